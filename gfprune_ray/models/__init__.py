"""Model adapters, one per architecture family: the only code that knows module names."""

from __future__ import annotations

from torch import nn

from .base import KINDS, Adapter, BlockGeometry, Kind, UnitWeights
from .bert import BertAdapter
from .distilbert import DistilBertAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter
from .mpnet import MPNetAdapter
from .opt import OPTAdapter

ADAPTERS: tuple[type[Adapter], ...] = (BertAdapter, DistilBertAdapter, GPT2Adapter, OPTAdapter, LlamaAdapter, MPNetAdapter)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a loaded transformers model, chosen by its config's model_type."""
    model_type = getattr(model.config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise ValueError(f"unsupported model type {model_type!r}; supported: {', '.join(supported_model_types())}")


__all__ = ["ADAPTERS", "KINDS", "Adapter", "BlockGeometry", "Kind", "UnitWeights", "adapter_for", "supported_model_types"]
