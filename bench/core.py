"""Core benchmark: quality, MACs, latency and stage times of every method, budget and reconstruction.

    .venv/bin/python bench/core.py                       # packaged MiniLM, pydoc text
    .venv/bin/python bench/core.py --model PATH_OR_ID    # any supported model (repeatable)

Statistics are collected once per model and reused for every method, budget and reconstruction,
as the farm does. llm-surgeon collects its own curvature in every shot; it is run once per shot
count in --surgeon-shots, and its prune time is its whole plan (all shots) plus surgery. Prints a Markdown table and writes JSON (and a quality-vs-MACs plot) to
bench/results/. Not a test: nothing here asserts; targets are reported as met or not.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

from gfprune_ray.choices import STEPS_CPU
from gfprune_ray.data import mean_tokens_per_sequence, read_examples, split_examples, tokenize
from gfprune_ray.evaluate import QualityReference, efficiency
from gfprune_ray.latency import LatencySettings
from gfprune_ray.loading import load_model
from gfprune_ray.methods.surgeon import step_for_shots
from gfprune_ray.methods.trained import kept_fraction, student_for
from gfprune_ray.models import adapter_for
from gfprune_ray.options import PruneOptions
from gfprune_ray.pipeline import calibrate, plan_llm_surgeon, reconstruct_sites, score_sites, search_masks
from gfprune_ray.single import prepare_batches
from gfprune_ray.surgery import apply_pruning
from gfprune_ray.training import GatedTraining, Schedule, run_training

RESULTS = Path(__file__).parent / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model to benchmark (repeatable); default pkg:all-minilm-l6-v2")
    p.add_argument("--data", default="pydoc")
    p.add_argument("--budgets", default="0.9,0.8,0.7,0.6,0.5")
    p.add_argument("--methods", default="gfp,fluctuation,magnitude,random")
    p.add_argument("--ablations", default="gfp-r2,gfp-d2", help="extra methods run with full reconstruction only")
    p.add_argument("--reconstructions", default="full,none")
    p.add_argument("--surgeon-shots", default="1,5", help="llm-surgeon runs, one per shot count (empty: none)")
    p.add_argument("--surgeon-budgets", default=None, help="budgets of the llm-surgeon runs (default: --budgets)")
    p.add_argument("--trained", default="", help="training-based methods, e.g. cofi,flop (default: none; make bench runs them apart)")
    p.add_argument("--trained-budgets", default=None, help="budgets of the training runs (default: --budgets)")
    p.add_argument("--steps", type=int, default=STEPS_CPU, help="pruning steps of cofi and flop (a quarter as many fine-tuning steps follow)")
    p.add_argument("--train-batch-size", type=int, default=16, help="sequences per training step")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "core.json")
    return p.parse_args()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


@torch.inference_mode()
def plain_forward(model, batches) -> None:
    for b in batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])


def prepare(source: str, args) -> dict:
    model, tokenizer = load_model(source)
    adapter = adapter_for(model)
    opts = PruneOptions(samples=args.samples, eval_samples=args.eval_samples, seq_len=args.seq_len, batch_size=args.batch_size)
    calib_batches, eval_batches, labels = prepare_batches(tokenizer, read_examples(args.data), opts.validate())
    _, forward_s = timed(plain_forward, model, calib_batches)
    calibration, collect_s = timed(calibrate, adapter, calib_batches, mean_tokens_per_sequence(calib_batches))
    reference = QualityReference(model, adapter, eval_batches, labels)
    calib_texts = split_examples(read_examples(args.data), opts.samples, opts.eval_samples, opts.seed)[0].texts
    return dict(model=model, adapter=adapter, calibration=calibration, reference=reference, calib_batches=calib_batches,
                forward_s=forward_s, collect_s=collect_s, tokens=calibration.total.tokens, tokenizer=tokenizer, calib_texts=calib_texts)


def measured(ctx: dict, masks, weights, args, with_latency: bool) -> dict:
    """Cut a copy of the model and measure it: quality, MACs, params, latency where asked."""
    adapter = ctx["adapter"]
    pruned = adapter_for(copy.deepcopy(ctx["model"]))
    _, surgery_s = timed(apply_pruning, pruned, masks, weights)
    row = ctx["reference"].measure(pruned.model)
    repeats = args.latency_repeats if with_latency else 0  # MACs and params always, latency where asked
    # on the benchmark's own threads (its README tables were measured so), not prune's default of one
    row |= efficiency(adapter, pruned, LatencySettings(repeats, (1, 32), args.seq_len, torch.get_num_threads()))
    row["kept_prunable_macs"] = masks.kept_fraction(adapter.geometries(), ctx["calibration"].seq_len)
    return row | {"surgery_s": surgery_s}


def run_surgeon(ctx: dict, budget: float, shots: int, args) -> dict:
    """llm-surgeon from scratch: its prune time is every shot's curvature, costs and updates."""
    calibration = ctx["calibration"]
    result, plan_s = timed(plan_llm_surgeon, ctx["adapter"], ctx["calib_batches"], budget, calibration.seq_len, step_for_shots(budget, shots))
    row = dict(method="llm-surgeon", budget=budget, reconstruction=f"T={shots}", allocation="global", shots=shots)
    row |= measured(ctx, result.masks, result.weights, args, with_latency=True)
    row |= result.timings | {"plan_s": plan_s}
    row["prune_s"] = plan_s + row["surgery_s"]
    row["prune_over_forward"] = row["prune_s"] / ctx["forward_s"]
    return row


