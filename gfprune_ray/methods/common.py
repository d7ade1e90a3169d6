"""Small tensor helpers shared by the scoring methods."""

from __future__ import annotations

import torch

from ..models import UnitWeights
from ..stats import GramStats


def per_unit(values: torch.Tensor, width: int) -> torch.Tensor:
    """Sum per-column values over the `width` consecutive columns of each unit."""
    return values.reshape(-1, width).sum(1)


def output_energy(w: UnitWeights, stats: GramStats, centered: bool, grads: GramStats | None = None, prior: float = 0.0) -> torch.Tensor:
    """E |W_u x_u|^2 per unit: what flows through the unit into the residual stream, or with the
    loss curvature at the block output, E[(W_u x_u)^T G (W_u x_u)] (G = E[g g^T] of the output
    gradients, `grads`): twice the loss increase that removing the unit alone causes, to second
    order, under the Kronecker factorization G (x) E[x x^T] that LLM Surgeon uses.

    For a unit spanning columns u this is trace(W_u^T G W_u M_uu) with M the second moment of the
    inputs (or their covariance when `centered`, for methods that assume the mean is absorbed by
    the bias) and G = I without `grads`.

    `prior` in [0, 1) shrinks M toward the layer's mean activity, (1 - prior) M + prior mean(diag M) I:
    the calibration text measures each unit's activity on one domain only, and a unit idle there
    (narrative English is rare in documentation) may be busy on the user's text. With the prior
    every unit is partly assumed as active as its layer's average, which prices it by its
    weights in the loss metric, tr(W_u^T G W_u), the domain-free part of the estimate.

    Why the curvature: plain energy prices every layer's output alike, but a unit of an early
    layer moves the loss far more per unit of energy than one of a late layer (its change passes
    through every later block and norm). On SmolLM2 energy ranking removed all attention of
    layer 0 at budget 0.9 and multiplied perplexity by 6; with G it is 1.07 (README).
    """
    # only the unit blocks of M (and its diagonal) are used: they are read from the Gram matrix
    # directly, never a k x k copy of it (1 GB for an 11008-wide FFN)
    n = stats.n.clamp(min=1)
    out = w.out.to(torch.float64)
    units, width = w.units, w.width
    blocks_w = out.reshape(out.shape[0], units, width).permute(1, 0, 2)  # units x d x width
    idx = torch.arange(units * width).reshape(units, width)
    blocks_m = stats.gram[idx[:, :, None], idx[:, None, :]] / n  # units x width x width
    diagonal = stats.gram.diagonal() / n
    if centered:
        mean = stats.mean
        blocks_m = blocks_m - mean[idx][:, :, None] * mean[idx][:, None, :]
        diagonal = diagonal - mean * mean
    if prior:  # shrink the unit blocks toward the layer's mean activity
        blocks_m = (1 - prior) * blocks_m + prior * diagonal.mean() * torch.eye(width, dtype=blocks_m.dtype)
    if grads is None:
        gram_w = blocks_w.transpose(1, 2) @ blocks_w  # units x width x width
    else:
        curved = (grads.second_moment @ out).reshape(out.shape[0], units, width).permute(1, 0, 2)
        gram_w = blocks_w.transpose(1, 2) @ curved  # W_u^T G W_u
    return (gram_w * blocks_m).sum((1, 2)).clamp(min=0)
