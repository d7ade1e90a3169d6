"""DistilBERT encoders, with or without a task head."""

from __future__ import annotations

from torch import nn

from .base import Adapter


class DistilBertAdapter(Adapter):
    model_types = ("distilbert",)
    q_path = "attention.q_lin"
    k_path = "attention.k_lin"
    v_path = "attention.v_lin"
    o_path = "attention.out_lin"
    ffn_in_paths = ("ffn.lin1",)
    ffn_out_path = "ffn.lin2"
    attn_block_path = "attention"

    @property
    def hidden_size(self) -> int:
        return self.config.dim

    @property
    def head_dim(self) -> int:
        return self.config.dim // self.config.n_heads

    @property
    def heads_per_unit(self) -> int:
        return 1

    def layers(self) -> nn.ModuleList:
        return self.base.transformer.layer

    def set_head_count(self, layer: nn.Module, heads: int) -> None:
        layer.attention.n_heads = heads

    def per_sequence_modules(self) -> list[nn.Module]:
        return [m for name in ("pre_classifier", "classifier") if isinstance(m := getattr(self.model, name, None), nn.Linear)]
