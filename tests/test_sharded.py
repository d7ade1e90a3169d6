"""Sharded checkpoints (several safetensors files and an index, as 7B models ship): a sharded dense
model prunes, and a pruned model saved in shards loads back bit for bit."""

from __future__ import annotations

import json

import torch
from conftest import make_tokenizer, run_cli, sentences, tiny_batches, tiny_model

from gfprune_ray import load_pruned
from gfprune_ray.models import adapter_for
from gfprune_ray.search import Masks, full_masks
from gfprune_ray.surgery import apply_pruning, save_pruned

SHARD = "20KB"  # the tiny llama is ~90 KB in float32: several shards


def _shards(folder) -> list[str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def test_a_pruned_model_saved_in_shards_loads_bit_for_bit(tmp_path):
    adapter = adapter_for(tiny_model("llama"))
    masks = full_masks(adapter.geometries())
    keep = dict(masks.keep)
    for site in keep:
        keep[site] = keep[site].clone()
        keep[site][: len(keep[site]) // 2] = False
        if site[1] == "attn":  # a whole KV group (2 heads of 4), so grouped attention stays legal
            keep[site] = torch.tensor([False, False, True, True])
    apply_pruning(adapter, Masks(keep))
    save_pruned(adapter.model, tmp_path)
    adapter.model.save_pretrained(tmp_path, max_shard_size=SHARD)  # the same model again, in shards
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    assert len(_shards(tmp_path)) >= 2
    loaded = load_pruned(tmp_path)
    original = adapter.model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    batch = tiny_batches(1)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, adapter.model(**batch).logits)


def test_a_sharded_dense_checkpoint_prunes(tmp_path):
    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense, max_shard_size=SHARD)
    make_tokenizer(dense).save_pretrained(dense)
    assert len(_shards(dense)) >= 2 and not (dense / "model.safetensors").exists()
    (tmp_path / "data.txt").write_text("\n".join(sentences(60)) + "\n")
    result = run_cli("prune", dense, "--out", tmp_path / "out", "--data", tmp_path / "data.txt", "--budget", "0.6", "--samples", "30",
                     "--eval-samples", "16", "--seq-len", "32", "--batch-size", "8", "--latency-repeats", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gfprune.json").read_text())
    assert report["metrics"]["kept_prunable_macs"] <= 0.6 and report["metrics"]["params"] < report["metrics"]["dense_params"]
    assert load_pruned(tmp_path / "out").config.num_hidden_layers == 2
