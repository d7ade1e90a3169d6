"""OPT decoders."""

from __future__ import annotations

from torch import nn

from .base import Adapter


class OPTAdapter(Adapter):
    model_types = ("opt",)
    causal = True
    q_path = "self_attn.q_proj"
    k_path = "self_attn.k_proj"
    v_path = "self_attn.v_proj"
    o_path = "self_attn.out_proj"
    ffn_in_paths = ("fc1",)
    ffn_out_path = "fc2"
    attn_block_path = "self_attn"

    def layers(self) -> nn.ModuleList:
        return self.base.decoder.layers

    def set_head_count(self, layer: nn.Module, heads: int) -> None:
        layer.self_attn.num_heads = heads
