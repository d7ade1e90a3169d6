"""New weights for the kept units, in closed form from the collected statistics (DESIGN 6).

A site's output projection computes y = W x + b. After pruning only the kept columns S of W see
input. Every mode returns (W', b') for those columns; none needs another pass over data:

- full:  least squares fit of the dense output, ridged toward the original kept weights,
         W'_S = (W G[:, S] + lam W_S) (G[S, S] + lam I)^-1, with the input augmented by a constant 1
         when the layer has a bias, so that b' absorbs the mean of the removed units (the bias is
         not ridged). lam is relative to the mean diagonal of G[S, S] and picked on held-out tokens.
- scale: one scalar per kept unit (Kwon et al. 2022), ridged toward 1, rejected (all ones) if any
         leaves [-10, 10].
- none:  W'_S = W_S, b' = b.

G here is the second moment E[x x^T] (the Gram matrix divided by n).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .choices import RECONSTRUCTIONS
from .models.layers import unit_rows
from .stats import GramStats

MODES = RECONSTRUCTIONS
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
MAX_SCALE = 10.0


@dataclass
class Reconstruction:
    weight: torch.Tensor  # d x |S|
    bias: torch.Tensor | None
    lam: float | None  # the ridge chosen on held-out tokens (None where there is no choice)
    # E|y - y'|^2 / E|y|^2 on held-out tokens of the weights fitted without them (the weights
    # returned are refit on all calibration tokens with the chosen ridge)
    heldout_error: float
    heldout_error_none: float  # the same error without reconstruction

    def in_dtype(self, dtype: torch.dtype) -> Reconstruction:
        """The weights rounded to the model's dtype, as surgery writes them: the rounding is the
        same now or then, and until surgery every site's weights wait in memory (float64, a 7B
        model's 32 layers would hold 11 GB; bfloat16 a quarter of it)."""
        bias = None if self.bias is None else self.bias.to(dtype)
        return replace(self, weight=self.weight.to(dtype), bias=bias)


def input_moment(stats: GramStats, with_constant: bool) -> torch.Tensor:
    """E[x x^T], augmented with the constant input 1 as the last coordinate when asked."""
    moment = stats.second_moment
    if not with_constant:
        return moment
    mean = stats.mean
    top = torch.cat([moment, mean[:, None]], 1)
    bottom = torch.cat([mean, torch.ones(1, dtype=mean.dtype)])[None, :]
    return torch.cat([top, bottom], 0)


def augmented_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    w = weight.to(torch.float64)
    return w if bias is None else torch.cat([w, bias.to(torch.float64)[:, None]], 1)


def relative_error(dense: torch.Tensor, pruned: torch.Tensor, moment: torch.Tensor) -> float:
    """E|(dense - pruned) x|^2 / E|dense x|^2 for (augmented) weight matrices over the full input."""
    delta = dense - pruned
    energy = ((dense @ moment) * dense).sum()
    return float(((delta @ moment) * delta).sum() / energy.clamp(min=1e-300))


def with_bias_column(cols: torch.Tensor, inputs: int, has_bias: bool) -> torch.Tensor:
    """Kept columns of the augmented [W, b] layout: the kept inputs, plus the bias column."""
    return torch.cat([cols, torch.tensor([inputs])]) if has_bias else cols


class GramRows(Protocol):
    """Statistics read in one pass over the Gram's rows: a GramStats, or a stored site streamed
    from disk (`stats_store.StreamedGram`), which never holds its Gram whole."""

    n: torch.Tensor
    total: torch.Tensor

    @property
    def mean(self) -> torch.Tensor: ...

    def row_blocks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]: ...


Stats = GramStats | Callable[[], GramStats]
RowStats = GramRows | Callable[[], GramRows]
# modes that need each Gram whole; the others pass over its rows once (and may get GramRows)
WHOLE_GRAM_MODES = ("scale",)


def _read(stats: Stats | RowStats) -> GramStats | GramRows:
    return stats() if callable(stats) else stats


