"""Half-precision models on CPUs that have no fast half-precision matrix product.

torch multiplies bfloat16 and float16 matrices on a CPU with oneDNN when the CPU has the
instructions for it (AVX-512 with BF16/FP16, AMX). Without them (an AVX2-only CPU, such as an
AMD EPYC before Zen 4) the products fall back to a generic loop: measured on such a host with
2 threads and 7B widths (512 tokens, 4096 x 11008 weight), a forward product x @ W^T ran at
20 GFLOP/s against 105 in float32, and the backward's input gradient g @ W at 0.3 GFLOP/s against
93, so one backward of a 7B-wide layer took minutes.

`float32_products(model)` makes every `nn.Linear` of the model compute its products in float32
while it is active, on such CPUs only: inputs and weights are converted block by block of output
rows (at most FLOAT32_BLOCK_BYTES of converted weight at a time, never a float32 copy of the
model), results are rounded back to the model's dtype. Rounding differs from the half-precision
product only in the order of float32 additions: torch's own half-precision products also add in
float32 and round once at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

HALF = (torch.bfloat16, torch.float16)
# Converted weight rows per block: 64 MB of float32 (4096 rows of a 4096-wide layer).
FLOAT32_BLOCK_BYTES = 64 * 2**20
# Below this many tokens a forward product stays in half precision: converting the weight costs
# more than the slow product (AVX2 host, 2 threads, an 11008 x 4096 weight: 80 ms to convert it;
# bfloat16 43 ms for 10 tokens and 136 for 32, float32 by blocks 130 and 133). Token-by-token
# generation runs below it. The backward's g @ W is upcast at any size (0.3 GFLOP/s in bfloat16).
FLOAT32_MIN_TOKENS = 32


def slow_half_products(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """True when products of `dtype` on `device` take torch's generic (slow) CPU path."""
    if dtype not in HALF or torch.device(device).type != "cpu":
        return False
    try:
        fast = torch.ops.mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else torch.ops.mkldnn._is_mkldnn_fp16_supported()
    except (AttributeError, RuntimeError):  # a build without oneDNN
        fast = False
    return not (fast and torch.backends.mkldnn.is_available())


def _row_blocks(weight: torch.Tensor) -> list[slice]:
    rows = max(1, FLOAT32_BLOCK_BYTES // (4 * weight.shape[1]))
    return [slice(r, min(r + rows, weight.shape[0])) for r in range(0, weight.shape[0], rows)]


class Float32Linear(torch.autograd.Function):
    """y = x W^T + b computed in float32, rounded to x's dtype; saves only the half-precision
    x and W for the backward, as a plain linear does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        if x.numel() < FLOAT32_MIN_TOKENS * x.shape[-1]:
            return F.linear(x, weight, bias)
        x32 = x.float()
        out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
        for rows in _row_blocks(weight):
            b = None if bias is None else bias[rows].float()
            out[..., rows] = F.linear(x32, weight[rows].float(), b)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g32 = grad.float()
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        flat_x = x.reshape(-1, x.shape[-1]).float() if need_w else None
        for rows in _row_blocks(weight):
            if need_x:
                grad_x += g32[..., rows] @ weight[rows].float()
            if need_w:
                grad_w[rows] = (g32[..., rows].reshape(-1, rows.stop - rows.start).T @ flat_x).to(weight.dtype)
        grad_b = g32.reshape(-1, g32.shape[-1]).sum(0).to(weight.dtype) if need_b else None  # False without a bias
        return (grad_x.to(x.dtype) if need_x else None), grad_w, grad_b


def _float32_forward(module: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return Float32Linear.apply(x, module.weight, module.bias)

    return forward


@contextmanager
def float32_products(model: nn.Module) -> Iterator[None]:
    """Inside: every nn.Linear of `model` whose weight is half precision on a CPU without fast
    half-precision products computes in float32 (module docstring). Hooks still run: only the
    modules' forward is replaced, and restored on exit."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and slow_half_products(m.weight.dtype, m.weight.device)]
    previous = [m.__dict__.get("forward") for m in linears]  # an instance forward set by someone else
    for module in linears:
        module.forward = _float32_forward(module)
    try:
        yield
    finally:
        for module, forward in zip(linears, previous):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
