"""MPNet encoders (all-mpnet-base-v2 and other sentence-transformers MPNets), with or without a task head.

MPNet adds a relative position bias to the attention scores. The encoder computes it once for all
heads (`encoder.relative_attention_bias`, one column per head) and hands the same tensor to every
layer, so a layer that lost heads must read only the columns of the heads it kept. Such a layer's
self-attention carries the original indices of its kept heads in a buffer (saved with the weights,
so a reloaded model slices the bias the same way) and a forward pre-hook selects those columns.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, get_path

HEADS_BUFFER = "position_bias_heads"  # original head indices whose bias columns a pruned layer reads


def _select_bias_heads(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a pruned MPNetSelfAttention: (hidden, mask, position_bias, ...) with the
    position bias narrowed to the kept heads."""
    if len(args) < 3 or args[2] is None:
        return args
    heads = getattr(module, HEADS_BUFFER)
    return (*args[:2], args[2].index_select(1, heads), *args[3:])


class MPNetAdapter(Adapter):
    model_types = ("mpnet",)
    q_path = "attention.attn.q"
    k_path = "attention.attn.k"
    v_path = "attention.attn.v"
    o_path = "attention.attn.o"
    ffn_in_paths = ("intermediate.dense",)
    ffn_out_path = "output.dense"
    # the output projection lives inside MPNetSelfAttention; MPNetAttention keeps the LayerNorm over
    # (output + residual), so an attention that lost every head is replaced by its output bias
    attn_block_path = "attention.attn"
    stream_source_paths = ("embeddings.word_embeddings", "embeddings.position_embeddings")
    stream_norm_paths = ("embeddings.LayerNorm",)
    layer_norm_paths = ("attention.LayerNorm", "output.LayerNorm")

    def layers(self) -> nn.ModuleList:
        return self.base.encoder.layer

    def _cut_attention_inputs(self, i: int, keep: torch.Tensor) -> None:
        super()._cut_attention_inputs(i, keep)
        attention = get_path(self.layers()[i], self.attn_block_path)
        previous = getattr(attention, HEADS_BUFFER, None)
        heads = keep.clone() if previous is None else previous[keep]  # indices into the original heads
        if previous is None:
            attention.register_buffer(HEADS_BUFFER, heads)
            attention.register_forward_pre_hook(_select_bias_heads)
        else:
            setattr(attention, HEADS_BUFFER, heads)

    def set_head_count(self, layer: nn.Module, heads: int) -> None:
        attention = layer.attention.attn
        attention.num_attention_heads = heads
        attention.all_head_size = heads * attention.attention_head_size

    def max_positions(self) -> int | None:
        limit = super().max_positions()
        if limit is not None:
            limit -= self.base.embeddings.padding_idx + 1  # positions are numbered from padding_idx + 1
        return limit

    @property
    def supports_hidden_cut(self) -> bool:
        # MPNetForMaskedLM's decoder is tied to the word embeddings but reads the head's own space
        return super().supports_hidden_cut and getattr(self.model, "lm_head", None) is None

    def stream_readers(self) -> list[tuple[nn.Module, str]]:
        """Linear layers outside the blocks that read the stream (the last hidden states)."""
        pooler = getattr(self.base, "pooler", None)
        classifier = getattr(self.model, "classifier", None)
        found = [(pooler, "dense")] if pooler is not None else []
        if classifier is not None and hasattr(classifier, "out_proj"):  # MPNetClassificationHead, on <s>
            found.append((classifier, "dense"))
        elif isinstance(classifier, nn.Linear) and pooler is None:  # token classification (multiple choice reads the pooler)
            found.append((self.model, "classifier"))
        if isinstance(getattr(self.model, "qa_outputs", None), nn.Linear):
            found.append((self.model, "qa_outputs"))
        return found

    def per_sequence_modules(self) -> list[nn.Module]:
        pooler = getattr(self.base, "pooler", None)
        classifier = getattr(self.model, "classifier", None)
        found = [pooler.dense] if pooler is not None else []
        if classifier is not None and hasattr(classifier, "out_proj"):
            found.extend([classifier.dense, classifier.out_proj])
        elif isinstance(classifier, nn.Linear) and pooler is not None:  # multiple choice: on the pooled token
            found.append(classifier)
        return found