def run_trained(ctx: dict, method: str, budget: float, args) -> dict:
    """cofi or flop from the dense model: its prune time is the whole training plus the cut. Run in
    this process (the loop a Ray Train worker runs, without the trainer's ~20 s of start-up)."""
    adapter = adapter_for(copy.deepcopy(ctx["model"]))
    dense_geoms = adapter.geometries()
    seq_len = ctx["calibration"].seq_len
    batches = tokenize(ctx["tokenizer"], ctx["calib_texts"], args.seq_len, args.train_batch_size)
    start = time.perf_counter()
    schedule = Schedule(steps=args.steps, budget=budget)
    training = GatedTraining(student_for(method, adapter, seq_len), schedule)
    run_training(training, batches)
    training.student.finish(budget)
    prune_s = time.perf_counter() - start
    finetune = schedule.total_steps - schedule.steps
    row = dict(method=method, budget=budget, reconstruction=f"steps={args.steps}+{finetune}", allocation="global", steps=args.steps, finetune_steps=finetune)
    row |= ctx["reference"].measure(adapter.model)
    row |= efficiency(ctx["adapter"], adapter, LatencySettings(args.latency_repeats, (1, 32), args.seq_len, torch.get_num_threads()))
    last = training.curve[-1]
    row |= {"kept_prunable_macs": kept_fraction(adapter, dense_geoms, seq_len), "trimmed": training.student.trimmed,
            "final_expected_kept": last["expected_kept"], "final_task_loss": last["task_loss"],
            "first_task_loss": training.curve[0]["task_loss"], "train_s": prune_s, "prune_s": prune_s,
            "prune_over_forward": prune_s / ctx["forward_s"], "curve": [{k: r[k] for k in ("step", "task_loss", "expected_kept", "target")} for r in training.curve]}
    return row


def run_one(ctx: dict, scores, method, budget, reconstruction, allocation, args, with_latency: bool) -> dict:
    adapter, calibration = ctx["adapter"], ctx["calibration"]
    masks, search_s = timed(search_masks, scores, adapter, budget, calibration.seq_len, allocation)
    weights, reconstruct_s = timed(reconstruct_sites, adapter, masks, calibration, reconstruction)
    row = dict(method=method, budget=budget, reconstruction=reconstruction, allocation=allocation)
    return row | measured(ctx, masks, weights, args, with_latency) | dict(search_s=search_s, reconstruct_s=reconstruct_s)


