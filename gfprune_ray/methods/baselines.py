"""Baselines: random, weight magnitude and activation-aware fluctuation (FLAP / Wanda-sp style)."""

from __future__ import annotations

import torch

from ..models import UnitWeights
from ..stats import GramStats
from .common import output_energy, per_unit


def weights_per_unit(w: UnitWeights) -> int:
    """Weights that belong to one unit (its output columns and input rows, and its share of the
    key/value rows its K/V group shares): its MACs per token, apart from the attention-score term
    of heads."""
    return w.out.shape[0] * w.width + sum(weight.numel() for weight in w.ins + w.shared_ins) // w.units


def random_scores(w: UnitWeights, stats: GramStats, rng: torch.Generator, grads: GramStats | None = None) -> torch.Tensor:
    """A uniform random value per unit times the unit's weight count: random per MAC, so the
    global search keeps heads and neurons in proportion instead of dropping the dearer kind."""
    return torch.rand(w.units, generator=rng, dtype=torch.float64) * weights_per_unit(w)


def magnitude_scores(w: UnitWeights, stats: GramStats, rng: torch.Generator, grads: GramStats | None = None) -> torch.Tensor:
    """Squared L2 norm of all weights that belong to the unit (its input rows and output columns);
    a K/V head's rows count for each of the query heads that share it, split evenly."""
    units = w.units
    total = per_unit(w.out.to(torch.float64).pow(2).sum(0), w.width)
    for weight in w.ins:
        total = total + weight.to(torch.float64).pow(2).reshape(units, -1).sum(1)
    for weight in w.shared_ins:
        per_group = weight.to(torch.float64).pow(2).reshape(units // w.group, -1).sum(1)
        total = total + (per_group / w.group).repeat_interleave(w.group)
    return total


def fluctuation_scores(w: UnitWeights, stats: GramStats, rng: torch.Generator, grads: GramStats | None = None) -> torch.Tensor:
    """Variance of the unit's activation times the squared norm of its output columns.

    For a head the block version: trace(W_h^T W_h Cov_hh), the variance of the head's output;
    weighted by the loss curvature at the block output where it was collected, as gfp's D2."""
    return output_energy(w, stats, centered=True, grads=grads)
