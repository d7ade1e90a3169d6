"""Per-layer activation statistics: collected once, summed across shards, saved as safetensors.

For every block and each kind of unit the inputs x of the output projection (the attention context
for `attn`, the FFN activations for `ffn`) are accumulated over non-padding tokens:
n (token count), gram = sum x x^T and total = sum x. Every field is a sum, so statistics of two
shards add up to the statistics of their union; that is what lets the farm reduce by addition.

Each batch's x^T x is computed in float32 (fast BLAS) and added to a float64 accumulator, so
rounding does not grow with the number of batches.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError, first_line
from .models import KINDS, Adapter, Kind

GRADS_PART = "grads"
# 2: held-out statistics are every 5th example; 3: a `grads` part (output curvature); 4: a checksum
FORMAT_VERSION = 4


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
        self.gram += (x32.T @ x32).to(self.gram.device, torch.float64)  # accumulators stay on the CPU
        self.total += x32.sum(0, dtype=torch.float64).to(self.total.device)

    def __add__(self, other: GramStats) -> GramStats:
        return GramStats(self.n + other.n, self.gram + other.gram, self.total + other.total)

    @property
    def second_moment(self) -> torch.Tensor:
        return self.gram / self.n.clamp(min=1)

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.n.clamp(min=1)


@dataclass
class ModelStats:
    """Statistics of every site of a model, keyed by (layer, kind), plus their fingerprint."""

    sites: dict[tuple[int, Kind], GramStats]
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
        first = next(iter(self.sites.values()), None)
        return 0 if first is None else int(first.n)


def empty_stats(adapter: Adapter) -> ModelStats:
    sites = {}
    for i, geom in enumerate(adapter.geometries()):
        for kind in KINDS:
            if geom.count(kind):
                sites[(i, kind)] = GramStats.zeros(geom.count(kind) * geom.width(kind))
    return ModelStats(sites)


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
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def stats_fingerprint(model_fp: str, data_fp: str, seq_len: int, samples: int, seed: int = 0) -> str:
    """Key of a statistics file: the model weights, the data, the sequence length, the sample count
    and the seed (the curvature's targets are sampled with it)."""
    key = json.dumps({"v": FORMAT_VERSION, "model": model_fp, "data": data_fp, "seq_len": seq_len, "samples": samples, "seed": seed})
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ---- safetensors I/O -------------------------------------------------------------------------


class DamagedStats(UserError):
    """A statistics file that cannot be read back as it was written: truncated, or its tensor data
    changed since (the checksum written with it does not match)."""


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes, in name order. safetensors checks
    only the header, so damaged data would otherwise load as plausible numbers."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy())  # the buffer itself: no copy
    return digest.hexdigest()


def save_stats(parts: dict[str, ModelStats], path: str | Path) -> None:
    """Save named parts (e.g. fit and heldout) of one model's statistics to one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    fingerprints = {p.fingerprint for p in parts.values()}
    if len(fingerprints) != 1:
        raise ValueError("all parts of a statistics file must share one fingerprint")
    for part, stats in parts.items():
        for (layer, kind), s in stats.sites.items():
            prefix = f"{part}/{layer}/{kind}"
            tensors[f"{prefix}/n"] = s.n.reshape(1)
            tensors[f"{prefix}/gram"] = s.gram.contiguous()
            tensors[f"{prefix}/total"] = s.total.contiguous()
    meta = {"fingerprint": fingerprints.pop(), "format": str(FORMAT_VERSION), "checksum": tensors_checksum(tensors)}
    meta.update({f"meta/{k}": json.dumps(v) for k, v in next(iter(parts.values())).meta.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)  # never leave a half-written file under the real name


def load_stats(path: str | Path, fingerprint: str | None, adapter: Adapter | None = None) -> dict[str, ModelStats]:
    """Load a statistics file, refusing it when it is damaged, or when its fingerprint or its
    shapes do not match."""
    path = Path(path)
    meta, tensors = _read_checked(path)
    found = meta.get("fingerprint")
    if fingerprint is not None and found != fingerprint:
        raise UserError(f"{path}: statistics fingerprint {found} does not match this model and data ({fingerprint})")
    parts: dict[str, dict] = {}
    for key, tensor in tensors.items():
        fields = key.split("/")
        if len(fields) != 4 or not fields[1].isdigit():
            raise UserError(f"{path}: not a gfprune-ray statistics file (unexpected tensor {key!r})")
        part, layer, kind, name = fields
        parts.setdefault(part, {}).setdefault((int(layer), kind), {})[name] = tensor
    extra = {k.removeprefix("meta/"): json.loads(v) for k, v in meta.items() if k.startswith("meta/")}
    loaded = {
        part: ModelStats(
            {key: GramStats(d["n"].reshape(()), d["gram"], d["total"]) for key, d in sites.items()}, found, extra
        )
        for part, sites in parts.items()
    }
    if adapter is not None:
        expected = {k: tuple(v.total.shape) for k, v in empty_stats(adapter).sites.items()}
        for part, stats in loaded.items():
            # the output curvature of every site is as wide as the residual stream
            want = {k: (adapter.hidden_size,) for k in expected} if part == GRADS_PART else expected
            if {k: tuple(v.total.shape) for k, v in stats.sites.items()} != want:
                raise UserError(f"{path}: statistics shapes do not match the model's layers")
    return loaded


def _read_checked(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a statistics file whose format and checksum are right."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != str(FORMAT_VERSION):
                raise UserError(f"{path}: not a gfprune-ray statistics file of format {FORMAT_VERSION} (found {meta.get('format')!r})")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except UserError:
        raise
    except Exception as exc:  # safetensors raises its own error types, on open and on a short read
        raise DamagedStats(f"{path}: not a readable statistics file ({first_line(exc)})") from None
    if tensors_checksum(tensors) != meta.get("checksum"):
        raise DamagedStats(f"{path}: statistics file is damaged (its data does not match the checksum written with it)")
    return meta, tensors



def load_cached_stats(path: Path, fingerprint: str, warn: Callable[[str], None]) -> dict[str, ModelStats] | None:
    """A cache entry, or None when there is none. A damaged entry is moved aside (kept for a
    post-mortem, never read again) so that the caller collects the statistics afresh."""
    if not path.exists():
        return None
    try:
        return load_stats(path, fingerprint)
    except DamagedStats as exc:
        aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        path.replace(aside)
        warn(f"{exc}; moved to {aside.name}, collecting the statistics again")
        return None
