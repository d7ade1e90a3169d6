"""The adapter interface: what the rest of gfprune-ray may know about a model.

An adapter wraps one loaded transformers model and answers, per block: its geometry, the modules
whose inputs are the attention context and the FFN activations (for statistics), the weights of
each prunable unit (for scores and reconstruction), and how to cut units out in place.

Family adapters are mostly declarative: dotted paths, relative to one transformer layer, of the
projections, plus the few attributes that must follow a change of head count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from . import layers as L

Kind = Literal["attn", "ffn"]
HIDDEN_KEY = "gfprune_hidden"  # config key: width of the residual stream once hidden dimensions are cut
KINDS: tuple[Kind, Kind] = ("attn", "ffn")


@dataclass(frozen=True)
class BlockGeometry:
    """Shape of one transformer block as it is now (pruned blocks differ from layer to layer).

    An attention *unit* is one query head. With grouped-query attention `heads_per_unit` query
    heads (consecutive units) share one key/value head: that K/V head stays while any of its query
    heads does, and since transformers repeats each K/V head the same number of times in a layer,
    every kept group of a layer keeps the same number of query heads (`kv_groups`). Without GQA
    `heads_per_unit` is 1 and every head is its own group.
    """

    d: int
    units: int
    heads_per_unit: int
    head_dim: int
    ffn: int
    gated: bool

    @property
    def unit_width(self) -> int:
        """Context columns (input columns of the attention output projection) per attention unit."""
        return self.head_dim

    @property
    def kv_heads(self) -> int:
        """Key/value heads (KV groups) of the attention as it is now."""
        return self.units // self.heads_per_unit

    def count(self, kind: Kind) -> int:
        return self.units if kind == "attn" else self.ffn

    def width(self, kind: Kind) -> int:
        return self.unit_width if kind == "attn" else 1


@dataclass
class UnitWeights:
    """The weights of one prunable site as plain tensors: all that a scoring method sees.

    `out` is the output projection (d x units*width) whose columns are grouped per unit; each tensor
    in `ins` holds input-projection rows grouped per unit (units*r x d): the query rows of each head,
    the FFN input rows of each neuron. `shared_ins` holds rows that `group` consecutive units share
    (units/group*r x d): the key and value rows of each K/V head (with `group` = 1 without GQA).
    """

    out: torch.Tensor
    bias: torch.Tensor | None
    ins: list[torch.Tensor]
    width: int
    shared_ins: list[torch.Tensor] = field(default_factory=list)
    group: int = 1

    @property
    def units(self) -> int:
        return self.out.shape[1] // self.width


def kv_groups(heads: torch.Tensor, group: int) -> torch.Tensor:
    """The K/V groups (sorted indices) that the kept query heads `heads` read, with `group` query
    heads per K/V head. Raises unless every kept group keeps the same number of heads: transformers
    repeats each K/V head `num_key_value_groups` times, one number per layer."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    groups, counts = torch.unique(heads // group, return_counts=True)
    if len(counts) and (counts != counts[0]).any():
        raise ValueError(f"kept query heads {heads.tolist()} keep {counts.tolist()} heads of their K/V groups of {group}: "
                         "every kept group of a layer must keep the same number")
    return groups


