"""LLM Surgeon (van der Ouderaa et al., ICLR 2024), structured: heads and FFN neurons removed by
Kronecker-factored curvature, with correlated weight updates, global allocation and several shots.

For one output projection y = W x + b (W is d x k, its columns grouped per unit) the curvature of
the loss in W is approximated by G (x) A, with A = E[x x^T] (augmented by a constant 1 when there
is a bias, so the bias can absorb the mean of what is removed) and G = E[g g^T] of the gradients
at y (`curvature.py`). With P = (A + damping)^-1, removing the columns C of one unit and moving
the other weights to the optimum of that quadratic is

    dW   = -W[:, C] (P_CC)^-1 P_(C,:)                    the correlated update (G drops out)
    cost = 1/2 tr(G W[:, C] (P_CC)^-1 W[:, C]^T)          the loss increase

For a neuron C is one column, cost = 1/2 w_c^T G w_c / P_cc; for a (query) head C is its block of
columns. The unit's rows in the input projections feed nothing once its output columns are gone,
so they go with it at no further cost (a K/V head once none of its query heads is left).

One shot: the costs of all remaining units of all layers, in one currency (loss), go to the core's
global search under the shot's MACs target, so llm-surgeon and gfp are compared at the same MACs.
Then, per layer, the units chosen go at once with the joint update (the formula above with C = all
removed columns). That update equals the core's `full` reconstruction with ridge = damping: both
are W_S + W_C A_CS (A_SS + damping)^-1 (the tests check it), and like `full` its damping is chosen
on held-out tokens, here by the G-weighted output error. Costs use a fixed damping (COST_DAMPING).

Several shots: each shot removes at most `step` of the dense model's prunable MACs (targets
1 - step, 1 - 2 step, ..., then the budget itself), and the curvature is collected again on the
partly pruned model before each shot. The steps do not depend on the budget, so the path to 0.8 is
the first part of the path to 0.5: a sweep runs the shots of its lowest budget, and every other
budget branches off with at most one shot of its own, with exactly the result it gets alone.
Everything here is a pure function of tensors; `pipeline.plan_llm_surgeon` and the farm run the
shots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..curvature import SiteCurvature
from ..choices import SURGEON, check_shot_step
from ..flops import prunable_macs
from ..models import BlockGeometry, UnitWeights
from ..models.layers import unit_rows
from ..reconstruct import LAMBDAS, Reconstruction, augmented_weight, input_moment, split_augmented, with_bias_column
from ..search import Masks, Site, global_search

NAME = SURGEON
COST_DAMPING = 0.01  # relative to the mean diagonal of A
GRID_DECIMALS = 9  # shot targets are compared at this precision


def damped(moment: torch.Tensor, damping: float, scale_cols: torch.Tensor, has_constant: bool) -> torch.Tensor:
    """A + damping * mean(diag A over scale_cols) on every coordinate but the constant one."""
    diag = moment.diagonal()
    scale = diag[scale_cols].mean().clamp(min=1e-300) if len(scale_cols) else torch.tensor(1.0, dtype=moment.dtype)
    ridge = torch.full_like(diag, damping) * scale
    if has_constant:
        ridge[-1] = 0
    return moment + torch.diag(ridge)


def unit_costs(weights: UnitWeights, curvature: SiteCurvature, damping: float = COST_DAMPING) -> torch.Tensor:
    """Loss increase of removing each unit alone (with the correlated update of the rest)."""
    has_bias = weights.bias is not None
    w = weights.out.to(torch.float64)
    k, width, units = w.shape[1], weights.width, weights.units
    moment = input_moment(curvature.inputs, has_bias)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped(moment, damping, torch.arange(k), has_bias)))
    idx = torch.arange(k).reshape(units, width)
    p_blocks = inverse[idx[:, :, None], idx[:, None, :]]  # units x width x width
    w_blocks = w.reshape(w.shape[0], units, width).permute(1, 0, 2)  # units x d x width
    g = curvature.grad.second_moment
    m_blocks = w_blocks.transpose(1, 2) @ g @ w_blocks  # W_C^T G W_C per unit
    return 0.5 * torch.linalg.solve(p_blocks, m_blocks).diagonal(dim1=1, dim2=2).sum(1).clamp(min=0)


def correlated_update(dense: torch.Tensor, remove: torch.Tensor, moment_damped: torch.Tensor) -> torch.Tensor:
    """dense - W_C (P_CC)^-1 P_(C,:) with P the inverse of the damped moment: the new weights of
    every column (the removed ones come out zero)."""
    factor = torch.linalg.cholesky(moment_damped)
    basis = torch.zeros(len(moment_damped), len(remove), dtype=moment_damped.dtype)
    basis[remove, torch.arange(len(remove))] = 1
    p_rows = torch.cholesky_solve(basis, factor).T  # P_(C,:)
    new = dense - dense[:, remove] @ torch.linalg.solve(p_rows[:, remove], p_rows)
    new[:, remove] = 0
    return new


def g_weighted_energy(weight: torch.Tensor, moment: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """tr(G W M W^T): the loss-weighted energy of the outputs W x."""
    return ((g @ weight @ moment) * weight).sum()


def g_weighted_error(dense: torch.Tensor, new: torch.Tensor, moment: torch.Tensor, g: torch.Tensor, dense_energy: torch.Tensor) -> float:
    """tr(G D M D^T) / tr(G W M W^T), D = dense - new: the loss-weighted output error, relative.
    The dense energy is the caller's, computed once for every candidate (half of the work)."""
    return float(g_weighted_energy(dense - new, moment, g) / dense_energy.clamp(min=1e-300))


