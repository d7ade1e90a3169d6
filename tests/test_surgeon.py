"""LLM Surgeon: closed forms, equivalence with the core's reconstruction, budgets, shots."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_batches, tiny_model

from gfprune_ray.curvature import Curvature, SiteCurvature, collect_curvature
from gfprune_ray.flops import prunable_macs, unit_macs
from gfprune_ray.methods import surgeon
from gfprune_ray.models import UnitWeights, adapter_for
from gfprune_ray.pipeline import calibrate, mark_heldout, plan_llm_surgeon, score_sites, search_masks, surgeon_model, surgeon_shot
from gfprune_ray.reconstruct import reconstruct
from gfprune_ray.search import Masks
from gfprune_ray.stats import GramStats, ModelStats
from gfprune_ray.surgery import apply_pruning

F64 = torch.float64


def _gram(x: torch.Tensor) -> GramStats:
    return GramStats(torch.tensor(float(len(x)), dtype=F64), x.T @ x, x.sum(0))


def _kkt_removal(loss, w: torch.Tensor, remove: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Exact minimum of a quadratic `loss` over W' with the columns `remove` forced to zero,
    from its autograd Hessian (no Kronecker structure assumed): the loss there and the W'."""
    d, k = w.shape
    hessian = torch.autograd.functional.hessian(lambda v: loss(v.reshape(d, k)), w.flatten())
    grad = torch.autograd.functional.jacobian(lambda v: loss(v.reshape(d, k)), w.flatten())
    # W' = W + delta; constraints delta[:, c] = -W[:, c]; minimise g.delta + 1/2 delta H delta
    fixed = torch.zeros(d, k, dtype=torch.bool)
    fixed[:, remove] = True
    fixed = fixed.flatten()
    n_c = int(fixed.sum())
    constraint = torch.zeros(n_c, d * k, dtype=F64)
    constraint[torch.arange(n_c), fixed.nonzero().flatten()] = 1
    kkt = torch.cat([torch.cat([hessian, constraint.T], 1), torch.cat([constraint, torch.zeros(n_c, n_c, dtype=F64)], 1)])
    rhs = torch.cat([-grad, -w.flatten()[fixed]])
    delta = torch.linalg.solve(kkt, rhs)[: d * k].reshape(d, k)
    return float(loss(w + delta)), w + delta


@pytest.mark.parametrize("width,with_bias", [(1, True), (2, False), (3, True)])
def test_single_unit_cost_and_update_match_the_exact_quadratic(width, with_bias):
    """Loss 1/2 sum_n (W' x_n + b' - W x_n - b)^T H (...): its Hessian in [W, b] is exactly
    H (x) sum [x, 1][x, 1]^T, so the Kronecker formulas must give the exact constrained optimum."""
    g = torch.Generator().manual_seed(width)
    d, units, n = 4, 3, 40
    k = units * width
    x = torch.randn(n, k, generator=g, dtype=F64) + 0.3  # a mean, so that the bias has work to do
    w = torch.randn(d, k, generator=g, dtype=F64)
    bias = torch.randn(d, generator=g, dtype=F64) if with_bias else None
    root = torch.randn(d, d, generator=g, dtype=F64)
    h = root @ root.T + 0.5 * torch.eye(d, dtype=F64)
    xa = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1) if with_bias else x
    wa = torch.cat([w, bias[:, None]], 1) if with_bias else w

    def loss(candidate):
        diff = (candidate - wa) @ xa.T  # d x n
        return 0.5 * (diff * (h @ diff)).sum()

    site = SiteCurvature(fit=_gram(x), heldout=GramStats.zeros(k), grad=GramStats(torch.tensor(1.0, dtype=F64), h, torch.zeros(d, dtype=F64)))
    weights = UnitWeights(out=w, bias=bias, ins=[], width=width)
    costs = surgeon.unit_costs(weights, site, damping=0.0) * n  # the formulas use E[x x^T] = gram / n
    moment = xa.T @ xa / n
    for unit in range(units):
        remove = torch.arange(unit * width, (unit + 1) * width)
        exact_loss, exact_w = _kkt_removal(loss, wa, remove)
        assert costs[unit].item() == pytest.approx(exact_loss, rel=1e-8)
        updated = surgeon.correlated_update(wa, remove, moment)
        torch.testing.assert_close(updated, exact_w, rtol=1e-8, atol=1e-10)


