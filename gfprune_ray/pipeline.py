"""The single-model pipeline: statistics -> scores -> masks -> weights -> pruned model.

Each stage is a plain function of tensors and statistics, free of I/O and of Ray, so that the farm
can run the same functions as Ray tasks (one per layer, per budget) and get the same result.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .data import heldout_flags
from .flops import check_budget
from .methods import get_method
from .models import Adapter
from .reconstruct import MODES, Reconstruction, reconstruct
from .search import SEARCHES, Masks, Site
from .stats import ModelStats, collect_split


@dataclass
class Calibration:
    """Statistics of the calibration data: `fit` to fit weights, `heldout` to choose their ridge."""

    fit: ModelStats
    heldout: ModelStats
    seq_len: float  # mean tokens per sequence: the s of the FLOPs model

    @property
    def total(self) -> ModelStats:
        return self.fit + self.heldout


def heldout_rows(total: int) -> torch.Tensor:
    """`data.heldout_flags` as a boolean tensor."""
    return torch.tensor(heldout_flags(total), dtype=torch.bool)


def mark_heldout(batches: list[dict]) -> list[dict]:
    """The batches with a per-row `heldout` flag, ready for `collect_split`."""
    held = heldout_rows(sum(len(b["input_ids"]) for b in batches))
    out, offset = [], 0
    for batch in batches:
        n = len(batch["input_ids"])
        out.append(batch | {"heldout": held[offset : offset + n]})
        offset += n
    return out


def calibrate(adapter: Adapter, batches: list[dict], seq_len: float, on_batch: Callable[[int], None] | None = None) -> Calibration:
    fit, heldout = collect_split(adapter, mark_heldout(batches), on_batch)
    return Calibration(fit, heldout, seq_len)


def site_generator(seed: int, site: Site) -> torch.Generator:
    """A generator per site, so results do not depend on the order in which sites are scored."""
    layer, kind = site
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{layer}/{kind}".encode()))


def score_sites(adapter: Adapter, stats: ModelStats, method: str, seed: int = 0) -> dict[Site, torch.Tensor]:
    score = get_method(method)
    return {site: score(adapter.unit_weights(*site), stats[site], site_generator(seed, site)) for site in stats.sites}


def search_masks(scores: dict[Site, torch.Tensor], adapter: Adapter, budget: float, seq_len: float, allocation: str = "global") -> Masks:
    if allocation not in SEARCHES:
        raise ValueError(f"unknown allocation {allocation!r}; choose one of: {', '.join(SEARCHES)}")
    return SEARCHES[allocation](scores, adapter.geometries(), check_budget(budget), seq_len)


def reconstruct_sites(adapter: Adapter, masks: Masks, calibration: Calibration, mode: str) -> dict[Site, Reconstruction]:
    if mode not in MODES:
        raise ValueError(f"unknown reconstruction {mode!r}; choose one of: {', '.join(MODES)}")
    out = {}
    for site, mask in masks.keep.items():
        if bool(mask.all()):
            continue  # nothing removed here: the dense weights are already the best fit
        w = adapter.unit_weights(*site)
        out[site] = reconstruct(mode, w.out, w.bias, mask.nonzero().flatten(), w.width, calibration.fit[site], calibration.heldout[site])
    return out


@dataclass
class PruneResult:
    masks: Masks
    weights: dict[Site, Reconstruction]
    budget: float
    kept_fraction: float  # prunable MACs kept, analytic
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        errors = [r.heldout_error for r in self.weights.values()]
        errors_none = [r.heldout_error_none for r in self.weights.values()]
        return {
            "kept_prunable_macs": self.kept_fraction,
            "heads_kept": sum(int(m.sum()) for (_, k), m in self.masks.keep.items() if k == "attn"),
            "neurons_kept": sum(int(m.sum()) for (_, k), m in self.masks.keep.items() if k == "ffn"),
            "mean_block_error": sum(errors) / len(errors) if errors else 0.0,
            "mean_block_error_none": sum(errors_none) / len(errors_none) if errors_none else 0.0,
        }


def plan(
    adapter: Adapter,
    calibration: Calibration,
    budget: float,
    method: str = "gfp",
    reconstruction: str = "full",
    allocation: str = "global",
    seed: int = 0,
    scores: dict[Site, torch.Tensor] | None = None,
) -> PruneResult:
    """Scores, masks and new weights for one budget; the model is not touched."""
    timings = {}
    start = time.perf_counter()
    if scores is None:
        scores = score_sites(adapter, calibration.total, method, seed)
    timings["score_s"] = time.perf_counter() - start
    start = time.perf_counter()
    masks = search_masks(scores, adapter, budget, calibration.seq_len, allocation)
    timings["search_s"] = time.perf_counter() - start
    start = time.perf_counter()
    weights = reconstruct_sites(adapter, masks, calibration, reconstruction)
    timings["reconstruct_s"] = time.perf_counter() - start
    kept = masks.kept_fraction(adapter.geometries(), calibration.seq_len)
    return PruneResult(masks, weights, budget, kept, timings)