def surgeon_update(weights: UnitWeights, keep_units: torch.Tensor, curvature: SiteCurvature) -> Reconstruction:
    """New weights of one layer's kept units after removing the others at once; the damping is
    the one of LAMBDAS (or no update) with the least G-weighted error on held-out tokens."""
    has_bias = weights.bias is not None
    dense = augmented_weight(weights.out, weights.bias)
    k = weights.out.shape[1]
    keep_cols = unit_rows(keep_units.nonzero().flatten(), weights.width)
    remove = unit_rows((~keep_units).nonzero().flatten(), weights.width)
    cols = with_bias_column(keep_cols, k, has_bias)
    g = curvature.grad.second_moment
    held = input_moment(curvature.heldout, has_bias)
    energy = g_weighted_energy(dense, held, g)
    fit_moment = input_moment(curvature.fit, has_bias)

    def fit(moment: torch.Tensor, lam: float) -> torch.Tensor:
        return correlated_update(dense, remove, damped(moment, lam, keep_cols, has_bias))

    unchanged = dense.clone()
    unchanged[:, remove] = 0
    none_error = g_weighted_error(dense, unchanged, held, g, energy)
    errors = {lam: g_weighted_error(dense, fit(fit_moment, lam), held, g, energy) for lam in LAMBDAS}
    best = min(errors, key=errors.get)
    if errors[best] >= none_error:  # no damping beats leaving the kept weights alone
        w, b = split_augmented(unchanged[:, cols], has_bias)
        return Reconstruction(w, b, None, none_error, none_error)
    w, b = split_augmented(fit(input_moment(curvature.inputs, has_bias), best)[:, cols], has_bias)
    return Reconstruction(w, b, best, errors[best], none_error)


def shot_targets(budget: float, step: float) -> list[float]:
    """Fractions of the dense model's prunable MACs kept after each shot: 1 - step, 1 - 2 step, ...
    while above the budget, then the budget. Grid points are rounded (0.7, not 0.7000000000000001)
    so that a budget on the grid and the grid point of a lower budget's path are the same target."""
    check_shot_step(step)
    targets = []
    while (target := round(1 - (len(targets) + 1) * step, GRID_DECIMALS)) > budget + 10**-GRID_DECIMALS:
        targets.append(target)
    return targets + [budget]


