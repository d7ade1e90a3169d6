"""Llama-layout decoders (Llama, Mistral, Qwen2, Qwen3): gated FFN, grouped-query attention.

With grouped-query attention the attention unit is a whole KV group: one key/value head and the
query heads that read it. Head counts live nowhere in these modules (shapes are inferred), so
nothing but the weights has to change.
"""

from __future__ import annotations

from torch import nn

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
