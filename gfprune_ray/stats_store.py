"""Statistics on disk: a folder with one safetensors file per site and a manifest written last.

One file per site lets every consumer read only the site it works on (a scoring task, a
reconstruction, the single-process pipeline going layer by layer), so no process needs a whole
7B-class model's statistics in memory, and a site can be written as soon as its collection pass
is reduced. The manifest is written after every site: a folder without one is unfinished (a
killed run) and is never read as statistics.

Each file holds the site's parts (`fit`, `heldout`, `grads`), each as n, gram and total, with a
SHA-256 checksum per part in its metadata: safetensors checks only the header, so damaged data
would otherwise load as plausible numbers.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import UserError, first_line
from .models import Adapter
from .stats import FORMAT_VERSION, GRADS_PART, GramStats, ModelStats, Site, model_sites

MANIFEST = "manifest.json"
FIELDS = ("n", "gram", "total")


class DamagedStats(UserError):
    """Statistics that cannot be read back as they were written: a truncated file, or tensor data
    changed since (the checksum written with it does not match)."""


def site_file(folder: Path, site: Site) -> Path:
    layer, kind = site
    return Path(folder) / f"site-{layer}-{kind}.safetensors"


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        _hash_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def _field_header(name: str, dtype: torch.dtype, shape: tuple) -> bytes:
    """What the checksum hashes before a tensor's bytes."""
    return f"{name}|{dtype}|{shape}|".encode()


def _hash_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().contiguous()
    digest.update(_field_header(name, tensor.dtype, tuple(tensor.shape)))
    digest.update(tensor.view(torch.uint8).numpy())  # the buffer itself: no copy


def write_site(folder: Path, site: Site, parts: dict[str, GramStats], fingerprint: str) -> None:
    """One site's parts to its file (written under a temporary name, then renamed)."""
    meta = {"fingerprint": fingerprint, "format": str(FORMAT_VERSION)}
    tensors: dict[str, torch.Tensor] = {}
    for part, stats in parts.items():
        fields = {f"{part}/n": stats.n.reshape(1), f"{part}/gram": stats.gram.contiguous(), f"{part}/total": stats.total.contiguous()}
        meta[f"checksum/{part}"] = tensors_checksum(fields)
        tensors |= fields
    path = site_file(folder, site)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    write_safetensors(tmp, tensors, meta)
    tmp.replace(path)


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32"}
DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
MAX_HEADER = 100_000_000  # as the library refuses larger headers


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written tensor by tensor from the tensors' own buffers. The library's
    save_file first turns every tensor into bytes, a second copy of a site's statistics (2 GB for
    an 11008-wide FFN) at the moment memory is fullest."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    names = sorted(tensors)
    for name in names:
        size = tensors[name].numel() * tensors[name].element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensors[name].dtype], "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as the library writes it
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in names:
            f.write(tensors[name].detach().contiguous().view(torch.uint8).numpy())


def read_site(folder: Path, site: Site, parts: tuple[str, ...] | None = None) -> dict[str, GramStats]:
    """The named parts of one site (default: all), each checked against its checksum."""
    path = site_file(folder, site)
    try:
        meta, tensors = read_safetensors(path, lambda name: parts is None or name.split("/")[0] in parts)
    except Exception as exc:  # a short file, a broken header, an unknown dtype
        raise DamagedStats(f"{path}: not a readable statistics file ({first_line(exc)})") from None
    wanted = parts or tuple(dict.fromkeys(n.split("/")[0] for n in tensors))
    out = {}
    for part in wanted:
        fields = {k: v for k, v in tensors.items() if k.startswith(f"{part}/")}
        if len(fields) != len(FIELDS) or tensors_checksum(fields) != meta.get(f"checksum/{part}"):
            raise DamagedStats(f"{path}: statistics file is damaged (its data does not match the checksum written with it)")
        out[part] = GramStats(fields[f"{part}/n"].reshape(()), fields[f"{part}/gram"], fields[f"{part}/total"])
    return out


