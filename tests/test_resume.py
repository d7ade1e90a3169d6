"""Resuming and growing a campaign, in process on one real local Ray and real MLflow (sqlite):
cached statistics are loaded, not collected again; unit runs a crash left unfinished are deleted
and their units redone; a campaign grown by budgets or models runs only its new units; and every
gfp and magnitude unit keeps at most its budget of the prunable MACs and misses it by less than
one head, computed here from the model's geometry and the saved model's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tokenizer, save_tiny, sentences
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from gfprune_ray.farm.campaign import load_campaign
from gfprune_ray.farm.sweep import run_sweep

pytestmark = pytest.mark.timeout(300)

# the tiny BERT of conftest: 2 layers, d=32, 4 heads of 8, 48 FFN neurons
LAYERS, D, HEADS, DH, FFN = 2, 32, 4, 8, 48
BUDGETS = [0.9, 0.7, 0.5, 0.3]
METHODS = ["gfp", "magnitude"]
SMALL = dict(samples=32, eval_samples=16, seq_len=16, batch_size=8, workers=1, latency_repeats=1)
DETERMINISTIC = ("relative_quality", "kept_prunable_macs", "params", "calibration_tokens")


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        tokenizer = make_tokenizer(root)
        self.bert = save_tiny(root / "bert", "bert", 0, tokenizer)
        self.bert_b = save_tiny(root / "bert-b", "bert", 1, tokenizer)  # another model (other weights)
        self.data = root / "data.txt"
        self.data.write_text("\n".join(sentences(60)) + "\n")
        self.cache = root / "cache"
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)

    def campaign(self, experiment: str, models: str, **options):
        """A campaign of this workspace; its experiment keeps artifacts here, not in the cwd."""
        if self.client.get_experiment_by_name(experiment) is None:
            self.client.create_experiment(experiment, artifact_location=(self.root / "artifacts" / experiment).as_uri())
        models_file = self.root / f"{experiment}.models.txt"
        models_file.write_text(models)
        return load_campaign(models=models_file, **(dict(
            methods=METHODS, data=str(self.data), out=self.root / "out" / experiment, experiment=experiment,
            tracking_uri=self.uri, cache_dir=self.cache, **SMALL) | options))

    def units(self, experiment: str, deleted: bool = False) -> dict:
        """run id -> unit run of the experiment (active ones; every one with deleted=True)."""
        exp = self.client.get_experiment_by_name(experiment)
        view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
        runs = self.client.search_runs([exp.experiment_id], "tags.gfprune_kind = 'unit'", run_view_type=view, max_results=1000)
        return {r.info.run_id: r for r in runs}

    def cache_files(self) -> dict[str, int]:
        return {str(p.relative_to(self.cache)): p.stat().st_mtime_ns for p in self.cache.rglob("*") if p.is_file()}


def _by_key(runs: dict) -> dict:
    out: dict = {}
    for run in runs.values():
        out.setdefault(run.data.tags["gfprune_unit"], []).append(run)
    return out


@pytest.fixture(scope="module")
def ws(local_ray, tmp_path_factory):
    """The workspace and its first campaign, `base`: 2 methods x 4 budgets, on an empty cache."""
    ws = Workspace(tmp_path_factory.mktemp("resume"))
    ws.base = ws.campaign("base", f"{ws.bert}\n", budgets=BUDGETS)
    ws.base_result = run_sweep(ws.base)
    assert not ws.base_result.failures, ws.base_result.failures
    return ws


# ---- 1. statistics come from the cache -------------------------------------------------------


def test_a_second_campaign_loads_the_statistics_from_the_cache(ws):
    """Breaks if: the cache is not looked up (a fingerprint that depends on the campaign, e.g. its
    experiment), the cached file is rewritten or a second one written, or stats_reused/collect_s
    are not recorded as they happened."""
    first = ws.units("base")
    assert len(first) == len(BUDGETS) * len(METHODS)
    assert all(r.data.metrics["stats_reused"] == 0.0 and r.data.metrics["collect_s"] > 0 for r in first.values()), \
        "the first campaign on an empty cache collects"
    cached = ws.cache_files()
    assert len([n for n in cached if n.endswith("manifest.json")]) == 1, cached  # one model's statistics, complete

    again = ws.campaign("again", f"{ws.bert}\n", budgets=[0.6])
    result = run_sweep(again)
    assert not result.failures, result.failures
    runs = ws.units("again")
    assert len(runs) == len(METHODS)
    for run in runs.values():
        assert run.data.metrics["stats_reused"] == 1.0
        assert run.data.metrics["collect_s"] == 0.0
        # the statistics loaded are the ones collected: the same token count
        assert run.data.metrics["calibration_tokens"] == next(iter(first.values())).data.metrics["calibration_tokens"]
        assert run.data.tags["stats_fingerprint"] == next(iter(first.values())).data.tags["stats_fingerprint"]
    (model_run,) = ws.client.search_runs([ws.client.get_experiment_by_name("again").experiment_id], "tags.gfprune_kind = 'model'")
    assert model_run.data.metrics["stats_reused"] == 1.0 and model_run.data.metrics["collect_s"] == 0.0
    assert ws.cache_files() == cached, "no collection ran: the cache is neither rewritten nor added to"

    # a sweep killed after the model's last unit leaves its model run RUNNING: the next run of the
    # campaign closes it, and redoes nothing
    ws.client.update_run(model_run.info.run_id, "RUNNING")
    assert not run_sweep(again).failures
    assert ws.client.get_run(model_run.info.run_id).info.status == "FINISHED"
    assert {k: r.info.end_time for k, r in ws.units("again").items()} == {k: r.info.end_time for k, r in runs.items()}, "nothing redone"


# ---- 2. unfinished unit runs are deleted and their units redone --------------------------------


def test_unit_runs_a_crash_left_unfinished_are_deleted_and_redone(ws):
    """Breaks if: a rerun skips a unit whose run is RUNNING (counts it as done), keeps the
    unfinished run beside the redone one, leaves a stray duplicate run active, or reruns units
    that finished."""
    campaign = ws.campaign("crash", f"{ws.bert}\n", methods=["gfp"], budgets=[0.8, 0.6, 0.4])
    assert not run_sweep(campaign).failures
    before = ws.units("crash")
    keys = _by_key(before)
    assert len(keys) == 3 and all(len(v) == 1 for v in keys.values())
    by_budget = {float(r.data.params["budget"]): r for r in before.values()}

    # a crash between creating the 0.8 unit's run and ending it leaves it RUNNING, and nothing else
    broken = by_budget[0.8]
    ws.client.update_run(broken.info.run_id, "RUNNING")
    # a stray run of the 0.6 unit (finished beside it), as an attempt killed mid-way would leave
    twin = by_budget[0.6]
    exp_id = twin.info.experiment_id
    stray_tags = {k: twin.data.tags[k] for k in ("gfprune_kind", "gfprune_campaign", "gfprune_unit", "gfprune_model", "mlflow.parentRunId")}
    stray = ws.client.create_run(exp_id, tags=stray_tags, run_name="stray").info.run_id
    assert ws.client.get_run(stray).info.status == "RUNNING"

    result = run_sweep(campaign)
    assert not result.failures, result.failures

    assert ws.client.get_run(broken.info.run_id).info.lifecycle_stage == "deleted"
    assert ws.client.get_run(stray).info.lifecycle_stage == "deleted"
    after = ws.units("crash")
    by_key = _by_key(after)
    assert by_key.keys() == keys.keys()
    assert all(len(v) == 1 and v[0].info.status == "FINISHED" for v in by_key.values()), \
        {k: [(r.info.run_id, r.info.status) for r in v] for k, v in by_key.items()}
    (redone,) = by_key[broken.data.tags["gfprune_unit"]]
    assert redone.info.run_id != broken.info.run_id, "the unit whose run was unfinished is redone"
    for budget in (0.6, 0.4):
        (run,) = by_key[by_budget[budget].data.tags["gfprune_unit"]]
        assert run.info.run_id == by_budget[budget].info.run_id, f"the finished {budget} unit is not rerun"
        assert run.info.end_time == by_budget[budget].info.end_time
    assert {k: redone.data.metrics[k] for k in DETERMINISTIC} == pytest.approx({k: broken.data.metrics[k] for k in DETERMINISTIC}, rel=1e-6)
    assert sorted(float(r["budget"]) for r in result.records) == [0.4, 0.6, 0.8]


# ---- 3. a grown campaign runs only its new units ----------------------------------------------


def test_a_campaign_grown_by_budgets_and_models_runs_only_the_new_units(ws):
    """Breaks if: a grown campaign is not found (a key that depends on its budgets or models, so
    everything reruns), old units are rerun or touched, new units are missed or duplicated, or the
    new budget's units collect statistics again."""
    small = ws.campaign("grow", f"{ws.bert}\n", budgets=[0.8])
    assert not run_sweep(small).failures
    old = ws.units("grow")
    assert len(old) == len(METHODS)

    by_budget = ws.campaign("grow", f"{ws.bert}\n", budgets=[0.8, 0.6])
    assert not run_sweep(by_budget).failures
    mid = ws.units("grow")
    assert {k: (r.info.end_time, r.info.status) for k, r in mid.items() if k in old} == {k: (r.info.end_time, r.info.status) for k, r in old.items()}
    new = {k: r for k, r in mid.items() if k not in old}
    assert old.keys() <= mid.keys(), "old unit runs stay"
    assert sorted(r.data.tags["gfprune_unit"] for r in new.values()) == sorted(u.key for u in by_budget.units() if u.budget == 0.6)
    assert all(r.data.metrics["stats_reused"] == 1.0 and r.data.metrics["collect_s"] == 0.0 for r in new.values()), \
        "the grown budget's units load the statistics the first run cached"

    by_model = ws.campaign("grow", f"{ws.bert}\n{ws.bert_b} budgets=0.7 method=gfp\n", budgets=[0.8, 0.6])
    result = run_sweep(by_model)
    assert not result.failures, result.failures
    last = ws.units("grow")
    assert {k: r.info.end_time for k, r in last.items() if k in mid} == {k: r.info.end_time for k, r in mid.items()}
    added = [r for k, r in last.items() if k not in mid]
    assert [(r.data.tags["gfprune_model"], r.data.params["method"], r.data.params["budget"]) for r in added] == [("bert-b", "gfp", "0.7")]
    assert added[0].data.metrics["stats_reused"] == 0.0, "another model's statistics are collected, not taken from bert's"
    keys = [r.data.tags["gfprune_unit"] for r in last.values()]
    assert len(keys) == len(set(keys)) == len(by_model.units()) == 5, "every unit exactly once"
    assert sorted(keys) == sorted(u.key for u in by_model.units())
    assert all(r.info.status == "FINISHED" for r in last.values())
    assert len(ws.units("grow", deleted=True)) == 5, "nothing was run and thrown away"
    assert len(result.records) == 5


