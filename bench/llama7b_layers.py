"""A simulated 7B model on a small machine: Llama-2-7B's widths (hidden 4096, 32 heads, FFN 11008,
vocabulary 32000) with only a few layers, in bfloat16, through `prune` and a one-model `sweep`.

    .venv/bin/python bench/llama7b_layers.py                      # 2 and 4 layers, prune and sweep
    .venv/bin/python bench/llama7b_layers.py --layers 2 --only prune

Weights are random (memory and time do not depend on their values); the tokenizer is the packaged
MiniLM's (30522 ids, all below 32000). Each command runs as a user runs it, in a fresh process,
alone on the machine. Memory is read from /proc while it runs, for the CLI process (the driver of
a sweep) and each Ray worker process (collection actor, per-site tasks, evaluation): the peak
resident set (VmHWM, exact) and, sampled every 0.2 s, private memory (RssAnon) and shared memory
(RssShmem). Ray's object store is shared memory: a page of it counts in the resident set of every
process that maps it, so the object store's own peak (growth of /dev/shm) is reported apart, and
"node" is the largest sum, at one moment, of every process's private memory and the store.
The target of issue 15: no process above 2.5x the model's bfloat16 weights plus one layer's
float64 statistics, and no more per process with 4 layers than with 2.

The method is `fluctuation` (activation-aware, no KCM: gfp's KCM on 11008 points per FFN needs a
11008^2 kernel product per iteration, minutes per layer on 2 CPU cores; on a GPU it is
milliseconds). Reconstruction is `full`, the default. Prints a Markdown table and writes
bench/results/llama7b_layers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
BIN = Path(sys.executable).parent
WIDTHS = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="2,4")
    p.add_argument("--only", choices=["prune", "sweep"], default=None)
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--budget", default="0.7")
    p.add_argument("--stats-memory", default=None, help="passed to both commands (default: theirs)")
    p.add_argument("--out", type=Path, default=RESULTS / "llama7b_layers.json")
    return p.parse_args()


def build_model(folder: Path, layers: int) -> dict:
    """A bfloat16 Llama with 7B widths and `layers` layers, saved with the MiniLM tokenizer."""
    import torch
    import transformers as T

    from gfprune_ray.packaged import packaged_model_path

    config = T.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **WIDTHS, torch_dtype="bfloat16",
                           bos_token_id=101, eos_token_id=102, pad_token_id=0)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # never a float32 copy of the weights
    try:
        model = T.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)
    T.AutoTokenizer.from_pretrained(packaged_model_path("all-minilm-l6-v2")).save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "weights_bytes": 2 * params}


def layer_stats_bytes() -> int:
    from gfprune_ray.models import BlockGeometry
    from gfprune_ray.stats import site_stats_bytes

    geom = BlockGeometry(d=4096, units=32, heads_per_unit=1, head_dim=128, ffn=11008, gated=True)
    return site_stats_bytes(geom, "attn") + site_stats_bytes(geom, "ffn")


class PeakMemory:
    """Polls /proc for the command's process and every Ray worker: the peak resident set (VmHWM)
    and, sampled, the peak private memory (RssAnon) and shared memory (RssShmem: pages of Ray's
    object store this process mapped, counted again in every process that maps them), and how
    full the node's shared memory (/dev/shm, where the object store lives) got."""

    def __init__(self, root_pid: int):
        self.root, self.peaks, self.names = root_pid, {}, {}
        self.shm_base = shutil.disk_usage("/dev/shm").used
        self.shm_peak = 0
        self.node_peak = 0  # private memory of every process plus the object store, at one moment
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            private = sum(self._read(int(entry.name)) for entry in os.scandir("/proc") if entry.name.isdigit())
            shm = shutil.disk_usage("/dev/shm").used - self.shm_base
            self.shm_peak = max(self.shm_peak, shm)
            self.node_peak = max(self.node_peak, private + shm)
            time.sleep(0.2)

    def _read(self, pid: int) -> int:
        """Updates the process's peaks; returns its private memory now (0 for other processes)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return 0
        if pid != self.root and not cmdline.startswith("ray::"):
            return 0
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith(("VmHWM", "RssAnon", "RssFile", "RssShmem"))}
        peak = self.peaks.setdefault(pid, {"peak_bytes": 0, "private_bytes": 0, "shared_bytes": 0, "file_bytes": 0})
        peak["peak_bytes"] = max(peak["peak_bytes"], fields.get("VmHWM", 0))
        peak["private_bytes"] = max(peak["private_bytes"], fields.get("RssAnon", 0))
        peak["shared_bytes"] = max(peak["shared_bytes"], fields.get("RssShmem", 0))
        peak["file_bytes"] = max(peak["file_bytes"], fields.get("RssFile", 0))  # libraries; objects Ray could not fit in the store
        name = "cli (driver)" if pid == self.root else cmdline.split()[0].removeprefix("ray::")
        names = self.names.setdefault(pid, [])
        if name != "IDLE" and name not in names:  # a worker runs many tasks, IDLE between them
            names.append(name)
        return fields.get("RssAnon", 0)

    def by_process(self) -> list[dict]:
        rows = ({"pid": p, "process": "+".join(self.names.get(p, [])) or "IDLE", **peak} for p, peak in self.peaks.items())
        return sorted(rows, key=lambda r: -r["peak_bytes"])


def run(command: list[str], env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(proc.pid) as peaks:
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{err[-4000:]}")
    return {"wall_s": wall, "processes": peaks.by_process(), "object_store_peak_bytes": peaks.shm_peak, "node_peak_bytes": peaks.node_peak, "stderr_tail": err[-1500:]}


def common(args: argparse.Namespace) -> list[str]:
    return ["--data", "pydoc", "--samples", str(args.samples), "--eval-samples", str(args.eval_samples), "--seq-len", str(args.seq_len),
            "--batch-size", "8", "--latency-repeats", "0", *(["--stats-memory", args.stats_memory] if args.stats_memory else [])]


def bench_prune(model: Path, work: Path, args, env) -> dict:
    out = work / "pruned"
    result = run([str(BIN / "gfprune-ray"), "prune", str(model), "--out", str(out), "--method", "fluctuation", "--budget", args.budget,
                  *common(args)], env)
    record = json.loads((out / "gfprune.json").read_text())
    result["timings"] = record.get("timings", {})
    result["metrics"] = {k: record["metrics"][k] for k in ("perplexity", "dense_perplexity", "kept_prunable_macs", "params", "dense_params")}
    result["passes"] = next((line.split("(")[1].split()[0] for line in result["stderr_tail"].splitlines() if "passes)" in line), "1")
    return result


def bench_sweep(model: Path, work: Path, args, env) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    models = work / "models.txt"
    models.write_text(f"{model}\n")
    result = run([str(BIN / "gfprune-ray"), "sweep", "--models", str(models), "--methods", "fluctuation", "--budgets", args.budget,
                  "--workers", "1", "--out", str(work / "sweep"), "--experiment", "llama7b", "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
                  "--cache-dir", str(work / "cache"), *common(args)], env)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llama7b")
    (unit,) = client.search_runs([experiment.experiment_id], "tags.gfprune_kind = 'unit'")
    result["timings"] = {k: v for k, v in unit.data.metrics.items() if k.endswith("_s")}
    result["metrics"] = {k: unit.data.metrics.get(k) for k in ("perplexity", "dense_perplexity", "kept_prunable_macs")}
    return result


def main() -> None:
    args = parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", NO_COLOR="1", COLUMNS="200")
    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        with tempfile.TemporaryDirectory(prefix=f"llama7b-{layers}-", dir=os.environ.get("TMPDIR")) as tmp:
            work = Path(tmp)
            env["GFPRUNE_RAY_CACHE"] = str(work / "gfprune-cache")
            sizes = build_model(work / "model", layers)
            budget_bytes = 2.5 * sizes["weights_bytes"] + layer_stats_bytes()
            for command, bench in (("prune", bench_prune), ("sweep", bench_sweep)):
                if args.only not in (None, command):
                    continue
                print(f"{layers} layers: {command} ...", file=sys.stderr, flush=True)
                result = bench(work / "model", work / command, args, env)
                peak = max(p["peak_bytes"] for p in result["processes"])
                private = max(p["private_bytes"] for p in result["processes"])
                rows.append({"layers": layers, "command": command, "stats_memory": args.stats_memory or "default", **sizes, "layer_stats_bytes": layer_stats_bytes(), "target_bytes": budget_bytes,
                             "peak_bytes": peak, "target_met": peak <= budget_bytes,
                             "private_peak_bytes": private, "private_target_met": private <= budget_bytes, **result})
                print(f"  {result['wall_s']:.0f} s, peak {peak / 1e9:.2f} GB, private {private / 1e9:.2f} GB (target {budget_bytes / 1e9:.2f} GB)",
                      file=sys.stderr, flush=True)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    args.out.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


def print_table(rows: list[dict]) -> None:
    gb = lambda b: f"{b / 1e9:.2f}"
    print("| layers | command | --stats-memory | wall s | weights GB (bf16) | one layer's stats GB | target GB | peak resident GB (process) | met "
          "| peak private GB (process) | met | object store GB | node GB | stage seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        top = r["processes"][0]
        private = max(r["processes"], key=lambda p: p["private_bytes"])
        stages = ", ".join(f"{k.removesuffix('_s')} {v:.0f}" for k, v in r["timings"].items() if v and v >= 0.5)
        print(f"| {r['layers']} | {r['command']} | {r['stats_memory']} | {r['wall_s']:.0f} | {gb(r['weights_bytes'])} | {gb(r['layer_stats_bytes'])} | "
              f"{gb(r['target_bytes'])} | {gb(r['peak_bytes'])} ({top['process']}) | {'yes' if r['target_met'] else 'NO'} | "
              f"{gb(r['private_peak_bytes'])} ({private['process']}) | {'yes' if r['private_target_met'] else 'NO'} | "
              f"{gb(r['object_store_peak_bytes'])} | {gb(r['node_peak_bytes'])} | {stages} |")
    print()
    print("Every process above 100 MB (peak resident / private / shared / file-backed GB; a worker's tasks in the order it ran them):")
    for r in rows:
        procs = "; ".join(f"{p['process']} {gb(p['peak_bytes'])} / {gb(p['private_bytes'])} / {gb(p['shared_bytes'])} / {gb(p['file_bytes'])}"
                          for p in r["processes"] if p["peak_bytes"] > 1e8)
        print(f"- {r['layers']} layers, {r['command']}: {procs}")


if __name__ == "__main__":
    main()