def step_for_shots(budget: float, shots: int) -> float:
    """The step that reaches `budget` in `shots` equal shots (the paper's T; the benchmarks' rows)."""
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    return (1 - budget) / shots if budget < 1 else 1.0


@dataclass
class SurgeonState:
    """Where a multi-shot run stands, relative to the dense model: the dense indices of the units
    each site still has, and the newest weights of every site that has lost units."""

    kept: dict[Site, torch.Tensor]
    weights: dict[Site, Reconstruction] = field(default_factory=dict)
    shots_done: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, summed over shots

    @classmethod
    def dense(cls, geoms: list[BlockGeometry]) -> SurgeonState:
        return cls({(i, k): torch.arange(g.count(k)) for i, g in enumerate(geoms) for k in ("attn", "ffn") if g.count(k)})

    def sites(self) -> list[Site]:
        """Sites that still have units."""
        return [site for site, kept in self.kept.items() if len(kept)]

    def masks(self, dense_geoms: list[BlockGeometry]) -> Masks:
        """The units kept so far, as masks over the dense model's units."""
        keep = {}
        for (i, kind), kept in self.kept.items():
            mask = torch.zeros(dense_geoms[i].count(kind), dtype=torch.bool)
            mask[kept] = True
            keep[(i, kind)] = mask
        return Masks(keep)

    def geometries(self, dense_geoms: list[BlockGeometry]) -> list[BlockGeometry]:
        """The geometry of the partly pruned model."""
        out, none = [], torch.zeros(0, dtype=torch.long)
        for i, g in enumerate(dense_geoms):
            heads = self.kept.get((i, "attn"), none) if g.units else none
            ffn = len(self.kept.get((i, "ffn"), ())) if g.ffn else 0
            out.append(BlockGeometry(g.d, len(heads), _heads_per_group(heads, g.heads_per_unit), g.head_dim, ffn, g.gated))
        return out

    def site_weights(self, site: Site, dense: UnitWeights) -> UnitWeights:
        """The site's weights in the partly pruned model, from its dense weights."""
        kept = self.kept[site]
        rec = self.weights.get(site)
        if rec is not None:
            out, bias = rec.weight, rec.bias
        else:
            out, bias = dense.out[:, unit_rows(kept, dense.width)], dense.bias
        ins = [w.reshape(dense.units, -1, w.shape[-1])[kept].reshape(-1, w.shape[-1]) for w in dense.ins]
        groups = torch.unique(kept // dense.group)
        shared = [w.reshape(dense.units // dense.group, -1, w.shape[-1])[groups].reshape(-1, w.shape[-1]) for w in dense.shared_ins]
        return UnitWeights(out=out, bias=bias, ins=ins, width=dense.width, shared_ins=shared, group=_heads_per_group(kept, dense.group))

    def advance(self, local: Masks, updates: dict[Site, Reconstruction], timings: dict[str, float]) -> SurgeonState:
        """The state after a shot that kept `local` (masks over the current units) with `updates`;
        the shot's `timings` are added to the running totals."""
        kept = {site: (idx[local.keep[site]] if site in local.keep else idx) for site, idx in self.kept.items()}
        totals = {k: self.timings.get(k, 0.0) + timings.get(k, 0.0) for k in self.timings.keys() | timings.keys()}
        return SurgeonState(kept, self.weights | updates, self.shots_done + 1, totals)


def _heads_per_group(heads: torch.Tensor, group: int) -> int:
    """Query heads per kept K/V group, for the dense indices `heads` of a legal structure (the
    dense model's group size where nothing is kept)."""
    return len(heads) // len(torch.unique(heads // group)) if len(heads) else group


def shot_masks(costs: dict[Site, torch.Tensor], state: SurgeonState, dense_geoms: list[BlockGeometry], target: float, seq_len: float) -> Masks:
    """Which of the current units to keep so that `target` of the dense prunable MACs remains."""
    geoms = state.geometries(dense_geoms)
    budget = min(1.0, target * prunable_macs(dense_geoms, seq_len) / prunable_macs(geoms, seq_len))
    return global_search(costs, geoms, budget, seq_len)
