"""Object storage as --out: a real S3 protocol server (moto's, on a local port) reached through
pyarrow.fs, as a user's bucket would be. Folders are whole or absent there, bad locations fail
before any work, and a sweep, a prune and an eval read and write their models in the bucket."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import free_port, make_tokenizer, run_cli, save_tiny, sentences, tiny_batches

from gfprune_ray import load_pruned
from gfprune_ray.data import mean_tokens_per_sequence, with_labels
from gfprune_ray.errors import UserError
from gfprune_ray.options import PruneOptions
from gfprune_ray.outputs import RECORD_FILE
from gfprune_ray.single import prune_model
from gfprune_ray.storage import RemoteFolder, check_writable, download, is_written, location, read_record_at, shown, staged_folder, upload
from gfprune_ray.train_ray import OUTCOME_FILE, TrainJob, fit, read_outcome
from gfprune_ray.training import Schedule

pytestmark = pytest.mark.timeout(600)

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
SMALL = ("--samples", "40", "--eval-samples", "20", "--seq-len", "16", "--batch-size", "8", "--latency-repeats", "0")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """s3://bucket on a moto server; the URI carries the endpoint, the credentials are in the environment."""
    moto_server = pytest.importorskip("moto.server", reason="moto (an S3 protocol server) is not installed")
    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    mp = pytest.MonkeyPatch()
    for key, value in CREDENTIALS.items():
        mp.setenv(key, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    filesystem, _ = pafs.FileSystem.from_uri(f"s3://bucket?{query}&allow_bucket_creation=true")
    filesystem.create_dir("bucket")
    yield RemoteFolder("s3://bucket", query)
    server.stop()
    mp.undo()


def _objects(folder: RemoteFolder) -> dict[str, int]:
    import pyarrow.fs as pafs

    filesystem, path = folder.open()
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path.removeprefix(path + "/"): i.size for i in infos if i.type == pafs.FileType.File}


def test_locations_keep_a_uri_whole_and_make_a_local_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert location("runs/x") == tmp_path / "runs" / "x"
    assert location(f"file://{tmp_path}/y") == tmp_path / "y"
    remote = location("s3://KEY:SECRET@bucket/runs/?endpoint_override=host:9000&scheme=http")
    assert isinstance(remote, RemoteFolder)
    assert str(remote / "bert" / "gfp-0.5") == "s3://KEY:SECRET@bucket/runs/bert/gfp-0.5?endpoint_override=host:9000&scheme=http"
    assert (remote / "bert").name == "bert" and (remote / "bert").parent == remote
    assert shown(remote / "bert") == "s3://bucket/runs/bert", "credentials and options stay out of what is printed"
    assert location(str(remote)) == remote
    with pytest.raises(UserError, match="not a storage location pyarrow can open"):
        (location("s3://bucket/x?no_such_option=1")).open()
    with pytest.raises(UserError, match="give a folder inside the bucket, e.g. s3://bucket/runs"):
        location("s3://KEY:SECRET@bucket/?endpoint_override=host:9000")


def test_a_remote_folder_is_whole_or_absent(bucket, tmp_path):
    out = bucket / "whole"
    with pytest.raises(RuntimeError), staged_folder(out) as staging:
        (staging / "model.safetensors").write_bytes(b"weights")
        raise RuntimeError("the work failed")
    assert _objects(out) == {} and not is_written(out), "a failed block uploads nothing"

    with staged_folder(out) as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "a.bin").write_bytes(b"x" * 70000)
        (staging / RECORD_FILE).write_text("{}")
    assert _objects(out) == {"sub/a.bin": 70000, RECORD_FILE: 2} and is_written(out)
    download(out, tmp_path / "copy")
    assert (tmp_path / "copy" / "sub" / "a.bin").read_bytes() == b"x" * 70000

    with pytest.raises(UserError, match="output exists and is not empty"), staged_folder(out):
        pass
    with staged_folder(out, force=True) as staging:  # replacing drops what the old folder held
        (staging / RECORD_FILE).write_text("[]")
    assert _objects(out) == {RECORD_FILE: 2}

    unfinished = bucket / "unfinished"  # files without their record: not a written folder
    (tmp_path / "part").mkdir()
    (tmp_path / "part" / "model.safetensors").write_bytes(b"half")
    upload(tmp_path / "part", unfinished, replace=False)
    assert _objects(unfinished) and not is_written(unfinished)
    with pytest.raises(UserError, match=r"not a gfprune-ray output folder \(no readable gfprune.json\): s3://bucket/unfinished$"):
        read_record_at(unfinished)
    assert read_record_at(out) == {}, "a record that is not a mapping reads as empty, as on local disk"


def test_a_location_that_cannot_be_written_fails_in_one_line(bucket):
    check_writable(bucket / "fine", "--out")
    assert _objects(bucket / "fine") == {}, "the probe is removed"
    missing = RemoteFolder("s3://no-such-bucket/x", bucket.query)
    with pytest.raises(UserError, match=r"--out s3://no-such-bucket/x: cannot write there \(.*does not exist"):
        check_writable(missing, "--out")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    tokenizer = make_tokenizer(root)
    save_tiny(root / "gpt2", "gpt2", 0, tokenizer)
    (root / "models.txt").write_text("gpt2\n")
    (root / "data.txt").write_text("\n".join(sentences(120)) + "\n")
    return root


def _load_remote(folder: RemoteFolder, into: Path):
    download(folder, into)
    return load_pruned(into), json.loads((into / RECORD_FILE).read_text())