def bench_model(source: str, args) -> dict:
    print(f"== {source}", file=sys.stderr)
    ctx = prepare(source, args)
    budgets = [float(b) for b in args.budgets.split(",")]
    runs, score_times = [], {}
    plan = [(m, r, "global") for m in args.methods.split(",") for r in args.reconstructions.split(",")]
    plan += [(m, "full", "global") for m in filter(None, args.ablations.split(","))]
    plan += [("gfp", r, "uniform") for r in args.reconstructions.split(",")]
    for method in dict.fromkeys(m for m, _, _ in plan):
        scores, score_times[method] = timed(score_sites, ctx["adapter"], ctx["calibration"].total, method, 0, ctx["calibration"].grads)
        for _, reconstruction, allocation in (p for p in plan if p[0] == method):
            for budget in budgets:
                with_latency = reconstruction == "full" and allocation == "global"
                row = run_one(ctx, scores, method, budget, reconstruction, allocation, args, with_latency)
                row["score_s"] = score_times[method]
                row["prune_s"] = ctx["collect_s"] + row["score_s"] + row["search_s"] + row["reconstruct_s"] + row["surgery_s"]
                row["prune_over_forward"] = row["prune_s"] / ctx["forward_s"]
                runs.append(row)
                print(f"   {method:12s} {reconstruction:5s} {allocation:7s} b={budget:.1f} quality={row['relative_quality']:.4f}", file=sys.stderr)
    surgeon_budgets = [float(b) for b in (args.surgeon_budgets or args.budgets).split(",")]
    for shots in (int(t) for t in filter(None, args.surgeon_shots.split(","))):
        for budget in surgeon_budgets:
            row = run_surgeon(ctx, budget, shots, args)
            runs.append(row)
            print(f"   llm-surgeon  T={shots:<3d} b={budget:.1f} quality={row['relative_quality']:.4f} prune {row['prune_s']:.0f} s", file=sys.stderr)
    for method in filter(None, args.trained.split(",")):
        for budget in (float(b) for b in (args.trained_budgets or args.budgets).split(",")):
            row = run_trained(ctx, method, budget, args)
            runs.append(row)
            print(f"   {method:12s} steps={args.steps} b={budget:.1f} quality={row['relative_quality']:.4f} kept {row['kept_prunable_macs']:.3f} "
                  f"(trimmed {row['trimmed']}) train {row['train_s']:.0f} s", file=sys.stderr)
    return dict(model=source, calibration_tokens=ctx["tokens"], forward_s=ctx["forward_s"], collect_s=ctx["collect_s"],
                score_s=score_times, dense_quality=ctx["reference"].dense_value, runs=runs)


def targets(result: dict) -> dict:
    """The issue's targets, evaluated on this run."""
    runs = result["runs"]
    main = [r for r in runs if r["allocation"] == "global"]
    best = {}
    for r in main:
        key = r["budget"]
        if r["method"] in ("gfp", "fluctuation", "magnitude", "random"):
            if key not in best or r["relative_quality"] > best[key]["relative_quality"]:
                best[key] = r
    gfp06 = [r for r in main if r["method"] == "gfp" and r["reconstruction"] == "full" and abs(r["budget"] - 0.6) < 1e-9]
    gfp_full = [r for r in main if r["method"] == "gfp" and r["reconstruction"] == "full"]
    return {
        "gfp_full_quality_at_0.6": gfp06[0]["relative_quality"] if gfp06 else None,
        "quality_target_0.97_met": bool(gfp06) and gfp06[0]["relative_quality"] >= 0.97,
        "best_method_per_budget": {str(b): f"{r['method']}/{r['reconstruction']}" for b, r in sorted(best.items())},
        "gfp_best_at_every_budget": all(r["method"] == "gfp" for r in best.values()),
        "max_prune_over_forward": max((r["prune_over_forward"] for r in gfp_full), default=None),
        "prune_cost_target_1.5x_met": all(r["prune_over_forward"] <= 1.5 for r in gfp_full),
        "min_speedup_b32_vs_ideal": min((r["speedup_b32_vs_ideal"] for r in gfp_full), default=None),
        "latency_target_0.9_met": all(r["speedup_b32_vs_ideal"] >= 0.9 for r in gfp_full),
    } | surgeon_targets(main) | trained_targets(main)


