"""Farm benchmark: what the sweep saves by reusing statistics, how collection scales with workers,
what Ray and MLflow cost on top of the single-process core, and what llm-surgeon's budgets share.

    .venv/bin/python bench/farm.py                 # this machine (embedded Ray)
    .venv/bin/python bench/farm.py --workers 8     # a GPU machine: one worker per GPU
    .venv/bin/python bench/farm.py --parts surgeon # one part again; the others stay as the JSON has them

Whole commands are timed as a user runs them (`gfprune-ray sweep` / `gfprune-ray prune`, each a
fresh process), on the packaged MiniLM and a second model of the same shape with random weights
(no second real model ships in a registry package; timing does not depend on the weights).
Prints a Markdown table and writes bench/results/farm.json. Not a test: targets are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BIN = Path(sys.executable).parent
MINILM = "pkg:all-minilm-l6-v2"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="0.9,0.8,0.7,0.6")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--latency-repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="workers of the scaling run (the GPU count on a GPU machine)")
    p.add_argument("--surgeon-budgets", default="0.9,0.8,0.7,0.6,0.5", help="llm-surgeon's sweep, against its lowest budget alone")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which benchmarks to run (default all: {','.join(PARTS)})")
    p.add_argument("--out", type=Path, default=RESULTS / "farm.json")
    return p.parse_args()


def second_model(folder: Path) -> Path:
    """MiniLM's architecture and tokenizer with seeded random weights."""
    import torch
    import transformers

    from gfprune_ray.loading import load_model

    model, tokenizer = load_model(MINILM)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(model.config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run(args: list, cwd: Path) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    done = subprocess.run([str(BIN / "gfprune-ray"), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed: gfprune-ray {' '.join(map(str, args))}\n{done.stderr[-3000:]}")
    return seconds


def common(a) -> list:
    return ["--data", "pydoc", "--samples", a.samples, "--eval-samples", a.eval_samples, "--latency-repeats", a.latency_repeats, "--seq-len", 128, "--batch-size", 32]


def sweep_args(a, models: Path, work: Path, name: str, budgets: str, workers: int = 1, method: str = "gfp") -> list:
    return ["sweep", "--models", models, "--budgets", budgets, "--methods", method, "--out", work / name, "--experiment", name,
            "--tracking-uri", f"sqlite:///{work / name}.db", "--cache-dir", work / f"{name}-cache", "--workers", workers, *common(a)]


def collect_seconds(work: Path, name: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / name}.db")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], "tags.gfprune_kind = 'model'")
    return [r.data.metrics["collect_s"] for r in runs]


def reuse(a, work: Path) -> dict:
    models = [MINILM, str(second_model(work / "minilm-random"))]
    budgets = a.budgets.split(",")
    listing = work / "two-models.txt"
    listing.write_text("\n".join(models) + "\n")
    sweep_s = run(sweep_args(a, listing, work, "reuse", a.budgets), work)
    collect = collect_seconds(work, "reuse")
    singles = []
    for model in models:
        for budget in budgets:
            out = work / "single" / f"{Path(model).name}-{budget}"
            singles.append(run(["prune", model, "--budget", budget, "--method", "gfp", "--out", out, "--force", *common(a)], work))
    units = len(models) * len(budgets)
    return {
        "units": units, "sweep_s": sweep_s, "independent_prunes_s": sum(singles), "independent_prune_each_s": singles,
        "speedup": sum(singles) / sweep_s, "target_speedup": 3.0, "collect_s_per_model": collect,
        "sweep_in_collections": sweep_s / sum(collect), "target_in_collections": len(models) * (1 + 0.2 * len(budgets)),
    }


def scaling(a, work: Path) -> dict:
    """Collection alone (actors started, shards collected, reduced), 1 worker vs `--workers`."""
    import ray

    from gfprune_ray.farm import stages as farm
    from gfprune_ray.farm.ray_data import read_dataset, select_examples, tokenize_rows

    farm.connect(None)
    calib_rows, _ = select_examples(read_dataset("pydoc"), a.samples, a.eval_samples, 0)
    calib = tokenize_rows(calib_rows, MINILM, 128, 32)
    info = ray.get(farm.describe.remote(MINILM))
    out = {}
    for workers in (1, a.workers, 1, a.workers):  # each twice; the first pass warms the worker pool
        start = time.perf_counter()
        sites, _ = farm.submit_collection(MINILM, calib, [info.sites], workers, 32)
        ray.get(list(sites.values()))
        out.setdefault(workers, []).append(time.perf_counter() - start)
    ray.shutdown()
    one, many = min(out[1]), min(out[a.workers])
    return {"workers": a.workers, "seconds": {str(k): v for k, v in out.items()}, "speedup": one / many, "efficiency": one / (a.workers * many)}


def overhead(a, work: Path) -> dict:
    listing = work / "one-model.txt"
    listing.write_text(MINILM + "\n")
    budget = a.budgets.split(",")[-1]
    farm_s = run(sweep_args(a, listing, work, "overhead", budget), work)
    core_s = run(["prune", MINILM, "--budget", budget, "--method", "gfp", "--out", work / "overhead-core", "--force", *common(a)], work)
    return {"farm_s": farm_s, "core_s": core_s, "ratio": farm_s / core_s, "target_ratio": 1.3}


def surgeon(a, work: Path) -> dict:
    """llm-surgeon swept over several budgets against the same sweep at its lowest budget alone:
    the budgets share the shots of the lowest one's path, so the difference is their evaluations."""
    listing = work / "one-model.txt"
    listing.write_text(MINILM + "\n")
    lowest = min(a.surgeon_budgets.split(","), key=float)
    many_s = run(sweep_args(a, listing, work, "surgeon-many", a.surgeon_budgets, method="llm-surgeon"), work)
    one_s = run(sweep_args(a, listing, work, "surgeon-one", lowest, method="llm-surgeon"), work)
    return {"budgets": a.surgeon_budgets, "lowest": lowest, "sweep_s": many_s, "lowest_alone_s": one_s, "ratio": many_s / one_s, "target_ratio": 1.5}


PARTS = {"reuse": reuse, "overhead": overhead, "scaling": scaling, "surgeon": surgeon}


def table(results: dict) -> str:
    rows = ["| benchmark | measured | target | met |", "|---|---|---|---|"]
    if r := results.get("reuse"):
        rows.append(f"| reuse: sweep of {r['units']} units vs independent prunes | {r['sweep_s']:.0f} s vs {r['independent_prunes_s']:.0f} s = {r['speedup']:.2f}x | >= 3x | {r['speedup'] >= 3} |")
        rows.append(f"| reuse: sweep wall in collections | {r['sweep_in_collections']:.2f} | <= {r['target_in_collections']:.1f} | {r['sweep_in_collections'] <= r['target_in_collections']} |")
    if o := results.get("overhead"):
        rows.append(f"| overhead: farm vs core, 1 model 1 budget | {o['farm_s']:.0f} s vs {o['core_s']:.0f} s = {o['ratio']:.2f}x | <= 1.3x | {o['ratio'] <= 1.3} |")
    if s := results.get("scaling"):
        rows.append(f"| scaling: collection 1 vs {s['workers']} workers | {s['speedup']:.2f}x, efficiency {s['efficiency']:.2f} | (report) | - |")
    if u := results.get("surgeon"):
        rows.append(f"| llm-surgeon: sweep of budgets {u['budgets']} vs {u['lowest']} alone | {u['sweep_s']:.0f} s vs {u['lowest_alone_s']:.0f} s = "
                    f"{u['ratio']:.2f}x | <= 1.5x | {u['ratio'] <= 1.5} |")
    return "\n".join(rows)


def main() -> None:
    a = parse_args()
    parts = a.parts.split(",")
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"unknown parts: {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    results = json.loads(a.out.read_text()) if a.out.exists() and set(parts) != set(PARTS) else {}
    results |= {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for part in parts:
            results[part] = PARTS[part](a, work) | {"settings": vars(a) | {"out": str(a.out)}}
    print(table(results))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