def test_a_sweep_writes_models_checkpoints_and_summary_to_object_storage(bucket, ws, tmp_path):
    """Each unit's task uploads its model; the driver logs it to MLflow and writes the summary
    there; flop's Ray Train checkpoints live in the bucket and are gone once it is recorded. The
    bucket's gfp model is the one a single-process prune to a local folder makes, and `eval` of
    it in the bucket gives the sweep's numbers again."""
    out = bucket / "sweep"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli("sweep", "--models", ws / "models.txt", "--budgets", "0.7", "--methods", "gfp,flop", "--data", ws / "data.txt", *SMALL,
                     "--steps", "12", "--checkpoint-every", "5", "--out", str(out), "--tracking-uri", tracking,
                     "--cache-dir", tmp_path / "cache", "--experiment", "s3", cwd=tmp_path, **CREDENTIALS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"summary: {shown(out)}/summary.md" in result.stdout, "the printed address has no endpoint options"
    objects = _objects(out)
    assert {"summary.md", "summary.csv", "quality_vs_macs.png"} <= set(objects)
    assert {f"gpt2/{u}/{RECORD_FILE}" for u in ("gfp-0.7", "flop-0.7")} <= set(objects)
    assert not [k for k in objects if k.startswith(".train/")], "a recorded unit's checkpoints are removed"
    assert not list(tmp_path.glob("s3*")), "no local folder named after the URI"

    saved, record = _load_remote(out / "gpt2" / "gfp-0.7", tmp_path / "from-bucket")
    opts = PruneOptions(budget=0.7, method="gfp", samples=40, eval_samples=20, seq_len=16, batch_size=8, latency_repeats=0)
    report = prune_model(str(ws / "gpt2"), str(ws / "data.txt"), opts, tmp_path / "single")
    single = load_pruned(tmp_path / "single")
    ids = torch.randint(5, 90, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, single(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    assert record["metrics"]["relative_quality"] == pytest.approx(report["metrics"]["relative_quality"], abs=1e-6)

    from gfprune_ray.farm.tracking import Tracker

    tracker = Tracker(tracking, "s3")
    for run in tracker.client.search_runs([tracker.experiment_id], "tags.gfprune_kind = 'unit'"):
        assert run.info.status == "FINISHED"
        logged = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "model")}
        assert "model/model.safetensors" in logged, run.data.params["method"]

    again = run_cli("eval", str(out / "gpt2" / "gfp-0.7"), cwd=tmp_path, **CREDENTIALS)
    assert again.returncode == 0, again.stderr[-3000:]
    eval_record = json.loads(_fetch(out / "gpt2" / "gfp-0.7", "eval.json", tmp_path / "eval"))
    assert eval_record["metrics"]["relative_quality"] == pytest.approx(record["metrics"]["relative_quality"], abs=1e-6)
    assert eval_record["model"] == shown(out / "gpt2" / "gfp-0.7")


def _fetch(folder: RemoteFolder, name: str, into: Path) -> str:
    download(folder, into)
    return (into / name).read_text()


def test_prune_writes_to_object_storage_and_refuses_to_overwrite_without_force(bucket, ws, tmp_path):
    out = bucket / "prune" / "gpt2-0.6"
    args = ("prune", ws / "gpt2", "--out", str(out), "--data", ws / "data.txt", "--budget", "0.6", *SMALL)
    first = run_cli(*args, cwd=tmp_path, **CREDENTIALS)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"saved to {shown(out)} " in first.stdout
    saved, record = _load_remote(out, tmp_path / "copy")
    assert record["metrics"]["kept_prunable_macs"] <= 0.6 + 1e-9
    assert sum(p.numel() for p in saved.parameters()) == record["metrics"]["params"]
    again = run_cli(*args, cwd=tmp_path, **CREDENTIALS)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [f"error: output exists and is not empty: {shown(out)} (use --force to replace it)"]
    unreachable = run_cli(*args[:3], str(RemoteFolder("s3://no-such-bucket/x", bucket.query)), *args[4:], cwd=tmp_path, **CREDENTIALS)
    assert unreachable.returncode == 2 and "cannot write there" in unreachable.stderr and len(unreachable.stderr.strip().splitlines()) == 1


def test_training_checkpoints_live_in_object_storage_and_a_finished_run_is_found_again(bucket, local_ray, tmp_path):
    """cofi/flop under Ray Train with --out in a bucket: checkpoints go to OUT/.train there (the
    URI's endpoint options reach Ray as a pyarrow filesystem), and `fit` again finds the run."""
    source = save_tiny(tmp_path / "model", "bert", 0, make_tokenizer(tmp_path))
    batches = tiny_batches(n_batches=2)
    schedule = Schedule(steps=8, budget=0.5, seed=0, checkpoint_every=4)
    storage = bucket / "train"
    job = TrainJob(str(source), "cofi", schedule, with_labels(batches, None), mean_tokens_per_sequence(batches), "unit", str(storage))
    checkpoint = fit(job)
    assert checkpoint.filesystem.type_name == "s3"
    assert any(k.startswith("unit/") and k.endswith(OUTCOME_FILE) for k in _objects(storage))
    first_model, first = read_outcome(checkpoint)
    assert len(first["curve"]) == schedule.total_steps
    again_model, again = read_outcome(fit(job))
    assert again == first
    for (name, p), (_, q) in zip(first_model.state_dict().items(), again_model.state_dict().items()):
        assert torch.equal(p, q), name