def trained_targets(main: list[dict]) -> dict:
    """Issue 6: where cofi and flop gain over gfp and llm-surgeon, and at what wall time."""
    out = {}
    rivals = [r for r in main if r["method"] in ("gfp", "llm-surgeon") and r["reconstruction"] in ("full", "T=5")]
    for method in ("cofi", "flop"):
        for r in (r for r in main if r["method"] == method):
            same = [x for x in rivals if abs(x["budget"] - r["budget"]) < 1e-9]
            if same:
                best = max(same, key=lambda x: x["relative_quality"])
                gfp = [x for x in same if x["method"] == "gfp"]
                out[f"{method}_{r['budget']}_minus_best_rival"] = r["relative_quality"] - best["relative_quality"]
                out[f"{method}_{r['budget']}_best_rival"] = f"{best['method']}/{best['reconstruction']}"
                if gfp:
                    out[f"{method}_{r['budget']}_prune_over_gfp"] = r["prune_s"] / gfp[0]["prune_s"]
    return out


def surgeon_targets(main: list[dict]) -> dict:
    """Issue 5: llm-surgeon (most shots run) best at 0.8 and 0.7, at <= 5x gfp's prune time."""
    surgeon = [r for r in main if r["method"] == "llm-surgeon"]
    if not surgeon:
        return {}
    most = max(r["shots"] for r in surgeon)
    others = [r for r in main if r["method"] != "llm-surgeon" and r["reconstruction"] == "full"]
    out = {}
    for budget in (0.8, 0.7):
        mine = [r for r in surgeon if r["shots"] == most and abs(r["budget"] - budget) < 1e-9]
        rivals = [r["relative_quality"] for r in others if abs(r["budget"] - budget) < 1e-9]
        if mine and rivals:
            out[f"surgeon_T{most}_best_at_{budget}"] = mine[0]["relative_quality"] > max(rivals)
    gfp = {r["budget"]: r["prune_s"] for r in others if r["method"] == "gfp"}
    ratios = [r["prune_s"] / gfp[r["budget"]] for r in surgeon if r["shots"] == most and r["budget"] in gfp]
    if ratios:
        out[f"surgeon_T{most}_max_prune_over_gfp"] = max(ratios)
        out["surgeon_wall_target_5x_met"] = max(ratios) <= 5
    return out


def markdown(result: dict) -> str:
    lines = [f"**{result['model']}** ({result['calibration_tokens']} calibration tokens; plain forward {result['forward_s']:.1f} s, "
             f"statistics {result['collect_s']:.1f} s)", "",
             "| method | recon | alloc | budget | quality | MACs ratio | params (M) | speedup b32 | ideal | prune s | prune / forward |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        speed = f"{r['speedup_b32']:.2f}" if "speedup_b32" in r else ""
        lat = f"{r['macs_ratio']:.3f} | {r['params'] / 1e6:.1f} | {speed} | {r['ideal_speedup']:.2f}"
        lines.append(f"| {r['method']} | {r['reconstruction']} | {r['allocation']} | {r['budget']:.1f} | "
                     f"{r['relative_quality']:.4f} | {lat} | {r['prune_s']:.1f} | {r['prune_over_forward']:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in results:
        runs = [r for r in result["runs"] if r["allocation"] == "global"]
        for key in dict.fromkeys((r["method"], r["reconstruction"]) for r in runs):
            pts = sorted((r["budget"], r["relative_quality"]) for r in runs if (r["method"], r["reconstruction"]) == key)
            ax.plot(*zip(*pts), marker="o", linestyle="--" if key[1] == "none" else "-", label=f"{key[0]} / {key[1]}")
    ax.set_xlabel("prunable MACs kept (budget)")
    ax.set_ylabel("quality relative to dense")
    ax.set_title(", ".join(r["model"] for r in results))
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    results = [bench_model(m, args) for m in args.model or ["pkg:all-minilm-l6-v2"]]
    for result in results:
        result["targets"] = targets(result)
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    for result in results:
        print(markdown(result))
        print("\ntargets:", json.dumps(result["targets"], indent=2))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}", file=sys.stderr)


if __name__ == "__main__":
    main()
