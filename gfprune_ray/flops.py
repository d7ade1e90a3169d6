"""Analytic MACs (multiply-accumulates) per token, and budget arithmetic.

Per token, with s the sequence length attended over and dh the head size:
- a query head costs 2*d*dh (its rows of Q, its columns of O) + 2*s*dh (scores and weighted sum);
- a key/value head costs 2*d*dh (its rows of K and V), once, however many of the query heads that
  share it (its KV group) are kept. Attention MACs are therefore not additive over heads: a layer
  keeping n K/V heads with k query heads each costs n*(2*d*dh*k + 2*d*dh + 2*s*dh*k). Without
  grouped-query attention (k = 1) a head costs the 4*d*dh + 2*s*dh of DESIGN 5;
- an FFN neuron costs 2*d, or 3*d in a gated FFN.
Everything else (embeddings, LM head, poolers) is not prunable and is reported separately.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import KINDS, Adapter, BlockGeometry, Kind
from .models import layers as L


def group_macs(geom: BlockGeometry, heads: int, seq_len: float) -> float:
    """MACs per token of one K/V head and `heads` query heads that share it."""
    d, dh = geom.d, geom.head_dim
    return 2 * d * dh * heads + 2 * d * dh + 2 * seq_len * dh * heads


def attention_macs(geom: BlockGeometry, groups: int, heads_per_group: int, seq_len: float) -> float:
    """MACs per token of an attention that keeps `groups` K/V heads with `heads_per_group` query
    heads each: the structures a layer can have (`models.base.kv_groups`)."""
    return groups * group_macs(geom, heads_per_group, seq_len) if groups else 0.0


def unit_macs(geom: BlockGeometry, kind: Kind, seq_len: float) -> float:
    """MACs per token of one unit of the given kind. For attention, the average query head of the
    layer as it is: its own MACs and its share of its K/V head's (so units x unit_macs is the
    layer's attention); what a set of heads costs is `kept_site_macs`, not a sum of these."""
    if kind == "attn":
        return group_macs(geom, geom.heads_per_unit, seq_len) / geom.heads_per_unit
    return (3 if geom.gated else 2) * geom.d


def site_macs(geom: BlockGeometry, kind: Kind, seq_len: float) -> float:
    """MACs per token of a block's attention (or FFN) as it is now."""
    if kind == "attn":
        return attention_macs(geom, geom.kv_heads, geom.heads_per_unit, seq_len)
    return geom.ffn * unit_macs(geom, kind, seq_len)


def kept_site_macs(geom: BlockGeometry, kind: Kind, keep: torch.Tensor, seq_len: float) -> float:
    """MACs per token of a block's attention (or FFN) that keeps the units marked in `keep`: per
    K/V group, its K/V head if any of its query heads is kept, plus the kept query heads."""
    if kind == "ffn":
        return int(keep.sum()) * unit_macs(geom, kind, seq_len)
    counts = keep.reshape(-1, geom.heads_per_unit).sum(1)
    counts = counts[counts > 0].tolist()
    if len(set(counts)) <= 1:  # the structures a layer can have: n groups of k heads each
        return attention_macs(geom, len(counts), counts[0] if counts else 0, seq_len)
    return sum(group_macs(geom, c, seq_len) for c in counts)


def prunable_macs(geoms: list[BlockGeometry], seq_len: float) -> float:
    """MACs per token of everything the search may remove."""
    return sum(site_macs(g, k, seq_len) for g in geoms for k in KINDS)


def _prunable_modules(adapter: Adapter) -> set[int]:
    ids = set()
    for i in range(adapter.num_layers):
        layer = adapter.layers()[i]
        for module in layer.modules():
            if isinstance(module, L.LinearLike):
                ids.add(id(module))
    return ids


def other_macs(adapter: Adapter, seq_len: int) -> float:
    """MACs of one sequence outside the transformer blocks: LM heads, poolers, classifiers.

    Linear layers applied to every token count seq_len times; the adapter names those applied to
    one token per sequence. A tied LM head is a Linear too, so it is counted like any other.
    """
    inside = _prunable_modules(adapter)
    once = {id(m) for m in adapter.per_sequence_modules()}
    total = 0.0
    for module in adapter.model.modules():
        if isinstance(module, L.LinearLike) and id(module) not in inside:
            out_features, in_features = L.shape_of(module)
            total += out_features * in_features * (1 if id(module) in once else seq_len)
    return total


def factorization_savings(adapter: Adapter) -> float:
    """MACs per token that factorized layers (FLOP) save against the dense matrices that the
    block geometry assumes."""
    saved = 0.0
    for module in adapter.model.modules():
        if isinstance(module, L.FactorizedLinear):
            n_in, n_out = module.first.in_features, module.second.out_features
            saved += n_in * n_out - module.rank * (n_in + n_out)
    return saved


def kept_prunable_macs(adapter: Adapter, seq_len: float) -> float:
    """MACs per token of the prunable parts as the model is now."""
    return prunable_macs(adapter.geometries(), seq_len) - factorization_savings(adapter)


def model_macs(adapter: Adapter, seq_len: int) -> float:
    """Analytic MACs of one forward pass over one sequence of seq_len tokens."""
    return seq_len * kept_prunable_macs(adapter, seq_len) + other_macs(adapter, seq_len)


def _sdpa_macs_mapping() -> dict:
    """FlopCounterMode has no formula for the fused CPU attention kernel that SDPA picks on CPU
    (`_scaled_dot_product_flash_attention_for_cpu`), so it would count attention scores and the
    weighted sum as zero. Give that kernel the formula torch uses for the GPU SDPA kernels."""
    from torch.utils.flop_counter import sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {op: formula}


def counted_macs(model: nn.Module, input_ids: torch.Tensor) -> float:
    """MACs that torch's FlopCounterMode counts for one forward pass (it reports 2 FLOPs per MAC).

    Like torch's own SDPA formulas (and like `unit_macs`), causal attention is counted in full."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_sdpa_macs_mapping())
    with counter, torch.inference_mode():
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return counter.get_total_flops() / 2
