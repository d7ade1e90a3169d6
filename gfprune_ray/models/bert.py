"""BERT-style encoders: BERT, RoBERTa (and MiniLM, which is a BERT), with or without a task head."""

from __future__ import annotations

from torch import nn

from .base import Adapter


class BertAdapter(Adapter):
    model_types = ("bert", "roberta", "xlm-roberta", "camembert", "electra")
    q_path = "attention.self.query"
    k_path = "attention.self.key"
    v_path = "attention.self.value"
    o_path = "attention.output.dense"
    ffn_in_paths = ("intermediate.dense",)
    ffn_out_path = "output.dense"
    attn_block_path = "attention.self"
    out_proj_outside_attn_block = True  # attention.output keeps its LayerNorm over (bias + residual)
    stream_source_paths = ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings")
    stream_norm_paths = ("embeddings.LayerNorm",)
    layer_norm_paths = ("attention.output.LayerNorm", "output.LayerNorm")

    def layers(self) -> nn.ModuleList:
        return self.base.encoder.layer

    def set_head_count(self, layer: nn.Module, heads: int) -> None:
        attention = layer.attention.self
        attention.num_attention_heads = heads
        attention.all_head_size = heads * attention.attention_head_size

    def max_positions(self) -> int | None:
        limit = super().max_positions()
        if limit is not None and self.config.model_type != "bert" and self.config.model_type != "electra":
            limit -= (self.config.pad_token_id or 0) + 1  # RoBERTa numbers positions from pad_token_id + 1
        return limit

    def stream_readers(self) -> list[tuple[nn.Module, str]]:
        found = super().stream_readers()
        pooler = getattr(self.base, "pooler", None)
        if pooler is not None:
            found.append((pooler, "dense"))
        classifier = getattr(self.model, "classifier", None)
        if classifier is not None and hasattr(classifier, "out_proj"):  # RoBERTa's head reads <s> itself
            found.append((classifier, "dense"))
        return found

    def per_sequence_modules(self) -> list[nn.Module]:
        found = []
        pooler = getattr(self.base, "pooler", None)
        if pooler is not None:
            found.append(pooler.dense)
        classifier = getattr(self.model, "classifier", None)
        if isinstance(classifier, nn.Linear):  # BertForSequenceClassification: on the pooled token
            found.append(classifier)
        elif classifier is not None:  # RobertaClassificationHead: dense + out_proj on <s>
            found.extend(m for m in classifier.modules() if isinstance(m, nn.Linear))
        return found
