"""Grouped-query attention with query heads as units: legal structures, MACs, search, surgery, reload.

The tiny models of conftest share a K/V head between 2 query heads; here a test-local config shares
it between 3 (6 query heads in 2 KV groups), so that partial groups (1 or 2 of 3 heads) occur.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T

from conftest import COMMON, tiny_batches, tiny_model
from gfprune_ray import flops
from gfprune_ray.methods.baselines import magnitude_scores, random_scores, weights_per_unit
from gfprune_ray.methods.cofi import CoFiStudent
from gfprune_ray.models import KINDS, BlockGeometry, adapter_for
from gfprune_ray.models.base import kv_groups
from gfprune_ray.pipeline import calibrate, plan, plan_llm_surgeon, score_sites
from gfprune_ray.search import Masks, global_search, uniform_search
from gfprune_ray.surgery import SIZES_KEY, apply_pruning, load_pruned, masked, save_pruned

TOL = dict(atol=1e-5, rtol=1e-5)
SEQ = 12.0
BUDGETS = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]


def gqa3_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """6 query heads of size 8 in 2 KV groups of 3; Qwen2 has biases on Q, K and V."""
    cls_config, cls_model = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM)}[family]
    config = cls_config(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                        intermediate_size=40, bos_token_id=0, eos_token_id=2, pad_token_id=1, **COMMON)
    torch.manual_seed(seed)
    model = cls_model(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.02)
    return model.eval()


def smollm2_geometry(layers: int = 30) -> list[BlockGeometry]:
    """SmolLM2-135M's blocks: 9 query heads of 64 in 3 KV groups, 1536 gated neurons."""
    return [BlockGeometry(d=576, units=9, heads_per_unit=3, head_dim=64, ffn=1536, gated=True) for _ in range(layers)]


def _random_scores(geoms, seed):
    g = torch.Generator().manual_seed(seed)
    return {(i, k): torch.rand(geom.count(k), generator=g, dtype=torch.float64)
            for i, geom in enumerate(geoms) for k in KINDS if geom.count(k)}


def _outputs(model, batches):
    with torch.inference_mode():
        return torch.cat([(model(**b).logits * b["attention_mask"][..., None]).flatten() for b in batches])


def _assert_legal(masks: Masks, geoms) -> None:
    for (i, kind), mask in masks.keep.items():
        if kind == "attn":
            heads = mask.nonzero().flatten()
            groups = kv_groups(heads, geoms[i].heads_per_unit)  # raises unless every kept group keeps as many
            counts = mask.reshape(-1, geoms[i].heads_per_unit).sum(1)
            assert len(set(counts[groups].tolist())) <= 1


def _partial_masks(adapter) -> Masks:
    """Layer 0 keeps 2 of 3 heads in both groups; layer 1 one head of group 1; some neurons go."""
    keep = {
        (0, "attn"): torch.tensor([True, False, True, False, True, True]),
        (1, "attn"): torch.tensor([False, False, False, False, True, False]),
    }
    for i, geom in enumerate(adapter.geometries()):
        keep[(i, "ffn")] = torch.arange(geom.ffn) % (3 + i) != 0
    return Masks(keep)


# ---- geometry, legal structures, MACs ------------------------------------------------------------


def test_geometry_counts_query_heads_and_kv_heads():
    adapter = adapter_for(gqa3_model())
    geom = adapter.geometry(0)
    assert (geom.units, geom.heads_per_unit, geom.kv_heads, geom.unit_width) == (6, 3, 2, 8)
    weights = adapter.unit_weights(0, "attn")
    assert weights.units == 6 and weights.group == 3
    assert [w.shape for w in weights.ins] == [(48, 48)] and [w.shape for w in weights.shared_ins] == [(16, 48), (16, 48)]


