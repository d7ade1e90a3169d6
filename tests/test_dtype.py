"""Half-precision models: bfloat16 and float16 checkpoints prune, save and reload in their own
dtype, and `--dtype` loads a float32 checkpoint in another (statistics add up in float64 either
way). Through the command line, as a user runs it; the early rounding of refit weights in-process."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, run_cli, sentences, tiny_batches, tiny_model
from safetensors.torch import load_file

from gfprune_ray import load_pruned
from gfprune_ray.models import adapter_for
from gfprune_ray.pipeline import calibrate, plan
from gfprune_ray.reconstruct import reconstruct
from gfprune_ray.surgery import apply_pruning

SMALL = ("--samples", "40", "--eval-samples", "16", "--seq-len", "32", "--batch-size", "8", "--latency-repeats", "0")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dtype")
    tokenizer = make_tokenizer(root)
    for dtype in ("float32", "bfloat16", "float16"):
        model = tiny_model("llama").to(getattr(torch, dtype))
        model.save_pretrained(root / dtype)
        tokenizer.save_pretrained(root / dtype)
    (root / "data.txt").write_text("\n".join(sentences(80)) + "\n")
    return root


def _saved_dtypes(folder: Path) -> set[torch.dtype]:
    return {t.dtype for t in load_file(str(folder / "model.safetensors")).values() if t.is_floating_point()}


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "gfprune.json").read_text())["metrics"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_checkpoint_prunes_and_reloads_in_its_dtype(ws, tmp_path, dtype):
    out = tmp_path / "out"
    result = run_cli("prune", ws / dtype, "--out", out, "--data", ws / "data.txt", "--budget", "0.6", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _saved_dtypes(out) == {getattr(torch, dtype)}
    assert load_pruned(out).dtype == getattr(torch, dtype)
    metrics = _metrics(out)
    assert metrics["kept_prunable_macs"] <= 0.6 and metrics["params"] < metrics["dense_params"]
    # the least-squares refit in float64, rounded into half precision, still helps
    assert metrics["mean_block_error"] < metrics["mean_block_error_none"]
    assert torch.isfinite(torch.tensor(metrics["perplexity"]))


def test_without_a_refit_kept_half_precision_weights_are_the_checkpoints_bit_for_bit(ws, tmp_path):
    """No float32 round trip on the way: every kept FFN neuron's rows and column are the
    checkpoint's own bfloat16 values."""
    out = tmp_path / "out"
    result = run_cli("prune", ws / "bfloat16", "--out", out, "--data", ws / "data.txt", "--reconstruct", "none", "--budget", "0.6", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    dense = load_file(str(ws / "bfloat16" / "model.safetensors"))
    pruned = load_file(str(out / "model.safetensors"))
    masks = json.loads((out / "gfprune.json").read_text())["masks"]
    cut = 0
    for layer in range(2):
        kept = torch.tensor(masks[f"{layer}.ffn"])
        cut += 48 - len(kept)
        prefix = f"model.layers.{layer}.mlp."
        for name in ("up_proj", "gate_proj"):
            assert torch.equal(pruned[prefix + name + ".weight"], dense[prefix + name + ".weight"][kept])
        assert torch.equal(pruned[prefix + "down_proj.weight"], dense[prefix + "down_proj.weight"][:, kept])
    assert cut > 0, "the budget removed no neuron: nothing was checked"


def test_dtype_option_loads_and_saves_in_that_dtype_and_eval_measures_it_the_same(ws, tmp_path):
    out = tmp_path / "out"
    result = run_cli("prune", ws / "float32", "--out", out, "--data", ws / "data.txt", "--dtype", "bfloat16", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _saved_dtypes(out) == {torch.bfloat16}
    recorded = json.loads((out / "gfprune.json").read_text())["options"]
    assert recorded["dtype"] == "bfloat16"
    again = run_cli("eval", out, "--latency-repeats", "0")
    assert again.returncode == 0, again.stderr[-3000:]
    remeasured = json.loads((out / "eval.json").read_text())["metrics"]
    # the dense reference is loaded in bfloat16 too: the same numbers as at pruning time
    for key in ("perplexity", "dense_perplexity"):
        assert remeasured[key] == pytest.approx(_metrics(out)[key], rel=1e-6)
    float32 = tmp_path / "f32"
    assert run_cli("prune", ws / "float32", "--out", float32, "--data", ws / "data.txt", *SMALL).returncode == 0
    assert _saved_dtypes(float32) == {torch.float32}
    assert _metrics(float32)["dense_perplexity"] != _metrics(out)["dense_perplexity"], "bfloat16 rounding changes the dense model"


@pytest.mark.parametrize("args, text", [
    (("--dtype", "float64"), "unknown dtype 'float64'; choose one of: float32, bfloat16, float16"),
    (("--dtype", "bfloat16", "--method", "cofi"), "--dtype does not apply to cofi"),
])
def test_bad_dtype_is_one_line(ws, tmp_path, args, text):
    result = run_cli("prune", ws / "float32", "--out", tmp_path / "out", "--data", ws / "data.txt", *args, *SMALL)
    assert result.returncode == 2 and text in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_refit_weights_kept_in_the_model_dtype_cut_the_same_model_as_float64_ones(dtype):
    """Plans hold each site's new weights in the model's dtype until surgery (a 7B model's float64
    ones would take 11 GB); surgery rounds to that dtype anyway, so the cut model is the same bit
    for bit as one cut with the float64 weights the refit computes."""
    adapter = adapter_for(tiny_model("llama").to(dtype))
    calibration = calibrate(adapter, tiny_batches(4), 12.0)
    result = plan(adapter, calibration, 0.5, "gfp", "full")
    assert result.weights and all(r.weight.dtype == dtype for r in result.weights.values())
    exact = {}
    for site, rec in result.weights.items():
        w = adapter.unit_weights(*site)
        exact[site] = reconstruct("full", w.out, w.bias, result.masks.keep[site].nonzero().flatten(), w.width,
                                  calibration.fit[site], calibration.heldout[site])
        assert exact[site].weight.dtype == torch.float64
        assert not torch.equal(exact[site].weight.to(dtype).to(torch.float64), exact[site].weight), "the rounding must be real"
    kept, float64 = adapter_for(copy.deepcopy(adapter.model)), adapter_for(copy.deepcopy(adapter.model))
    apply_pruning(kept, result.masks, result.weights)
    apply_pruning(float64, result.masks, exact)
    for (name, a), (_, b) in zip(kept.model.state_dict().items(), float64.model.state_dict().items()):
        assert a.dtype == dtype and torch.equal(a, b), name
