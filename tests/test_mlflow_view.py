"""What a user sees of a campaign in MLflow (issue 17), on a real sqlite store and a real local Ray:
run times that span the work, names that fit the runs table, params a user filters on and tags for
the environment, the data as dataset inputs, the summary as the campaign's description, a failure's
whole error as its run's description, and an experiment that opens on its runs table."""

from __future__ import annotations


import mlflow
import torch
import transformers

import pytest
from conftest import make_tokenizer, save_tiny, sentences
from mlflow.tracking import MlflowClient

from gfprune_ray import load_pruned
from gfprune_ray.data import tokenize
from gfprune_ray.evaluate import sentence_embeddings
from gfprune_ray.farm.campaign import load_campaign
from gfprune_ray.farm.report import table_rows, to_markdown
from gfprune_ray.farm.sweep import run_sweep

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def campaign(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("view")
    tokenizer = make_tokenizer(root)
    save_tiny(root / "tiny-bert", "bert", 0, tokenizer)
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    (root / "models.txt").write_text(f"{root / 'tiny-bert'}\n{root / 'broken'}\n")
    (root / "data.txt").write_text("\n".join(sentences(60)) + "\n")
    (root / "other.txt").write_text("\n".join(sentences(30, seed=4)) + "\n")
    c = load_campaign(models=root / "models.txt", methods=["gfp"], budgets=[0.8], data=str(root / "data.txt"), eval_data=[str(root / "other.txt")],
                      samples=24, eval_samples=12, seq_len=16, batch_size=8, latency_repeats=1, latency_batch_sizes=[2, 8], out=root / "out", experiment="view",
                      tracking_uri=f"sqlite:///{root / 'mlflow.db'}", cache_dir=root / "cache", register_model="tiny-pruned")
    ns = type("View", (), {})()
    ns.root, ns.result = root, run_sweep(c)
    ns.client = MlflowClient(c.tracking_uri)
    ns.experiment = ns.client.get_experiment_by_name("view")
    ns.runs = {kind: ns.client.search_runs([ns.experiment.experiment_id], f"tags.gfprune_kind = '{kind}'") for kind in ("campaign", "model", "unit")}
    return ns


def test_the_experiment_opens_on_its_runs_table_and_the_sweep_says_where(campaign):
    assert campaign.experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert campaign.result.runs_url.startswith(f"http://127.0.0.1:5000/#/experiments/{campaign.experiment.experiment_id}/runs")
    # a sqlite store keeps its artifacts beside it, not in whatever folder the command ran in
    assert campaign.experiment.artifact_location.startswith((campaign.root / "mlruns").as_uri())


def test_unit_runs_span_their_work_and_are_named_for_their_row(campaign):
    [unit] = campaign.runs["unit"]
    assert unit.info.run_name == "gfp@0.8"
    seconds = (unit.info.end_time - unit.info.start_time) / 1000
    metrics = unit.data.metrics
    stages = metrics["collect_s"] + metrics["search_s"] + metrics["reconstruct_s"] + metrics["evaluate_s"]
    assert stages > 0.5 and seconds >= stages, (seconds, stages)  # it was 0.03-0.07 s when runs were made after the work
    [model] = [r for r in campaign.runs["model"] if r.data.tags["gfprune_model"] == "tiny-bert"]
    assert model.info.start_time <= unit.info.start_time and unit.info.end_time <= model.info.end_time


def test_params_are_what_a_user_filters_on_and_the_environment_is_tags(campaign):
    [unit] = campaign.runs["unit"]
    for key in ("model", "method", "budget", "data", "samples", "architecture"):
        assert key in unit.data.params, key
    assert unit.data.params["latency_batch_sizes"] == "2,8" and unit.data.params["latency_threads"] == "1"
    for key in ("version_torch", "version_mlflow", "model_fingerprint", "stats_fingerprint"):
        assert key in unit.data.tags and key not in unit.data.params, key
    [parent] = campaign.runs["campaign"]
    assert "version_torch" in parent.data.tags and not any(k.startswith("version_") for k in parent.data.params)


def test_the_data_is_logged_as_dataset_inputs_with_digests(campaign):
    [unit] = campaign.runs["unit"]
    inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]): d.dataset for d in unit.inputs.dataset_inputs}
    # the calibration corpus twice: the examples it calibrated on and those held back to evaluate
    assert set(inputs) == {("data", "calibration"), ("data", "evaluation"), ("other", "evaluation")}, sorted(inputs)
    assert all(len(d.digest) == 16 for d in inputs.values()) and len({d.digest for d in inputs.values()}) == 3
    assert '"num_rows": 24' in inputs["data", "calibration"].profile and '"num_rows": 12' in inputs["other", "evaluation"].profile
    assert str(campaign.root / "other.txt") in inputs["other", "evaluation"].source