class StreamedGram:
    """One part of a stored site for one pass over its Gram's rows (a 7B FFN site's Gram is 1 GB;
    the refit needs it once, row by row): n and total are read at once, the Gram a block of rows
    at a time by `row_blocks`, which checks the part's checksum when the pass ends (a consumer
    must finish the pass; its results are void if that raises DamagedStats)."""

    def __init__(self, path: Path, part: str):
        self.path, self.part = path, part
        try:
            with open(path, "rb") as f:
                header, self.start = read_header(f)
            self.meta = header.get("__metadata__") or {}
            self.gram_info = header[f"{part}/gram"]
            _, small = read_safetensors(path, lambda name: name in (f"{part}/n", f"{part}/total"))
            self.n, self.total = small[f"{part}/n"].reshape(()), small[f"{part}/total"]
        except Exception as exc:
            raise DamagedStats(f"{path}: not a readable statistics file ({first_line(exc)})") from None

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.n.clamp(min=1)

    def row_blocks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        shape, dtype = tuple(self.gram_info["shape"]), DTYPES_BY_NAME[self.gram_info["dtype"]]
        begin, end = self.gram_info["data_offsets"]
        row_bytes = shape[1] * dtype.itemsize
        if (end - begin) != shape[0] * row_bytes:
            raise DamagedStats(f"{self.path}: not a readable statistics file (its Gram's size does not match its shape)")
        digest = hashlib.sha256()
        digest.update(_field_header(f"{self.part}/gram", dtype, shape))  # its bytes follow block by block
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            for first in range(0, shape[0], rows):
                block = torch.empty((min(rows, shape[0] - first), shape[1]), dtype=dtype)
                buffer = block.view(torch.uint8).numpy()
                if f.readinto(buffer.reshape(-1)) != buffer.nbytes:
                    raise DamagedStats(f"{self.path}: not a readable statistics file (shorter than its header says)")
                digest.update(buffer)
                yield first, block
        _hash_tensor(digest, f"{self.part}/n", self.n.reshape(1))
        _hash_tensor(digest, f"{self.part}/total", self.total)
        if digest.hexdigest() != self.meta.get(f"checksum/{self.part}"):
            raise DamagedStats(f"{self.path}: statistics file is damaged (its data does not match the checksum written with it)")


def site_reader(sites: Mapping[Site, GramStats], site: Site, by_rows: bool) -> Callable[[], GramStats | StreamedGram]:
    """A function that reads one site's statistics: streamed by rows from disk when `by_rows` and
    the sites are stored, else whole."""
    if by_rows and isinstance(sites, StoredSites):
        return lambda: StreamedGram(site_file(sites.folder, site), sites.part)
    return lambda: sites[site]


def read_header(f: BinaryIO) -> tuple[dict, int]:
    """An open safetensors file's header and the offset where its tensor data starts."""
    size = int.from_bytes(f.read(8), "little")
    if size > MAX_HEADER:
        raise ValueError(f"header of {size} bytes")
    return json.loads(f.read(size)), 8 + size


def read_safetensors(path: Path, keep: Callable[[str], bool]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and the kept tensors of a safetensors file, read with plain reads into
    tensors of their own. The library maps the file and copies each tensor out of the map: while
    the map is open its pages count in the process's resident memory beside the copies, so an
    11008-wide site (2 GB) showed twice in a 7B-wide prune's peak."""
    with open(path, "rb") as f:
        header, start = read_header(f)
        meta = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, info in header.items():
            if not keep(name):
                continue
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=DTYPES_BY_NAME[info["dtype"]])
            buffer = tensor.reshape(-1).view(torch.uint8).numpy()
            f.seek(start + begin)
            if buffer.nbytes != end - begin or f.readinto(buffer) != end - begin:
                raise ValueError(f"{name}: the file is shorter than its header says")
            tensors[name] = tensor
    return meta, tensors


def finish(folder: Path, fingerprint: str, sites: list[Site], tokens: dict[str, int], meta: dict | None = None) -> None:
    """Mark a folder whose every site is written as complete statistics."""
    manifest = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "sites": [list(s) for s in sites], "tokens": tokens, "meta": meta or {}}
    tmp = Path(folder) / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(Path(folder) / MANIFEST)


