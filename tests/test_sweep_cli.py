"""`gfprune-ray sweep` and `report` as a user runs them: real subprocesses with embedded Ray and a
local MLflow store. The campaign is killed with SIGKILL mid-way and resumed; bad input fails in
one line before any work starts."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import cli_command, cli_env, make_tokenizer, run_cli, save_tiny, sentences
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.timeout(480)

SMALL = ["--samples", "30", "--eval-samples", "16", "--seq-len", "16", "--batch-size", "4", "--latency-repeats", "1"]
SWEEP = ["--budgets", "0.9,0.7,0.5,0.3", "--methods", "gfp,magnitude,random", *SMALL]
UNITS = 12  # 4 budgets x 3 methods of the one good model
DETERMINISTIC = ("relative_quality", "relative_quality/other", "kept_prunable_macs", "macs", "params", "calibration_tokens")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    tokenizer = make_tokenizer(root)
    save_tiny(root / "tiny-bert", "bert", 0, tokenizer)
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{not json")
    (root / "models.txt").write_text("tiny-bert\nbroken   # fails to load: recorded, the rest goes on\n")
    (root / "data.txt").write_text("\n".join(sentences(80)) + "\n")
    (root / "other.txt").write_text("\n".join(sentences(40, seed=5)) + "\n")  # a second evaluation corpus
    return root


def _sweep_args(ws, name: str) -> list[str]:
    return ["sweep", "--models", ws / "models.txt", "--data", ws / "data.txt", "--out", ws / name / "out",
            "--tracking-uri", f"sqlite:///{ws / name / 'mlflow.db'}", "--cache-dir", ws / name / "cache",
            "--experiment", "resume", "--eval-data", ws / "other.txt", *SWEEP]


def _units(ws, name: str) -> list:
    client = MlflowClient(f"sqlite:///{ws / name / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("resume")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], "tags.gfprune_kind = 'unit'")


def _finished_unit_ids(db) -> list[str]:
    """Read the store with sqlite directly, read-only: an MlflowClient would race the running
    campaign to create the tables."""
    query = ("select r.run_uuid from runs r join tags t on t.run_uuid = r.run_uuid "
             "where t.key = 'gfprune_kind' and t.value = 'unit' and r.status = 'FINISHED'")
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return [row[0] for row in con.execute(query)]
    except sqlite3.Error:  # not created yet
        return []


def _metrics(runs) -> dict:
    return {r.data.tags["gfprune_unit"]: {k: r.data.metrics[k] for k in DETERMINISTIC} for r in runs}


def test_a_campaign_killed_mid_way_resumes_to_the_uninterrupted_result(ws):
    (ws / "killed").mkdir()
    proc = subprocess.Popen([*cli_command(), *map(str, _sweep_args(ws, "killed"))], env=cli_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    finished = []
    while time.time() < deadline and proc.poll() is None:
        finished = _finished_unit_ids(ws / "killed" / "mlflow.db")
        if finished:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started: no cleanup runs
    proc.wait()
    assert 1 <= len(finished) < UNITS, f"the kill must land mid-way, after {len(finished)} units; stderr: {proc.stderr.read()[-2000:]}"

    resumed = run_cli(*_sweep_args(ws, "killed"))
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert "1 failed" in resumed.stderr and "broken" in resumed.stderr
    runs = _units(ws, "killed")
    keys = [r.data.tags["gfprune_unit"] for r in runs]
    assert len(keys) == len(set(keys)) == UNITS, "every unit exactly once"
    assert all(r.info.status == "FINISHED" for r in runs)
    assert set(finished) <= {r.info.run_id for r in runs}, "units finished before the kill were kept, not redone"

    (ws / "straight").mkdir()
    straight = run_cli(*_sweep_args(ws, "straight"))
    assert straight.returncode == 1, straight.stderr[-3000:]
    note = f"note: {UNITS} of {UNITS} units' speedups cannot be trusted (few runs: {UNITS}); under 3 passes tell no spread: use --latency-repeats 3"
    assert note in straight.stderr, "one latency round tells no spread"
    want, got = _metrics(_units(ws, "straight")), _metrics(runs)
    assert want.keys() == got.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key

    report = run_cli("report", "resume", "--tracking-uri", f"sqlite:///{ws / 'straight' / 'mlflow.db'}", "--markdown")
    assert report.returncode == 0, report.stderr
    lines = [line for line in report.stdout.splitlines() if line.startswith("| tiny-bert |")]
    assert len(lines) == UNITS and all("FINISHED" in line for line in lines)
    assert "| data (calib) | other |" in report.stdout
    header = (ws / "straight" / "out" / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("data (calib)") + 1] == "other", header


@pytest.mark.parametrize(
    ("models", "extra", "message"),
    [
        ("tiny-bert budgets=0.5\ntiny-bert colour=red\n", [], "models.txt:2: unknown key 'colour'"),
        ("tiny-bert\n./nowhere\n", [], "models.txt:2: model folder not found: ./nowhere"),
        ("tiny-bert\n", ["--budgets", "0.5,1.5"], "budgets.1: Input should be less than or equal to 1"),
        ("tiny-bert\n", ["--budgets", "half"], "--budgets expects comma-separated numbers"),
        ("tiny-bert\n", ["--data", "missing.txt"], "data not found: missing.txt"),
        ("tiny-bert\n", ["--eval-data", "pydoc,missing-eval.txt"], "data not found: missing-eval.txt"),
        ("tiny-bert dtype=half\n", [], "models.txt:1: dtype: unknown dtype 'half'; choose one of: float32, bfloat16, float16"),
        ("tiny-bert\n", ["--dtype", "bfloat16", "--methods", "gfp,cofi"], "dtype does not apply to cofi"),
        ("tiny-bert\n", ["--self-texts", "-1"], "self_texts: Input should be greater than or equal to 0"),
    ],
)
def test_bad_input_is_one_line_before_any_work(ws, tmp_path, models, extra, message):
    (tmp_path / "models.txt").write_text(models)
    (tmp_path / "tiny-bert").symlink_to(ws / "tiny-bert")
    result = run_cli("sweep", "--models", tmp_path / "models.txt", "--out", tmp_path / "out", "--data", ws / "data.txt", *extra, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "mlflow.db").exists(), "no record of a campaign that never started"


def test_the_cli_and_the_campaign_schema_import_no_torch_ray_or_mlflow():
    """A models file, option or data path the sweep refuses fails before seconds of imports (choices.py)."""
    code = ("import sys, gfprune_ray.cli, gfprune_ray.data, gfprune_ray.farm.campaign, gfprune_ray.options; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env())
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr[-2000:])


@pytest.mark.parametrize("bad", [["--budget", "2"], ["--data", "/no/such/file.txt"], ["--method", "llm-surgeon", "--shot-step", "0"],
                                 ["--eval-data", "pydoc,/no/such/corpus.txt"], ["--samples", "0"], ["--latency-batch-sizes", "0"],
                                 ["--latency-batch-sizes", "1,x"], ["--latency-threads", "0"], ["--self-texts", "-1"]])
def test_prune_refuses_bad_input_before_importing_torch(bad, tmp_path):
    """`prune`'s options and data are checked before the heavy stack is imported (options.py)."""
    code = ("import sys; from typer.testing import CliRunner; from gfprune_ray.cli import app; "
            f"r = CliRunner().invoke(app, ['prune', 'some-model', '--out', {str(tmp_path / 'out')!r}, *{bad!r}]); "
            "print(r.exit_code, sorted(m for m in ('torch', 'ray', 'mlflow', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env())
    assert done.returncode == 0 and done.stdout.strip() == "2 []", (done.stdout, done.stderr[-2000:])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("record", "extra", "message"), [
    (None, [], "not a gfprune-ray output folder"),
    ({"source": "m", "data": "/no/such/calibration.txt"}, [], "/no/such/calibration.txt"),
    ({"source": "m", "data": "pydoc", "options": {"budget": 0.5}}, ["--eval-data", "/no/such/corpus.txt"], "/no/such/corpus.txt"),
    ({"source": "m", "data": "pydoc", "options": {"budget": 0.5}}, ["--eval-samples", "0"], "eval-samples must be at least 1"),
])
def test_eval_refuses_bad_input_before_importing_torch(record, extra, message, tmp_path):
    """`eval` reads the folder's record, its options and data sources before the heavy imports."""
    folder = tmp_path / "pruned"
    folder.mkdir()
    if record is not None:
        (folder / "gfprune.json").write_text(json.dumps(record))
    code = ("import sys; from typer.testing import CliRunner; from gfprune_ray.cli import app; "
            f"r = CliRunner().invoke(app, ['eval', {str(folder)!r}, *{extra!r}]); "
            "print(r.exit_code, sorted(m for m in ('torch', 'ray', 'mlflow', 'transformers') if m in sys.modules)); print(r.output)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env())
    assert done.returncode == 0 and done.stdout.startswith("2 []"), (done.stdout, done.stderr[-2000:])
    assert message in done.stdout


def test_report_on_an_unknown_experiment(tmp_path):
    result = run_cli("report", "nothing-here", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 2 and "no MLflow experiment named 'nothing-here'" in result.stderr