# ---- 4. gfp and magnitude units are held to their budget -------------------------------------


def _prunable_macs_per_token(heads: list[int], neurons: list[int], seq_len: float) -> float:
    """A BERT layer's prunable MACs per token, from its geometry: a head has its rows of Q, K and V
    and its columns of O (4*d*dh) and attends over seq_len positions (scores and weighted sum,
    2*s*dh); an FFN neuron has a row of the up and a column of the down projection (2*d)."""
    head, neuron = 4 * D * DH + 2 * seq_len * DH, 2 * D
    return sum(h * head + n * neuron for h, n in zip(heads, neurons))


def _saved_sizes(folder: Path) -> tuple[list[int], list[int]]:
    """Heads and FFN neurons per layer, read from the shapes of the saved model's weights."""
    (weights,) = folder.glob("*.safetensors")
    with safe_open(str(weights), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    # the output projection's input columns: dh per kept head (a layer without heads has no Q, K, V)
    heads = [shapes[f"encoder.layer.{i}.attention.output.dense.weight"][1] // DH for i in range(LAYERS)]
    neurons = [shapes[f"encoder.layer.{i}.intermediate.dense.weight"][0] for i in range(LAYERS)]
    return heads, neurons


def test_gfp_and_magnitude_units_keep_at_most_their_budget_and_less_than_one_head_below_it(ws):
    """Breaks if: the search overshoots the budget (by any margin over rounding), stops short of it
    by a whole head or more, MACs are counted against a different total or sequence length, or
    the recorded kept_prunable_macs or the saved model differ from the masks the unit chose."""
    runs = ws.units("base")
    seen = []
    for run in runs.values():
        budget, method = float(run.data.params["budget"]), run.data.params["method"]
        s = run.data.metrics["mean_seq_len"]
        dense = _prunable_macs_per_token([HEADS] * LAYERS, [FFN] * LAYERS, s)
        largest = max(4 * D * DH + 2 * s * DH, 2 * D) / dense  # one head (vs one neuron) of the prunable MACs
        masks = json.loads((Path(ws.client.download_artifacts(run.info.run_id, "masks.json"))).read_text())
        heads = [len(masks[f"{i}.attn"]) for i in range(LAYERS)]
        neurons = [len(masks[f"{i}.ffn"]) for i in range(LAYERS)]
        kept = _prunable_macs_per_token(heads, neurons, s) / dense
        recorded = run.data.metrics["kept_prunable_macs"]
        assert recorded == pytest.approx(kept, rel=1e-9), (method, budget, recorded, kept)
        assert _saved_sizes(ws.base.out / "bert" / f"{method}-{budget:g}") == (heads, neurons), (method, budget)
        seen.append((method, budget, kept, heads, neurons))
        assert kept <= budget + 1e-9, f"{method} at {budget} keeps {kept:.6f} of the prunable MACs"
        assert kept > budget - largest, f"{method} at {budget} keeps {kept:.6f}, short by more than one head ({largest:.4f})"
    assert sorted((m, b) for m, b, *_ in seen) == sorted((m, b) for m in METHODS for b in BUDGETS)
