"""Physical removal of units, saving a pruned model, and loading it back with one call.

transformers 5 configs have no per-layer head or FFN sizes, so a pruned model's config carries
`gfprune_sizes` ([query heads, FFN neurons] per layer, and the K/V heads third under grouped-query
attention; see `Adapter.resize`); where CoFi cut hidden dimensions,
`gfprune_hidden` (the stream's width); where FLOP factorized weight matrices, `gfprune_factorized`
(module path: rank). `load_pruned` builds the ordinary transformers class, narrows its layers to
those sizes and its stream to that width, swaps in the factorized layers and loads the weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from .models import KINDS, Adapter, adapter_for
from .models.base import HIDDEN_KEY, set_path
from .models import layers as L
from .outputs import RECORD_FILE
from .reconstruct import Reconstruction
from .search import Masks

SIZES_KEY = "gfprune_sizes"
FACTORIZED_KEY = "gfprune_factorized"


def _kept(adapter: Adapter, masks: Masks, i: int, kind: str) -> torch.Tensor:
    if (i, kind) in masks.keep:
        return masks.kept_indices((i, kind))
    return torch.arange(adapter.geometry(i).count(kind))


def apply_pruning(adapter: Adapter, masks: Masks, weights: dict | None = None) -> None:
    """Cut every unit that `masks` drops and write the reconstructed output weights, in place."""
    weights = weights or {}
    for i in range(adapter.num_layers):
        adapter.prune_block(i, _kept(adapter, masks, i, "attn"), _kept(adapter, masks, i, "ffn"))
        for kind in KINDS:
            rec: Reconstruction | None = weights.get((i, kind))
            if rec is not None:
                adapter.set_output(i, kind, rec.weight, rec.bias)


@contextmanager
def masked(adapter: Adapter, masks: Masks, weights: dict | None = None) -> Iterator[None]:
    """The dense model behaving as the pruned one: dropped inputs of each output projection are
    zeroed by a hook and reconstructed weights sit in the kept columns. For tests and checks."""
    weights = weights or {}
    handles, saved = [], []
    for (i, kind), mask in masks.keep.items():
        module = adapter.output_projection(i, kind)
        width = adapter.geometry(i).width(kind)
        column_mask = mask.repeat_interleave(width)
        handles.append(module.register_forward_pre_hook(lambda _m, args, cm=column_mask: (args[0] * cm.to(args[0].dtype),)))
        rec = weights.get((i, kind))
        if rec is not None:
            saved.append((module, L.weight_of(module).detach().clone(), None if module.bias is None else module.bias.detach().clone()))
            full = torch.zeros_like(L.weight_of(module))
            full[:, column_mask] = rec.weight.to(full.dtype)
            L.assign(module, full, rec.bias)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, weight, bias in saved:
            L.assign(module, weight, bias)


def save_pruned(model: nn.Module, out_dir: str | Path, tokenizer=None, record: dict | None = None) -> None:
    """Write weights (safetensors), config with per-layer sizes, tokenizer and gfprune.json."""
    out_dir = Path(out_dir)
    model.config.__setattr__(SIZES_KEY, adapter_for(model).sizes())
    ranks = factorized_ranks(model)
    if ranks:
        model.config.__setattr__(FACTORIZED_KEY, ranks)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / RECORD_FILE).write_text(json.dumps(record or {}, indent=2, default=str) + "\n")


def factorized_ranks(model: nn.Module) -> dict[str, int]:
    return {name: m.rank for name, m in model.named_modules() if isinstance(m, L.FactorizedLinear)}


def refactorize(model: nn.Module, ranks: dict[str, int]) -> None:
    """Swap each named linear layer for an (uninitialised) factorized one of the given rank."""
    for path, rank in ranks.items():
        module = model.get_submodule(path)
        n_out, n_in = L.shape_of(module)
        set_path(model, path, L.FactorizedLinear(n_in, rank, n_out, bias=module.bias is not None))


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    return load_file(str(path / "model.safetensors"))


def _saved_dtype(config) -> torch.dtype | None:
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else None


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built in this block get their parameters on the meta device (no memory, and their
    random initialisation computes nothing); buffers stay real, so the non-persistent ones that
    constructors compute (rotary frequencies, position ids) keep their values. A parameter's
    constructor still asks for an uninitialised tensor first, but it is dropped before anything
    touches its pages."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_pruned(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model saved by gfprune-ray: the ordinary transformers class, with narrower layers.

    The model is built with its parameters on the meta device, narrowed, and given the saved
    weights as they are read: memory holds the pruned model once, never the full-size one.

    >>> model = load_pruned("runs/minilm-0.6")   # a BertModel; pipelines, generate, save_pretrained work
    """
    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    sizes = getattr(config, SIZES_KEY, None)
    architecture = (config.architectures or [None])[0]
    model_class = getattr(transformers, architecture or "", None)
    if model_class is None:
        raise ValueError(f"{path}: config names no transformers architecture")
    hidden = config.__dict__.pop(HIDDEN_KEY, None)  # build at full width, then cut (like heads)
    with parameters_on_meta():
        model = model_class(config)
        if sizes is not None:
            adapter_for(model).resize(sizes)
        if hidden is not None:
            adapter_for(model).cut_hidden(torch.arange(hidden))
        refactorize(model, getattr(config, FACTORIZED_KEY, None) or {})
    dtype = dtype or _saved_dtype(config)
    # buffers the constructor computed stay as built (rotary frequencies are float32 in a
    # bfloat16 model, as from_pretrained keeps them); parameters take `dtype` with the weights
    state = _state_dict(path)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # a tied head shares the embedding it was saved with, not the meta placeholder
    empty = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if empty or unexpected:
        raise ValueError(f"{path}: weights do not fit the saved sizes (missing {empty}, unexpected {unexpected})")
    return model.eval()
