"""Misuse and damage, as a careless or unlucky user meets them (issue 14): damaged statistics,
two sweeps of one campaign at once, unreachable Ray and MLflow, damaged weights, unwritable and
unreplaceable outputs, what killed runs leave behind, too little data, failures in a summary.

Real files, real subprocesses of the CLI, real Ray and MLflow. Each test fails on 0120663."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_in_process, cli_command, cli_env, free_port, make_tokenizer, run_cli, save_tiny, sentences
from mlflow.tracking import MlflowClient

from gfprune_ray.errors import UserError
from gfprune_ray.stats import GramStats, ModelStats
from gfprune_ray.stats_store import DamagedStats, StreamedGram, load_stats, move_aside, read_site, save_stats, site_file

pytestmark = pytest.mark.timeout(600)

SMALL = ["--samples", "20", "--eval-samples", "10", "--seq-len", "16", "--batch-size", "4", "--latency-repeats", "1"]


def _one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 2, f"exit {result.returncode}; stderr:\n{result.stderr[-3000:]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def _unwritable_folder() -> Path:
    """A folder this process cannot create anything in: chmod works for a normal user; root needs
    a file system that refuses it (sysfs here)."""
    candidates = []
    if os.geteuid() != 0:
        folder = Path(tempfile.mkdtemp())
        folder.chmod(0o555)
        candidates.append(folder)
    candidates.append(Path("/sys"))
    for folder in candidates:
        try:
            Path(tempfile.mkdtemp(dir=folder)).rmdir()
        except OSError:
            return folder
    pytest.skip("no unwritable folder on this machine")


def _flip_data_byte(path: Path) -> None:
    """Change one byte of tensor data, leaving the safetensors header intact."""
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header + (len(raw) - header) // 2] ^= 0x5A
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    tokenizer = make_tokenizer(root)
    ns = type("Workspace", (), {})()
    ns.root = root
    ns.model = save_tiny(root / "tiny-bert", "bert", 0, tokenizer)
    ns.data = root / "data.txt"
    ns.data.write_text("\n".join(sentences(40)) + "\n")
    ns.stats = root / "stats"
    ns.prune = run_cli("prune", ns.model, "--out", root / "pruned", "--data", ns.data, "--budget", "0.6", "--stats", ns.stats, *SMALL)
    assert ns.prune.returncode == 0, ns.prune.stderr[-3000:]
    return ns


# ---- statistics integrity --------------------------------------------------------------------


def _small_stats() -> dict[str, ModelStats]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    def site(rows: torch.Tensor) -> GramStats:
        return GramStats(torch.tensor(float(len(rows)), dtype=torch.float64), rows.T @ rows, rows.sum(0))

    return {"fit": ModelStats({(0, "ffn"): site(x[:15])}, "fp"), "heldout": ModelStats({(0, "ffn"): site(x[15:])}, "fp")}


@pytest.mark.parametrize("damage", [_flip_data_byte, _truncate])
def test_damaged_statistics_are_refused_and_a_damaged_cache_entry_is_moved_aside(tmp_path, damage):
    path = tmp_path / "s"
    save_stats(_small_stats(), path)
    assert torch.equal(load_stats(path, "fp")["fit"].sites[(0, "ffn")].gram, _small_stats()["fit"].sites[(0, "ffn")].gram)
    damage(site_file(path, (0, "ffn")))
    # each part is checked as it is read: reading every part must find the damage
    streamed = [lambda part=part: list(StreamedGram(site_file(path, (0, "ffn")), part).row_blocks(2)) for part in ("fit", "heldout")]
    for read in (lambda: [part[(0, "ffn")] for part in load_stats(path, "fp").values()], lambda: read_site(path, (0, "ffn")), lambda: [r() for r in streamed]):
        with pytest.raises(DamagedStats, match="site-0-ffn.safetensors"):
            read()
    warnings = []
    move_aside(path, "damaged", warnings.append)
    assert not path.exists() and len(list(tmp_path.glob("s.damaged-*"))) == 1
    assert len(warnings) == 1 and "collecting the statistics again" in warnings[0]


def test_a_foreign_statistics_folder_is_refused(tmp_path):
    path = tmp_path / "s"
    save_stats(_small_stats(), path)
    with pytest.raises(UserError, match="does not match") as caught:
        load_stats(path, "another")
    assert not isinstance(caught.value, DamagedStats) and path.exists()


@pytest.mark.parametrize("damage", [_flip_data_byte, _truncate])
def test_prune_refuses_a_damaged_stats_file_in_one_line(ws, tmp_path, damage):
    stats = tmp_path / "stats"
    shutil.copytree(ws.stats, stats)
    damage(site_file(stats, (1, "ffn")))
    result = cli_in_process("prune", ws.model, "--out", tmp_path / "out", "--data", ws.data, "--budget", "0.6", "--stats", stats, *SMALL)
    _one_line_error(result, "site-1-ffn.safetensors")
    assert not (tmp_path / "out").exists()


# ---- resources that cannot be used: one line, before any work -------------------------------


def test_prune_with_damaged_weights_is_one_line(ws, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ws.model, model)
    _truncate(model / "model.safetensors")
    result = cli_in_process("prune", model, "--out", tmp_path / "out", "--data", ws.data, *SMALL)
    _one_line_error(result, "cannot load model")


def test_unwritable_out_and_stats_fail_before_the_collection(ws, tmp_path):
    blocked = _unwritable_folder()
    start = time.perf_counter()
    result = cli_in_process("prune", ws.model, "--out", blocked / "sub" / "out", "--data", ws.data, *SMALL)
    _one_line_error(result, "cannot write", str(blocked))
    result = cli_in_process("prune", ws.model, "--out", tmp_path / "out", "--data", ws.data, "--stats", blocked / "s", *SMALL)
    _one_line_error(result, "--stats", str(blocked))
    assert "collect" not in result.stderr and not (tmp_path / "out").exists()
    assert time.perf_counter() - start < 60


def test_an_output_that_cannot_be_replaced_leaves_nothing_behind(ws, tmp_path):
    """An existing empty --out that cannot be removed (an immutable folder here, a mount point for a
    user): one line before the work, and no `.partial` folder is left."""
    out = tmp_path / "out"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        result = cli_in_process("prune", ws.model, "--out", out, "--data", ws.data, *SMALL)
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    _one_line_error(result, str(out), "cannot be replaced")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not any(out.iterdir())


def test_a_killed_prunes_partial_folder_is_removed_by_the_next_run(ws, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".out.partial-{dead.pid}@{host}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    older = tmp_path / f".out.partial-{dead.pid}"  # named as before hosts were in the name
    older.mkdir()
    alive = tmp_path / f".out.partial-{os.getppid()}@{host}"  # a live process's: not ours to remove
    alive.mkdir()
    elsewhere = tmp_path / f".out.partial-{dead.pid}@another-{host}"  # on shared storage: cannot be checked here
    elsewhere.mkdir()
    result = run_cli("prune", ws.model, "--out", tmp_path / "out", "--data", ws.data, *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not stale.exists() and not older.exists() and alive.exists() and elsewhere.exists()
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_too_little_data_is_said_and_recorded(ws, tmp_path):
    data = tmp_path / "three.txt"
    data.write_text("\n".join(sentences(3, seed=9)) + "\n")
    result = run_cli("prune", ws.model, "--out", tmp_path / "out", "--data", data, "--samples", "64", "--eval-samples", "8",
                     "--seq-len", "16", "--batch-size", "4", "--latency-repeats", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    # 3 examples: 1 evaluates (at most half), 2 calibrate
    assert len(warning) == 1 and "three.txt has 3 examples" in warning[0] and "calibrating on 2 (--samples 64)" in warning[0], result.stderr
    metrics = json.loads((tmp_path / "out" / "gfprune.json").read_text())["metrics"]
    assert (metrics["calibration_examples"], metrics["evaluation_examples"]) == (2, 1)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (lambda t: ["--address", f"127.0.0.1:{free_port()}"], ["cannot reach the Ray cluster"]),
        (lambda t: ["--address", "nonsense"], ["Ray address 'nonsense'"]),
        (lambda t: ["--tracking-uri", "bogus://x"], ["MLflow tracking store bogus://x"]),
        (lambda t: ["--tracking-uri", f"file://{t / 'mlruns'}"], ["folder stores"]),
        (lambda t: ["--tracking-uri", str(t / "mlruns")], ["folder stores"]),
        (lambda t: ["--tracking-uri", f"sqlite:///{_unwritable_folder() / 'mlflow.db'}"], ["cannot write"]),
        (lambda t: ["--tracking-uri", f"sqlite:///{t / 'data.txt'}"], ["not a sqlite database"]),
        (lambda t: ["--tracking-uri", f"http://127.0.0.1:{free_port()}"], ["cannot reach the MLflow server"]),
        (lambda t: ["--out", _unwritable_folder() / "out"], ["--out", "cannot write"]),
        (lambda t: ["--cache-dir", _unwritable_folder() / "cache"], ["--cache-dir", "cannot write"]),
    ],
    ids=["ray-unreachable", "ray-nonsense", "mlflow-scheme", "mlflow-file-uri", "mlflow-folder", "mlflow-readonly",
         "mlflow-not-sqlite", "mlflow-unreachable", "out-readonly", "cache-readonly"],
)
def test_sweep_resources_fail_in_one_line_before_any_record(ws, tmp_path, extra, words):
    shutil.copy(ws.data, tmp_path / "data.txt")
    (tmp_path / "models.txt").write_text(f"{ws.model}\n")
    args = ["sweep", "--models", tmp_path / "models.txt", "--data", tmp_path / "data.txt", "--budgets", "0.8", *SMALL]
    args += ["--cache-dir", tmp_path / "cache", "--out", tmp_path / "out"]  # the case's own come last and win
    start = time.perf_counter()
    result = cli_in_process(*args, *extra(tmp_path), cwd=tmp_path)
    _one_line_error(result, *words)
    assert time.perf_counter() - start < 60, "a resource that cannot be used must fail fast"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()


# ---- two sweeps at once; what a killed or changed campaign leaves ----------------------------


def _sweep(ws, root: Path, experiment: str, budgets: str, models: str | None = None) -> list:
    (root / "models.txt").write_text(models or f"{ws.model}\n")
    return ["sweep", "--models", root / "models.txt", "--data", ws.data, "--budgets", budgets, "--methods", "gfp",
            "--out", root / "out", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--cache-dir", root / "cache",
            "--experiment", experiment, *SMALL]


def _runs(root: Path, experiment: str, kind: str) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], f"tags.gfprune_kind = '{kind}'") if found else []


def test_a_second_sweep_of_a_running_campaign_stops_in_one_line_and_nothing_is_recorded_twice(ws, tmp_path):
    args = [*cli_command(), *map(str, _sweep(ws, tmp_path, "twice", "0.8,0.6"))]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "mlflow.db").exists():  # the first holds the campaign from before it opens the store
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() is not None else "slow"
            time.sleep(0.2)
        second = run_cli(*_sweep(ws, tmp_path, "twice", "0.8,0.6"), timeout=120)
        line = _one_line_error(second, "campaign 'twice'", "in use by", f"pid {first.pid}")
        assert "wait for it to finish" in line
        _, err = first.communicate(timeout=540)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]
    units = _runs(tmp_path, "twice", "unit")
    assert sorted(r.data.tags["gfprune_unit"] for r in units) == sorted({r.data.tags["gfprune_unit"] for r in units})
    assert len(units) == 2


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    """Different campaigns racing to create one sqlite store: each gets its experiment, none a
    migration traceback."""
    code = ("import sys; from gfprune_ray.farm.tracking import Tracker; "
            "t = Tracker(sys.argv[1], sys.argv[2]); print(t.experiment_id)")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, f"e{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=cli_env()) for i in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 3


def test_a_rerun_heals_what_a_damaged_cache_a_deleted_model_and_a_killed_sweep_left(ws, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    models = f"{ws.model}\n{broken}\n"
    first = run_cli(*_sweep(ws, tmp_path, "heal", "0.8,0.7", models))
    assert first.returncode == 1, first.stderr[-3000:]
    # a model that fails to load is one line in the summary: its cause, not Ray's traceback
    failures = first.stderr[first.stderr.index("failed:"):].strip().splitlines()[1:]
    assert failures and all("broken" in line and "cannot load model" in line for line in failures), first.stderr[-3000:]
    assert "Traceback" not in first.stderr

    # deleted from OUT: one model its run holds a copy of, one whose copy is gone too (as after
    # --no-save-models); and the cached statistics damaged
    out = tmp_path / "out" / "tiny-bert"
    saved = {p.name: p.read_bytes() for p in (out / "gfp-0.8").iterdir()}
    shutil.rmtree(out / "gfp-0.8")
    shutil.rmtree(out / "gfp-0.7")
    [lost] = [r for r in _runs(tmp_path, "heal", "unit") if r.data.params["budget"] == "0.7"]
    shutil.rmtree(Path(lost.info.artifact_uri.removeprefix("file://")) / "model")
    [cached] = [p.parent for p in (tmp_path / "cache").glob("*/manifest.json")]
    _flip_data_byte(site_file(cached, (0, "attn")))

    grown = run_cli(*_sweep(ws, tmp_path, "heal", "0.8,0.7,0.6", models))
    assert grown.returncode == 1, grown.stderr[-3000:]
    assert "site-0-attn.safetensors: statistics file is damaged" in grown.stderr and "collecting the statistics again" in grown.stderr
    assert len(list((tmp_path / "cache").glob(f"{cached.name}.damaged-*"))) == 1
    assert read_site(cached, (0, "attn"))["fit"].n > 0, "the statistics were collected and cached again"
    assert {p.name: p.read_bytes() for p in (out / "gfp-0.8").iterdir()} == saved, "the deleted model is restored from its run"
    assert "restored from MLflow run" in grown.stderr
    assert "pruning it again" in grown.stderr and (out / "gfp-0.7" / "model.safetensors").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(lost.info.run_id).info.lifecycle_stage == "deleted"
    units = _runs(tmp_path, "heal", "unit")
    good = sorted((r.data.params["budget"], r.info.status, r.data.metrics.get("stats_reused")) for r in units)
    assert good == [("0.6", "FINISHED", 0.0), ("0.7", "FINISHED", 0.0), ("0.8", "FINISHED", 0.0)], "each unit once"

