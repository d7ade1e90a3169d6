"""Half-precision linears computed in float32 on CPUs without fast half-precision products."""

import pytest
import torch
from conftest import tiny_batches, tiny_model

from gfprune_ray import cpu_precision
from gfprune_ray.cpu_precision import Float32Linear, float32_products, slow_half_products
from gfprune_ray.curvature import collect_curvature
from gfprune_ray.models import adapter_for
from gfprune_ray.pipeline import mark_heldout


@pytest.mark.parametrize("min_tokens", [0, 1000], ids=["float32-forward", "half-forward"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_linear_matches_the_definition(monkeypatch, dtype, min_tokens):
    """Forward and all three gradients against float64 products of the same half-precision
    values, with weight blocks of 3 rows so that the 40 output rows span 14 uneven blocks; the
    forward of few tokens in half precision as well."""
    monkeypatch.setattr(cpu_precision, "FLOAT32_BLOCK_BYTES", 3 * 4 * 24)
    monkeypatch.setattr(cpu_precision, "FLOAT32_MIN_TOKENS", min_tokens)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(40, 24, generator=gen).to(dtype).requires_grad_()
    b = torch.randn(40, generator=gen).to(dtype).requires_grad_()
    r = torch.randn(3, 5, 40, generator=gen, dtype=torch.float64)
    y = Float32Linear.apply(x, w, b)
    (y.double() * r).sum().backward()

    x64, w64, b64, g = x.detach().double(), w.detach().double(), b.detach().double(), r.to(dtype).double()
    unit = 2.0**-8  # bfloat16's relative rounding is 2^-9, float16's 2^-11

    def close(value, expected, scale):
        assert value.dtype == dtype
        assert ((value.double() - expected).abs() <= unit * scale + 1e-12).all()

    close(y, x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs())
    close(x.grad, g @ w64, g.abs() @ w64.abs())
    gf, xf = g.reshape(-1, 40), x64.reshape(-1, 24)
    close(w.grad, gf.T @ xf, gf.abs().T @ xf.abs())
    close(b.grad, gf.sum(0), gf.abs().sum(0))


def test_only_half_precision_on_cpu_is_redirected():
    assert not slow_half_products(torch.float32)
    assert not slow_half_products(torch.bfloat16, "cuda")
    fast = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert slow_half_products(torch.bfloat16) == (not fast)


def test_a_model_under_float32_products_gives_its_own_statistics(monkeypatch):
    """A bfloat16 Llama's curvature statistics and logits inside the context agree with the plain
    bfloat16 ones to half-precision rounding (hooks still fire, gradients still flow), and the
    modules' own forward is back afterwards."""
    model = tiny_model("llama").to(torch.bfloat16)
    adapter = adapter_for(model)
    batches = mark_heldout(tiny_batches())
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    monkeypatch.setattr(cpu_precision, "slow_half_products", lambda dtype, device="cpu": False)
    plain = collect_curvature(adapter, batches)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    monkeypatch.setattr(cpu_precision, "slow_half_products", lambda dtype, device="cpu": True)
    redirected = collect_curvature(adapter, batches)
    linear = model.model.layers[0].mlp.down_proj
    with torch.no_grad(), float32_products(model):
        redirected_logits = model(input_ids=ids, attention_mask=mask).logits
        assert "forward" in vars(linear)
    assert "forward" not in vars(linear)
    torch.testing.assert_close(redirected_logits.float(), logits.float(), rtol=0.05, atol=0.05)
    differ = 0  # float32 products add in another order than bfloat16 ones: a few values move
    for part in ("fit", "heldout", "grads"):
        for site, stats in getattr(plain, part).sites.items():
            other = getattr(redirected, part).sites[site]
            assert other.n == stats.n
            scale = stats.gram.abs().max()
            assert scale > 0
            assert (other.gram - stats.gram).abs().max() <= 0.05 * scale, (part, site)
            differ += not torch.equal(other.gram, stats.gram)
    assert differ > 0
