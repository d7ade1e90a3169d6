"""Every adapter: geometry, hooks, physical removal equal to masking, save and reload."""

from __future__ import annotations

import torch

from conftest import legal_head_mask, tiny_batches, tiny_model
from gfprune_ray.models import adapter_for
from gfprune_ray.search import Masks
from gfprune_ray.stats import collect_stats
from gfprune_ray.surgery import apply_pruning, load_pruned, masked, save_pruned


def _outputs(model, batches):
    with torch.inference_mode():
        outs = []
        for b in batches:
            out = model(**b)
            value = out.logits if hasattr(out, "logits") else out.last_hidden_state
            outs.append(value * b["attention_mask"][..., None] if value.dim() == 3 else value)
        return torch.cat([o.flatten() for o in outs])


def _random_masks(adapter, seed=0, drop_all_attn_layer=None):
    g = torch.Generator().manual_seed(seed)
    keep = {}
    for i, geom in enumerate(adapter.geometries()):
        for kind in ("attn", "ffn"):
            mask = torch.rand(geom.count(kind), generator=g) < 0.6
            mask[torch.randint(geom.count(kind), (1,), generator=g)] = True
            if kind == "attn" and i == drop_all_attn_layer:
                mask[:] = False
            keep[(i, kind)] = legal_head_mask(mask, geom.heads_per_unit) if kind == "attn" else mask
    return Masks(keep)


def test_geometry_matches_config(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    geom = adapter.geometry(0)
    assert adapter.num_layers == 2
    assert geom.d == 32 and geom.head_dim == 8 and geom.ffn == 48
    assert geom.units == 4 and geom.kv_heads == (getattr(model.config, "num_key_value_heads", None) or 4)
    assert geom.gated == (family in {"llama", "qwen2", "qwen3", "mistral"})


def test_hooks_see_context_and_activations(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    batches = tiny_batches()
    stats = collect_stats(adapter, batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for (i, kind), s in stats.sites.items():
        geom = adapter.geometry(i)
        assert int(s.n) == tokens
        assert s.gram.shape[0] == geom.count(kind) * geom.width(kind)
        assert torch.isfinite(s.gram).all() and s.gram.diagonal().min() >= 0


def test_physical_removal_equals_masking_and_survives_reload(family, tmp_path):
    model = tiny_model(family)
    adapter = adapter_for(model)
    batches = tiny_batches(n_batches=2)
    masks = _random_masks(adapter, drop_all_attn_layer=1)
    with masked(adapter, masks):
        expected = _outputs(model, batches)
    apply_pruning(adapter, masks)
    pruned = _outputs(model, batches)
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=1e-5)
    assert adapter.geometry(1).units == 0
    assert adapter.geometry(0).ffn == int(masks.keep[(0, "ffn")].sum())

    save_pruned(model, tmp_path / "pruned", record={"test": True})
    loaded = load_pruned(tmp_path / "pruned")
    assert type(loaded) is type(model)
    torch.testing.assert_close(_outputs(loaded, batches), pruned, atol=1e-5, rtol=1e-5)
    assert adapter_for(loaded).sizes() == adapter.sizes()


def test_removing_whole_ffn_keeps_model_running(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    keep = {(0, "ffn"): torch.zeros(48, dtype=torch.bool)}
    masks = Masks(keep)
    with masked(adapter, masks):
        expected = _outputs(model, tiny_batches(1))
    apply_pruning(adapter, masks)
    assert adapter.geometry(0).ffn == 0
    torch.testing.assert_close(_outputs(model, tiny_batches(1)), expected, atol=1e-5, rtol=1e-5)


def test_pruned_decoder_generates(tmp_path):
    for family in ("gpt2", "llama", "opt"):
        model = tiny_model(family)
        adapter = adapter_for(model)
        apply_pruning(adapter, _random_masks(adapter, drop_all_attn_layer=0))
        save_pruned(model, tmp_path / family)
        loaded = load_pruned(tmp_path / family)
        prompt = torch.tensor([[5, 6, 7]])
        out = loaded.generate(prompt, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 7)
        # the KV cache must not change the result: greedy with and without cache agree
        no_cache = loaded.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
        assert torch.equal(out, no_cache)
