"""Memory-bounded statistics: a group of sites per collection pass, each site streamed to disk.

The claim every test here checks: collecting in several passes changes how much is in memory at
once, never a number. Grouped statistics equal one-pass statistics exactly; a prune or a sweep
that collects in passes saves the same model, bit for bit, as one that does not."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from conftest import make_tokenizer, run_cli, save_tiny, sentences, tiny_batches, tiny_model
from gfprune_ray.curvature import collect_curvature
from gfprune_ray.errors import UserError
from gfprune_ray.farm.campaign import load_campaign
from gfprune_ray.farm.sweep import run_sweep
from gfprune_ray.models import BlockGeometry, adapter_for
from gfprune_ray.pipeline import mark_heldout
from gfprune_ray.choices import parse_memory
from gfprune_ray.stats import model_sites, plan_groups, site_stats_bytes
from gfprune_ray.stats_store import load_stats, read_site

SMALL = ["--samples", "30", "--eval-samples", "10", "--seq-len", "16", "--batch-size", "4", "--latency-repeats", "0"]


def test_site_bytes_and_groups_follow_the_memory_budget():
    # Llama-2-7B widths: an FFN site is 2 x 11008^2 (fit, held-out) + 4096^2 (curvature) doubles
    geom = BlockGeometry(d=4096, units=32, heads_per_unit=1, head_dim=128, ffn=11008, gated=True)
    assert site_stats_bytes(geom, "ffn") == 8 * (2 * (11008**2 + 11008 + 1) + 4096**2 + 4096 + 1)
    assert site_stats_bytes(geom, "attn") == 8 * (2 * (4096**2 + 4096 + 1) + 4096**2 + 4096 + 1)
    geoms = [geom] * 3
    sites = model_sites(geoms)
    layer = site_stats_bytes(geom, "attn") + site_stats_bytes(geom, "ffn")  # 2.47 GB
    assert plan_groups(sites, geoms, None) == [sites]
    assert plan_groups(sites, geoms, 10 * layer) == [sites]
    assert plan_groups(sites, geoms, layer) == [sites[0:2], sites[2:4], sites[4:6]]
    assert plan_groups(sites, geoms, 2 * layer - 1) == [sites[0:3], sites[3:6]]  # consecutive, greedy
    # a site larger than the budget is collected alone, never skipped
    assert plan_groups(sites, geoms, 1) == [[s] for s in sites]


@pytest.mark.parametrize(("text", "size"), [("6GB", 6 * 10**9), ("512 MB", 512 * 10**6), ("2.5GiB", int(2.5 * 2**30)), ("4096", 4096)])
def test_memory_sizes_parse(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["lots", "6XB", "-1GB", "0", ""])
def test_a_bad_memory_size_is_one_line(text):
    with pytest.raises(UserError, match="--stats-memory"):
        parse_memory(text)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_grouped_collection_equals_one_pass_exactly(family, group_size):
    adapter = adapter_for(tiny_model(family))
    batches = mark_heldout(tiny_batches(n_batches=3))
    whole = collect_curvature(adapter, batches, seed=0)
    sites = model_sites(adapter.geometries())
    for start in range(0, len(sites), group_size):
        group = sites[start : start + group_size]
        part = collect_curvature(adapter, batches, seed=0, sites=group)
        assert list(part.fit.sites) == group
        for site in group:
            for got, want in ((part.fit[site], whole.fit[site]), (part.heldout[site], whole.heldout[site]), (part.grads[site], whole.grads[site])):
                assert float(got.n) == float(want.n) > 0
                assert torch.equal(got.gram, want.gram) and torch.equal(got.total, want.total), site


# ---- prune and sweep in passes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("grouped")
    ns = type("Workspace", (), {})()
    ns.root = root
    ns.model = save_tiny(root / "tiny-llama", "llama", 0, make_tokenizer(root))
    ns.data = root / "data.txt"
    ns.data.write_text("\n".join(sentences(60)) + "\n")
    ns.cache = root / "cache"
    ns.one_pass = run_cli("prune", ns.model, "--out", root / "one-pass", "--data", ns.data, "--budget", "0.6", *SMALL, GFPRUNE_RAY_CACHE=str(ns.cache))
    assert ns.one_pass.returncode == 0, ns.one_pass.stderr[-3000:]
    return ns


def _sha(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def _metrics(folder) -> dict:
    """The numbers a prune reports about its model (no timings: they are not in `metrics`)."""
    return {k: v for k, v in json.loads((folder / "gfprune.json").read_text())["metrics"].items() if isinstance(v, (int, float))}


def test_prune_in_passes_saves_the_same_model_and_leaves_no_scratch(ws, tmp_path):
    """2000 bytes hold one tiny site at a time: 4 passes, each site written to a scratch folder
    and read back one at a time for scoring and reconstruction."""
    out = tmp_path / "passes"
    result = run_cli("prune", ws.model, "--out", out, "--data", ws.data, "--budget", "0.6", "--stats-memory", "2000", *SMALL,
                     GFPRUNE_RAY_CACHE=str(ws.cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 passes" in result.stderr
    assert _sha(out) == _sha(ws.root / "one-pass")
    assert _metrics(out) == pytest.approx(_metrics(ws.root / "one-pass"), rel=1e-12)
    assert not list((ws.cache / "scratch").iterdir()), "the scratch statistics are removed"


def test_prune_in_passes_writes_a_stats_folder_that_a_one_pass_run_reuses(ws, tmp_path):
    stats = tmp_path / "stats"
    first = run_cli("prune", ws.model, "--out", tmp_path / "a", "--data", ws.data, "--budget", "0.6", "--stats", stats,
                    "--stats-memory", "2000", *SMALL, GFPRUNE_RAY_CACHE=str(ws.cache))
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in stats.iterdir()) == ["manifest.json"] + sorted(f"site-{i}-{k}.safetensors" for i in (0, 1) for k in ("attn", "ffn"))
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]
    parts = load_stats(stats, None, adapter_for(tiny_model("llama")))
    assert parts["fit"].tokens + parts["heldout"].tokens == int(read_site(stats, (0, "ffn"))["fit"].n + read_site(stats, (0, "ffn"))["heldout"].n)
    again = run_cli("prune", ws.model, "--out", tmp_path / "b", "--data", ws.data, "--budget", "0.6", "--stats", stats, *SMALL,
                    GFPRUNE_RAY_CACHE=str(ws.cache))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "gfprune.json").read_text())["stats_reused"] is True
    assert _sha(tmp_path / "a") == _sha(tmp_path / "b") == _sha(ws.root / "one-pass")


def test_a_sweep_in_passes_equals_one_in_one_pass(local_ray, ws, tmp_path):
    """gfp and llm-surgeon (2 shots), 2 actors: one site per pass against the default (one pass);
    the cache holds a file per site and a manifest."""
    models = tmp_path / "models.txt"
    models.write_text(f"{ws.model}\n")
    results = {}
    for name, memory in (("passes", "2000"), ("one-pass", None)):
        campaign = load_campaign(models=models, budgets=[0.6], methods=["gfp", "llm-surgeon"], data=str(ws.data), samples=30, eval_samples=10,
                                 seq_len=16, batch_size=4, workers=2, out=tmp_path / name, experiment=name, latency_repeats=0, shot_step=0.2,
                                 tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", cache_dir=tmp_path / f"cache-{name}", stats_memory=memory)
        result = run_sweep(campaign)
        assert not result.failures, result.failures
        results[name] = {r["method"]: r for r in result.records}
        [cache] = [p.parent for p in (tmp_path / f"cache-{name}").glob("*/manifest.json")]
        assert len(list(cache.glob("site-*.safetensors"))) == 4
    for method in ("gfp", "llm-surgeon"):
        a, b = results["passes"][method], results["one-pass"][method]
        assert float(a["relative_quality"]) == pytest.approx(float(b["relative_quality"]), rel=1e-9), method
        assert _sha(tmp_path / "passes" / "tiny-llama" / f"{method}-0.6") == _sha(tmp_path / "one-pass" / "tiny-llama" / f"{method}-0.6")
