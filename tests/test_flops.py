"""The analytic MACs model against torch's FlopCounterMode, dense and after physical pruning."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, legal_head_mask, tiny_model
from gfprune_ray import flops
from gfprune_ray.choices import check_budget
from gfprune_ray.models import BlockGeometry, adapter_for
from gfprune_ray.search import Masks
from gfprune_ray.surgery import apply_pruning

SEQ = 16
TOLERANCE = 0.02


def _ids(seq_len=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, seq_len), generator=g)


def _assert_close_to_count(adapter, seq_len=SEQ):
    analytic = flops.model_macs(adapter, seq_len)
    counted = flops.counted_macs(adapter.model, _ids(seq_len))
    assert counted > 0
    assert abs(analytic - counted) <= TOLERANCE * counted, (analytic, counted, analytic / counted - 1)
    return analytic, counted


def _some_masks(adapter, seed=0, empty_attn_layer=None, empty_ffn_layer=None):
    """Drop roughly half of every site's units, keeping at least one, and dropping at least one
    where a site has more than one; heads in a structure grouped-query attention can run."""
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for i, geom in enumerate(adapter.geometries()):
        for kind in ("attn", "ffn"):
            n = geom.count(kind)
            mask = torch.rand(n, generator=g) < 0.5
            order = torch.randperm(n, generator=g)
            mask[order[0]] = True
            if n > 1:
                mask[order[1]] = False
            if (kind == "attn" and i == empty_attn_layer) or (kind == "ffn" and i == empty_ffn_layer):
                mask[:] = False
            keep[(i, kind)] = legal_head_mask(mask, geom.heads_per_unit) if kind == "attn" else mask
    return Masks(keep)


def test_analytic_macs_match_flop_counter(family):
    adapter = adapter_for(tiny_model(family))
    _assert_close_to_count(adapter)
    _assert_close_to_count(adapter, seq_len=7)


def test_analytic_macs_match_flop_counter_after_pruning(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    dense_analytic, dense_counted = _assert_close_to_count(adapter)
    masks = _some_masks(adapter)
    apply_pruning(adapter, masks)
    for i, geom in enumerate(adapter.geometries()):
        assert geom.units == int(masks.keep[(i, "attn")].sum())
        assert geom.ffn == int(masks.keep[(i, "ffn")].sum())
    analytic, counted = _assert_close_to_count(adapter)
    assert counted < dense_counted and analytic < dense_analytic
    # what the pruning removed is what the mask says it removes
    dense_geoms = adapter_for(tiny_model(family)).geometries()
    removed = SEQ * (flops.prunable_macs(dense_geoms, SEQ) - masks.kept_macs(dense_geoms, SEQ))
    assert abs((dense_analytic - analytic) - removed) <= 1e-9 * dense_analytic


def test_analytic_macs_match_flop_counter_with_empty_blocks(family):
    """A layer that lost all its heads (or all its neurons) costs nothing for that block."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    apply_pruning(adapter, _some_masks(adapter, seed=1, empty_attn_layer=1, empty_ffn_layer=0))
    assert adapter.geometry(1).units == 0 and adapter.geometry(0).ffn == 0
    _assert_close_to_count(adapter)


def test_flop_counter_counts_sdpa_like_eager_attention(family):
    """On CPU, SDPA runs a fused kernel (_scaled_dot_product_flash_attention_for_cpu) that torch's
    FlopCounterMode has no formula for: counted_macs must still count attention like eager does."""
    model = tiny_model(family)
    sdpa = flops.counted_macs(model, _ids())
    model.set_attn_implementation("eager")
    assert flops.counted_macs(model, _ids()) == sdpa


def test_unit_macs_follow_the_design_formula():
    s = 12.0
    head = BlockGeometry(d=32, units=4, heads_per_unit=1, head_dim=8, ffn=48, gated=False)
    assert flops.unit_macs(head, "attn", s) == 4 * 32 * 8 + 2 * s * 8
    assert flops.unit_macs(head, "ffn", s) == 2 * 32
    gated = BlockGeometry(d=32, units=6, heads_per_unit=3, head_dim=8, ffn=48, gated=True)
    # a KV group of three query heads: Q and O for three heads, K and V once, scores for three heads
    group = 2 * 32 * 8 * 3 + 2 * 32 * 8 + 2 * s * 8 * 3
    assert flops.group_macs(gated, 3, s) == group
    assert flops.unit_macs(gated, "attn", s) == group / 3  # the average head, with its share of K and V
    assert flops.unit_macs(gated, "ffn", s) == 3 * 32
    assert flops.prunable_macs([head, gated], s) == (
        4 * flops.unit_macs(head, "attn", s) + 48 * 64 + 2 * group + 48 * 96
    )
    # kept heads are not additive: one K/V head per group that keeps any query head
    one_head = 2 * 32 * 8 + 2 * s * 8
    keep = torch.tensor([True, False, False, False, True, False])  # one head in each group
    assert flops.kept_site_macs(gated, "attn", keep, s) == 2 * (one_head + 2 * 32 * 8)
    keep = torch.tensor([True, True, False, False, False, False])  # two heads of one group
    assert flops.kept_site_macs(gated, "attn", keep, s) == 2 * one_head + 2 * 32 * 8


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.5, 1.0000001, float("nan")])
def test_check_budget_rejects_out_of_range(budget):
    with pytest.raises(ValueError):
        check_budget(budget)


@pytest.mark.parametrize("budget", [1.0, 1, 0.5, 1e-6])
def test_check_budget_accepts_fractions(budget):
    assert check_budget(budget) == budget
