"""A campaign submitted with `ray job submit` to a real `ray start --head` cluster on this machine,
the way jobs/README.md submits one to a GPU cluster; its results are read back from MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, make_tokenizer, save_tiny, sentences, start_ray_node, stop_ray_node
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.timeout(420)

BIN = Path(sys.executable).parent


def _env() -> dict:
    # the job's commands resolve through the PATH of the `ray start` process: the venv comes first
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture
def head_cluster(tmp_path):
    dashboard = free_port()
    head = start_ray_node("--head", f"--port={free_port()}", "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                          "--include-dashboard=true", "--disable-usage-stats", log=tmp_path / "head.log", env=_env())
    assert head is not None, (tmp_path / "head.log").read_text()[-3000:]
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop_ray_node(head)


def test_a_campaign_submitted_as_a_ray_job_lands_in_mlflow(head_cluster, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    save_tiny(job / "tiny-bert", "bert", 0, make_tokenizer(tmp_path))
    (job / "models.txt").write_text("tiny-bert\n")
    (job / "data.txt").write_text("\n".join(sentences(60)) + "\n")
    results = tmp_path / "results"
    (job / "campaign.yaml").write_text(
        "experiment: job-test\nmodels: models.txt\nbudgets: [0.8, 0.5]\nmethods: [gfp]\ndata: data.txt\n"
        "samples: 30\neval_samples: 16\nseq_len: 16\nbatch_size: 4\nlatency_repeats: 1\n"
        f"out: {results / 'out'}\ncache_dir: {results / 'cache'}\ntracking_uri: sqlite:///{results / 'mlflow.db'}\n"
    )
    submit = [str(BIN / "ray"), "job", "submit", "--address", head_cluster, "--working-dir", str(job), "--",
              "gfprune-ray", "sweep", "--config", "campaign.yaml"]
    deadline = time.monotonic() + 90
    while True:
        done = subprocess.run(submit, env=_env(), capture_output=True, text=True, timeout=360)
        # the head says "Ray runtime started" before its job agent registers, later on a busy machine
        if "No available agent to submit job" not in done.stderr + done.stdout or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0 and "succeeded" in done.stdout.lower(), (done.stdout[-3000:], done.stderr[-3000:])

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("job-test")
    runs = client.search_runs([experiment.experiment_id])
    kinds = sorted(r.data.tags["gfprune_kind"] for r in runs)
    assert kinds == ["campaign", "model", "unit", "unit"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert (results / "out" / "tiny-bert" / "gfp-0.5" / "config.json").exists()
