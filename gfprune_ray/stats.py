"""Per-layer activation statistics: collected once, summed across shards, saved as safetensors.

For every block and each kind of unit the inputs x of the output projection (the attention context
for `attn`, the FFN activations for `ffn`) are accumulated over non-padding tokens:
n (token count), gram = sum x x^T and total = sum x. Every field is a sum, so statistics of two
shards add up to the statistics of their union; that is what lets the farm reduce by addition.

Each batch's x^T x is computed in float32 (fast BLAS) and added to a float64 accumulator, so
rounding does not grow with the number of batches.

A 7B-class model's statistics outgrow a node's memory (Llama-2-7B: about 2.5 GB per layer in
float64), so collection can be restricted to a group of sites and run in several passes
(`plan_groups`); each site's statistics are then streamed to disk (`stats_store.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from .models import KINDS, Adapter, BlockGeometry, Kind

GRADS_PART = "grads"
# 2: held-out statistics are every 5th example; 3: a `grads` part (output curvature); 4: a checksum;
# 5: a folder with one file per site (stats_store.py); 6: sampled targets drawn by inverse CDF
# (the curvature of models with logits differs from format 5's by the random draws)
FORMAT_VERSION = 6
Site = tuple[int, Kind]
# A batch's Gram is computed in blocks of rows: GRAM_BLOCKS of them, each at least GRAM_MIN_ROWS
# (thinner products lose BLAS efficiency) and at most GRAM_ROWS (bounds the temporaries).
GRAM_BLOCKS, GRAM_MIN_ROWS, GRAM_ROWS = 8, 96, 2048


@dataclass
class GramStats:
    """Sums over tokens of one site's inputs x: n, sum x x^T and sum x (float64)."""

    n: torch.Tensor
    gram: torch.Tensor
    total: torch.Tensor

    @classmethod
    def zeros(cls, width: int) -> GramStats:
        f64 = torch.float64
        return cls(torch.zeros((), dtype=f64), torch.zeros(width, width, dtype=f64), torch.zeros(width, dtype=f64))

    def add_(self, x: torch.Tensor) -> None:
        """Accumulate a (tokens x width) block of inputs."""
        x32 = x.detach().to(torch.float32)
        self.n += x32.shape[0]
        width = x32.shape[1]
        # The Gram is symmetric: each block of rows is multiplied only with the columns from its
        # diagonal on, and the part right of the diagonal block is mirrored below it. About 9/16
        # of the full product's multiply-adds at 8 blocks (BLAS syrk would do 1/2, but torch has
        # none and SciPy's was slower than torch's matmul in a quick try). Blocks also bound the
        # float32 product and its float64 copy: a 7B FFN's 11008-wide Gram in one piece would be
        # 1.5 GB of temporaries.
        rows = min(GRAM_ROWS, max(GRAM_MIN_ROWS, -(-width // GRAM_BLOCKS)))
        for start in range(0, width, rows):
            end = min(start + rows, width)
            product = (x32[:, start:end].T @ x32[:, start:]).to(self.gram.device, torch.float64)
            self.gram[start:end, start:] += product
            self.gram[end:, start:end] += product[:, end - start :].T
        self.total += x32.sum(0, dtype=torch.float64).to(self.total.device)

    def __add__(self, other: GramStats) -> GramStats:
        return GramStats(self.n + other.n, self.gram + other.gram, self.total + other.total)

    def __reduce__(self):
        # Ray ships NumPy arrays out of band: the object store copies the Gram straight from this
        # buffer and a reader on the node maps it without a copy. A pickled tensor is copied into
        # a bytes object first and again out of it (2 GB more per 7B FFN site, in each process).
        # Readers therefore share the store's memory: consumers never write into statistics.
        return _from_arrays, tuple(t.detach().cpu().numpy() for t in (self.n, self.gram, self.total))

    @property
    def second_moment(self) -> torch.Tensor:
        return self.gram / self.n.clamp(min=1)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.n.clamp(min=1)

    def row_blocks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, gram[first : first + rows]) for each block of the Gram's rows, in order (as
        `stats_store.StreamedGram` reads a stored one)."""
        for start in range(0, self.gram.shape[0], rows):
            yield start, self.gram[start : start + rows]


def _from_arrays(n, gram, total) -> GramStats:
    with warnings.catch_warnings():  # the object store's arrays are read-only; so is our use of them
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return GramStats(*(torch.from_numpy(a) for a in (n, gram, total)))


@dataclass
class ModelStats:
    """Statistics of every site of a model, keyed by (layer, kind), plus their fingerprint."""

    sites: Mapping[Site, GramStats]  # a dict, or sites read from disk one at a time (stats_store)
    fingerprint: str = ""
    meta: dict = field(default_factory=dict)

    def __add__(self, other: ModelStats) -> ModelStats:
        if self.sites.keys() != other.sites.keys():
            raise ValueError("cannot add statistics of different models")
        if self.fingerprint != other.fingerprint:
            raise ValueError("cannot add statistics with different fingerprints")
        return ModelStats({k: self.sites[k] + other.sites[k] for k in self.sites}, self.fingerprint, self.meta)

    def __getitem__(self, key: tuple[int, Kind]) -> GramStats:
        return self.sites[key]

    @property
    def tokens(self) -> int:
        known = getattr(self.sites, "tokens", None)  # stored sites know it without reading a Gram
        if known is not None:
            return known
        first = next(iter(self.sites.values()), None)
        return 0 if first is None else int(first.n)


class SiteSums(Mapping):
    """Two statistics' sites added on access (e.g. fit + held-out), so that a model's total never
    exists in memory at once. Sites read from disk are fresh tensors and are added in place."""

    def __init__(self, a: Mapping[Site, GramStats], b: Mapping[Site, GramStats]):
        self.a, self.b = a, b
        known = (getattr(a, "tokens", None), getattr(b, "tokens", None))
        self.tokens = None if None in known else sum(known)

    def __getitem__(self, site: Site) -> GramStats:
        a, b = self.a[site], self.b[site]
        if not getattr(self.a, "fresh", False):
            return a + b
        a.n += b.n
        a.gram += b.gram
        a.total += b.total
        return a

    def __iter__(self):
        return iter(self.a)

    def __len__(self) -> int:
        return len(self.a)


def model_sites(geometries: list[BlockGeometry]) -> list[Site]:
    """Every (layer, kind) that has units, in model order."""
    return [(i, kind) for i, geom in enumerate(geometries) for kind in KINDS if geom.count(kind)]


def empty_stats(adapter: Adapter, sites: Iterable[Site] | None = None) -> ModelStats:
    """Zero statistics of `sites` (default: every site of the model)."""
    geoms = adapter.geometries()
    keys = model_sites(geoms) if sites is None else list(sites)
    return ModelStats({(i, kind): GramStats.zeros(geoms[i].count(kind) * geoms[i].width(kind)) for i, kind in keys})


# ---- memory-bounded collection ------------------------------------------------------------


def site_stats_bytes(geom: BlockGeometry, kind: Kind) -> int:
    """Bytes of one site's statistics as collected: fit and held-out Grams of its inputs and the
    Gram of the output curvature (as wide as the residual stream), all float64."""
    width = geom.count(kind) * geom.width(kind)
    return 8 * (2 * (width * width + width + 1) + geom.d * geom.d + geom.d + 1)


def plan_groups(sites: list[Site], geometries: list[BlockGeometry], memory: int | None) -> list[list[Site]]:
    """Consecutive groups of sites whose statistics fit in `memory` bytes together, one collection
    pass each (None: one pass). A site larger than the budget is a group of its own."""
    groups: list[list[Site]] = []
    used = 0
    for site in sites:
        size = site_stats_bytes(geometries[site[0]], site[1])
        if not groups or (memory is not None and used + size > memory):
            groups.append([])
            used = 0
        groups[-1].append(site)
        used += size
    return groups


def physical_memory() -> int:
    """This machine's RAM in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# The default share of a machine's memory that one process's statistics may take: the model, the
# per-batch products and the farm's object store need the rest.
STATS_MEMORY_SHARE = 8


class BatchRouting:
    """Which tokens of the current batch count (non-padding) and which go to the held-out part.

    A batch may carry a boolean `heldout` flag per row: tokens of flagged rows go to the held-out
    statistics, the rest to the fit statistics."""

    def __init__(self):
        self.tokens = torch.zeros(0, dtype=torch.bool)
        self.held = torch.zeros(0, dtype=torch.bool)
        self.any_held = False

    def start(self, batch: dict[str, torch.Tensor]) -> int:
        """Route the tokens of a new batch; returns its non-padding token count."""
        mask = batch["attention_mask"].bool()
        rows = batch.get("heldout", torch.zeros(len(mask), dtype=torch.bool)).bool()
        self.tokens = mask.flatten()
        self.held = rows[:, None].expand_as(mask)[mask]
        self.any_held = bool(rows.any())
        return int(self.tokens.sum())

    def tokens_of(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, width), or (batch * seq, width) where a model flattens (OPT), as the
        (non-padding tokens, width) block."""
        return x.reshape(-1, x.shape[-1])[self.tokens]


def record_inputs(adapter: Adapter, fit: ModelStats, heldout: ModelStats, routing: BatchRouting) -> list:
    """Forward pre-hooks that add every site's inputs to `fit` / `heldout`; returns the handles."""

    def hook_for(key: tuple[int, Kind]):
        def hook(_module, args):
            x = routing.tokens_of(args[0])
            if routing.any_held:
                fit.sites[key].add_(x[~routing.held])
                heldout.sites[key].add_(x[routing.held])
            else:  # no copy of the activations on the common path
                fit.sites[key].add_(x)

        return hook

    return [adapter.output_projection(i, kind).register_forward_pre_hook(hook_for((i, kind))) for (i, kind) in fit.sites]


@torch.inference_mode()
def collect_split(
    adapter: Adapter,
    batches: Iterable[dict[str, torch.Tensor]],
    on_batch: Callable[[int], None] | None = None,
) -> tuple[ModelStats, ModelStats]:
    """One forward pass over `batches` (dicts with input_ids and attention_mask) with hooks that
    accumulate every site's statistics over the non-padding tokens.

    Tokens of rows flagged `heldout` go to the second statistics, the rest to the first, so fit
    and held-out statistics cost one pass together."""
    fit, heldout = empty_stats(adapter), empty_stats(adapter)
    routing = BatchRouting()
    handles = record_inputs(adapter, fit, heldout, routing)
    model = adapter.model
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            tokens = routing.start(batch)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if on_batch is not None:
                on_batch(tokens)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return fit, heldout


def collect_stats(
    adapter: Adapter,
    batches: Iterable[dict[str, torch.Tensor]],
    on_batch: Callable[[int], None] | None = None,
) -> ModelStats:
    """Statistics of all tokens of `batches` (one forward pass)."""
    return collect_split(adapter, ({k: v for k, v in b.items() if k != "heldout"} for b in batches), on_batch)[0]


# ---- fingerprints ---------------------------------------------------------------------------


def weights_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy())  # the buffer itself, not a copy
    return digest.hexdigest()[:16]


def stats_fingerprint(model_fp: str, data_fp: str, seq_len: int, samples: int, seed: int = 0) -> str:
    """Key of a statistics file: the model weights, the data, the sequence length, the sample count
    and the seed (the curvature's targets are sampled with it)."""
    key = json.dumps({"v": FORMAT_VERSION, "model": model_fp, "data": data_fp, "seq_len": seq_len, "samples": samples, "seed": seed})
    return hashlib.sha256(key.encode()).hexdigest()[:16]


