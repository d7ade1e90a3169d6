"""Small tensor helpers shared by the scoring methods."""

from __future__ import annotations

import torch

from ..models import UnitWeights
from ..stats import GramStats


def per_unit(values: torch.Tensor, width: int) -> torch.Tensor:
    """Sum per-column values over the `width` consecutive columns of each unit."""
    return values.reshape(-1, width).sum(1)


def output_energy(w: UnitWeights, stats: GramStats, centered: bool) -> torch.Tensor:
    """E |W_u x_u|^2 per unit: what flows through the unit into the residual stream.

    For a unit spanning columns u this is trace(W_u^T W_u M_uu) with M the second moment of the
    inputs (or their covariance when `centered`, for methods that assume the mean is absorbed by
    the bias).
    """
    moment = stats.second_moment
    if centered:
        mean = stats.mean
        moment = moment - torch.outer(mean, mean)
    out = w.out.to(torch.float64)
    units, width = w.units, w.width
    blocks_w = out.reshape(out.shape[0], units, width).permute(1, 0, 2)  # units x d x width
    idx = torch.arange(units * width).reshape(units, width)
    blocks_m = moment[idx[:, :, None], idx[:, None, :]]  # units x width x width
    gram_w = blocks_w.transpose(1, 2) @ blocks_w  # units x width x width
    return (gram_w * blocks_m).sum((1, 2)).clamp(min=0)
