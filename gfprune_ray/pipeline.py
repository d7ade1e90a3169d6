"""The single-model pipeline: statistics -> scores -> masks -> weights -> pruned model.

Each stage is a plain function of tensors and statistics, free of I/O and of Ray, so that the farm
can run the same functions as Ray tasks (one per layer, per budget) and get the same result.
"""

from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .choices import SHOT_STEP, check_budget
from .curvature import Curvature, collect_curvature
from .data import heldout_flags
from .memory import release_memory
from .methods import get_method, surgeon
from .models import Adapter, adapter_for
from .reconstruct import MODES, WHOLE_GRAM_MODES, Reconstruction, reconstruct
from .search import SEARCHES, Masks, Site
from .stats import ModelStats, SiteSums
from .stats_store import site_reader
from .surgery import apply_pruning


@dataclass
class Calibration:
    """Statistics of the calibration data: `fit` to fit weights, `heldout` to choose their ridge,
    `grads` (the loss curvature at each block output, E[g g^T]) to price units in loss units."""

    fit: ModelStats
    heldout: ModelStats
    seq_len: float  # mean tokens per sequence: the s of the FLOPs model
    grads: ModelStats

    @property
    def total(self) -> ModelStats:
        """fit + held-out, added site by site as each is used."""
        return ModelStats(SiteSums(self.fit.sites, self.heldout.sites), self.fit.fingerprint, self.fit.meta)


def heldout_rows(total: int) -> torch.Tensor:
    """`data.heldout_flags` as a boolean tensor."""
    return torch.tensor(heldout_flags(total), dtype=torch.bool)


def mark_heldout(batches: list[dict]) -> list[dict]:
    """The batches with a per-row `heldout` flag, ready for `collect_curvature` (or `collect_split`)."""
    held = heldout_rows(sum(len(b["input_ids"]) for b in batches))
    out, offset = [], 0
    for batch in batches:
        n = len(batch["input_ids"])
        out.append(batch | {"heldout": held[offset : offset + n]})
        offset += n
    return out


def calibrate(adapter: Adapter, batches: list[dict], seq_len: float, on_batch: Callable[[int], None] | None = None, seed: int = 0) -> Calibration:
    """Input statistics and output curvature of every site: one forward and one backward pass
    (activations only) per batch, targets sampled from the model itself (`curvature.py`)."""
    curvature = collect_curvature(adapter, mark_heldout(batches), seed, on_batch)
    return Calibration(curvature.fit, curvature.heldout, seq_len, curvature.grads)


def site_generator(seed: int, site: Site) -> torch.Generator:
    """A generator per site, so results do not depend on the order in which sites are scored."""
    layer, kind = site
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{layer}/{kind}".encode()))


def score_sites(adapter: Adapter, stats: ModelStats, method: str, seed: int = 0, grads: ModelStats | None = None) -> dict[Site, torch.Tensor]:
    """Scores of every site's units; with `grads` the activation-aware methods are in loss units."""
    score = get_method(method)
    return {
        site: score(adapter.unit_weights(*site), stats[site], site_generator(seed, site), grads=None if grads is None else grads[site])
        for site in stats.sites
    }


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
        # readers, not values: statistics stored on disk are read one Gram at a time, and streamed
        # by rows where the mode passes over them once (all but scale)
        by_rows = mode not in WHOLE_GRAM_MODES
        fit, heldout = (site_reader(part.sites, site, by_rows) for part in (calibration.fit, calibration.heldout))
        rec = reconstruct(mode, w.out, w.bias, mask.nonzero().flatten(), w.width, fit, heldout)
        out[site] = rec.in_dtype(w.out.dtype)
        release_memory()  # a 7B FFN site's refit frees ~2 GB of temporaries: not kept for the next
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
        scores = score_sites(adapter, calibration.total, method, seed, calibration.grads)
    timings["score_s"] = time.perf_counter() - start
    release_memory()
    start = time.perf_counter()
    masks = search_masks(scores, adapter, budget, calibration.seq_len, allocation)
    timings["search_s"] = time.perf_counter() - start
    start = time.perf_counter()
    weights = reconstruct_sites(adapter, masks, calibration, reconstruction)
    timings["reconstruct_s"] = time.perf_counter() - start
    kept = masks.kept_fraction(adapter.geometries(), calibration.seq_len)
    return PruneResult(masks, weights, budget, kept, timings)


# ---- LLM Surgeon: several shots, curvature refreshed on the partly pruned model ----------------


def surgeon_model(adapter: Adapter, state: surgeon.SurgeonState) -> Adapter:
    """The model cut and updated as far as `state` has come: before the first shot the dense model
    itself (collecting curvature leaves a model as it was), after it a cut copy."""
    if not state.shots_done:
        return adapter
    current = adapter_for(copy.deepcopy(adapter.model))
    apply_pruning(current, state.masks(adapter.geometries()), state.weights)
    return current


def surgeon_shot(
    state: surgeon.SurgeonState,
    curvature: Curvature,
    dense_weights: dict[Site, object],
    dense_geoms: list,
    target: float,
    seq_len: float,
    collect_s: float = 0.0,
) -> surgeon.SurgeonState:
    """One shot on collected curvature: costs, global masks to `target`, joint updates per layer."""
    timings = {"collect_s": collect_s}
    start = time.perf_counter()
    current = {site: state.site_weights(site, dense_weights[site]) for site in state.sites()}
    costs = {site: surgeon.unit_costs(w, curvature[site]) for site, w in current.items()}
    timings["score_s"] = time.perf_counter() - start
    release_memory()
    start = time.perf_counter()
    local = surgeon.shot_masks(costs, state, dense_geoms, target, seq_len)
    timings["search_s"] = time.perf_counter() - start
    start = time.perf_counter()
    updates = {site: surgeon.surgeon_update(current[site], mask, curvature[site]) for site, mask in local.keep.items() if not bool(mask.all())}
    timings["reconstruct_s"] = time.perf_counter() - start
    return state.advance(local, updates, timings)


def plan_llm_surgeon(
    adapter: Adapter,
    batches: list[dict],
    budget: float,
    seq_len: float,
    shot_step: float = SHOT_STEP,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> PruneResult:
    """LLM Surgeon to `budget` in shots of at most `shot_step` of the prunable MACs; the model is
    not touched. Each shot collects curvature on the model as pruned so far, so the result is
    relative to the dense model."""
    dense_geoms = adapter.geometries()
    state = surgeon.SurgeonState.dense(dense_geoms)
    dense_weights = {site: adapter.unit_weights(*site) for site in state.kept}
    marked = mark_heldout(batches)
    for target in surgeon.shot_targets(check_budget(budget), shot_step):
        start = time.perf_counter()
        curvature = collect_curvature(surgeon_model(adapter, state), marked, seed, on_batch)
        state = surgeon_shot(state, curvature, dense_weights, dense_geoms, target, seq_len, time.perf_counter() - start)
    masks = state.masks(dense_geoms)
    return PruneResult(masks, state.weights, budget, masks.kept_fraction(dense_geoms, seq_len), state.timings)