def is_complete(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def save_stats(parts: dict[str, ModelStats], folder: str | Path) -> None:
    """Statistics held in memory (named parts of one model, e.g. fit and heldout) to a folder."""
    folder = Path(folder)
    fingerprints = {p.fingerprint for p in parts.values()}
    if len(fingerprints) != 1:
        raise ValueError("all parts of a statistics folder must share one fingerprint")
    fingerprint = fingerprints.pop()
    sites = list(next(iter(parts.values())).sites)
    for site in sites:
        write_site(folder, site, {name: stats.sites[site] for name, stats in parts.items()}, fingerprint)
    finish(folder, fingerprint, sites, {name: stats.tokens for name, stats in parts.items()}, next(iter(parts.values())).meta)


class StoredSites(Mapping):
    """One part of every site of a statistics folder, read from disk on each access (nothing is
    kept, so a process holds one site at a time)."""

    fresh = True  # every access returns new tensors, which a caller may change in place

    def __init__(self, folder: Path, part: str, sites: list[Site], tokens: int | None):
        self.folder, self.part, self.keys_, self.tokens = Path(folder), part, sites, tokens

    def __getitem__(self, site: Site) -> GramStats:
        if site not in self.keys_:
            raise KeyError(site)
        return read_site(self.folder, site, (self.part,))[self.part]

    def __iter__(self) -> Iterator[Site]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def _manifest(folder: Path) -> dict:
    if not folder.is_dir():
        what = "a file" if folder.exists() else "missing"
        raise UserError(f"{folder}: not a gfprune-ray statistics folder ({what}; statistics are a folder since format 5: collect them again)")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: unfinished statistics (no {MANIFEST}): collect them again") from None
    except (OSError, ValueError) as exc:
        raise DamagedStats(f"{folder / MANIFEST}: not readable ({first_line(exc)})") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(f"{folder}: not gfprune-ray statistics of format {FORMAT_VERSION} (found {manifest.get('format')!r})")
    return manifest


def _site_shapes(folder: Path, site: Site) -> dict[str, tuple]:
    """part -> total's shape, from the file's header alone."""
    path = site_file(folder, site)
    try:
        with open(path, "rb") as f:
            header = read_header(f)[0]
        return {name.split("/")[0]: tuple(info["shape"]) for name, info in header.items() if name.endswith("/total")}
    except Exception as exc:
        raise DamagedStats(f"{path}: not a readable statistics file ({first_line(exc)})") from None


def load_stats(folder: str | Path, fingerprint: str | None, adapter: Adapter | None = None) -> dict[str, ModelStats]:
    """A statistics folder as named parts whose sites are read on access. Refuses a folder of
    another fingerprint or (given the model) of other shapes, before reading any Gram."""
    folder = Path(folder)
    manifest = _manifest(folder)
    found = manifest.get("fingerprint")
    if fingerprint is not None and found != fingerprint:
        raise UserError(f"{folder}: statistics fingerprint {found} does not match this model and data ({fingerprint})")
    sites = [(int(layer), kind) for layer, kind in manifest["sites"]]
    tokens = manifest.get("tokens", {})
    if adapter is not None:
        geoms = adapter.geometries()  # shapes from the geometry: zero statistics of a 7B model would be 80 GB
        expected = {(i, kind): (geoms[i].count(kind) * geoms[i].width(kind),) for i, kind in model_sites(geoms)}
        if set(sites) != set(expected):
            raise UserError(f"{folder}: statistics shapes do not match the model's layers")
        for site in sites:
            for part, shape in _site_shapes(folder, site).items():
                # the output curvature of every site is as wide as the residual stream
                if shape != ((adapter.hidden_size,) if part == GRADS_PART else expected[site]):
                    raise UserError(f"{folder}: statistics shapes do not match the model's layers")
    return {part: ModelStats(StoredSites(folder, part, sites, tokens.get(part)), found, manifest.get("meta", {})) for part in tokens}


def stored_tokens(folder: Path) -> dict[str, int]:
    """Token count of each part of a complete folder, from its manifest."""
    return _manifest(Path(folder))["tokens"]


def move_aside(folder: Path, reason: str, warn: Callable[[str], None]) -> None:
    """Move damaged statistics out of the cache's way (kept for a post-mortem, never read again)."""
    aside = folder.with_name(f"{folder.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    folder.replace(aside)
    warn(f"{reason}; moved to {aside.name}, collecting the statistics again")