def test_illegal_head_sets_are_refused_before_any_cut():
    adapter = adapter_for(gqa3_model())
    with pytest.raises(ValueError, match="same number"):
        adapter.prune_block(0, torch.tensor([0, 1, 3]), torch.arange(40))  # 2 heads of group 0, 1 of group 1
    assert adapter.geometry(0).units == 6 and adapter.sizes()[0] == [6, 40, 2]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_partial_groups_cut_equal_masking_and_count_like_the_flop_counter(family):
    model = gqa3_model(family)
    adapter = adapter_for(model)
    dense_geoms = adapter.geometries()
    batches = tiny_batches(n_batches=2)
    masks = _partial_masks(adapter)
    with masked(adapter, masks):
        expected = _outputs(model, batches)
    apply_pruning(adapter, masks)
    torch.testing.assert_close(_outputs(model, batches), expected, **TOL)
    assert [(g.units, g.heads_per_unit, g.kv_heads) for g in adapter.geometries()] == [(4, 2, 2), (1, 1, 1)]
    assert [layer.self_attn.num_key_value_groups for layer in model.model.layers] == [2, 1]
    ids = batches[0]["input_ids"][:1]
    for seq_len in (ids.shape[1], 5):
        analytic = flops.model_macs(adapter, seq_len)
        assert analytic == pytest.approx(flops.counted_macs(model, ids[:, :seq_len]), rel=1e-9)
    # what the cut removed is what the masks say they remove (MACs not additive over heads)
    s = float(ids.shape[1])
    kept = flops.prunable_macs(adapter.geometries(), s)
    assert kept == pytest.approx(masks.kept_macs(dense_geoms, s), rel=1e-12)
    d, dh = 48, 8
    assert masks.kept_macs(dense_geoms, s) - sum(flops.kept_site_macs(dense_geoms[i], "ffn", masks.keep[(i, "ffn")], s) for i in range(2)) == (
        2 * (2 * (2 * d * dh + 2 * s * dh) + 2 * d * dh) + (2 * d * dh + 2 * s * dh) + 2 * d * dh
    )


def test_gqa_model_with_partial_groups_saves_loads_and_generates(tmp_path):
    model = gqa3_model("qwen2")
    adapter = adapter_for(model)
    apply_pruning(adapter, _partial_masks(adapter))
    batches = tiny_batches(n_batches=2)
    pruned = _outputs(model, batches)
    save_pruned(model, tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config[SIZES_KEY] == [[4, 40 - 14, 2], [1, 40 - 10, 1]]  # [query heads, neurons, K/V heads]
    loaded = load_pruned(tmp_path / "pruned")
    assert type(loaded) is type(model)
    assert adapter_for(loaded).sizes() == adapter.sizes()
    assert [layer.self_attn.num_key_value_groups for layer in loaded.model.layers] == [2, 1]
    torch.testing.assert_close(_outputs(loaded, batches), pruned, **TOL)
    prompt = torch.tensor([[5, 6, 7]])
    out = loaded.generate(prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, loaded.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False))