def test_the_campaign_run_describes_the_campaign_and_a_failure_its_whole_error(campaign):
    [parent] = campaign.runs["campaign"]
    key = parent.data.tags["gfprune_campaign"]
    assert parent.info.run_name == f"campaign {key}"
    description = parent.data.tags["mlflow.note.content"]
    assert to_markdown(campaign.result.records) in description and "| tiny-bert | gfp | 0.8 |" in description
    [broken] = [r for r in campaign.runs["model"] if r.data.tags["gfprune_model"] == "broken"]
    assert broken.info.status == "FAILED"
    assert "cannot load model" in broken.data.tags["error"] and "\n" not in broken.data.tags["error"]
    assert len(broken.data.tags["mlflow.note.content"]) > len(broken.data.tags["error"]), "the description holds the whole error"


def test_the_table_shows_the_quality_value_enough_digits_and_one_named_macs_figure(campaign):
    [record] = [r for r in campaign.result.records if r.get("status") == "FINISHED"]
    # in a table of one kind of model, the metric and the sequence length go to the header
    header, [row] = table_rows([record])
    assert "fidelity" in header and "MACs kept @64 tok" in header  # 128 tokens, or all the positions of a smaller model
    assert row[header.index("fidelity")] == f"{float(record['fidelity']):.5f}"
    assert row[header.index("MACs kept @64 tok")] == f"{float(record['macs_ratio']):.3f}"
    # the speedup at the largest batch timed, marked where it cannot be trusted
    assert row[header.index("speedup b8")].endswith("(few runs)"), "one latency round cannot tell its spread"
    assert {"latency_b2_s", "latency_b8_cpu_share", "speedup_b8_trusted"} <= set(record) and "speedup_b32" not in record
    timed = {**record, "speedup_b8_spread": 0.02, "latency_b8_busy": 0.0}
    assert table_rows([timed])[1][0][header.index("speedup b8")] == f"{float(record['speedup_b8']):.2f}"
    busy = table_rows([timed | {"latency_b8_busy": 1.0}])[1][0][header.index("speedup b8")]
    assert busy.endswith("(busy machine)")
    small = {k: v for k, v in timed.items() if "_b8" not in k}
    header, rows = table_rows([timed, small])
    assert "speedup" in header and sorted(r[header.index("speedup")].split(" ")[1] for r in rows) == ["@b2", "@b8"]
    # mixed rows name them in each cell
    other = {**record, "quality_metric": "perplexity", "perplexity": 36.4172, "latency_seq_len": 128}
    header, rows = table_rows([record, other])
    assert "quality" in header and "MACs kept" in header
    assert sorted(r[header.index("quality")] for r in rows) == sorted([f"fidelity {float(record['fidelity']):.5f}", "perplexity 36.42"])
    assert any(r[header.index("MACs kept")].endswith("@128 tok") for r in rows)
    plain = {k: v for k, v in record.items() if "/" not in k} | {"relative_quality": 0.999991}
    header, [row] = table_rows([plain])
    assert row[header.index("relative quality")] == "0.99999", "five decimals tell 0.99999 from 1"


def test_each_pruned_model_is_an_mlflow_model_registered_and_loadable(campaign):
    [unit] = campaign.runs["unit"]
    [version] = campaign.client.search_model_versions("name = 'tiny-pruned'")
    assert version.run_id == unit.info.run_id
    mlflow.set_tracking_uri(campaign.client.tracking_uri)
    served = mlflow.pyfunc.load_model(f"models:/tiny-pruned/{version.version}")
    texts = sentences(5, seed=11)
    got = torch.tensor(served.predict(texts))
    folder = campaign.root / "out" / "tiny-bert" / "gfp-0.8"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    want = sentence_embeddings(load_pruned(folder), tokenize(tokenizer, texts, seq_len=64, batch_size=32))
    assert got.shape == (5, 32) and torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, got[:1]), "different texts, different embeddings"
