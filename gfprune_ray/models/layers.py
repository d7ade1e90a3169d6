"""Generic surgery on linear layers: slicing rows and columns of nn.Linear and GPT-2's Conv1D.

Nothing here knows a module name; the adapters say which module to cut and where.
Weights are always handled in nn.Linear layout, (out_features, in_features).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D



class FactorizedLinear(nn.Module):
    """A linear layer stored as two thin ones, (out x rank) after (rank x in): what FLOP leaves of
    a weight matrix once its zero-gated rank-1 components are dropped. Cheaper than the dense
    layer only while rank * (in + out) < in * out."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None):
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=dtype)

    @property
    def rank(self) -> int:
        return self.first.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


LinearLike = nn.Linear | Conv1D | FactorizedLinear


def weight_of(module: LinearLike) -> torch.Tensor:
    """The weight in (out, in) layout; Conv1D stores it transposed, a factorized layer as a product."""
    if isinstance(module, FactorizedLinear):
        return module.second.weight @ module.first.weight
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def bias_of(module: LinearLike) -> torch.Tensor | None:
    return module.bias


def shape_of(module: LinearLike) -> tuple[int, int]:
    out_features, in_features = weight_of(module).shape
    return out_features, in_features


def build_like(module: LinearLike, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearLike:
    """A new module of the same type holding `weight` (out, in) and `bias`."""
    out_features, in_features = weight.shape
    if isinstance(module, Conv1D):
        new = Conv1D(out_features, in_features)
        new.weight = nn.Parameter(weight.T.contiguous().clone())
        new.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros(out_features, dtype=weight.dtype))
        return new
    new = nn.Linear(in_features, out_features, bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def sliced(module: LinearLike, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> LinearLike:
    """Keep only output features `rows` and input features `cols` (index tensors)."""
    with torch.no_grad():
        weight = weight_of(module)
        bias = bias_of(module)
        if rows is not None:
            weight = weight[rows]
            bias = bias[rows] if bias is not None else None
        if cols is not None:
            weight = weight[:, cols]
    return build_like(module, weight, bias)


def assign(module: LinearLike, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Overwrite a module's weight (out, in) and bias in place, in the module's dtype."""
    with torch.no_grad():
        target = weight_of(module)
        target.copy_(weight.to(target.dtype))
        if bias is not None:
            if module.bias is None:
                raise ValueError("cannot give a bias to a layer built without one")
            module.bias.copy_(bias.to(module.bias.dtype))


def sliced_embedding(module: nn.Embedding, keep: torch.Tensor) -> nn.Embedding:
    """The embedding table with only the dimensions `keep`."""
    new = nn.Embedding(module.num_embeddings, len(keep), padding_idx=module.padding_idx, dtype=module.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(module.weight[:, keep])
    return new


def sliced_norm(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A LayerNorm or RMSNorm over only the dimensions `keep` (its statistics too)."""
    new = copy.deepcopy(module)
    with torch.no_grad():
        new.weight = nn.Parameter(module.weight[keep].clone())
        if getattr(module, "bias", None) is not None:
            new.bias = nn.Parameter(module.bias[keep].clone())
    if isinstance(new, nn.LayerNorm):
        new.normalized_shape = (len(keep),)
    return new


def norm_over(module: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """What `sliced_norm(module, keep)` computes on x[..., keep], scattered back into a zero tensor
    of x's shape: the norm of a stream whose other dimensions are gated off."""
    sub = x.index_select(-1, keep)
    if isinstance(module, nn.LayerNorm):
        bias = module.bias[keep] if module.bias is not None else None
        y = nn.functional.layer_norm(sub, (len(keep),), module.weight[keep], bias, module.eps)
    else:  # RMSNorm (Llama family): statistics in float32, as transformers computes them
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
        h = sub.float()
        y = module.weight[keep] * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return torch.zeros_like(x).index_copy(-1, keep, y.to(x.dtype))


def unit_rows(units: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of whole units of `width` consecutive rows (heads, K/V heads)."""
    offsets = torch.arange(width)
    return (units[:, None] * width + offsets[None, :]).reshape(-1)


class ConstantOutput(nn.Module):
    """Stands in for an attention block or FFN that lost all of its units.

    Its output is the bias of the removed output projection (zeros without one), which is exactly
    what the block computes once every unit feeding that projection is gone. Decoders still advance
    the KV cache with zero heads so that the cache length stays right for `generate`.
    """

    def __init__(self, width: int, bias: torch.Tensor | None, returns_tuple: bool, layer_idx: int | None = None):
        super().__init__()
        self.width = width
        self.returns_tuple = returns_tuple
        self.layer_idx = layer_idx
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def narrow(self, keep: torch.Tensor) -> None:
        """Keep only the output dimensions `keep` (the residual stream lost the others)."""
        self.width = len(keep)
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach()[keep].clone())

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        shape = (*hidden_states.shape[:-1], self.width)
        out = hidden_states.new_zeros(shape)
        if self.bias is not None:
            # a new tensor, not an expanded view of the parameter: under inference_mode a view would
            # still claim requires_grad (with no grad_fn), which breaks module hooks such as
            # FlopCounterMode's, and an in-place op downstream could write into the shared bias
            out = out + self.bias.to(hidden_states.dtype)
        cache = kwargs.get("past_key_values")
        if cache is not None and self.layer_idx is not None:
            empty = hidden_states.new_zeros(hidden_states.shape[0], 0, hidden_states.shape[1], 1)
            cache.update(empty, empty, self.layer_idx)
        return (out, None) if self.returns_tuple else out
