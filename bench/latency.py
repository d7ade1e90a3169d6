"""Can a latency measurement be trusted? The same dense/pruned pair timed on a quiet machine twice,
then beside other work, with the verdict `evaluate` attaches to each speedup (issue 16's target:
two quiet measurements agree within 10%; on a loaded machine the report says so instead of
printing a wrong ratio).

    .venv/bin/python bench/latency.py                        # MiniLM cut to 0.6 by a prune here
    .venv/bin/python bench/latency.py --pruned runs/some-prune-folder

Run it alone: the quiet rows need a quiet machine. The load is N processes each multiplying
1024 x 1024 matrices on its own torch threads (--loads "1x1,1x2": one process of one thread,
then one of two). Every row is one `latency.paired_latency` call, as `prune`, `eval` and the
farm's evaluate tasks make it; a row whose speedup is more than 10% off the first quiet one
and not flagged is a failure of the target.
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

import torch

from gfprune_ray.latency import doubt, paired_latency
from gfprune_ray.loading import load_model
from gfprune_ray import load_pruned

RESULTS = Path(__file__).parent / "results"
LOAD = "import sys, time, torch; torch.set_num_threads(int(sys.argv[1])); a = torch.randn(1024, 1024)\nwhile True: a @ a"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", default="pkg:all-minilm-l6-v2")
    p.add_argument("--pruned", type=Path, help="a `gfprune-ray prune` folder of --dense (default: prune it to --budget here)")
    p.add_argument("--budget", type=float, default=0.6)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", default="1,2", help="torch threads of the measurement, one row set each")
    p.add_argument("--loads", default="1x1,1x2", help="background loads: PROCESSESxTHREADS, comma-separated")
    p.add_argument("--out", type=Path, default=RESULTS / "latency.json")
    return p.parse_args()


def pruned_folder(a: argparse.Namespace, scratch: Path) -> Path:
    if a.pruned is not None:
        return a.pruned
    folder = scratch / "pruned"
    command = [str(Path(sys.executable).parent / "gfprune-ray"), "prune", a.dense, "--out", str(folder), "--budget", str(a.budget), "--latency-repeats", "0"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return folder


def start_load(spec: str) -> list[subprocess.Popen]:
    processes, threads = (int(x) for x in spec.split("x"))
    return [subprocess.Popen([sys.executable, "-c", LOAD, str(threads)]) for _ in range(processes)]


def stop(load: list[subprocess.Popen]) -> None:
    for p in load:
        p.kill()
        p.wait()


def rows_for(condition: str, dense, pruned, a: argparse.Namespace) -> list[dict]:
    rows = []
    for threads in (int(t) for t in a.threads.split(",")):
        for batch in (int(b) for b in a.batch_sizes.split(",")):
            start = time.perf_counter()
            timed = paired_latency(dense, pruned, batch, a.seq_len, a.repeats, threads)
            metrics = timed.metrics(batch, 1.0)
            rows.append({"condition": condition, "threads": threads, "batch": batch, "speedup": metrics[f"speedup_b{batch}"],
                         "dense_s": timed.dense_s, "pruned_s": timed.pruned_s, "rounds": timed.rounds, "spread": timed.spread,
                         "cpu_share": timed.load.cpu_share, "other_cpus": timed.load.other_cpus, "verdict": doubt(metrics, batch) or "trusted",
                         "seconds": time.perf_counter() - start})
            print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    other = "" if r["other_cpus"] is None else f"{r['other_cpus']:.2f}"
    return (f"| {r['condition']} | {r['threads']} | {r['batch']} | {r['speedup']:.3f} | {r['dense_s'] * 1000:.1f} | {r['rounds']} | "
            f"{r['spread']:.3f} | {r['cpu_share']:.2f} | {other} | {r['verdict']} | {r.get('off', '')} |")


def judge(rows: list[dict]) -> dict:
    """Each row's distance from the first quiet measurement of its (threads, batch); the targets."""
    reference = {(r["threads"], r["batch"]): r["speedup"] for r in rows if r["condition"] == "quiet 1"}
    for r in rows:
        r["off_quiet_1"] = r["speedup"] / reference[(r["threads"], r["batch"])] - 1
        r["off"] = f"{r['off_quiet_1']:+.1%}"
    quiet = [r for r in rows if r["condition"] == "quiet 2"]
    wrong_and_trusted = [r for r in rows if abs(r["off_quiet_1"]) > 0.10 and r["verdict"] == "trusted"]
    return {"quiet_agree_within_10pct": all(abs(r["off_quiet_1"]) <= 0.10 for r in quiet),
            "wrong_ratios_reported_as_trusted": len(wrong_and_trusted)}


def main() -> None:
    a = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = pruned_folder(a, Path(scratch))
        dense, _ = load_model(a.dense)
        pruned = load_pruned(folder)
    dense.eval(), pruned.eval()
    print("| condition | threads | batch | speedup | dense ms | rounds | spread | CPU share | other cores | verdict | vs quiet 1 |\n|" + "---|" * 11)
    rows = rows_for("quiet 1", dense, pruned, a) + rows_for("quiet 2", dense, pruned, a)
    for spec in a.loads.split(","):
        load = start_load(spec)
        try:
            time.sleep(1.0)  # let the load start
            rows += rows_for(f"load {spec}", dense, pruned, a)
        finally:
            stop(load)
    targets = judge(rows)
    print("\n| condition | threads | batch | speedup | dense ms | rounds | spread | CPU share | other cores | verdict | vs quiet 1 |\n|" + "---|" * 11)
    print("\n".join(_line(r) for r in rows))
    print(targets)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(a).items()}, "machine": machine, "rows": rows, "targets": targets}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
