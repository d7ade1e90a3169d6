"""What a prune costs in plain forward passes over its own calibration data (issue 16's target:
a whole prune <= 1.5 forward passes), every piece timed side by side in one process.

    .venv/bin/python bench/prune_cost.py                                  # MiniLM, gfp, 0.7
    .venv/bin/python bench/prune_cost.py --model pkg:smollm2-135m --repeats 1

Per repeat, in this order: a plain forward pass (inference mode), a forward and backward pass as
the curvature takes it (activation gradients only, no hooks), the collection (`calibrate`: both
passes plus the statistics' hooks), then scoring, search and reconstruction (`pipeline.plan`) and
the surgery on a copy of the model; with --surgeon-shots, LLM Surgeon's whole plan and surgery
as well (its shots collect their own curvature). The machine's speed drifts between runs, so the ratio is taken
within each repeat; the table shows every repeat and the JSON keeps them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from gfprune_ray.curvature import activation_gradients, sampled_loss
from gfprune_ray.data import mean_tokens_per_sequence, read_examples
from gfprune_ray.loading import load_model
from gfprune_ray.methods.surgeon import step_for_shots
from gfprune_ray.models import adapter_for
from gfprune_ray.options import PruneOptions
from gfprune_ray.pipeline import calibrate, plan, plan_llm_surgeon
from gfprune_ray.single import prepare_batches
from gfprune_ray.surgery import apply_pruning

RESULTS = Path(__file__).parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="pkg:all-minilm-l6-v2")
    p.add_argument("--data", default="pydoc")
    p.add_argument("--budget", type=float, default=0.7)
    p.add_argument("--method", default="gfp")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--surgeon-shots", type=int, default=0, help="also time llm-surgeon with this many shots (its target: <= 5x the prune)")
    p.add_argument("--out", type=Path, help="JSON file (default: bench/results/prune_cost_<model>.json)")
    return p.parse_args()


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward(model, batches: list[dict]) -> None:
    with torch.inference_mode():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])


def forward_backward(model, batches: list[dict]) -> None:
    """The curvature pass without its statistics' hooks (curvature.activation_gradients)."""
    with activation_gradients(model):
        for b in batches:
            ids, mask = b["input_ids"], b["attention_mask"]
            sampled_loss(model(input_ids=ids, attention_mask=mask), ids, mask, 0).backward()


def one_repeat(adapter, batches: list[dict], seq_len: float, a: argparse.Namespace) -> dict:
    row = {"forward_s": seconds(lambda: forward(adapter.model, batches)),
           "forward_backward_s": seconds(lambda: forward_backward(adapter.model, batches))}
    start = time.perf_counter()
    calibration = calibrate(adapter, batches, seq_len)
    row["collect_s"] = time.perf_counter() - start
    result = plan(adapter, calibration, a.budget, a.method)
    row |= result.timings
    copied = adapter_for(copy.deepcopy(adapter.model))
    row["surgery_s"] = seconds(lambda: apply_pruning(copied, result.masks, result.weights))
    row["prune_s"] = sum(row[k] for k in ("collect_s", "score_s", "search_s", "reconstruct_s", "surgery_s"))
    row["prune_in_forward_passes"] = row["prune_s"] / row["forward_s"]
    if a.surgeon_shots:
        surgeon = plan_llm_surgeon(adapter, batches, a.budget, seq_len, step_for_shots(a.budget, a.surgeon_shots))
        copied = adapter_for(copy.deepcopy(adapter.model))
        surgery_s = seconds(lambda: apply_pruning(copied, surgeon.masks, surgeon.weights))
        row |= {f"surgeon_{k}": v for k, v in surgeon.timings.items()}  # summed over the shots
        row["surgeon_s"] = sum(surgeon.timings.values()) + surgery_s
        row["surgeon_in_prunes"] = row["surgeon_s"] / row["prune_s"]
    return row


def main() -> None:
    a = parse_args()
    model, tokenizer = load_model(a.model)
    adapter = adapter_for(model.eval())
    opts = PruneOptions(budget=a.budget, method=a.method, samples=a.samples).validate()
    batches, _, _ = prepare_batches(tokenizer, read_examples(a.data), opts)
    seq_len = mean_tokens_per_sequence(batches)
    rows = [one_repeat(adapter, batches, seq_len, a) for _ in range(a.repeats)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"{a.model}, {a.method} at {a.budget}: {sum(len(b['input_ids']) for b in batches)} examples, {tokens} tokens, "
          f"{torch.get_num_threads()} threads")
    keys = ["forward_s", "forward_backward_s", "collect_s", "score_s", "search_s", "reconstruct_s", "surgery_s", "prune_s", "prune_in_forward_passes"]
    keys += [k for k in ("surgeon_s", "surgeon_in_prunes") if k in rows[0]]
    print("| repeat | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for i, row in enumerate(rows, 1):
        print(f"| {i} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
    out = a.out or RESULTS / f"prune_cost_{a.model.split(':')[-1].split('/')[-1]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"settings": vars(a) | {"out": str(out)}, "machine": machine, "tokens": tokens, "repeats": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