def test_sizes_saved_with_whole_kv_groups_as_units_still_load(tmp_path):
    """Before query heads were units, a GQA model saved [KV groups, neurons] per layer."""
    model = gqa3_model()
    adapter = adapter_for(model)
    keep = {(0, "attn"): torch.tensor([False] * 3 + [True] * 3), (1, "attn"): torch.zeros(6, dtype=torch.bool),
            (0, "ffn"): torch.arange(40) < 30, (1, "ffn"): torch.ones(40, dtype=torch.bool)}
    apply_pruning(adapter, Masks(keep))
    save_pruned(model, tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    config = json.loads(path.read_text())
    assert config[SIZES_KEY] == [[3, 30, 1], [0, 40, 0]]
    config[SIZES_KEY] = [[1, 30], [0, 40]]  # the old format
    path.write_text(json.dumps(config))
    loaded = load_pruned(tmp_path / "old")
    assert adapter_for(loaded).sizes() == adapter.sizes()
    batches = tiny_batches(n_batches=1)
    torch.testing.assert_close(_outputs(loaded, batches), _outputs(model, batches), **TOL)


# ---- search ------------------------------------------------------------------------------------


def _geometries(name: str) -> list[BlockGeometry]:
    if name == "smollm2":
        return smollm2_geometry(6)
    if name == "mixed":  # after an earlier round: groups of 3, 2 and 1 heads, a layer without attention
        return [BlockGeometry(48, 6, 3, 8, 40, True), BlockGeometry(48, 4, 2, 8, 13, True),
                BlockGeometry(48, 2, 1, 8, 40, True), BlockGeometry(48, 0, 3, 8, 7, True)]
    return adapter_for(gqa3_model()).geometries()


@pytest.mark.parametrize("name", ["gqa3", "smollm2", "mixed"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_masks_are_legal_and_never_exceed_the_budget(name, seed):
    geoms = _geometries(name)
    scores = _random_scores(geoms, seed)
    scores.update({(i, "attn"): s ** 4 for (i, k), s in scores.items() if k == "attn"})  # uneven heads: partial groups pay
    total = flops.prunable_macs(geoms, SEQ)
    partial = False
    for budget in BUDGETS:
        for search in (global_search, uniform_search):
            masks = search(scores, geoms, budget, SEQ)
            assert masks.keep.keys() == scores.keys()
            _assert_legal(masks, geoms)
            assert masks.kept_macs(geoms, SEQ) <= budget * total * (1 + 1e-12), (search.__name__, budget)
            partial |= any(0 < int(m.reshape(-1, geoms[i].heads_per_unit).sum(1).max()) < geoms[i].heads_per_unit
                           for (i, k), m in masks.keep.items() if k == "attn" and geoms[i].heads_per_unit > 1)
            # what the model cut to these masks costs, by its geometry
            if search is global_search:
                cut = [_cut_geometry(g, masks.keep.get((i, "attn")), masks.keep.get((i, "ffn"))) for i, g in enumerate(geoms)]
                assert flops.prunable_macs(cut, SEQ) == pytest.approx(masks.kept_macs(geoms, SEQ), rel=1e-12)
    assert partial, "some mask keeps part of a KV group"


def _cut_geometry(geom: BlockGeometry, attn, ffn) -> BlockGeometry:
    heads = int(attn.sum()) if attn is not None else geom.units
    groups = len(kv_groups(attn.nonzero().flatten(), geom.heads_per_unit)) if attn is not None else geom.kv_heads
    return BlockGeometry(geom.d, heads, heads // groups if groups else geom.heads_per_unit, geom.head_dim,
                         int(ffn.sum()) if ffn is not None else geom.ffn, geom.gated)


def test_global_search_keeps_one_good_head_per_group_instead_of_whole_groups():
    """One valuable head per group: the search keeps that head of every group (k = 1), which a
    search over whole KV groups could not, and spends the rest on neurons."""
    geoms = smollm2_geometry(4)
    scores = {}
    for i, geom in enumerate(geoms):
        heads = torch.zeros(9, dtype=torch.float64)
        heads[[1, 3, 8]] = 1e6  # one per group
        scores[(i, "attn")] = heads
        scores[(i, "ffn")] = torch.ones(geom.ffn, dtype=torch.float64)
    masks = global_search(scores, geoms, 0.5, SEQ)
    for i in range(4):
        assert masks.keep[(i, "attn")].nonzero().flatten().tolist() == [1, 3, 8]
    assert masks.kept_macs(geoms, SEQ) <= 0.5 * flops.prunable_macs(geoms, SEQ) * (1 + 1e-12)


def test_global_search_takes_a_layer_structure_only_where_it_pays():
    """A layer's steps are taken in order of score per MAC: with every head of a layer equally
    valuable, a layer keeps whole groups (a K/V head is best shared by all of its query heads)."""
    geoms = smollm2_geometry(3)
    scores = {(i, "attn"): torch.full((9,), 10.0 ** i, dtype=torch.float64) for i in range(3)}
    scores.update({(i, "ffn"): torch.full((1536,), 1e-9, dtype=torch.float64) for i in range(3)})
    attention = flops.site_macs(geoms[0], "attn", SEQ)
    budget = (2 * attention + 1) / flops.prunable_macs(geoms, SEQ)  # room for two layers' attention
    masks = global_search(scores, geoms, budget, SEQ)
    assert [int(masks.keep[(i, "attn")].sum()) for i in range(3)] == [0, 9, 9]


def _old_global_search(scores, geoms, budget, seq_len):
    """The search as it was when a unit's MACs were additive (heads without GQA): for reference."""
    f64 = torch.float64
    limit = budget * flops.prunable_macs(geoms, seq_len) * (1 + 1e-12)
    ranked = {}
    for kind in KINDS:
        sites = sorted(s for s in scores if s[1] == kind)
        sizes = [len(scores[s]) for s in sites]
        values = torch.cat([scores[s].to(f64) for s in sites])
        costs = torch.tensor([flops.unit_macs(geoms[s[0]], kind, seq_len) for s in sites for _ in range(len(scores[s]))], dtype=f64)
        order = torch.argsort(values, descending=True, stable=True)
        zero = torch.zeros(1, dtype=f64)
        ranked[kind] = (sites, sizes, order, torch.cat([zero, values[order].cumsum(0)]), torch.cat([zero, costs[order].cumsum(0)]))

    def keep_best(kind, count):
        sites, sizes, order, _, _ = ranked[kind]
        flat = torch.zeros(sum(sizes), dtype=torch.bool)
        flat[order[:count]] = True
        return dict(zip(sites, flat.split(sizes)))

    heads, neurons = ranked["attn"], ranked["ffn"]
    m = torch.searchsorted(neurons[4], (limit - heads[4]).clamp(min=0), right=True) - 1
    total = heads[3] + neurons[3][m.clamp(min=0)]
    total[heads[4] > limit] = -torch.inf
    k = int(torch.argmax(total))
    return Masks(keep_best("attn", k) | keep_best("ffn", int(m[k])))


@pytest.mark.parametrize("family", ["bert", "gpt2", "opt"])
def test_masks_without_gqa_are_those_of_the_additive_search(family):
    geoms = adapter_for(tiny_model(family)).geometries()
    geoms = geoms + [BlockGeometry(32, 3, 1, 8, 20, False), BlockGeometry(32, 0, 1, 8, 9, False)]
    for seed in range(8):
        scores = _random_scores(geoms, seed)
        if seed % 2:  # ties within and across layers
            scores = {site: (s * 4).round() for site, s in scores.items()}
        for budget in BUDGETS:
            for seq_len in (SEQ, 37.3):
                new, old = global_search(scores, geoms, budget, seq_len), _old_global_search(scores, geoms, budget, seq_len)
                assert new.to_json() == old.to_json(), (seed, budget, seq_len)


# ---- scores, LLM Surgeon and CoFi on partial groups ---------------------------------------------


def test_magnitude_and_random_share_a_kv_head_among_its_query_heads():
    adapter = adapter_for(gqa3_model())
    w = adapter.unit_weights(0, "attn")
    layer = adapter.layers()[0].self_attn
    scores = magnitude_scores(w, None, torch.Generator())
    total = sum(m.weight.detach().double().pow(2).sum() for m in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj))
    torch.testing.assert_close(scores.sum(), total)
    head = lambda m, h: m.weight.detach().double()[h * 8:(h + 1) * 8].pow(2).sum()
    expected = head(layer.q_proj, 4) + layer.o_proj.weight.detach().double()[:, 32:40].pow(2).sum() + (head(layer.k_proj, 1) + head(layer.v_proj, 1)) / 3
    torch.testing.assert_close(scores[4], expected)
    assert weights_per_unit(w) * w.units == sum(m.weight.numel() for m in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj))
    assert random_scores(w, None, torch.Generator().manual_seed(0)).shape == (6,)


@pytest.mark.parametrize("step", [1.0, 0.25])
def test_llm_surgeon_and_gfp_cut_partial_groups_exactly(step):
    model = gqa3_model("qwen2")
    adapter = adapter_for(model)
    with torch.no_grad():  # a dead head in each group of layer 0: worth keeping only the others
        for head in (1, 4):
            model.model.layers[0].self_attn.o_proj.weight[:, head * 8:(head + 1) * 8] = 0
    dense_geoms = adapter.geometries()
    batches = tiny_batches(n_batches=4)
    evaluation = tiny_batches(n_batches=2, seed=9)
    calibration = calibrate(adapter, batches, 10.0)
    scores = score_sites(adapter, calibration.total, "gfp")
    results = [plan_llm_surgeon(adapter, batches, 0.55, 10.0, shot_step=step), plan(adapter, calibration, 0.55, "gfp", "full", scores=scores)]
    for result in results:
        _assert_legal(result.masks, dense_geoms)
        assert result.masks.keep[(0, "attn")].tolist() == [True, False, True, True, False, True]
        assert result.kept_fraction <= 0.55 + 1e-9
        with masked(adapter, result.masks, result.weights):
            expected = _outputs(model, evaluation)
        pruned = adapter_for(copy.deepcopy(model))
        apply_pruning(pruned, result.masks, result.weights)
        torch.testing.assert_close(_outputs(pruned.model, evaluation), expected, **TOL)
        assert flops.prunable_macs(pruned.geometries(), 10.0) == pytest.approx(result.masks.kept_macs(dense_geoms, 10.0), rel=1e-12)


def test_cofi_gates_whole_kv_groups():
    adapter = adapter_for(gqa3_model())
    student = CoFiStudent(adapter, SEQ)
    assert student.gates["0-attn"].log_alpha.shape == (2,)  # one gate per KV group
    with torch.no_grad():
        for gates in student.gates.values():
            gates.log_alpha.fill_(10.0)
        student.gates["1-attn"].log_alpha[0] = -10.0
    masks = student.finish(1.0)
    assert masks.keep[(1, "attn")].tolist() == [False] * 3 + [True] * 3
    assert adapter.geometry(1).units == 3 and adapter.geometry(1).kv_heads == 1
    adapter.model(input_ids=tiny_batches(1)[0]["input_ids"])
