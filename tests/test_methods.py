"""Scoring methods: KCM behaves as described, every method gives sane scores, baselines are exact."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_batches, tiny_model
from gfprune_ray.methods import METHODS
from gfprune_ray.methods.gfp import kcm_self_weights
from gfprune_ray.models import adapter_for
from gfprune_ray.models import layers as L
from gfprune_ray.pipeline import calibrate, score_sites, site_generator
from gfprune_ray.stats import collect_stats


# ---- KCM -------------------------------------------------------------------------------------


def test_kcm_duplicated_point_weighs_less_than_an_isolated_one():
    g = torch.Generator().manual_seed(0)
    copies = 1e-3 * torch.randn(20, 4, generator=g)  # 20 near-identical points at the origin
    isolated = torch.full((1, 4), 5.0)  # far from everything (kernel value ~ e^-100)
    weights = kcm_self_weights(torch.cat([copies, isolated]))
    assert weights.shape == (21,)
    assert torch.isfinite(weights).all() and (weights >= 0).all()
    assert weights[20] > 5 * weights[:20].max()
    # each copy can be stood in for by the other 19: its own weight is about 1/20, the isolated
    # point has nobody to stand in for it and keeps a weight near 1
    assert weights[:20].max() < 0.1
    assert weights[20] > 0.9


def test_kcm_point_in_a_pair_weighs_less_than_a_lone_point():
    g = torch.Generator().manual_seed(1)
    spread = 3.0 * torch.eye(6)  # six points, pairwise far apart
    points = torch.cat([spread, spread[:1] + 1e-3 * torch.randn(1, 6, generator=g)])  # point 0 gets a twin
    weights = kcm_self_weights(points)
    assert weights[0] < weights[1:6].min() and weights[6] < weights[1:6].min()


def test_kcm_above_the_block_size_solves_near_equal_random_blocks_alone():
    """k identical points have the fixed point C = 1/k (K C = K for C = 1/k everywhere), so each of
    40 near-copies weighs 1/40 in one solve, and 1/(its block's size) when blocks are solved alone:
    40 points in blocks of at most 16 are three blocks of 14, 13 and 13."""
    copies = 1e-4 * torch.randn(40, 3, generator=torch.Generator().manual_seed(2))
    whole = kcm_self_weights(copies, block=40)
    assert torch.allclose(whole, torch.full((40,), 1 / 40, dtype=torch.float64), rtol=1e-3)
    blocked = kcm_self_weights(copies, block=16)
    sizes = torch.round(1 / blocked)
    assert sorted(sizes.tolist()) == [13.0] * 26 + [14.0] * 14
    assert torch.allclose(blocked, 1 / sizes, rtol=1e-3)
    assert torch.equal(blocked, kcm_self_weights(copies, block=16)), "the partition is seeded: scores do not change between runs"


# ---- every method on every family ------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated():
    cache = {}

    def get(family):
        if family not in cache:
            adapter = adapter_for(tiny_model(family))
            calibration = calibrate(adapter, tiny_batches(n_batches=5), seq_len=10.0)
            cache[family] = (adapter, calibration)
        return cache[family]

    return get


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_finite_nonnegative_scores(family, method, calibrated):
    adapter, calibration = calibrated(family)
    scores = score_sites(adapter, calibration.total, method, seed=0)
    geoms = adapter.geometries()
    expected_sites = {(i, k) for i, g in enumerate(geoms) for k in ("attn", "ffn") if g.count(k)}
    assert set(scores) == expected_sites
    assert {k for (_, k) in scores} == {"attn", "ffn"}
    for (i, kind), s in scores.items():
        assert s.ndim == 1 and s.shape[0] == geoms[i].count(kind), (i, kind, s.shape)
        assert torch.isfinite(s).all(), (i, kind)
        assert (s >= 0).all(), (i, kind)
        if method != "gfp-r2" or geoms[i].count(kind) > 1:
            assert s.max() > 0, (i, kind)  # not all zero: the scores carry information


def test_random_scores_are_deterministic_per_seed():
    adapter = adapter_for(tiny_model("llama"))
    stats = collect_stats(adapter, tiny_batches(2))
    a = score_sites(adapter, stats, "random", seed=0)
    b = score_sites(adapter, stats, "random", seed=0)
    c = score_sites(adapter, stats, "random", seed=1)
    for site in a:
        assert torch.equal(a[site], b[site])
    assert any(not torch.equal(a[site], c[site]) for site in a)
    assert all(not torch.equal(a[site], c[site]) for site in a if len(a[site]) > 1)
    # sites draw from their own generators: equal-sized sites do not get the same numbers
    assert not torch.equal(a[(0, "ffn")], a[(1, "ffn")])
    # and a site's numbers do not depend on which other sites are scored, or in which order
    first = torch.rand(5, generator=site_generator(0, (1, "ffn")))
    again = torch.rand(5, generator=site_generator(0, (1, "ffn")))
    assert torch.equal(first, again)
    assert not torch.equal(first, torch.rand(5, generator=site_generator(1, (1, "ffn"))))


def test_non_random_methods_ignore_the_seed():
    adapter = adapter_for(tiny_model("bert"))
    stats = collect_stats(adapter, tiny_batches(2))
    for method in ("gfp", "fluctuation", "magnitude"):
        a = score_sites(adapter, stats, method, seed=0)
        b = score_sites(adapter, stats, method, seed=5)
        for site in a:
            assert torch.equal(a[site], b[site]), (method, site)


# ---- baselines and D2 against activations captured directly -----------------------------------


def _captured_inputs(adapter, batches, layer, kind):
    """Inputs of a site's output projection over the non-padding tokens, captured by our own hook."""
    captured = []
    module = adapter.output_projection(layer, kind)

    def hook(_module, args):
        x = args[0]
        captured.append(x.reshape(-1, x.shape[-1]).detach().to(torch.float64))

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            for b in batches:
                adapter.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        handle.remove()
    mask = torch.cat([b["attention_mask"].bool().flatten() for b in batches])
    return torch.cat(captured)[mask], L.weight_of(module).detach().to(torch.float64)


@pytest.mark.parametrize("name", ["bert", "gpt2", "opt", "llama"])
def test_fluctuation_of_a_neuron_is_variance_times_column_norm(name):
    adapter = adapter_for(tiny_model(name))
    batches = tiny_batches(n_batches=3, seed=4)
    stats = collect_stats(adapter, batches)
    scores = score_sites(adapter, stats, "fluctuation")
    for layer in range(adapter.num_layers):
        acts, w2 = _captured_inputs(adapter, batches, layer, "ffn")
        assert acts.shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)
        expected = acts.var(0, unbiased=False) * w2.pow(2).sum(0)
        torch.testing.assert_close(scores[(layer, "ffn")], expected, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_fluctuation_and_d2_of_a_head_are_output_variance_and_energy(name):
    """Without curvature (G = I): fluctuation is the variance of what the unit writes, D2 its
    energy, with each unit's activity shrunk toward the layer's mean by gfp.ACTIVITY_PRIOR:
    (1 - p) E|W_u x_u|^2 + p mean_c(E[x_c^2]) |W_u|_F^2."""
    from gfprune_ray.methods.gfp import ACTIVITY_PRIOR as p

    adapter = adapter_for(tiny_model(name))
    batches = tiny_batches(n_batches=3, seed=5)
    stats = collect_stats(adapter, batches)
    fluctuation = score_sites(adapter, stats, "fluctuation")
    d2 = score_sites(adapter, stats, "gfp-d2")
    for layer in range(adapter.num_layers):
        geom = adapter.geometry(layer)
        context, o = _captured_inputs(adapter, batches, layer, "attn")
        width = geom.unit_width
        variance, energy = [], []
        for u in range(geom.units):
            cols = slice(u * width, (u + 1) * width)
            out = context[:, cols] @ o[:, cols].T  # what the unit writes into the residual stream
            variance.append(out.var(0, unbiased=False).sum())
            energy.append((1 - p) * out.pow(2).sum(1).mean() + p * context.pow(2).mean() * o[:, cols].pow(2).sum())
        torch.testing.assert_close(fluctuation[(layer, "attn")], torch.stack(variance), rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(d2[(layer, "attn")], torch.stack(energy), rtol=1e-4, atol=1e-10)
        # and for neurons D2 = ((1 - p) E[a_i^2] + p mean_j E[a_j^2]) |W2[:, i]|^2
        acts, w2 = _captured_inputs(adapter, batches, layer, "ffn")
        activity = (1 - p) * acts.pow(2).mean(0) + p * acts.pow(2).mean()
        torch.testing.assert_close(d2[(layer, "ffn")], activity * w2.pow(2).sum(0), rtol=1e-4, atol=1e-10)


def test_magnitude_is_squared_norm_of_the_units_weights():
    adapter = adapter_for(tiny_model("bert"))
    stats = collect_stats(adapter, tiny_batches(1))
    scores = score_sites(adapter, stats, "magnitude")
    layer = adapter.layers()[0]
    w1 = layer.intermediate.dense.weight.detach().to(torch.float64)
    w2 = layer.output.dense.weight.detach().to(torch.float64)
    torch.testing.assert_close(scores[(0, "ffn")], w1.pow(2).sum(1) + w2.pow(2).sum(0))
    q, k, v = (getattr(layer.attention.self, n).weight.detach().to(torch.float64) for n in ("query", "key", "value"))
    o = layer.attention.output.dense.weight.detach().to(torch.float64)
    expected = torch.stack([
        sum(m[h * 8:(h + 1) * 8].pow(2).sum() for m in (q, k, v)) + o[:, h * 8:(h + 1) * 8].pow(2).sum()
        for h in range(4)
    ])
    torch.testing.assert_close(scores[(0, "attn")], expected)


def test_gfp_is_r2_times_d2():
    adapter = adapter_for(tiny_model("llama"))
    stats = collect_stats(adapter, tiny_batches(2))
    gfp = score_sites(adapter, stats, "gfp")
    d2 = score_sites(adapter, stats, "gfp-d2")
    for site in gfp:
        ratio = gfp[site] / d2[site]  # R2, scaled to a maximum of 1 within the site
        assert ratio.max() == pytest.approx(1.0, rel=1e-9)
        assert (ratio > 0).all() and (ratio <= 1 + 1e-12).all()


def test_random_keeps_heads_and_neurons_in_proportion():
    """Random must be random per MAC: a random score per unit would make the global search drop
    the dearer heads first (DESIGN 10's collapse), which is not a fair baseline."""
    import transformers as T

    from gfprune_ray.pipeline import calibrate, score_sites, search_masks

    config = T.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=16, intermediate_size=256, max_position_embeddings=64)
    adapter = adapter_for(T.BertModel(config).eval())
    calibration = calibrate(adapter, tiny_batches(n_batches=2), 10.0)
    for seed in range(3):
        scores = score_sites(adapter, calibration.total, "random", seed)
        masks = search_masks(scores, adapter, 0.5, calibration.seq_len)
        heads = sum(int(m.sum()) for (_, k), m in masks.keep.items() if k == "attn") / 64
        neurons = sum(int(m.sum()) for (_, k), m in masks.keep.items() if k == "ffn") / 1024
        assert 0.3 <= heads <= 0.7 and 0.3 <= neurons <= 0.7, (seed, heads, neurons)


def _kcm_by_definition(points, sigma=1.0, alpha=0.01, max_iterations=300):
    """KCM written out from DESIGN 4 in float64, loop by loop: K_ij = exp(-|x_i - x_j|^2 / sigma^2),
    C = 1/n, then C <- C * sqrt(K / (K C)) until the relative change of C is below alpha."""
    n = len(points)
    k = [[math.exp(-sum((a - b) ** 2 for a, b in zip(points[i], points[j])) / sigma**2) for j in range(n)] for i in range(n)]
    c = [[1.0 / n] * n for _ in range(n)]
    for _ in range(max_iterations):
        kc = [[sum(k[i][m] * c[m][j] for m in range(n)) for j in range(n)] for i in range(n)]
        new = [[c[i][j] * math.sqrt(k[i][j] / kc[i][j]) for j in range(n)] for i in range(n)]
        change = math.sqrt(sum((new[i][j] - c[i][j]) ** 2 for i in range(n) for j in range(n)) / sum(x * x for row in c for x in row))
        c = new
        if change < alpha:
            break
    return [c[i][i] for i in range(n)]


def test_r2_equals_kcm_by_definition_and_varies_across_units():
    """gfp's R2 pinned to KCM computed from its definition: the mean of C_ii over each unit's
    output columns, divided by the site's maximum, on columns where the answer is not trivial
    (three near-copies of one direction, three others apart: R2 identically 1, i.e. gfp ==
    gfp-d2, or a wrong normalisation fails here). Units of width 1 (neurons) and 2 (heads)."""
    from gfprune_ray.methods.gfp import representativeness
    from gfprune_ray.models import UnitWeights

    g = torch.Generator().manual_seed(0)
    base = torch.tensor([0.8, 0.0, 0.0, 0.0])
    copies = base + 0.05 * torch.randn(3, 4, generator=g)
    apart = torch.tensor([[0.0, 0.9, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.3, 0.0, 0.9]])
    columns = torch.cat([copies, apart])  # six points in R^4
    for width in (1, 2):
        w = UnitWeights(out=columns.T.contiguous(), bias=None, ins=[], width=width)
        diag = torch.tensor(_kcm_by_definition(columns.double().tolist()), dtype=torch.float64)
        per_unit = diag.reshape(-1, width).mean(1)
        expected = per_unit / per_unit.max()
        torch.testing.assert_close(representativeness(w), expected, rtol=2e-4, atol=1e-6)
        if width == 1:  # a near-copy can be stood in for by its twins: it weighs far less
            assert expected[:3].max() < 0.6 * expected[3:].min()


def test_kcm_with_kernel_entries_in_floats_denormal_range_keeps_its_definition():
    """Kernel entries below KERNEL_FLOOR are set to 0 (far points: products of their tiny entries
    fell into float32's denormal range and made SmolLM2's KCM 5x slower); C_ii stays KCM's by
    definition, computed in float64 without a floor, on points whose kernel spans 0.9 (a near
    pair) to 1e-70, denormal values included."""
    from gfprune_ray.methods.gfp import KERNEL_FLOOR

    axes = torch.eye(4)
    points = torch.stack([0 * axes[0], 0.3 * axes[0], 2.2 * axes[0], 2.6 * axes[1], 3.0 * axes[2], 6.0 * axes[3], 9.0 * axes[0], 9.0 * axes[1]])
    points = points + 0.01 * torch.randn(points.shape, generator=torch.Generator().manual_seed(3))
    kernel = torch.exp(-torch.cdist(points.double(), points.double()) ** 2)
    assert ((kernel > 0) & (kernel < torch.finfo(torch.float32).tiny)).any() and (kernel < KERNEL_FLOOR).any()
    expected = torch.tensor(_kcm_by_definition(points.double().tolist()), dtype=torch.float64)
    torch.testing.assert_close(kcm_self_weights(points), expected, rtol=1e-5, atol=0)
    assert expected[:2].max() < 0.7 < 0.99 < expected[2:].min()  # the near pair stand in for each other


def test_curvature_weighted_energy_is_the_mean_quadratic_form_of_each_units_output():
    """gfp's D2 with the output curvature G: per unit, the mean over tokens of
    (W_u x_u)^T G (W_u x_u), computed here token by token from the inputs themselves."""
    from gfprune_ray.methods.common import output_energy
    from gfprune_ray.models import UnitWeights
    from gfprune_ray.stats import GramStats

    g = torch.Generator().manual_seed(4)
    d, units, width, tokens = 5, 3, 2, 40
    out = torch.randn(d, units * width, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, units * width, generator=g, dtype=torch.float64) + 0.5  # a mean, too
    grads_x = torch.randn(tokens, d, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.2, 0.2, 0.1], dtype=torch.float64)
    inputs, grads = GramStats.zeros(units * width), GramStats.zeros(d)
    inputs.add_(x)
    grads.add_(grads_x)
    curvature = grads_x.T @ grads_x / tokens
    expected = torch.stack([
        torch.stack([
            (out[:, u * width:(u + 1) * width] @ x[t, u * width:(u + 1) * width]) @ curvature @ (out[:, u * width:(u + 1) * width] @ x[t, u * width:(u + 1) * width])
            for t in range(tokens)
        ]).mean()
        for u in range(units)
    ])
    w = UnitWeights(out=out, bias=None, ins=[], width=width)
    torch.testing.assert_close(output_energy(w, inputs, centered=False, grads=grads), expected, rtol=1e-5, atol=1e-8)
    plain = output_energy(w, inputs, centered=False)
    assert not torch.allclose(plain / plain.sum(), expected / expected.sum(), rtol=0.05)  # G changes the ranking's weights
