"""A sweep on a real two-node Ray cluster started on this machine (`ray start --head` and a second
`ray start --address`, each with two logical CPUs and its own custom resource), driven with `--address`
as a user drives a GPU cluster. Ray's own task records must show the collection actors and the
per-site tasks on both nodes, and the MLflow results must equal an embedded-Ray run's."""

from __future__ import annotations

import hashlib
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import free_port, make_tokenizer, run_cli, save_tiny, sentences, start_ray_node, stop_ray_node
from mlflow.tracking import MlflowClient
from test_jobs import _env

pytestmark = pytest.mark.timeout(480)

PER_SITE = ("score_site", "reconstruct_site")


@pytest.fixture
def two_nodes(tmp_path):
    """(GCS address, dashboard URL) of a head node and a second node, both on this machine."""
    port, dashboard = free_port(), free_port()
    head = start_ray_node("--head", f"--port={port}", "--num-cpus=2", '--resources={"node_a": 1}', "--include-dashboard=true",
                          "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
                          log=tmp_path / "head.log", env=_env())
    second = None
    try:
        if head is None:
            pytest.skip(f"`ray start --head` failed here: {(tmp_path / 'head.log').read_text().strip().splitlines()[-1:]}")
        second = start_ray_node(f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"node_b": 1}', log=tmp_path / "second.log", env=_env())
        if second is None:
            pytest.skip(f"a second raylet cannot start on this machine: {(tmp_path / 'second.log').read_text().strip().splitlines()[-1:]}")
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"
    finally:
        stop_ray_node(second)
        stop_ray_node(head)


def _wait_for_nodes(dashboard: str, n: int) -> None:
    import time

    from ray.util.state import list_nodes

    deadline = time.monotonic() + 60
    while len([x for x in list_nodes(address=dashboard) if x.state == "ALIVE"]) < n:
        assert time.monotonic() < deadline, "the second node never joined"
        time.sleep(1)


def _sweep(ws: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("sweep", "--models", ws / "models.txt", "--budgets", "0.8,0.5", "--methods", "gfp,magnitude", "--data", "data.txt",
                   "--samples", "30", "--eval-samples", "16", "--seq-len", "16", "--batch-size", "4", "--latency-repeats", "0",
                   "--workers", "2", "--out", f"out-{name}", "--cache-dir", f"cache-{name}", "--tracking-uri", f"sqlite:///{ws / name}.db",
                   *extra, cwd=ws, timeout=400, RAY_AUTH_MODE="disabled")


def _unit_metrics(db: Path) -> dict[str, dict[str, float]]:
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("gfprune")
    runs = client.search_runs([experiment.experiment_id])
    assert all(r.info.status == "FINISHED" for r in runs)
    return {r.info.run_name: {k: v for k, v in r.data.metrics.items() if not k.endswith("_s")}  # timings differ, of course
            for r in runs if r.data.tags["gfprune_kind"] == "unit"}


def _weights_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_a_sweep_spreads_over_two_nodes_and_equals_an_embedded_run(two_nodes, tmp_path):
    from ray.util.state import list_actors, list_tasks

    address, dashboard = two_nodes
    _wait_for_nodes(dashboard, 2)
    ws = tmp_path
    save_tiny(ws / "tiny-llama", "llama", 0, make_tokenizer(ws))
    (ws / "models.txt").write_text("tiny-llama\n")
    (ws / "data.txt").write_text("\n".join(sentences(60)) + "\n")  # a relative path: the cluster's workers run elsewhere

    on_cluster = _sweep(ws, "cluster", "--address", address)
    assert on_cluster.returncode == 0, on_cluster.stderr[-3000:]
    embedded = _sweep(ws, "embedded")  # no --address: its own Ray, even with a cluster running here
    assert embedded.returncode == 0, embedded.stderr[-3000:]

    nodes_of = defaultdict(set)
    for task in list_tasks(address=dashboard, limit=10000, detail=True, raise_on_missing_output=False):
        if task.node_id:
            nodes_of[task.name].add(task.node_id)
    collectors = {a.node_id for a in list_actors(address=dashboard, detail=True, raise_on_missing_output=False) if a.class_name == "Collector"}
    assert len(collectors) == 2 and len(nodes_of["Collector.collect"]) == 2, (collectors, dict(nodes_of))
    # per-site tasks go out with Ray's SPREAD, a best-effort hint: under load one kind of them
    # (4 score tasks here) can land on one node, so the check is on all of them together
    per_site = set().union(*(nodes_of[name] for name in PER_SITE))
    assert len(per_site) == 2, f"per-site tasks ran on {len(per_site)} node(s): {dict(nodes_of)}"

    cluster, local = _unit_metrics(ws / "cluster.db"), _unit_metrics(ws / "embedded.db")
    assert sorted(cluster) == ["gfp@0.5", "gfp@0.8", "magnitude@0.5", "magnitude@0.8"] and sorted(local) == sorted(cluster)
    for unit, metrics in cluster.items():
        assert metrics.keys() == local[unit].keys()
        for key, value in metrics.items():
            assert value == pytest.approx(local[unit][key], rel=1e-9, abs=1e-12), (unit, key)
        method, budget = unit.split("@")
        assert _weights_digest(ws / "out-cluster" / "tiny-llama" / f"{method}-{budget}") == \
            _weights_digest(ws / "out-embedded" / "tiny-llama" / f"{method}-{budget}"), unit
