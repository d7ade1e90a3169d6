"""CoFi and FLOP under Ray Train: one TorchTrainer run per (model, method, budget) unit.

Every worker loads the model, builds the gated student and trains on its share of the calibration
batches; with several workers the student is wrapped in DDP by `prepare_model` (one CPU worker
here, several GPUs on a cluster, same code). Rank 0 writes a checkpoint every `checkpoint_every`
steps (the whole `GatedTraining` state as safetensors and JSON). A run is named by its unit, so
calling `fit` again after a crash or a kill resumes from the latest checkpoint: Ray Train restores
a run whose name already exists in the storage folder.

The final checkpoint also holds the cut model (`model/`, loadable with `load_pruned`) and
`outcome.json` (masks, trimmed gates, the loss curve): that is what the caller measures and saves.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .methods.trained import kept_fraction, student_for
from .models import adapter_for
from .training import GatedTraining, Schedule, run_training

MODEL_DIR = "model"
OUTCOME_FILE = "outcome.json"


@dataclass
class TrainJob:
    source: str
    method: str
    schedule: Schedule
    batches: list[dict]
    seq_len: float
    name: str  # the same name in the same storage resumes from the latest checkpoint
    storage: str
    threads: int = 1
    counter: object = None  # a farm.Counter actor: rank 0 adds 1 per step, for the driver's bar


def _metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float))}


def _report(training: GatedTraining, rank: int, final: dict | None = None, model=None) -> None:
    import ray.train

    metrics = _metrics(training.curve[-1]) if training.curve else {}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        training.save(folder)
        if final is not None:
            from .surgery import save_pruned

            save_pruned(model, Path(folder) / MODEL_DIR)
            (Path(folder) / OUTCOME_FILE).write_text(json.dumps(final))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _report_finished(checkpoint, rank: int) -> bool:
    """A run killed after its final checkpoint (the cut model and outcome) but before its caller
    saved the model restores that checkpoint: report it again as this run's result, instead of
    loading the cut student's state into a full-size one. True if it was final."""
    import ray.train

    with checkpoint.as_directory() as folder:
        if not (Path(folder) / OUTCOME_FILE).exists():
            return False
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)
    return True


def train_loop(config: dict) -> None:
    """What each Ray Train worker runs."""
    import ray.train
    import ray.train.torch

    from .loading import load_model

    job: TrainJob = config["job"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and _report_finished(checkpoint, rank):
        return
    torch.set_num_threads(max(1, job.threads))
    model, _ = load_model(job.source)
    adapter = adapter_for(model)
    dense_geoms = adapter.geometries()
    student = student_for(job.method, adapter, job.seq_len)
    training = GatedTraining(student, job.schedule)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            training.load(folder)
    device = ray.train.torch.get_device()
    if world > 1:
        # DDP. In the fine-tuning phase no gradient reaches the gates or the multipliers: DDP must
        # be told that some parameters go unused, or it waits for their gradients
        training.student = ray.train.torch.prepare_model(student, parallel_strategy_kwargs={"find_unused_parameters": True})
    student.to(device)
    for teacher in getattr(student, "teacher", []):
        teacher.to(device)
    batches = [{k: v.to(device) for k, v in b.items()} for b in job.batches]
    on_step = None
    if job.counter is not None and rank == 0:
        job.counter.add.remote(training.step)  # steps a resumed run has already done
        on_step = lambda _row: job.counter.add.remote(1)  # noqa: E731
    run_training(training, batches, on_step=on_step, checkpoint=lambda t: _report(t, rank), rank=rank, world=world)
    masks = student.finish(job.schedule.budget)
    model = student.model.cpu()
    outcome = {
        "masks": masks.to_json(),
        "trimmed": student.trimmed,
        "kept_prunable_macs": kept_fraction(adapter, dense_geoms, job.seq_len),
        "curve": training.curve,
    }
    _report(training, rank, final=outcome, model=model)


def fit(job: TrainJob, workers: int = 1, cpus_per_worker: float = 1, use_gpu: bool = False):
    """Run (or resume) the job's training under Ray Train; the final checkpoint (a
    `ray.train.Checkpoint`: local, or in the object storage `job.storage` names)."""
    from pyarrow.fs import FileType
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .storage import RemoteFolder, location

    storage = location(job.storage)
    if isinstance(storage, RemoteFolder):  # its options (endpoint, region) live in the URI's query, which Ray would drop
        filesystem, path = storage.open()
        where = {"storage_path": path, "storage_filesystem": filesystem}
    else:
        where = {"storage_path": str(storage)}
    resources = {"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=job.name, checkpoint_config=CheckpointConfig(num_to_keep=1), **where),
    )
    checkpoint = trainer.fit().checkpoint
    if checkpoint is None or checkpoint.filesystem.get_file_info(f"{checkpoint.path}/{OUTCOME_FILE}").type != FileType.File:
        raise RuntimeError(f"training {job.name} ended without a final checkpoint")
    return checkpoint


def read_outcome(checkpoint) -> tuple:
    """(the cut model, outcome dict) from a final checkpoint (fetched first if it is remote)."""
    from .surgery import load_pruned

    with checkpoint.as_directory() as folder:
        return load_pruned(Path(folder) / MODEL_DIR), json.loads((Path(folder) / OUTCOME_FILE).read_text())
