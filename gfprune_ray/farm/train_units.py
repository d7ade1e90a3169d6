"""The farm's training units (CoFi, FLOP): one Ray Train run each, then the usual evaluation.

    train_unit (task)        runs `train_ray.fit` for one (model, method, budget): a TorchTrainer
                             whose workers take the CPUs (or GPUs); the task itself takes none,
                             so that waiting for its trainer cannot starve the trainer
    evaluate_trained (task)  loads the cut model from the final checkpoint, measures it against
                             the dense model, saves it to its folder, returns the loss curve

Training runs are named by the unit's key and keep their checkpoints under the campaign's output
folder (OUT/.train/<unit key>; on a multi-node cluster OUT must be storage every node sees, or
object storage), so a sweep killed during training resumes each run where its last checkpoint
left it. The driver removes a run's checkpoints once the unit is recorded.
"""

from __future__ import annotations

import time

import ray

from ..models import adapter_for
from ..train_ray import TrainJob, fit, read_outcome
from .stages import EvalSpec, Timed, _load, measure_and_save, set_threads


@ray.remote(num_cpus=0)
def train_unit(job: TrainJob, use_gpu: bool) -> Timed:
    start = time.perf_counter()
    checkpoint = fit(job, workers=1, cpus_per_worker=job.threads, use_gpu=use_gpu)
    return Timed(checkpoint, time.perf_counter() - start)


@ray.remote(num_cpus=1)
def evaluate_trained(spec: EvalSpec, ref, trained: Timed) -> dict:
    set_threads(1)
    start = time.perf_counter()
    dense, tokenizer = _load(spec.source)
    model, outcome = read_outcome(trained.value)
    extra = {"kept_prunable_macs": outcome["kept_prunable_macs"], "trimmed": outcome["trimmed"], "train_steps": len(outcome["curve"])}
    result = measure_and_save(spec, ref, dense, adapter_for(model), tokenizer, outcome["masks"], extra)
    timings = {"train_s": trained.seconds, "evaluate_s": time.perf_counter() - start}
    return result | {"timings": timings, "curve": outcome["curve"]}
