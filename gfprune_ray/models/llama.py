"""Llama-layout decoders (Llama, Mistral, Qwen2, Qwen3): gated FFN, grouped-query attention.

With grouped-query attention the attention unit is still one query head; a key/value head goes
once none of the query heads that read it is left. Head counts live nowhere in these modules
(shapes are inferred) except `num_key_value_groups`, how many times attention repeats each K/V
head: one number per layer, which `set_head_count` sets from what the layer kept.
"""

from __future__ import annotations

from torch import nn

from . import layers as L
from .base import Adapter


class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    causal = True
    gated = True
    q_path = "self_attn.q_proj"
    k_path = "self_attn.k_proj"
    v_path = "self_attn.v_proj"
    o_path = "self_attn.o_proj"
    ffn_in_paths = ("mlp.gate_proj", "mlp.up_proj")
    ffn_out_path = "mlp.down_proj"
    attn_block_path = "self_attn"
    stream_source_paths = ("embed_tokens",)
    stream_norm_paths = ("norm",)
    layer_norm_paths = ("input_layernorm", "post_attention_layernorm")

    def layers(self) -> nn.ModuleList:
        return self.base.layers

    def set_head_count(self, layer: nn.Module, heads: int) -> None:
        attention = layer.self_attn
        kv_heads = L.shape_of(attention.k_proj)[0] // attention.head_dim
        attention.num_key_value_groups = heads // kv_heads