CROSS_ROWS = 512


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) without the elementwise product as a temporary."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _gram_pass(
    stats: GramRows, inner: torch.Tensor, weight: torch.Tensor | None = None, moment: bool = True, extra: int = 0
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """One pass over the rows of the Gram G of `stats`, CROSS_ROWS at a time, for the kept inputs S
    (`inner`): G[S, S] when `moment` (in the top left of a buffer `extra` rows and columns
    larger), and given W, (W G)[:, S] and sum((W G) * W). Neither G (1 GB for a 7B FFN site,
    streamed from disk when stored) nor the d x k product W G is ever whole. G is symmetric, so
    its block of rows R gives (W G)[:, R] = W G[R, :]^T."""
    position = torch.full((stats.total.shape[0],), -1, dtype=torch.long)
    position[inner] = torch.arange(len(inner))
    size = len(inner) + extra
    m_ss = torch.empty(size, size, dtype=torch.float64) if moment else None
    cross = None if weight is None else torch.empty(weight.shape[0], len(inner), dtype=torch.float64)
    energy = torch.zeros((), dtype=torch.float64)
    for start, block in stats.row_blocks(CROSS_ROWS):
        local = position[start : start + block.shape[0]]
        chosen = (local >= 0).nonzero().flatten()
        if m_ss is not None:
            m_ss[local[chosen], : len(inner)] = block.index_select(0, chosen).index_select(1, inner)
        if weight is not None:
            product = weight @ block.mT
            energy += _inner(product, weight[:, start : start + block.shape[0]])
            cross[:, local[chosen]] = product[:, chosen]
    return m_ss, cross, energy