def get_path(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


class Adapter:
    """Base class. Subclasses fill in the class attributes and `layers`; a few override hooks."""

    model_types: ClassVar[tuple[str, ...]] = ()
    causal: ClassVar[bool] = False
    # paths relative to one layer
    q_path: ClassVar[str | None] = None
    k_path: ClassVar[str | None] = None
    v_path: ClassVar[str | None] = None
    fused_qkv_path: ClassVar[str | None] = None  # one projection computes Q, K and V (GPT-2)
    o_path: ClassVar[str] = ""
    ffn_in_paths: ClassVar[tuple[str, ...]] = ()
    ffn_out_path: ClassVar[str] = ""
    gated: ClassVar[bool] = False
    # the module that is swapped for a ConstantOutput once a block loses every unit
    attn_block_path: ClassVar[str] = ""
    ffn_block_path: ClassVar[str | None] = None  # None: zero-width nn.Linear layers already work
    # BERT keeps its attention output projection (and LayerNorm) outside the replaced module
    out_proj_outside_attn_block: ClassVar[bool] = False
    # the residual stream, for cutting hidden dimensions (CoFi); families that leave these empty
    # do not support it. Paths relative to the base model (sources: embedding tables summed into
    # the stream; norms: every normalization of the stream) or to one layer (layer norms).
    stream_source_paths: ClassVar[tuple[str, ...]] = ()
    stream_norm_paths: ClassVar[tuple[str, ...]] = ()
    layer_norm_paths: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.base = getattr(model, model.base_model_prefix, model)

    # ---- family-specific -------------------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def set_head_count(self, layer: nn.Module, heads: int) -> None:
        """Update attributes that must follow the number of query heads (default: none); the
        K/V projections are already cut when this is called."""

    def per_sequence_modules(self) -> list[nn.Module]:
        """Linear layers applied to one token per sequence (poolers, classifiers): for MACs."""
        return []

    def stream_readers(self) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of the linear layers outside the blocks that read the stream: the
        LM head by default; families add poolers and classifier heads."""
        head = self.model.get_output_embeddings()
        if head is None:
            return []
        name = next(n for n, m in self.model.named_modules() if m is head)
        parent, _, attr = name.rpartition(".")
        return [(self.model.get_submodule(parent) if parent else self.model, attr)]

    @property
    def is_lm(self) -> bool:
        """A causal LM with a head that predicts the next token: judged by perplexity, trained on
        next tokens by flop, able to write its own calibration text. A bare decoder (GPT2Model) is not."""
        return self.causal and self.model.get_output_embeddings() is not None

    def max_positions(self) -> int | None:
        """Longest sequence the model's positions allow (None if the config names no limit)."""
        limit = getattr(self.config, "max_position_embeddings", None)
        return limit if isinstance(limit, int) and limit > 0 else None

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream as it is now (CoFi may have cut hidden dimensions)."""
        return getattr(self.config, HIDDEN_KEY, None) or self.config.hidden_size

    @property
    def heads_per_unit(self) -> int:
        """Query heads per K/V head in the dense config (1 without grouped-query attention)."""
        kv = getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
        return self.config.num_attention_heads // kv

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    # ---- attention inputs: overridden by fused-QKV families (GPT-2) ----------------------------
    def attention_inputs(self, i: int) -> list[torch.Tensor]:
        layer = self.layers()[i]
        return [L.weight_of(get_path(layer, p)) for p in (self.q_path, self.k_path, self.v_path)]

    def group_size(self, i: int) -> int:
        """Query heads per K/V head in layer i as it is now: pruning may leave fewer than the config's."""
        if self.heads_per_unit == 1 or self.attention_removed(i):
            return self.heads_per_unit
        layer = self.layers()[i]
        return L.shape_of(get_path(layer, self.q_path))[0] // L.shape_of(get_path(layer, self.k_path))[0]

    def _cut_attention_inputs(self, i: int, keep: torch.Tensor) -> None:
        """Keep the query rows of the heads `keep` and the key/value rows of the K/V heads they read."""
        layer = self.layers()[i]
        groups = kv_groups(keep, self.group_size(i))
        q_rows = L.unit_rows(keep, self.head_dim)
        kv_rows = L.unit_rows(groups, self.head_dim)
        for path, rows in ((self.q_path, q_rows), (self.k_path, kv_rows), (self.v_path, kv_rows)):
            set_path(layer, path, L.sliced(get_path(layer, path), rows=rows))

    # ---- generic ------------------------------------------------------------------------------
    def block_linear_paths(self) -> list[str]:
        """Paths, relative to one layer, of every linear layer of a block (attention, then FFN)."""
        attn = [self.fused_qkv_path] if self.fused_qkv_path else [self.q_path, self.k_path, self.v_path]
        return [*attn, self.o_path, *self.ffn_in_paths, self.ffn_out_path]

    def linear_paths(self) -> list[str]:
        """Paths, from the model's root, of every linear layer inside the transformer blocks."""
        layers = self.layers()
        prefix = next(name for name, module in self.model.named_modules() if module is layers)
        return [f"{prefix}.{i}.{p}" for i in range(self.num_layers) for p in self.block_linear_paths()]

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    def attention_removed(self, i: int) -> bool:
        return isinstance(get_path(self.layers()[i], self.attn_block_path), L.ConstantOutput)

    def ffn_removed(self, i: int) -> bool:
        return self.ffn_block_path is not None and isinstance(
            get_path(self.layers()[i], self.ffn_block_path), L.ConstantOutput
        )

    def output_projection(self, i: int, kind: Kind) -> nn.Module | None:
        """The module whose input is the attention context (attn) or the FFN activations (ffn)."""
        layer = self.layers()[i]
        if kind == "attn":
            if self.attention_removed(i) and not self.out_proj_outside_attn_block:
                return None
            return get_path(layer, self.o_path)
        return None if self.ffn_removed(i) else get_path(layer, self.ffn_out_path)

    def geometry(self, i: int) -> BlockGeometry:
        o = self.output_projection(i, "attn")
        down = self.output_projection(i, "ffn")
        return BlockGeometry(
            d=self.hidden_size,
            units=0 if o is None or self.attention_removed(i) else L.shape_of(o)[1] // self.head_dim,
            heads_per_unit=self.group_size(i),
            head_dim=self.head_dim,
            ffn=0 if down is None else L.shape_of(down)[1],
            gated=self.gated,
        )

    def geometries(self) -> list[BlockGeometry]:
        return [self.geometry(i) for i in range(self.num_layers)]

    def unit_weights(self, i: int, kind: Kind) -> UnitWeights:
        geom = self.geometry(i)
        out = self.output_projection(i, kind)
        if geom.count(kind) == 0:
            raise ValueError(f"layer {i} has no {kind} units left")
        shared = []
        if kind == "attn":
            q, *shared = self.attention_inputs(i)  # query rows per head; key and value rows per K/V head
            ins = [q]
        else:
            ins = [L.weight_of(get_path(self.layers()[i], p)) for p in self.ffn_in_paths]
        return UnitWeights(
            out=L.weight_of(out).detach(),
            bias=None if out.bias is None else out.bias.detach(),
            ins=[w.detach() for w in ins],
            width=geom.width(kind),
            shared_ins=[w.detach() for w in shared],
            group=geom.heads_per_unit if kind == "attn" else 1,
        )

    def prune_block(self, i: int, keep_units: torch.Tensor, keep_neurons: torch.Tensor) -> None:
        """Physically remove every query head and FFN neuron of layer i not listed as kept (and
        every K/V head none of whose query heads is kept; see `kv_groups` for what is legal)."""
        geom = self.geometry(i)
        keep_units = torch.as_tensor(keep_units, dtype=torch.long).sort().values
        keep_neurons = torch.as_tensor(keep_neurons, dtype=torch.long).sort().values
        if geom.units and len(keep_units) < geom.units:
            self._prune_attention(i, keep_units, geom)
        if geom.ffn and len(keep_neurons) < geom.ffn:
            self._prune_ffn(i, keep_neurons)

    def _prune_attention(self, i: int, keep: torch.Tensor, geom: BlockGeometry) -> None:
        kv_groups(keep, geom.heads_per_unit)  # a structure transformers can run, or an error before any cut
        layer = self.layers()[i]
        o = get_path(layer, self.o_path)
        set_path(layer, self.o_path, L.sliced(o, cols=L.unit_rows(keep, geom.unit_width)))
        if len(keep) == 0:
            self._remove_attention(i)
            return
        self._cut_attention_inputs(i, keep)
        self.set_head_count(layer, len(keep))

    def _remove_attention(self, i: int) -> None:
        layer = self.layers()[i]
        if self.out_proj_outside_attn_block:
            replacement = L.ConstantOutput(0, None, returns_tuple=True)
        else:
            o = get_path(layer, self.o_path)
            replacement = L.ConstantOutput(self.hidden_size, o.bias, returns_tuple=True, layer_idx=self._idx(i))
        set_path(layer, self.attn_block_path, replacement)

    def _idx(self, i: int) -> int | None:
        return i if self.causal else None

    def _prune_ffn(self, i: int, keep: torch.Tensor) -> None:
        layer = self.layers()[i]
        down = get_path(layer, self.ffn_out_path)
        if len(keep) == 0 and self.ffn_block_path is not None:
            set_path(layer, self.ffn_block_path, L.ConstantOutput(self.hidden_size, down.bias, returns_tuple=False))
            return
        for path in self.ffn_in_paths:
            set_path(layer, path, L.sliced(get_path(layer, path), rows=keep))
        set_path(layer, self.ffn_out_path, L.sliced(down, cols=keep))

    def set_output(self, i: int, kind: Kind, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Write reconstructed output-projection weights (d x kept columns) and bias."""
        out = self.output_projection(i, kind)
        if out is None:  # the whole block became a constant: only its bias is left
            constant = get_path(self.layers()[i], self.attn_block_path if kind == "attn" else self.ffn_block_path)
            if bias is not None and constant.bias is not None:
                with torch.no_grad():
                    constant.bias.copy_(bias.to(constant.bias.dtype))
            return
        L.assign(out, weight, bias)

    # ---- hidden dimensions: the width of the residual stream ----------------------------------
    @property
    def supports_hidden_cut(self) -> bool:
        """Declared by the family, and the embeddings write the stream directly (no projection
        between them, as ELECTRA-small and OPT-350m have)."""
        return bool(self.stream_source_paths) and self.model.get_input_embeddings().embedding_dim == self.hidden_size

    def stream_sources(self) -> list[nn.Module]:
        return [self.base.get_submodule(p) for p in self.stream_source_paths]

    def stream_norms(self) -> list[nn.Module]:
        """Every normalization of the residual stream, in and outside the blocks."""
        inside = [layer.get_submodule(p) for layer in self.layers() for p in self.layer_norm_paths]
        return [self.base.get_submodule(p) for p in self.stream_norm_paths] + inside

    def cut_hidden(self, keep: torch.Tensor) -> None:
        """Keep only the residual-stream dimensions `keep`, everywhere the stream is read or written."""
        if not self.supports_hidden_cut:
            raise ValueError(f"{type(self).__name__} cannot cut hidden dimensions")
        keep = torch.as_tensor(keep, dtype=torch.long).sort().values
        tied = self.model.get_output_embeddings() is not None and self.model.get_output_embeddings().weight is self.model.get_input_embeddings().weight
        for path in self.stream_source_paths:
            set_path(self.base, path, L.sliced_embedding(self.base.get_submodule(path), keep))
        for path in self.stream_norm_paths:
            set_path(self.base, path, L.sliced_norm(self.base.get_submodule(path), keep))
        for i, layer in enumerate(self.layers()):
            for path in self.layer_norm_paths:
                set_path(layer, path, L.sliced_norm(layer.get_submodule(path), keep))
            self._cut_block_hidden(i, layer, keep)
        for parent, attr in self.stream_readers():
            setattr(parent, attr, L.sliced(getattr(parent, attr), cols=keep))
        if tied:  # an LM head tied to the input embeddings stays tied
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight
        setattr(self.config, HIDDEN_KEY, len(keep))

    def _cut_block_hidden(self, i: int, layer: nn.Module, keep: torch.Tensor) -> None:
        attn_readers = [] if self.attention_removed(i) else ([self.fused_qkv_path] if self.fused_qkv_path else [self.q_path, self.k_path, self.v_path])
        ffn_readers = [] if self.ffn_removed(i) else list(self.ffn_in_paths)
        for path in attn_readers + ffn_readers:
            set_path(layer, path, L.sliced(get_path(layer, path), cols=keep))
        for kind in KINDS:
            out = self.output_projection(i, kind)
            if out is not None:
                set_path(layer, self.o_path if kind == "attn" else self.ffn_out_path, L.sliced(out, rows=keep))
        for path in (self.attn_block_path, self.ffn_block_path):
            block = get_path(layer, path) if path else None
            if isinstance(block, L.ConstantOutput) and block.width:
                block.narrow(keep)

    def sizes(self) -> list[list[int]]:
        """Per-layer [query heads, FFN neurons], and with grouped-query attention a third entry,
        the K/V heads: what a saved config must carry."""
        gqa = self.heads_per_unit > 1
        return [[g.units, g.ffn, g.kv_heads] if gqa else [g.units, g.ffn] for g in self.geometries()]

    def resize(self, sizes: list[list[int]]) -> None:
        """Give a freshly built model the per-layer sizes of a pruned one (weights are loaded after).

        A two-entry size of a GQA model was saved when the attention unit was a whole KV group:
        [KV groups, FFN neurons], every group complete."""
        if len(sizes) != self.num_layers:
            raise ValueError(f"expected sizes for {self.num_layers} layers, got {len(sizes)}")
        g = self.heads_per_unit
        for i, entry in enumerate(sizes):
            if len(entry) == 2:
                (groups, ffn), per_group = entry, g
            else:
                heads, ffn, groups = entry
                per_group = heads // groups if groups else 0
            keep = (torch.arange(groups)[:, None] * g + torch.arange(per_group)[None, :]).reshape(-1)
            self.prune_block(i, keep, torch.arange(ffn))