def _identity_g(stats: ModelStats, d: int) -> ModelStats:
    eye = {site: GramStats(s.n.clone(), torch.eye(d, dtype=F64) * s.n, torch.zeros(d, dtype=F64)) for site, s in stats.sites.items()}
    return ModelStats(eye)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_one_shot_with_identity_g_is_the_full_reconstruction(family):
    """T = 1 and G = I: the surgeon's joint correlated update, damping chosen on held-out tokens,
    is the core's `full` reconstruction (ridge toward the kept weights) to rounding."""
    model = tiny_model(family).eval()
    adapter = adapter_for(model)
    batches = tiny_batches(n_batches=6)
    calibration = calibrate(adapter, batches, seq_len=10.0)
    curvature = Curvature(calibration.fit, calibration.heldout, _identity_g(calibration.fit, adapter.hidden_size))
    geoms = adapter.geometries()
    state = surgeon.SurgeonState.dense(geoms)
    dense_weights = {site: adapter.unit_weights(*site) for site in state.kept}
    state = surgeon_shot(state, curvature, dense_weights, geoms, 0.6, 10.0)
    assert state.weights, "the shot removed nothing"
    for site, rec in state.weights.items():
        w = dense_weights[site]
        keep = state.masks(geoms).keep[site]
        full = reconstruct("full", w.out, w.bias, keep.nonzero().flatten(), w.width, calibration.fit[site], calibration.heldout[site])
        if bool(keep.any()):
            assert rec.lam == full.lam
        else:  # no kept column to damp: every damping gives the same fit, the chosen one is a rounding tie
            assert rec.weight.numel() == full.weight.numel() == 0
        torch.testing.assert_close(rec.weight, full.weight.to(F64), rtol=1e-7, atol=1e-9)
        if w.bias is not None:
            torch.testing.assert_close(rec.bias.to(F64), full.bias.to(F64), rtol=1e-7, atol=1e-9)
        assert rec.heldout_error == pytest.approx(full.heldout_error, rel=1e-7, abs=1e-12)


