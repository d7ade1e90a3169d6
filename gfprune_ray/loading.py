"""Loading a model and its tokenizer from a local folder, a hub id or a package that ships weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import transformers
from safetensors import SafetensorError

from .choices import PACKAGED_PREFIX, looks_like_path
from .data import prepare_tokenizer
from .errors import UserError, first_line
from .packaged import GGUF_SUFFIX, PACKAGED, gguf_model_folder, packaged_model_path  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # tokenizer loading (in Ray Data workers) needs no torch
    from torch import nn


def resolve_model(source: str) -> str:
    """A local folder path, or a hub id left as it is. Missing local paths fail here, early.
    Packaged models and GGUF files become the cached transformers folder they convert to."""
    if source.startswith(PACKAGED_PREFIX):
        return str(packaged_model_path(source.removeprefix(PACKAGED_PREFIX)))
    path = Path(source).expanduser()
    if path.suffix.lower() == GGUF_SUFFIX:  # a llama.cpp model file
        return str(gguf_model_folder(path))
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"model folder has no config.json: {source}")
        return str(path)
    if looks_like_path(source):
        raise UserError(f"model not found: {source}")
    return source


def portable_source(source: str) -> str:
    """The model source as a process in another directory (a Ray worker) can load it: a local
    folder as an absolute path, a hub id as it is."""
    resolved = resolve_model(source)
    return str(Path(resolved).absolute()) if Path(resolved).exists() else resolved


def _model_class(config) -> type:
    for name in config.architectures or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


@contextmanager
def _quiet_local_load(local: bool) -> Iterator[None]:
    """No transformers progress bar while loading from a local folder (nothing to download; the
    CLI draws its own bars, and a failing command must print nothing but its one-line error)."""
    from transformers.utils import logging as hf_logging

    if not local or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()



def load_tokenizer(source: str, trust_remote_code: bool = False):
    """The tokenizer of a model, ready for padded batches."""
    where = resolve_model(source)
    try:
        with _quiet_local_load(Path(where).is_dir()):
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer of {source}: {first_line(exc)}") from None
    return prepare_tokenizer(tokenizer)


def load_model(source: str, trust_remote_code: bool = False, dtype: str | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) in eval mode, in `dtype` (one of DTYPES) or else the checkpoint's own
    dtype. The class named in the config is kept, task heads included; models pruned by
    gfprune-ray load through `load_pruned`."""
    import torch

    from .surgery import SIZES_KEY, load_pruned

    torch_dtype = getattr(torch, dtype) if dtype else None

    where = resolve_model(source)
    try:
        with _quiet_local_load(Path(where).is_dir()):
            config = transformers.AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
            if getattr(config, SIZES_KEY, None) is not None:
                model = load_pruned(where, torch_dtype)
            else:
                # safetensors only: a pytorch_model.bin is a pickle, and we never load untrusted pickles
                model = _model_class(config).from_pretrained(where, trust_remote_code=trust_remote_code, use_safetensors=True,
                                                             dtype=torch_dtype or "auto")
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError) as exc:  # a damaged weights file raises the last
        raise UserError(f"cannot load model {source}: {first_line(exc)}") from None
    prepare_tokenizer(tokenizer)
    if model.config.pad_token_id is None:  # sequence classifiers need it to find the last token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