def _to_moment_(m_ss: torch.Tensor, n: torch.Tensor, mean_s: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """G[S, S] (top left of `m_ss`) becomes M[S, S] = G[S, S] / n in place, augmented by the
    constant input 1 when the layer has a bias: M_aug = [[M, mu_S], [mu_S^T, 1]]."""
    size = len(mean_s)
    m_ss[:size, :size] /= n
    if has_bias:
        m_ss[:size, size] = m_ss[size, :size] = mean_s
        m_ss[size, size] = 1.0
    return m_ss


def _moment(stats: GramRows, inner: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """M[S, S] of `stats` in a new tensor (augmented as `_to_moment_`), from one pass over its Gram."""
    m_ss = _gram_pass(stats, inner, extra=int(has_bias))[0]
    return _to_moment_(m_ss, stats.n.clamp(min=1), stats.mean[inner], has_bias)


class _Quadratic:
    """E|D x - K x_S|^2 as a function of the kept weights K, for one input moment M = E[x x^T].

    Holds D M[:, S], so each candidate costs d |S|^2, not d k^2, and M[S, S] where the error is
    evaluated (`relative_error`). A quadratic that is only solved (`ridge_fit`) reads M[S, S] from
    its statistics again for each solve, which factors it in place anyway: holding it as well
    would add |S|^2 floats (0.9 GB for a 7B FFN site that keeps most of its 11008 neurons). Built
    without copying the Gram matrix whole (`of`)."""

    def __init__(self, dense_s: torch.Tensor, dm_s: torch.Tensor, m_ss: torch.Tensor | None, energy: torch.Tensor, tokens: float,
                 read_moment: Callable[[], torch.Tensor] | None = None):
        self.dense_s, self.dm_s, self.m_ss, self.energy, self.tokens = dense_s, dm_s, m_ss, energy, tokens
        self.read_moment = read_moment
        self.mixed: tuple[_Quadratic, float] | None = None  # a mix not yet applied to the M[S, S] read again

    @classmethod
    def of(cls, dense: torch.Tensor, stats: RowStats, cols: torch.Tensor, has_bias: bool, dense_s: torch.Tensor | None = None,
           hold_moment: bool = True) -> _Quadratic:
        """For M = E[x x^T] of `stats` (or of what the reader `stats` returns), augmented by the
        constant input 1 (last of `cols`, last column of `dense`) when the layer has a bias. Only
        M[S, S] (unless not `hold_moment`) and W M[:, S] are formed, in one pass over the Gram's rows."""
        source, stats = stats, _read(stats)
        n, mean = stats.n.clamp(min=1), stats.mean
        inner = cols[:-1] if has_bias else cols
        weight = dense[:, :-1] if has_bias else dense
        m_ss, dm_s, energy = _gram_pass(stats, inner, weight, moment=hold_moment, extra=int(has_bias))
        dm_s /= n
        energy /= n
        tokens = float(stats.n)
        del stats
        if has_bias:  # M_aug = [[M, mu], [mu^T, 1]], so W_aug M_aug = [W M + b mu^T, W mu + b]
            bias = dense[:, -1]
            last = weight @ mean + bias
            energy += 2 * (bias * (weight @ mean)).sum() + (bias * bias).sum()
            dm_s += bias[:, None] * mean[inner][None, :]
            dm_s = torch.cat([dm_s, last[:, None]], 1)
        if m_ss is not None:
            _to_moment_(m_ss, n, mean[inner], has_bias)
        read_moment = None if hold_moment else lambda: _moment(_read(source), inner, has_bias)
        return cls(dense[:, cols] if dense_s is None else dense_s, dm_s, m_ss, energy.clamp(min=1e-300), tokens, read_moment)

    def moment(self) -> torch.Tensor:
        """M[S, S] in a new tensor (a solve's system)."""
        if self.m_ss is not None:
            return self.m_ss.clone()
        m_ss = self.read_moment()
        if self.mixed is not None:
            other, share = self.mixed
            m_ss.mul_(1 - share).add_(other.m_ss, alpha=share)
        return m_ss

    def mix_(self, other: _Quadratic, share: float) -> _Quadratic:
        """This quadratic becomes that of (1 - share) M + share M_other (in place: M is linear;
        applied as M[S, S] is read again where it is not held)."""
        self.dm_s.mul_(1 - share).add_(other.dm_s, alpha=share)
        if self.m_ss is not None:
            self.m_ss.mul_(1 - share).add_(other.m_ss, alpha=share)
        else:
            self.mixed = (other, share)
        self.energy = self.energy * (1 - share) + other.energy * share
        return self

    def relative_error(self, kept: torch.Tensor) -> float:
        cross = _inner(kept, self.dm_s)
        # K M K^T's trace a block of K's rows at a time: K M whole is d x |S| (0.3 GB for a 7B FFN)
        quadratic = sum(_inner(kept[i : i + CROSS_ROWS] @ self.m_ss, kept[i : i + CROSS_ROWS]) for i in range(0, len(kept), CROSS_ROWS))
        return float((self.energy - 2 * cross + quadratic) / self.energy)

    def ridge_fit(self, lam: float, ridged: torch.Tensor) -> torch.Tensor:
        """(W M[:, S] + W_S Lam) (M[S, S] + Lam)^-1 with Lam = lam * mean diag(M[S, S]) on ridged columns.

        Solved by a Cholesky factorisation and two triangular solves, all in place: a general
        solve copies both the system and the right-hand side (1 GB more for a 7B FFN site)."""
        system = self.moment()
        diag = system.diagonal()
        scale = diag[ridged].mean() if ridged.any() else torch.tensor(1.0, dtype=diag.dtype)
        ridge = ridged.to(diag.dtype) * lam * scale
        system.diagonal().add_(ridge)
        rhs = self.dense_s * ridge[None, :]
        rhs += self.dm_s
        # the system is symmetric, so its transpose is the same matrix in the column-major layout
        # LAPACK factors in place; rhs.T is the |S| x d right-hand side, column-major as well
        factor, info = system.mT, torch.empty((), dtype=torch.int32)
        torch.linalg.cholesky_ex(factor, out=(factor, info))
        if info.item() != 0:  # not positive definite to working precision (no ridge on a singular M)
            del factor, system
            system = self.moment()
            system.diagonal().add_(ridge)
            return torch.linalg.solve(system, rhs.T).T
        solution = rhs.T
        torch.linalg.solve_triangular(factor, solution, upper=False, out=solution)
        torch.linalg.solve_triangular(factor.mT, solution, upper=True, out=solution)
        return rhs


def split_augmented(augmented: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (augmented[:, :-1], augmented[:, -1]) if has_bias else (augmented, None)


def reconstruct_full(weight, bias, keep_cols, fit: RowStats, heldout: RowStats) -> Reconstruction:
    has_bias = bias is not None
    dense = augmented_weight(weight, bias)
    cols = with_bias_column(keep_cols, weight.shape[1], has_bias)
    ridged = torch.ones(len(cols), dtype=torch.bool)
    if has_bias:
        ridged[-1] = False
    # each Gram is read (when given as a reader) by rows, the held-out one once, while its
    # quadratic is formed; the fit is only solved, so its M[S, S] is read again for each solve
    on_fit = _Quadratic.of(dense, fit, cols, has_bias, hold_moment=False)
    on_heldout = _Quadratic.of(dense, heldout, cols, has_bias, dense_s=on_fit.dense_s)
    del dense
    errors = {lam: on_heldout.relative_error(on_fit.ridge_fit(lam, ridged)) for lam in LAMBDAS}
    best = min(errors, key=errors.get)
    none_error = on_heldout.relative_error(on_fit.dense_s)
    if errors[best] >= none_error:  # no ridge beats the original weights on held-out tokens
        return Reconstruction(weight[:, keep_cols].to(torch.float64), bias, None, none_error, none_error)
    # all calibration tokens: the moment of fit + held-out is the token-weighted mix of the two
    share = on_heldout.tokens / max(on_fit.tokens + on_heldout.tokens, 1.0)
    refit = on_fit.mix_(on_heldout, share).ridge_fit(best, ridged)
    w, b = split_augmented(refit, has_bias)
    return Reconstruction(w, b, best, errors[best], none_error)


def _unit_scale_system(weight: torch.Tensor, moment: torch.Tensor, width: int) -> torch.Tensor:
    """M_uv = E[(W_u x_u) . (W_v x_v)] for all unit pairs: trace blocks of (W^T W) * E[x x^T]."""
    per_column = (weight.T @ weight) * moment
    units = weight.shape[1] // width
    return per_column.reshape(units, width, units, width).sum((1, 3))


def reconstruct_scale(weight, bias, keep_units, width, fit: Stats, heldout: Stats) -> Reconstruction:
    fit, heldout = _read(fit), _read(heldout)
    w = weight.to(torch.float64)
    cols = unit_rows(keep_units, width)
    dense = augmented_weight(weight, bias)
    on_heldout = _Quadratic.of(dense, heldout, with_bias_column(cols, w.shape[1], bias is not None), bias is not None)
    bias_column = dense[:, w.shape[1] :]  # empty without a bias; scaling leaves the bias alone

    def error(scales: torch.Tensor) -> float:
        return on_heldout.relative_error(torch.cat([w[:, cols] * scales.repeat_interleave(width)[None, :], bias_column], 1))

    def solve(stats: GramStats, lam: float) -> torch.Tensor:
        system = _unit_scale_system(w, stats.second_moment, width)
        block = system[keep_units][:, keep_units]
        ridge = lam * block.diagonal().mean().clamp(min=1e-300)
        rhs = system[keep_units].sum(1) + ridge
        return torch.linalg.solve(block + ridge * torch.eye(len(keep_units), dtype=block.dtype), rhs)

    ones = torch.ones(len(keep_units), dtype=torch.float64)
    none_error = error(ones)
    if len(keep_units) == 0:
        return Reconstruction(w[:, cols], bias, None, none_error, none_error)
    errors = {lam: error(solve(fit, lam)) for lam in LAMBDAS}
    best = min(errors, key=errors.get)
    scales = solve(fit + heldout, best)
    if scales.abs().max() > MAX_SCALE or errors[best] >= none_error:  # keeping the weights is better
        return Reconstruction(w[:, cols], bias, None, none_error, none_error)
    return Reconstruction(w[:, cols] * scales.repeat_interleave(width)[None, :], bias, best, errors[best], none_error)


def reconstruct(
    mode: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    keep_units: torch.Tensor,
    width: int,
    fit: Stats | RowStats,
    heldout: Stats | RowStats,
) -> Reconstruction:
    """New output-projection weights for the kept units of one site. `fit` and `heldout` are the
    site's statistics, or functions that read them: a 7B model's FFN site has two 1 GB Grams,
    which are then never in memory together (and never whole, when read by rows: GramRows,
    for every mode but WHOLE_GRAM_MODES)."""
    keep_units = torch.as_tensor(keep_units, dtype=torch.long).sort().values
    cols = unit_rows(keep_units, width)
    if mode == "full":
        return reconstruct_full(weight, bias, cols, fit, heldout)
    if mode == "scale":
        return reconstruct_scale(weight, bias, keep_units, width, fit, heldout)
    if mode == "none":
        dense = augmented_weight(weight, bias)
        kept = with_bias_column(cols, weight.shape[1], bias is not None)
        error = _Quadratic.of(dense, heldout, kept, bias is not None).relative_error(dense[:, kept])
        return Reconstruction(weight[:, cols].to(torch.float64), bias, None, error, error)
    raise ValueError(f"unknown reconstruction {mode!r}; choose one of: {', '.join(MODES)}")
