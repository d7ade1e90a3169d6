"""Diagnostic, not a benchmark: train CoFi or FLOP on MiniLM in this process and say where it ends.

    .venv/bin/python bench/trained_probe.py --method cofi --budget 0.5 --steps 200
    .venv/bin/python bench/trained_probe.py --steps 4 --finetune-steps 100   # 4 gate steps, then 100

Short sequences (48 tokens, batches of 8, 128 pydoc paragraphs) so that 250 steps (200 pruning,
50 fine-tuning) take about three minutes on 2 cores. Prints, for CoFi, per layer where the block and unit gates ended; then the
fidelity (cosine of sentence embeddings to the dense model's, 64 held-out paragraphs) of the model
with its final gates before fine-tuning and of the cut model after it, and appends a JSON line to
--out. Written to learn why CoFi and FLOP are poor at the CPU default (issue 6; README).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import torch

from gfprune_ray.data import read_examples, tokenize
from gfprune_ray.evaluate import fidelity, sentence_embeddings
from gfprune_ray.loading import load_model
from gfprune_ray.methods.cofi import CoFiStudent, _block_key, _unit_key
from gfprune_ray.methods.trained import kept_fraction, student_for
from gfprune_ray.models import adapter_for
from gfprune_ray.training import GatedTraining, Schedule, batch_for, run_training

SEQ_LEN = 40.0  # tokens per sequence for the MACs model (the 48-token batches average about 40)


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="cofi", choices=["cofi", "flop"])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=200, help="steps in which the gates learn")
    parser.add_argument("--finetune-steps", type=int, default=None, help="steps after them (default: the Schedule's share)")
    parser.add_argument("--lr", type=float, default=Schedule.lr)
    parser.add_argument("--gate-lr", type=float, default=None, help="default: the method's")
    parser.add_argument("--lambda-lr", type=float, default=Schedule.lambda_lr)
    parser.add_argument("--gate-optimizer", default=None, choices=["sgd", "adam"], help="default: the method's")
    parser.add_argument("--out", default="bench/results/trained_probe.jsonl")
    return parser.parse_args()


def schedule_for(args: argparse.Namespace) -> Schedule:
    finetune = Schedule.finetune if args.finetune_steps is None else args.finetune_steps / max(1, args.steps)
    return Schedule(steps=args.steps, budget=args.budget, lr=args.lr, lambda_lr=args.lambda_lr, finetune=finetune,
                    gate_optimizer=args.gate_optimizer, gate_lr=args.gate_lr)


def print_gates(student: CoFiStudent) -> None:
    for i, geom in enumerate(student.geoms):
        p = {k: student.gates[_block_key((i, k))].keep_probability().item() for k in ("attn", "ffn")}
        heads = student.gates[_unit_key((i, "attn"))].keep_probability().sum().item()
        neurons = student.gates[_unit_key((i, "ffn"))]
        la = neurons.log_alpha
        print(f"layer {i}: P(attention block) {p['attn']:.2f}, heads {heads:.1f}/{geom.units}, P(FFN block) {p['ffn']:.2f}, "
              f"neurons {neurons.keep_probability().sum().item():.0f}/{geom.ffn}, neuron log_alpha {la.min().item():.1f}..{la.max().item():.1f}")


def main() -> None:
    args = arguments()
    torch.set_num_threads(2)
    model, tokenizer = load_model("pkg:all-minilm-l6-v2")
    texts = read_examples("pydoc").texts
    batches = tokenize(tokenizer, texts[:128], 48, 8)
    evaluation = tokenize(tokenizer, texts[500:564], 48, 16)
    reference = sentence_embeddings(model, evaluation)
    adapter = adapter_for(model)
    student = student_for(args.method, adapter, SEQ_LEN)
    schedule = schedule_for(args)
    training = GatedTraining(student, schedule)
    start = time.perf_counter()
    while training.step < schedule.steps:
        training.train_step(batch_for(training.step, batches))  # the batch run_training would give it
    student.fix(schedule.budget)
    with torch.no_grad(), student.applied(student.fixed):
        pruned = fidelity(reference, sentence_embeddings(model, evaluation))
    if isinstance(student, CoFiStudent):
        print_gates(student)
    run_training(training, batches)
    student.finish(schedule.budget)
    row = asdict(schedule) | {
        "method": args.method, "total_steps": schedule.total_steps, "fidelity_pruned": pruned,
        "gate_optimizer": type(training.optimizers["gates"]).__name__, "gate_lr": training.optimizers["gates"].param_groups[0]["lr"],
        "fidelity": fidelity(reference, sentence_embeddings(model, evaluation)),
        "expected_kept": training.curve[schedule.steps - 1]["expected_kept"], "trimmed": student.trimmed,
        "kept": kept_fraction(adapter, student.geoms, SEQ_LEN), "wall_s": time.perf_counter() - start,
        "loss_first": training.curve[0]["task_loss"], "loss_last": training.curve[-1]["task_loss"],
    }
    print(json.dumps(row))
    with open(args.out, "a") as out:
        out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
