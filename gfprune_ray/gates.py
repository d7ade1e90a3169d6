"""Hard-concrete gates and the Lagrangian that steers their expected cost to a budget.

The machinery CoFi and FLOP share (Louizos, Welling and Kingma 2018; Wang et al. 2020). A gate
z in [0, 1] is a stretched, clipped binary concrete variable with a learned location log_alpha:

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  z = clip(s (r - l) + l, 0, 1)

Stretching to (l, r) = (-0.1, 1.1) and clipping puts real probability mass on exactly 0 and 1, so
P(z != 0) = sigmoid(log_alpha - beta log(-l / r)) is a differentiable expected L0 norm. Costs are
sums of products of independent gates (a head costs only while its layer's attention block is on),
so their expectations are products of these probabilities: `expected` costs are exact, not
estimates, which the Monte-Carlo test checks.

The budget is held by a Lagrangian lambda1 (E[cost] - target) + lambda2 (E[cost] - target)^2.
The weights and gates minimize it, the multipliers maximize it (gradient ascent), so any gap
between the expected cost and the target grows its own penalty until the gap closes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BETA = 2 / 3
LIMIT_L, LIMIT_R = -0.1, 1.1
# log_alpha at which a gate starts: P(z != 0) = 0.99 and most draws are exactly 1, so training
# starts from the dense model and gates must earn their way down
INIT_LOG_ALPHA = 3.0
_EPS = 1e-6


class HardConcreteGates(nn.Module):
    """`n` independent hard-concrete gates."""

    def __init__(self, n: int, init_log_alpha: float = INIT_LOG_ALPHA):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full((n,), float(init_log_alpha)))

    def __len__(self) -> int:
        return self.log_alpha.numel()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw of every gate, differentiable in log_alpha (the reparameterization trick)."""
        u = torch.rand(self.log_alpha.shape, generator=generator).to(self.log_alpha.device)
        u = u.clamp(_EPS, 1 - _EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / BETA)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)

    def keep_probability(self) -> torch.Tensor:
        """P(z != 0) per gate: the expected L0 norm, differentiable."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))

    def soft(self) -> torch.Tensor:
        """CoFi's deterministic value of a kept gate: sigmoid(0.8 log_alpha / beta)."""
        return torch.sigmoid(0.8 * self.log_alpha / BETA)

    def deterministic(self, keep: int | None = None) -> torch.Tensor:
        """The gates at the end of training, as CoFi's code sets them: keep as many gates as the
        expected L0 norm says (rounded; or `keep`), those with the largest log_alpha, at their
        `soft` value; the rest are 0 (removed). Counting by the expected L0 makes the deployed size
        follow the quantity that the Lagrangian actually controls."""
        if keep is None:
            keep = int(round(self.keep_probability().sum().item()))
        mask = torch.zeros_like(self.log_alpha)
        mask[torch.topk(self.log_alpha, min(keep, len(self))).indices] = 1.0
        return self.soft() * mask


class Lagrangian(nn.Module):
    """lambda1 (cost - target) + lambda2 (cost - target)^2, multipliers trained by gradient ascent."""

    def __init__(self):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))

    def forward(self, cost: torch.Tensor, target: float) -> torch.Tensor:
        gap = cost - target
        return self.lambda1 * gap + self.lambda2 * gap * gap


def target_at(step: int, steps: int, budget: float, warmup: float = 0.5, start: float = 1.0) -> float:
    """The kept fraction asked for at `step`: from `start` (the expected cost of the gates as
    initialised) down to `budget` over the first `warmup` of training, then held. A sudden target
    would make the multipliers jump and wreck the weights."""
    ramp = max(1, round(steps * warmup))
    return start - (start - budget) * min(1.0, (step + 1) / ramp)
