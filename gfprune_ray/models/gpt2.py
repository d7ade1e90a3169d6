"""GPT-2 decoders: fused QKV in one Conv1D, weights stored transposed."""

from __future__ import annotations

import torch
from torch import nn

from . import layers as L
from .base import Adapter, get_path


class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    causal = True
    fused_qkv_path = "attn.c_attn"
    o_path = "attn.c_proj"
    ffn_in_paths = ("mlp.c_fc",)
    ffn_out_path = "mlp.c_proj"
    attn_block_path = "attn"
    ffn_block_path = "mlp"  # a Conv1D cannot take a zero-width input, so an empty FFN becomes a constant
    stream_source_paths = ("wte", "wpe")
    stream_norm_paths = ("ln_f",)
    layer_norm_paths = ("ln_1", "ln_2")

    def layers(self) -> nn.ModuleList:
        return self.base.h

    def _qkv_width(self, i: int) -> int:
        return L.shape_of(get_path(self.layers()[i], self.fused_qkv_path))[0] // 3

    def attention_inputs(self, i: int) -> list[torch.Tensor]:
        return list(L.weight_of(self.layers()[i].attn.c_attn).split(self._qkv_width(i), dim=0))

    def _cut_attention_inputs(self, i: int, keep: torch.Tensor) -> None:
        attn = self.layers()[i].attn
        width = self._qkv_width(i)
        rows = L.unit_rows(keep, self.head_dim)
        attn.c_attn = L.sliced(attn.c_attn, rows=torch.cat([rows, rows + width, rows + 2 * width]))

    def set_head_count(self, layer: nn.Module, heads: int) -> None:
        layer.attn.num_heads = heads
        layer.attn.split_size = heads * layer.attn.head_dim
