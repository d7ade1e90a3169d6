"""Gradient-free pruning with unlabeled data (Nova, Dai and Schuurmans, ICML 2023).

Two signals per unit, both label-free:

- R2, representativeness, from kernelized convex masking (KCM). Each unit's output direction in
  the residual stream is a point; KCM finds nonnegative weights C with phi(X) ~ phi(X) C in the
  feature space of a Gaussian kernel. C_ii is how much point i has to stand in for itself: a unit
  that a mix of the others can replace gets a small C_ii.
- D2, data-driven magnitude: how much signal flows through the unit.

Exact formulas used here (DESIGN 4 leaves the combination to us; README "Methods" has the ablations):

  R2_u = mean over the unit's columns of C_ii, divided by its maximum in the layer, in (0, 1].
         (Dividing by the maximum rather than min-max keeps the least representative unit above 0,
         so its D2 still counts.)
  D2_u = E[(W_u x_u)^T G (W_u x_u)], the energy the unit adds to the block output weighted by
         the loss curvature G there (second moment, not centred: without reconstruction the
         mean is lost with the unit too). G = E[g g^T] of output gradients under targets sampled
         from the model itself (curvature.py), so no labels; without it (statistics collected
         before it existed), G = I, the plain energy E|W_u x_u|^2. The input moment is shrunk
         toward the layer's mean activity by ACTIVITY_PRIOR (common.output_energy says why).
  gfp  = R2_u * D2_u.

D2 in loss units (rather than the RMS activation standardised per layer) is what makes scores
comparable across layers and between heads and neurons: DESIGN 10 measured that per-layer
normalised scores collapse a global search, and DESIGN 11 that plain output energy misprices
early layers of decoders. `gfp-r2` and `gfp-d2` are the ablations.
"""

from __future__ import annotations

import torch

from ..models import UnitWeights
from ..stats import GramStats
from .common import output_energy

# On SmolLM2 this kernel is nearly the identity (its columns are 2 to 7 apart) and R2 flat; a
# bandwidth at each block's median distance made R2 vary there but cost perplexity on every
# corpus at 0.9 and 0.8 (README, "A scale-free kernel bandwidth"), so sigma stays fixed.
SIGMA = 1.0
# Weight of the layer-mean prior on each unit's activity in D2 (common.output_energy). Measured
# (README, "Quality on text it was not calibrated on"): calibrated on pydoc, 0.3 raised fidelity
# on Austen and license text by 0.003 to 0.02 for MiniLM and cut SmolLM2's perplexity ratio on
# Austen from 1.70 to 1.35 at budget 0.9, for 0.004 of in-domain fidelity.
ACTIVITY_PRIOR = 0.3
ALPHA = 0.01
MAX_ITERATIONS = 300
# KCM's updates cost n^3 multiply-adds for n points: 26 iterations on a 7B FFN's 11008 columns
# would be about 70 TFLOP per layer. Above KCM_BLOCK points, a seeded random partition splits them
# into near-equal blocks of at most KCM_BLOCK, each solved on its own, so the cost grows linearly
# with n: a point's self-weight then says how well a random share of the others stand in for it.
# Measured (README, "gfp, exactly"): the same heads and neurons kept and fidelity within 0.002 on
# three corpora for MiniLM and MPNet, whose scoring took 3.5x and 6x less time.
KCM_BLOCK = 1024
# Kernel entries below this are set to 0. SmolLM2's output columns are mostly 3 to 8 apart at
# sigma 1, so most of its kernel entries are tiny and the updates' products of them fall into
# float32's denormal range, where x86 arithmetic is much slower: its KCM took 26 s, 5 s with the
# floor, with the same C_ii on every site of SmolLM2, MiniLM and MPNet. The floor is far below
# float32's resolution next to K_ii = 1.
KERNEL_FLOOR = 1e-12
KCM_PARTITION_SEED = 0


def kcm_self_weights(
    points: torch.Tensor, sigma: float = SIGMA, alpha: float = ALPHA, max_iterations: int = MAX_ITERATIONS, block: int = KCM_BLOCK
) -> torch.Tensor:
    """Diagonal of the KCM weight matrix C for n points (rows of `points`), solved in blocks of
    at most `block` points when n exceeds it (see KCM_BLOCK)."""
    n = points.shape[0]
    if n <= block:
        return _kcm_diagonal(points, sigma, alpha, max_iterations)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(KCM_PARTITION_SEED))
    out = torch.empty(n, dtype=torch.float64)
    for part in torch.tensor_split(order, -(-n // block)):
        out[part] = _kcm_diagonal(points[part], sigma, alpha, max_iterations)
    return out


def _kcm_diagonal(points: torch.Tensor, sigma: float, alpha: float, max_iterations: int) -> torch.Tensor:
    """Multiplicative updates C <- C * sqrt(K / (K C)) from C = 1/n, until the relative change of C
    falls below alpha. They keep C nonnegative and decrease |phi(X) - phi(X) C|^2."""
    x = points.to(torch.float32)
    n = x.shape[0]
    sq = (x * x).sum(1)
    dist2 = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=0)
    kernel = torch.exp(-dist2 / sigma**2)
    kernel.masked_fill_(kernel < KERNEL_FLOOR, 0)
    c = torch.full((n, n), 1.0 / n)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(max_iterations):
        updated = c * torch.sqrt(kernel / (kernel @ c).clamp(min=tiny))
        change = torch.linalg.norm(updated - c) / torch.linalg.norm(c)
        c = updated
        if change < alpha:
            break
    return c.diagonal().to(torch.float64)


def representativeness(w: UnitWeights) -> torch.Tensor:
    """R2 per unit: KCM on the output columns, averaged within each unit, scaled to max 1."""
    per_column = kcm_self_weights(w.out.T)
    per_unit = per_column.reshape(-1, w.width).mean(1)
    return per_unit / per_unit.max().clamp(min=torch.finfo(torch.float64).tiny)


def gfp_scores(w: UnitWeights, stats: GramStats, rng: torch.Generator, grads: GramStats | None = None) -> torch.Tensor:
    return representativeness(w) * output_energy(w, stats, centered=False, grads=grads, prior=ACTIVITY_PRIOR)


def gfp_r2_scores(w: UnitWeights, stats: GramStats, rng: torch.Generator, grads: GramStats | None = None) -> torch.Tensor:
    """Ablation: R2 alone, put in the layer's currency by the layer's mean D2."""
    return representativeness(w) * output_energy(w, stats, centered=False, grads=grads, prior=ACTIVITY_PRIOR).mean()


def gfp_d2_scores(w: UnitWeights, stats: GramStats, rng: torch.Generator, grads: GramStats | None = None) -> torch.Tensor:
    """Ablation: D2 alone."""
    return output_energy(w, stats, centered=False, grads=grads, prior=ACTIVITY_PRIOR)