def test_correlated_update_equals_ridge_least_squares_at_any_damping():
    """dense - W_C P_CC^-1 P_C: with P = (A + lam)^-1 equals W_S + W_C A_CS (A_SS + lam)^-1."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 8, generator=g, dtype=F64)
    a = x.T @ x / 50
    w = torch.randn(5, 8, generator=g, dtype=F64)
    remove, keep = torch.tensor([1, 4, 5]), torch.tensor([0, 2, 3, 6, 7])
    for lam in (0.0, 0.01, 1.0):
        damped = a + lam * torch.eye(8, dtype=F64)
        new = surgeon.correlated_update(w, remove, damped)
        least_squares = w[:, keep] + w[:, remove] @ a[remove][:, keep] @ torch.linalg.inv(a[keep][:, keep] + lam * torch.eye(5, dtype=F64))
        torch.testing.assert_close(new[:, keep], least_squares, rtol=1e-9, atol=1e-11)
        assert new[:, remove].abs().max() == 0


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("budget,step", [(0.8, 1.0), (0.5, 0.2)])
def test_multi_shot_ends_at_the_budget(family, budget, step):
    model = tiny_model(family).eval()
    adapter = adapter_for(model)
    seq_len = 10.0
    result = plan_llm_surgeon(adapter, tiny_batches(), budget, seq_len, shot_step=step)
    geoms = adapter.geometries()
    dearest = max(unit_macs(g, k, seq_len) for g in geoms for k in ("attn", "ffn")) / prunable_macs(geoms, seq_len)
    assert budget - dearest <= result.kept_fraction <= budget + 1e-12
    pruned = adapter_for(copy.deepcopy(model))
    apply_pruning(pruned, result.masks, result.weights)
    assert prunable_macs(pruned.geometries(), seq_len) / prunable_macs(geoms, seq_len) == pytest.approx(result.kept_fraction)


def test_shot_targets_step_down_a_grid_that_does_not_depend_on_the_budget():
    assert surgeon.shot_targets(0.5, 0.1) == [0.9, 0.8, 0.7, 0.6, 0.5]
    assert surgeon.shot_targets(0.75, 0.1) == [0.9, 0.8, 0.75]
    assert surgeon.shot_targets(0.7, 1.0) == [0.7]
    assert surgeon.shot_targets(0.95, 0.1) == [0.95]
    assert surgeon.shot_targets(1.0, 0.1) == [1.0]
    assert surgeon.shot_targets(0.5, 0.3) == [0.7, 0.5]  # 1 - 2 x 0.3 = 0.4 would pass the budget
    # the path of a higher budget is the first part of a lower one's, up to its own last shot,
    # and exactly so (==) where a budget lies on the grid: the farm shares those shots
    for step in (0.1, 0.05, 0.15, 0.2):
        low = surgeon.shot_targets(0.3, step)
        for budget in (0.9, 0.85, 0.8, 0.7, 0.6, 0.45, 0.3):
            path = surgeon.shot_targets(budget, step)
            assert path[:-1] == low[: len(path) - 1] and path[-1] == budget
            assert all(b - a > 0 for a, b in zip(path[1:], path)), "targets fall strictly"
            assert all(a - b <= step + 1e-12 for a, b in zip([1.0] + path, path)), "no shot removes more than a step"
            if any(abs(t - budget) < 1e-12 for t in low):
                assert path == low[: len(path)]
    assert surgeon.step_for_shots(0.5, 5) == pytest.approx(0.1) and len(surgeon.shot_targets(0.6, surgeon.step_for_shots(0.6, 3))) == 3
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError):
            surgeon.shot_targets(0.5, bad)


def test_state_rebuilds_the_model_pruned_shot_by_shot():
    """The farm's actors rebuild the partly pruned model from (dense model, state): that must be
    the model that cutting shot after shot gives."""
    model = tiny_model("gpt2").eval()
    adapter = adapter_for(model)
    batches = mark_heldout(tiny_batches())
    geoms = adapter.geometries()
    state = surgeon.SurgeonState.dense(geoms)
    dense_weights = {site: adapter.unit_weights(*site) for site in state.kept}
    stepwise = adapter_for(copy.deepcopy(model))
    for target in surgeon.shot_targets(0.5, 0.2):
        curvature = collect_curvature(stepwise, batches)
        before = copy.deepcopy(state)
        state = surgeon_shot(state, curvature, dense_weights, geoms, target, 10.0)
        new_weights = {s: r for s, r in state.weights.items() if before.weights.get(s) is not r}
        apply_pruning(stepwise, Masks(_local_masks(before, state)), new_weights)
    rebuilt = surgeon_model(adapter, state)
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    with torch.inference_mode():
        torch.testing.assert_close(rebuilt.model(input_ids=ids, attention_mask=mask).logits, stepwise.model(input_ids=ids, attention_mask=mask).logits)
    assert rebuilt.sizes() == stepwise.sizes()


def _local_masks(before: surgeon.SurgeonState, after: surgeon.SurgeonState) -> dict:
    return {site: torch.isin(idx, after.kept[site]) for site, idx in before.kept.items() if len(idx)}


def test_costs_rank_a_dead_unit_first_and_scale_with_g():
    """A neuron whose activation is constant costs nothing (the bias absorbs it); doubling G
    doubles every cost, so allocation across layers follows the loss."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=F64)
    x[:, 2] = 0.7
    w = torch.randn(4, 6, generator=g, dtype=F64)
    site = SiteCurvature(_gram(x), GramStats.zeros(6), GramStats(torch.tensor(1.0, dtype=F64), torch.eye(4, dtype=F64), torch.zeros(4, dtype=F64)))
    weights = UnitWeights(out=w, bias=torch.zeros(4, dtype=F64), ins=[], width=1)
    costs = surgeon.unit_costs(weights, site)
    assert int(costs.argmin()) == 2 and costs[2] < 1e-3 * costs.max()
    doubled = SiteCurvature(site.fit, site.heldout, GramStats(site.grad.n, 2 * site.grad.gram, site.grad.total))
    torch.testing.assert_close(surgeon.unit_costs(weights, doubled), 2 * costs)


