"""Mask search under a MACs budget: never over budget, tight for the global search, sensible picks."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from gfprune_ray.flops import kept_site_macs, prunable_macs, unit_macs
from gfprune_ray.models import KINDS, BlockGeometry, adapter_for
from gfprune_ray.models.base import kv_groups
from gfprune_ray.search import Masks, full_masks, global_search, uniform_search

SEQ = 12.0
BUDGETS = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
SLACK = 1e-12  # the search's own allowance for float rounding of the budget


def _geoms(name: str) -> list[BlockGeometry]:
    if name == "wide":  # heterogeneous, as after an earlier pruning round: per-layer sizes differ
        return [
            BlockGeometry(d=64, units=8, heads_per_unit=1, head_dim=8, ffn=256, gated=False),
            BlockGeometry(d=64, units=3, heads_per_unit=1, head_dim=8, ffn=100, gated=False),
            BlockGeometry(d=64, units=0, heads_per_unit=1, head_dim=8, ffn=17, gated=False),
            BlockGeometry(d=64, units=5, heads_per_unit=1, head_dim=8, ffn=0, gated=False),
        ]
    return adapter_for(tiny_model(name)).geometries()


def _random_scores(geoms, seed):
    g = torch.Generator().manual_seed(seed)
    return {(i, k): torch.rand(geom.count(k), generator=g, dtype=torch.float64)
            for i, geom in enumerate(geoms) for k in KINDS if geom.count(k)}


def _max_unit_cost(geoms):
    return max(unit_macs(g, k, SEQ) for g in geoms for k in KINDS if g.count(k))


def _check_shapes(masks, scores):
    assert masks.keep.keys() == scores.keys()
    for site, mask in masks.keep.items():
        assert mask.dtype == torch.bool and mask.shape == scores[site].shape


@pytest.mark.parametrize("name", ["llama", "bert", "wide"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_search_fills_budget_without_exceeding_it(name, seed):
    geoms = _geoms(name)
    scores = _random_scores(geoms, seed)
    total = prunable_macs(geoms, SEQ)
    step = _max_unit_cost(geoms)
    previous = None
    for budget in BUDGETS:
        masks = global_search(scores, geoms, budget, SEQ)
        _check_shapes(masks, scores)
        kept = masks.kept_macs(geoms, SEQ)
        limit = budget * total
        assert kept <= limit * (1 + SLACK), (budget, kept, limit)
        assert kept > limit - step, (budget, kept, limit, step)
        if previous is not None:
            assert kept <= previous
        previous = kept


@pytest.mark.parametrize("name", ["llama", "bert", "wide"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uniform_search_stays_under_budget_in_every_layer(name, seed):
    geoms = _geoms(name)
    scores = _random_scores(geoms, seed)
    total = prunable_macs(geoms, SEQ)
    for budget in BUDGETS:
        masks = uniform_search(scores, geoms, budget, SEQ)
        _check_shapes(masks, scores)
        assert masks.kept_macs(geoms, SEQ) <= budget * total * (1 + SLACK)
        for i, geom in enumerate(geoms):
            layer_total = sum(geom.count(k) * unit_macs(geom, k, SEQ) for k in KINDS)
            layer_kept = sum(kept_site_macs(geom, k, masks.keep[(i, k)], SEQ) for k in KINDS if geom.count(k))
            assert layer_kept <= budget * layer_total * (1 + SLACK)
            layer_step = max((unit_macs(geom, k, SEQ) for k in KINDS if geom.count(k)), default=0.0)
            gqa = geom.heads_per_unit > 1  # legal structures only: the layer's share may not fill up
            assert gqa or layer_kept > budget * layer_total - layer_step, (i, budget)
            if geom.units:
                # the same fraction of heads in every layer (at most, with GQA), and the layer's best ones
                kept_heads = masks.keep[(i, "attn")]
                assert int(kept_heads.sum()) <= int(budget * geom.units + 1e-9)
                assert gqa or int(kept_heads.sum()) == int(budget * geom.units + 1e-9)
                kv_groups(kept_heads.nonzero().flatten(), geom.heads_per_unit)  # raises unless legal
            for k in KINDS:
                if k == "attn" and gqa:  # the best structure, not the best heads
                    continue
                if geom.count(k) and 0 < int(masks.keep[(i, k)].sum()) < geom.count(k):
                    s, m = scores[(i, k)], masks.keep[(i, k)]
                    assert s[m].min() >= s[~m].max()


@pytest.mark.parametrize("name", ["llama", "bert", "wide"])
def test_global_search_keeps_the_best_units_of_each_kind(name):
    geoms = _geoms(name)
    scores = _random_scores(geoms, 7)
    masks = global_search(scores, geoms, 0.5, SEQ)
    for kind in KINDS:
        values = torch.cat([scores[s] for s in sorted(scores) if s[1] == kind])
        kept = torch.cat([masks.keep[s] for s in sorted(scores) if s[1] == kind])
        if kept.any() and not kept.all():
            assert values[kept].min() >= values[~kept].max()


@pytest.mark.parametrize("search", [global_search, uniform_search])
@pytest.mark.parametrize("name", ["llama", "bert", "wide"])
def test_budget_one_keeps_everything(search, name):
    geoms = _geoms(name)
    masks = search(_random_scores(geoms, 3), geoms, 1.0, SEQ)
    assert all(bool(m.all()) for m in masks.keep.values())
    assert masks.kept_macs(geoms, SEQ) == pytest.approx(prunable_macs(geoms, SEQ), rel=1e-12)
    full = full_masks(geoms)
    assert full.keep.keys() == masks.keep.keys()


@pytest.mark.parametrize("search", [global_search, uniform_search])
@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5])
def test_search_rejects_budgets_out_of_range(search, budget):
    geoms = _geoms("bert")
    with pytest.raises(ValueError):
        search(_random_scores(geoms, 0), geoms, budget, SEQ)


def test_global_search_prefers_the_layer_with_higher_scores():
    geoms = _geoms("llama")  # 2 layers, 2 KV-group units and 48 gated neurons each
    g = torch.Generator().manual_seed(0)
    scores = {
        (0, "attn"): torch.full((2,), 1e6, dtype=torch.float64),
        (1, "attn"): torch.full((2,), 1e6, dtype=torch.float64),
        (0, "ffn"): 10 + torch.rand(48, generator=g, dtype=torch.float64),
        (1, "ffn"): 0.1 * torch.rand(48, generator=g, dtype=torch.float64),
    }
    head, neuron = unit_macs(geoms[0], "attn", SEQ), unit_macs(geoms[0], "ffn", SEQ)
    # room for every head, all of layer 0's neurons and 20 of layer 1's
    budget = (4 * head + 68 * neuron + 0.5 * neuron) / prunable_macs(geoms, SEQ)
    masks = global_search(scores, geoms, budget, SEQ)
    assert masks.keep[(0, "attn")].all() and masks.keep[(1, "attn")].all()
    assert masks.keep[(0, "ffn")].all()
    layer1 = masks.keep[(1, "ffn")]
    assert int(layer1.sum()) == 20
    top20 = torch.argsort(scores[(1, "ffn")], descending=True)[:20]
    assert set(layer1.nonzero().flatten().tolist()) == set(top20.tolist())


def test_global_search_drops_worthless_heads_for_neurons():
    geoms = _geoms("llama")
    g = torch.Generator().manual_seed(1)
    scores = {(i, "attn"): torch.zeros(2, dtype=torch.float64) for i in range(2)}
    scores.update({(i, "ffn"): 1 + torch.rand(48, generator=g, dtype=torch.float64) for i in range(2)})
    neuron = unit_macs(geoms[0], "ffn", SEQ)
    budget = 0.5
    masks = global_search(scores, geoms, budget, SEQ)
    assert not masks.keep[(0, "attn")].any() and not masks.keep[(1, "attn")].any()
    kept_neurons = int(masks.keep[(0, "ffn")].sum() + masks.keep[(1, "ffn")].sum())
    assert kept_neurons == int(budget * prunable_macs(geoms, SEQ) / neuron)


def test_global_search_weighs_heads_against_neurons_by_total_score():
    """One head with a score above the neurons it displaces is kept; the others are not."""
    geoms = _geoms("bert")  # 4 heads and 48 neurons per layer, no GQA
    head, neuron = unit_macs(geoms[0], "attn", SEQ), unit_macs(geoms[0], "ffn", SEQ)
    per_head = head / neuron  # neurons one head costs
    scores = {(i, "attn"): torch.zeros(4, dtype=torch.float64) for i in range(2)}
    scores[(1, "attn")][2] = 10 * per_head  # worth far more than the neurons it displaces
    scores.update({(i, "ffn"): torch.ones(48, dtype=torch.float64) for i in range(2)})
    masks = global_search(scores, geoms, 0.4, SEQ)
    assert masks.keep[(1, "attn")].tolist() == [False, False, True, False]
    assert not masks.keep[(0, "attn")].any()


def test_masks_json_round_trip():
    geoms = _geoms("wide")
    masks = global_search(_random_scores(geoms, 5), geoms, 0.45, SEQ)
    # make sure the round trip sees an empty site and a full site too
    masks.keep[(1, "attn")] = torch.zeros(geoms[1].units, dtype=torch.bool)
    masks.keep[(2, "ffn")] = torch.ones(geoms[2].ffn, dtype=torch.bool)
    text = json.dumps(masks.to_json())
    back = Masks.from_json(json.loads(text), geoms)
    assert back.keep.keys() == masks.keep.keys()
    for site, mask in masks.keep.items():
        assert back.keep[site].dtype == torch.bool
        assert torch.equal(back.keep[site], mask), site
    assert back.kept_macs(geoms, SEQ) == masks.kept_macs(geoms, SEQ)
    assert back.to_json() == masks.to_json()
