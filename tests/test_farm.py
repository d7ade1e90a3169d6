"""The farm on a real local Ray: collection equals the single process, survives a killed actor,
and a sweep records every unit in MLflow, skips finished units on a rerun, and isolates a broken
model. Every test here has a timeout: a Ray hang must fail, not eat the CI run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import ray
import torch
from conftest import make_tokenizer, save_tiny, sentences

from gfprune_ray import load_pruned
from gfprune_ray.farm import stages as farm
from gfprune_ray.farm import surgeon_shots
from gfprune_ray.farm.campaign import load_campaign
from gfprune_ray.curvature import collect_curvature
from gfprune_ray.data import Examples, batches_fingerprint, heldout_flags, mean_tokens_per_sequence, read_examples, split_examples
from gfprune_ray.errors import UserError
from gfprune_ray.loading import load_model
from gfprune_ray.models import adapter_for
from gfprune_ray.methods.surgeon import SurgeonState, shot_targets
from gfprune_ray.pipeline import calibrate, mark_heldout, plan_llm_surgeon, surgeon_model, surgeon_shot
from gfprune_ray.farm.ray_data import fingerprint_and_length, read_dataset, select_examples, shard, tokenize_rows
from gfprune_ray.options import PruneOptions
from gfprune_ray.single import prepare_batches, prune_model
from gfprune_ray.farm.sweep import run_sweep
from gfprune_ray.farm.tracking import Tracker

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("farm")
    tokenizer = make_tokenizer(root)
    ns = type("Workspace", (), {})()
    ns.root = root
    ns.bert = save_tiny(root / "bert", "bert", 0, tokenizer)
    ns.gpt2 = save_tiny(root / "gpt2", "gpt2", 0, tokenizer)
    ns.data = root / "data.txt"
    ns.data.write_text("\n".join(sentences(120)) + "\n")
    ns.other = root / "other.txt"  # a second evaluation corpus
    ns.other.write_text("\n".join(sentences(60, seed=11)) + "\n")
    return ns


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _single_process(source, data, samples, seq_len, batch_size):
    model, tokenizer = load_model(str(source))
    opts = PruneOptions(samples=samples, eval_samples=20, seq_len=seq_len, batch_size=batch_size)
    batches, _, _ = prepare_batches(tokenizer, read_examples(str(data)), opts)
    return calibrate(adapter_for(model), batches, mean_tokens_per_sequence(batches)), batches


def _farm_data(source, data, samples, seq_len, batch_size):
    calib_rows, eval_rows = select_examples(read_dataset(str(data)), samples, 20, 0)
    return tokenize_rows(calib_rows, str(source), seq_len, batch_size), calib_rows


def _assert_exact(farm_pairs: dict, calibration, tol: float = 1e-6) -> None:
    for site, pair in farm_pairs.items():
        fit, held, grads = pair.value
        for got, want in ((fit, calibration.fit[site]), (held, calibration.heldout[site]), (grads, calibration.grads[site])):
            assert int(got.n) == int(want.n) > 0, site
            assert _rel(got.gram, want.gram) < tol, (site, _rel(got.gram, want.gram))
            assert _rel(got.total, want.total) < tol, site


def test_every_input_format_gives_the_examples_the_single_process_picks(local_ray, ws, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = sentences(50, seed=7)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("\n".join(texts[:20]) + "\n\n")
    (tmp_path / "folder" / "b.jsonl").write_text("".join(f'{{"text": "{t}"}}\n' for t in texts[20:35]))
    pq.write_table(pa.table({"text": texts[35:]}), tmp_path / "folder" / "c.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    want_calib, want_eval = split_examples(Examples(texts), 12, 8, seed=3)
    for source in (tmp_path / "folder", tmp_path / "saved"):
        calib, evaluation = select_examples(read_dataset(str(source)), 12, 8, 3)
        assert [r["text"] for r in calib] == want_calib.texts, source
        assert [r["text"] for r in evaluation] == want_eval.texts, source
        assert [r["heldout"] for r in calib] == heldout_flags(12)
    for name, line in (("untitled.jsonl", '{"body": "w1 w2"}\n'), ("untitled.parquet", None)):  # records without a text field
        path = tmp_path / name
        path.write_text(line * 30) if line else pq.write_table(pa.table({"body": texts}), path)
        with pytest.raises(UserError, match=r"untitled\.(jsonl|parquet): cannot read \(.*records have no 'text' field \(found: body\)"):
            select_examples(read_dataset(str(path)), 12, 8, 3, str(path.name))


def test_an_evaluate_task_reserves_its_latency_threads_but_no_more_than_a_node_has(local_ray):
    from gfprune_ray.farm.stages import evaluation_cpus

    assert [evaluation_cpus(n) for n in (1, 2, 3, 64)] == [1, 2, 2, 2]  # local_ray has 2 CPUs: 3 would never be scheduled


def test_named_corpora_are_read_by_ray_data_as_by_the_single_process(local_ray, tmp_path, monkeypatch):
    """Every corpus of CORPORA (here `licenses`, pointed at a folder of this test's texts), and an
    evaluation-only selection: the evaluation rows of a calibration selection, no calibration rows."""
    folder = tmp_path / "licenses"
    folder.mkdir()
    for n in range(3):
        (folder / f"L{n}").write_text("\n\n".join(" ".join(sentences(8, seed=10 * n + i)) for i in range(10)) + "\n")
    monkeypatch.setenv("GFPRUNE_RAY_LICENSES", str(folder))
    want_calib, want_eval = split_examples(read_examples("licenses"), 12, 8, seed=3)
    assert len(want_eval) == 8
    calib, evaluation = select_examples(read_dataset("licenses"), 12, 8, 3)
    assert [r["text"] for r in calib] == want_calib.texts and [r["text"] for r in evaluation] == want_eval.texts
    calib, evaluation = select_examples(read_dataset("licenses"), 12, 8, 3, eval_only=True)
    assert calib == [] and [r["text"] for r in evaluation] == want_eval.texts


def _in_groups(sites: list, size: int | None) -> list[list]:
    return [sites] if size is None else [sites[i : i + size] for i in range(0, len(sites), size)]


@pytest.mark.parametrize(("family", "workers", "group_size"), [("bert", 2, None), ("gpt2", 1, 1), ("gpt2", 2, 3), ("bert", 2, 3)])
def test_actors_give_the_single_process_statistics_in_one_pass_or_several(local_ray, ws, family, workers, group_size):
    """1 or 2 actors, all sites in one pass or a group of sites per pass (memory-bounded
    collection): every site equals the single process's one-pass statistics."""
    source = getattr(ws, family)
    single, batches = _single_process(source, ws.data, 60, 16, 8)
    calib, rows = _farm_data(source, ws.data, 60, 16, 8)
    # the same examples, in the same order, as the single process: same fingerprint and length
    assert fingerprint_and_length(calib, 8) == (batches_fingerprint(batches), mean_tokens_per_sequence(batches))
    info = ray.get(farm.describe.remote(str(source)))
    groups = _in_groups(info.sites, group_size)
    sites, batch_count = farm.submit_collection(str(source), calib, groups, workers, 8)
    assert list(sites) == info.sites and batch_count == len(batches) * len(groups)
    _assert_exact(dict(zip(sites, ray.get(list(sites.values())))), single)


@pytest.mark.parametrize(("family", "group_size"), [("bert", None), ("gpt2", 1)])
def test_two_actors_give_the_single_process_curvature(local_ray, ws, family, group_size):
    """LLM Surgeon's A and G from 2 actors equal the single process's, on the dense model and on
    a partly pruned one that the actors rebuild from the state; in one pass or one per site."""
    source = getattr(ws, family)
    _, batches = _single_process(source, ws.data, 60, 16, 8)
    calib, _ = _farm_data(source, ws.data, 60, 16, 8)
    model, _ = load_model(str(source))
    adapter = adapter_for(model)
    geoms = adapter.geometries()
    dense = SurgeonState.dense(geoms)
    weights = {site: adapter.unit_weights(*site) for site in dense.kept}
    single_dense = collect_curvature(adapter, mark_heldout(batches), seed=0)
    pruned = surgeon_shot(dense, single_dense, weights, geoms, 0.6, mean_tokens_per_sequence(batches))
    info = ray.get(farm.describe.remote(str(source)))
    shards = shard(calib, 2)  # Ray Data tasks: before the actors start
    plan = surgeon_shots.ShotPlan(farm.start_collectors(str(source), 2, long_lived=True), shards, info.sites, info.geometries, {}, 10.0, 8, 0,
                                  _in_groups(info.sites, group_size))
    for state in (dense, pruned):
        want = collect_curvature(surgeon_model(adapter, state), mark_heldout(batches), seed=0)
        curvature, _ = surgeon_shots.submit_curvature(plan, ray.put(state))
        got = dict(zip(curvature, ray.get(list(curvature.values()))))
        assert {s for s, t in got.items() if t.value is not None} == set(want.sites)
        for site in want.sites:
            for farm_stats, single_stats in zip(got[site].value, (want.fit[site], want.heldout[site], want.grads[site])):
                assert int(farm_stats.n) == int(single_stats.n) > 0
                assert _rel(farm_stats.gram, single_stats.gram) < 1e-6, (site, _rel(farm_stats.gram, single_stats.gram))


def test_llm_surgeon_budgets_share_their_shots_and_each_equals_its_own_run(local_ray, ws):
    """Budgets 0.8, 0.7 (off the grid), 0.6 and 0.5 at step 0.2: paths (0.8), (0.8, 0.7), (0.8, 0.6)
    and (0.8, 0.6, 0.5) need curvature on 3 states (dense, after 0.8, after 0.6) where separate
    runs collect 8 times; the actors' batch counter shows what ran. Every budget still gets the
    masks and weights of its own single-process run."""
    _, batches = _single_process(ws.gpt2, ws.data, 60, 16, 8)
    calib, _ = _farm_data(ws.gpt2, ws.data, 60, 16, 8)
    model, _ = load_model(str(ws.gpt2))
    adapter = adapter_for(model)
    seq_len = mean_tokens_per_sequence(batches)
    info = ray.get(farm.describe.remote(str(ws.gpt2)))
    shards = shard(calib, 2)
    counter = farm.Counter.remote()
    weights = farm.submit_site_weights(str(ws.gpt2), info.sites)
    plan = surgeon_shots.ShotPlan(farm.start_collectors(str(ws.gpt2), 2, long_lived=True), shards, info.sites, info.geometries, weights,
                                  seq_len, 8, 0, [info.sites], counter)
    budgets = [0.8, 0.7, 0.6, 0.5]
    chains, expected = surgeon_shots.submit_chains(plan, budgets, 0.2, lambda stage, refs: None)
    assert expected == farm.shard_batches(shards, 8) * 3
    for chain in chains:
        masks, timings, recs = chain.outputs
        want = plan_llm_surgeon(adapter, batches, chain.budget, seq_len, shot_step=0.2)
        assert ray.get(timings)["shots"] == len(shot_targets(chain.budget, 0.2))
        got = ray.get(masks).value
        assert got.keep.keys() == want.masks.keep.keys()
        for site, keep in want.masks.keep.items():
            assert torch.equal(got.keep[site], keep), (chain.budget, site)
        for site, rec in zip(info.sites, ray.get(recs)):
            assert (rec.value is None) == (site not in want.weights), (chain.budget, site)
            if rec.value is not None:
                assert _rel(rec.value.weight, want.weights[site].weight) < 1e-5, (chain.budget, site)
    assert ray.get(counter.value.remote()) == expected


def test_a_killed_collection_actor_is_restarted_and_statistics_stay_exact(local_ray, ws):
    data = ws.root / "long.txt"
    data.write_text("\n".join(sentences(700, seed=3)) + "\n")
    single, _ = _single_process(ws.bert, data, 600, 16, 2)
    calib, _ = _farm_data(ws.bert, data, 600, 16, 2)
    info = ray.get(farm.describe.remote(str(ws.bert)))
    counter = farm.Counter.remote()
    sites, batches = farm.submit_collection(str(ws.bert), calib, [info.sites], 2, 2, 0, counter)
    assert batches == 300
    deadline = time.time() + 120
    while not ray.get(counter.workers.remote()) and time.time() < deadline:
        time.sleep(0.05)
    victims = ray.get(counter.workers.remote())
    assert victims, "no collection actor reported progress"
    assert ray.get(counter.value.remote()) < 300, "the collection must still be running when one actor is killed"
    os.kill(victims[0], signal.SIGKILL)
    pairs = dict(zip(sites, ray.get(list(sites.values()))))
    _assert_exact(pairs, single)
    assert ray.get(counter.value.remote()) > 300, "the restarted actor redid its shard"


# ---- a whole sweep, in process --------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(local_ray, ws):
    broken = ws.root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert", "hidden_size": 32}')  # no weights
    models = ws.root / "models.txt"
    models.write_text(f"{ws.bert}\n{broken}\n{ws.gpt2} budgets=0.7 method=magnitude,llm-surgeon,flop\n")
    campaign = load_campaign(
        models=models, budgets=[0.8, 0.5], methods=["gfp", "magnitude"], data=str(ws.data), eval_data=[str(ws.data), str(ws.other)], samples=40, eval_samples=20,
        seq_len=16, batch_size=8, workers=2, out=ws.root / "out", experiment="farm-test", latency_repeats=1,
        tracking_uri=f"sqlite:///{ws.root / 'mlflow.db'}", cache_dir=ws.root / "cache", shot_step=0.15, steps=12, checkpoint_every=5,
    )
    start = time.perf_counter()
    result = run_sweep(campaign)
    return campaign, result, time.perf_counter() - start


def test_sweep_finishes_every_unit_of_the_good_models_and_reports_the_broken_one(swept):
    campaign, result, _ = swept
    finished = sorted((r["model"], r["method"], float(r["budget"])) for r in result.records if r["status"] == "FINISHED")
    assert finished == [("bert", "gfp", 0.5), ("bert", "gfp", 0.8), ("bert", "magnitude", 0.5), ("bert", "magnitude", 0.8),
                        ("gpt2", "flop", 0.7), ("gpt2", "llm-surgeon", 0.7), ("gpt2", "magnitude", 0.7)]
    assert len(result.failures) == 1 and result.failures[0].startswith("broken: "), result.failures
    failed = [r for r in result.records if r["status"] == "FAILED"]
    assert {r["model"] for r in failed} == {"broken"} and all(r["error"] for r in failed)
    for r in result.records:
        if r["status"] == "FINISHED":
            assert abs(float(r["kept_prunable_macs"]) - float(r["budget"])) < 0.1
            assert float(r["relative_quality"]) > 0
            if r["quality_metric"] == "fidelity":
                assert float(r["relative_quality"]) <= 1.0001
    assert result.summary["plot"].stat().st_size > 0 and "| bert | gfp | 0.8 |" in result.summary["md"].read_text()


def test_mlflow_has_a_campaign_run_with_nested_model_and_unit_runs(swept, ws):
    campaign, result, _ = swept
    tracker = Tracker(campaign.tracking_uri, campaign.experiment)
    runs = tracker.client.search_runs([tracker.experiment_id])
    by_kind = {}
    for run in runs:
        by_kind.setdefault(run.data.tags["gfprune_kind"], []).append(run)
    (parent,) = by_kind["campaign"]
    assert parent.info.status == "FAILED", "a campaign with a failed model does not end as finished"
    assert {r.data.tags["mlflow.parentRunId"] for r in by_kind["model"]} == {parent.info.run_id}
    models = {r.data.tags["gfprune_model"]: r for r in by_kind["model"]}
    assert models["broken"].info.status == "FAILED" and models["broken"].data.tags["error"]
    assert models["bert"].info.status == "FINISHED"
    for unit in by_kind["unit"]:
        assert unit.data.tags["mlflow.parentRunId"] == models[unit.data.tags["gfprune_model"]].info.run_id
        assert {"method", "budget", "samples", "seq_len", "seed"} <= set(unit.data.params)
        assert {"model_fingerprint", "version_torch"} <= set(unit.data.tags)
        own = {"train_s"} if unit.data.params["method"] == "flop" else {"collect_s", "reconstruct_s"}
        assert {"relative_quality", "macs_ratio", "params", "speedup_b32_vs_ideal", "evaluate_s", *own} <= set(unit.data.metrics)
        artifacts = {a.path for a in tracker.client.list_artifacts(unit.info.run_id)}
        assert {"masks.json", "report.json", "model"} <= artifacts
        # every evaluation corpus, the calibration one (given twice) once, equal to the plain metric
        assert unit.data.params["calibration_corpus"] == "data"
        assert {k for k in unit.data.metrics if k.startswith("relative_quality/")} == {"relative_quality/data", "relative_quality/other"}
        assert unit.data.metrics["relative_quality/data"] == unit.data.metrics["relative_quality"]
        assert 0 < unit.data.metrics["relative_quality/other"] and unit.data.metrics["relative_quality/other"] != unit.data.metrics["relative_quality"]
        assert json.loads(unit.data.tags["gfprune_corpora"]) == {"data": str(ws.data.resolve()), "other": str(ws.other.resolve())}
    campaign_files = {a.path for a in tracker.client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md", "quality_vs_macs.png"} <= campaign_files
    header, *rows = result.summary["csv"].read_text().splitlines()
    assert "data (calib),other" in header and "relative quality" not in header, header
    column = header.split(",").index("other")
    finished = [r for r in result.records if r["status"] == "FINISHED"]
    assert sorted(float(row.split(",")[column]) for row in rows if row.split(",")[column]) == pytest.approx(
        sorted(float(r["relative_quality/other"]) for r in finished), abs=1e-4)


def test_sweep_results_equal_the_single_process_prune(swept, ws, tmp_path):
    campaign, result, _ = swept
    (record,) = [r for r in result.records if r["model"] == "bert" and r["method"] == "gfp" and float(r["budget"]) == 0.5]
    opts = PruneOptions(budget=0.5, method="gfp", samples=40, eval_samples=20, seq_len=16, batch_size=8, latency_repeats=1)
    report = prune_model(str(ws.bert), str(ws.data), opts, tmp_path / "single", eval_data=[str(ws.other)])
    assert float(record["relative_quality"]) == pytest.approx(report["metrics"]["relative_quality"], abs=1e-6)
    assert float(record["relative_quality/other"]) == pytest.approx(report["metrics"]["relative_quality/other"], abs=1e-6)
    assert float(record["params"]) == report["metrics"]["params"]
    saved = load_pruned(campaign.out / "bert" / "gfp-0.5")
    single = load_pruned(tmp_path / "single")
    assert [list(s) for s in adapter_for(saved).sizes()] == [list(s) for s in adapter_for(single).sizes()]


def test_sweep_dtype_prunes_and_saves_in_that_dtype_like_the_single_process_prune(local_ray, ws, tmp_path):
    from safetensors.torch import load_file

    save_tiny(tmp_path / "llama", "llama", 0, make_tokenizer(tmp_path))
    models = tmp_path / "models.txt"
    models.write_text("llama\nllama dtype=float16\n")  # the campaign's dtype, then a line's own
    campaign = load_campaign(models=models, budgets=[0.5], methods=["gfp"], data=str(ws.data), samples=40, eval_samples=20, seq_len=16,
                             batch_size=8, out=tmp_path / "out", experiment="dtype", latency_repeats=0, dtype="bfloat16",
                             tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", cache_dir=tmp_path / "cache")
    result = run_sweep(campaign)
    assert not result.failures, result.failures
    records = {r["model"]: r for r in result.records}
    for name, dtype in (("llama", torch.bfloat16), ("llama-2", torch.float16)):
        saved = load_file(str(campaign.out / name / "gfp-0.5" / "model.safetensors"))
        assert {t.dtype for t in saved.values() if t.is_floating_point()} == {dtype}, name
        assert json.loads((campaign.out / name / "gfp-0.5" / "gfprune.json").read_text())["options"]["dtype"] == str(dtype).removeprefix("torch.")
    assert len(list((tmp_path / "cache").glob("*/manifest.json"))) == 2, "each dtype's statistics are its own"
    opts = PruneOptions(budget=0.5, method="gfp", samples=40, eval_samples=20, seq_len=16, batch_size=8, latency_repeats=0, dtype="bfloat16")
    report = prune_model(str(tmp_path / "llama"), str(ws.data), opts, tmp_path / "single")
    assert float(records["llama"]["relative_quality"]) == pytest.approx(report["metrics"]["relative_quality"], abs=1e-6)
    assert float(records["llama"]["params"]) == report["metrics"]["params"]


def test_sweep_llm_surgeon_equals_the_single_process_prune(swept, ws, tmp_path):
    """Two shots (0.85, 0.7) as farm rounds (2 actors, per-site tasks) give the single process's model."""
    campaign, result, _ = swept
    (record,) = [r for r in result.records if r["model"] == "gpt2" and r["method"] == "llm-surgeon"]
    opts = PruneOptions(budget=0.7, method="llm-surgeon", samples=40, eval_samples=20, seq_len=16, batch_size=8, latency_repeats=1, shot_step=0.15)
    report = prune_model(str(ws.gpt2), str(ws.data), opts, tmp_path / "single", eval_data=[str(ws.other)])
    assert float(record["relative_quality"]) == pytest.approx(report["metrics"]["relative_quality"], abs=1e-5)
    assert float(record["perplexity/other"]) == pytest.approx(report["metrics"]["perplexity/other"], rel=1e-5)
    assert float(record["kept_prunable_macs"]) == pytest.approx(report["metrics"]["kept_prunable_macs"])
    assert report["metrics"]["kept_prunable_macs"] <= 0.7 + 1e-9
    assert float(record["shots"]) == 2
    # the texts gpt2 wrote for its calibration: a quarter of --samples, the same in both (equal
    # quality above needs the same texts); bert is no language model and writes none
    assert float(record["self_texts"]) == report["metrics"]["self_texts"] == 10
    assert {float(r["self_texts"]) for r in result.records if r["model"] == "bert" and r["status"] == "FINISHED"} == {0.0}
    saved = load_pruned(campaign.out / "gpt2" / "llm-surgeon-0.7")
    assert [list(s) for s in adapter_for(saved).sizes()] == report["sizes"]
    tracker = Tracker(campaign.tracking_uri, campaign.experiment)
    (run,) = tracker.client.search_runs([tracker.experiment_id], "tags.gfprune_kind = 'unit' and params.method = 'llm-surgeon'")
    assert run.data.params["shot_step"] == "0.15" and run.data.params["reconstruction"] == "correlated"


def test_sweep_flop_trains_on_ray_train_like_the_single_process_prune(swept, ws, tmp_path):
    """A training unit: TorchTrainer in the farm, loss curve in MLflow, checkpoints cleaned up,
    and the same model as `prune --method flop` (training is deterministic)."""
    campaign, result, _ = swept
    (record,) = [r for r in result.records if r["model"] == "gpt2" and r["method"] == "flop"]
    opts = PruneOptions(budget=0.7, method="flop", samples=40, eval_samples=20, seq_len=16, batch_size=8, latency_repeats=1, steps=12, checkpoint_every=5)
    report = prune_model(str(ws.gpt2), str(ws.data), opts, tmp_path / "single")
    assert float(record["relative_quality"]) == pytest.approx(report["metrics"]["relative_quality"], abs=1e-5)
    assert float(record["kept_prunable_macs"]) == pytest.approx(report["metrics"]["kept_prunable_macs"])
    assert float(record["kept_prunable_macs"]) <= 0.7 + 1e-9 and float(record["train_steps"]) == 12 + 3  # pruning + fine-tuning
    saved = load_pruned(campaign.out / "gpt2" / "flop-0.7")
    single = load_pruned(tmp_path / "single")
    ids = torch.randint(3, 90, (2, 10))
    with torch.no_grad():
        assert torch.allclose(saved(input_ids=ids).logits, single(input_ids=ids).logits, atol=1e-5)
    tracker = Tracker(campaign.tracking_uri, campaign.experiment)
    (run,) = tracker.client.search_runs([tracker.experiment_id], "tags.gfprune_kind = 'unit' and params.method = 'flop'")
    assert run.data.params["steps"] == "12" and run.data.params["reconstruction"] == "trained"
    curve = tracker.client.get_metric_history(run.info.run_id, "train/expected_kept")
    assert sorted(m.step for m in curve) == list(range(15))
    assert not any((campaign.out / ".train").glob("*")), "a recorded unit's checkpoints are removed"
    assert not (tmp_path / ".single.train").exists()


def test_rerun_skips_finished_units_and_reuses_statistics(swept):
    campaign, result, first_s = swept
    tracker = Tracker(campaign.tracking_uri, campaign.experiment)
    before = {r.info.run_id for r in tracker.client.search_runs([tracker.experiment_id], "tags.gfprune_kind = 'unit'")}
    again = run_sweep(campaign)
    after = {r.info.run_id for r in tracker.client.search_runs([tracker.experiment_id], "tags.gfprune_kind = 'unit'")}
    assert after == before, "finished units are not run again and failed ones are not duplicated"
    assert len(again.failures) == 1, "the broken model is retried and fails again"
    finished = lambda res: sorted((r["model"], r["method"], r["budget"], r["relative_quality"]) for r in res.records if r["status"] == "FINISHED")
    assert finished(again) == finished(result)
    assert list(campaign.stats_dir().glob("*/manifest.json")), "statistics are cached for later campaigns"


def test_rerun_with_a_new_evaluation_corpus_adds_it_to_the_finished_units(swept, ws, tmp_path):
    """Evaluation corpora are not part of a unit's key: a rerun that adds one measures the
    finished units again and adds the new corpus's metrics to their runs; nothing else changes."""
    campaign, _, _ = swept
    third = ws.root / "third.txt"
    third.write_text("\n".join(sentences(50, seed=13)) + "\n")
    # latency threads beyond any node's CPUs: a unit measured again times nothing, so it must not ask for them
    grown = campaign.model_copy(update={"models": campaign.models[:1], "methods": ["gfp"], "budgets": [0.8], "latency_threads": 64,
                                        "eval_data": [*campaign.eval_data, str(third)], "out": tmp_path / "out"})
    tracker = Tracker(campaign.tracking_uri, campaign.experiment)
    units = lambda: {r.info.run_id: r for r in tracker.client.search_runs([tracker.experiment_id], "tags.gfprune_kind = 'unit'")}
    before = units()
    again = run_sweep(grown)
    after = units()
    assert after.keys() == before.keys() and not again.failures
    (unit,) = grown.units()
    for run_id, run in after.items():
        metrics, was = run.data.metrics, before[run_id].data.metrics
        if run.data.tags["gfprune_unit"] == unit.key:
            assert set(metrics) - set(was) == {"relative_quality/third", "fidelity/third"}
            assert 0 < metrics["relative_quality/third"] <= 1.0001
            assert json.loads(run.data.tags["gfprune_corpora"])["third"] == str(third.resolve())
        else:
            assert set(metrics) == set(was), "units outside the rerun are left alone"
        assert {k: metrics[k] for k in was} == was, "recorded metrics are not changed"
    (record,) = again.records
    assert float(record["relative_quality/third"]) == after[record["run_id"]].data.metrics["relative_quality/third"]
    assert "third" in (tmp_path / "out" / "summary.csv").read_text().splitlines()[0]
    # the unit is not pruned or saved again; its model, missing from this new --out, is copied from its run
    folder = Path("bert") / "gfp-0.8" / "model.safetensors"
    assert (tmp_path / "out" / folder).read_bytes() == (campaign.out / folder).read_bytes()