def test_sampled_targets_follow_the_models_probabilities():
    """The draws of the curvature's sampled targets: each class as often as its probability says
    (within 4 standard errors over 40,000 rows), never one of probability 0, one per row."""
    from gfprune_ray.curvature import draw

    probs = torch.tensor([0.1, 0.0, 0.2, 0.6, 0.1])
    rows = 40_000
    draws = draw(probs.expand(rows, -1), torch.Generator().manual_seed(0))
    assert draws.shape == (rows, 1)
    frequency = torch.bincount(draws.flatten(), minlength=len(probs)).double() / rows
    standard_error = (probs.double() * (1 - probs.double()) / rows).sqrt()
    assert (frequency - probs.double()).abs().le(4 * standard_error + 1e-12).all(), frequency
    assert frequency[1] == 0


def test_curvature_does_not_depend_on_batching():
    """Targets are sampled per example, the loss is a sum: the same rows batched differently give
    the same A and G, which is what lets shards add up."""
    model = tiny_model("gpt2").eval()
    adapter = adapter_for(model)
    batches = mark_heldout(tiny_batches(n_batches=2, batch=4))
    halves = [{k: v[s] for k, v in b.items()} for b in batches for s in (slice(0, 2), slice(2, 4))]
    whole, split = collect_curvature(adapter, batches, seed=1), collect_curvature(adapter, halves, seed=1)
    for site in whole.sites:
        for a, b in ((whole.grads[site], split.grads[site]), (whole.fit[site], split.fit[site])):
            torch.testing.assert_close(a.gram, b.gram, rtol=1e-5, atol=1e-6)
            assert a.n == b.n
    other_seed = collect_curvature(adapter, batches, seed=2)
    assert not torch.allclose(other_seed.grads[whole.sites[0]].gram, whole.grads[whole.sites[0]].gram)


def test_gradient_gram_matches_autograd_on_one_sequence():
    """G from the hooks equals sum_t g_t g_t^T of the output gradients taken directly."""
    from gfprune_ray.curvature import sampled_loss

    model = tiny_model("bert").eval()
    adapter = adapter_for(model)
    batch = {k: v[:1] for k, v in tiny_batches(n_batches=1)[0].items()}
    curvature = collect_curvature(adapter, [batch], seed=0)
    module = adapter.output_projection(1, "ffn")
    seen = {}

    def keep_output(_module, _args, out):
        out.retain_grad()
        seen["out"] = out

    handle = module.register_forward_hook(keep_output)
    try:
        model.get_input_embeddings().weight.requires_grad_(True)
        out = model(**batch)
        sampled_loss(out, batch["input_ids"], batch["attention_mask"], 0).backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    grad = seen["out"].grad[0][batch["attention_mask"][0].bool()].to(F64)
    torch.testing.assert_close(curvature.grads[(1, "ffn")].gram, grad.T @ grad, rtol=1e-5, atol=1e-7)


def test_scores_for_the_shot_search_are_one_currency_with_gfp_masks_comparable():
    """The surgeon's final masks are over the dense model's units like any method's masks."""
    model = tiny_model("llama").eval()
    adapter = adapter_for(model)
    result = plan_llm_surgeon(adapter, tiny_batches(), 0.6, 10.0, shot_step=0.2)
    gfp = search_masks(score_sites(adapter, calibrate(adapter, tiny_batches(), 10.0).total, "gfp"), adapter, 0.6, 10.0)
    assert result.masks.keep.keys() == gfp.keep.keys()
    assert all(result.masks.keep[s].shape == gfp.keep[s].shape for s in gfp.keep)
