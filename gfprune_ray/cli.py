"""The gfprune-ray command line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from .choices import CHECKPOINT_EVERY, SHOT_STEP, STEPS_CPU
from .errors import UserError
from .storage import Location, location, shown

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="Label-free structured pruning of transformer language models: fewer heads, fewer FFN neurons, "
    "closed-form reconstruction, no labels and no retraining.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DATA_HELP = ("Text file (one example per line), JSONL or Parquet with a 'text' column, a folder of those, a named corpus ('pydoc': the "
             "bundled English corpus; 'austen': Jane Austen's novels, from 'make corpora'; 'licenses': Debian's license texts), or a hub dataset name.")
EVAL_DATA_HELP = ("More corpora to measure quality on, comma-separated, each anything --data takes (e.g. pydoc,austen,licenses): "
                  "each gives --eval-samples examples and its own metrics, <metric>/<corpus>. The calibration data is always "
                  "measured, on the examples held back from calibration.")
METHOD_HELP = (
    "gfp, gfp-r2, gfp-d2, fluctuation, magnitude, random (unit scores), llm-surgeon (curvature, correlated updates, "
    "several shots), cofi or flop (gates trained with the weights on Ray Train); the last three ignore --reconstruct."
)
STEPS_HELP = ("cofi, flop: steps that train the gates with the weights; a quarter as many again then fine-tune the structure "
              "they chose. 200 runs a small model on a CPU in minutes, far from the papers' quality (README); on GPUs use "
              "about 10000 (the papers train for epochs).")
CHECKPOINT_HELP = "cofi, flop: training steps between checkpoints; a killed run resumes from the last one when the same command runs again."
SHOT_STEP_HELP = ("llm-surgeon: the most of the prunable MACs one shot removes (curvature is collected again on the partly "
                  "pruned model before each shot): budget 0.6 takes 4 shots at 0.1, 0.75 takes 3 (0.9, 0.8, 0.75).")
LATENCY_HELP = ("Timed forward passes of each model per latency measurement, taking turns; more while their speedups "
                "spread over 10% on a machine that is not busy, for up to 3x the time again. The median is reported with "
                "its spread and the CPU share the process got, and a speedup that cannot be trusted (a busy machine, a wide "
                "spread, under 3 passes) is marked. 0 skips latency.")
SELF_TEXTS_HELP = ("Causal LMs: texts the model writes itself (sampled, up to 64 tokens each) added to the calibration data, so that "
                   "the statistics see what it does beyond --data's domain; 0: none. Encoders, cofi and flop ignore it.")
LATENCY_BATCH_HELP = "Batch sizes latency is measured at, comma-separated."
LATENCY_SEQ_HELP = "Tokens per sequence for latency and for MACs (at most the model's positions)."
LATENCY_THREADS_HELP = ("torch threads while timing, at most the CPUs the process may use (latency_threads records the number "
                        "used): one gives the same numbers in prune and in a sweep's one-CPU tasks.")
STATS_MEMORY_HELP = ("Most statistics (float64 Grams) one process holds in a collection pass, e.g. 6GB: a model whose statistics "
                     "exceed it is collected a group of layers per pass, each layer's written to disk as its pass ends (a 7B "
                     "model's are about 2.5 GB per layer).")
OBJECT_STORAGE_HELP = ("a URI pyarrow.fs opens (s3://bucket/prefix, gs://..., with options in the query, e.g. "
                       "?endpoint_override=host:9000&scheme=http; credentials from the environment).")
MODEL_HELP = "Local model folder, hub id, a llama.cpp .gguf file, or a packaged model: pkg:all-minilm-l6-v2, pkg:all-mpnet-base-v2, pkg:smollm2-135m."


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _run(action: Callable[[], object]) -> object:
    """Run a command body; user errors end as one line on stderr and exit code 2."""
    try:
        return action()
    except UserError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_report(title: str, metrics: dict, timings: dict | None = None, folder: str | None = None) -> None:
    from .latency import doubt, explain, timed_batches
    from .progress import table

    rows = [(k, _fmt(v)) for k, v in metrics.items()]
    rows += [(k, f"{v:.2f}") for k, v in (timings or {}).items()]
    table(title, rows)
    for batch in timed_batches(metrics):
        if (why := explain(metrics, batch)) is None:
            continue
        remedy = "--latency-repeats 3 or more" if doubt(metrics, batch) == "few runs" else "on a quiet machine"
        typer.echo(f"note: {why}; do not trust it. Measure again {remedy}: gfprune-ray eval {folder or 'FOLDER'}", err=True)


@app.command()
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Folder for the pruned model (must not exist, or be empty); or object storage: " + OBJECT_STORAGE_HELP),
    data: str = typer.Option("pydoc", "--data", "-d", help=DATA_HELP),
    eval_data: str | None = typer.Option(None, "--eval-data", help=EVAL_DATA_HELP),
    budget: float = typer.Option(0.6, "--budget", "-b", help="Fraction of the prunable MACs to keep, in (0, 1]."),
    method: str = typer.Option("gfp", help=METHOD_HELP),
    reconstruct: str = typer.Option("full", help="New weights for kept units: full, scale or none."),
    allocation: str = typer.Option("global", help="global: rank units across layers; uniform: same ratio in every layer."),
    samples: int = typer.Option(256, help="Calibration examples (every 5th is held out to tune reconstruction)."),
    eval_samples: int = typer.Option(256, help="Evaluation examples, disjoint from calibration."),
    seq_len: int = typer.Option(128, help="Tokens per example (longer ones are truncated)."),
    batch_size: int = typer.Option(32, help="Sequences per forward pass."),
    seed: int = typer.Option(0, help="Seed of the data split, of the targets the statistics sample from the model (no labels) and of the random method."),
    self_texts: int | None = typer.Option(None, help=SELF_TEXTS_HELP, show_default="a quarter of --samples"),
    stats: Path | None = typer.Option(None, help="Statistics folder: reused when it exists (refused if it belongs to another model or data), written otherwise."),
    stats_memory: str | None = typer.Option(None, help=STATS_MEMORY_HELP, show_default="an eighth of this machine's RAM"),
    latency_repeats: int = typer.Option(5, help=LATENCY_HELP),
    latency_batch_sizes: str = typer.Option("1,32", help=LATENCY_BATCH_HELP),
    latency_seq_len: int = typer.Option(128, help=LATENCY_SEQ_HELP),
    latency_threads: int = typer.Option(1, help=LATENCY_THREADS_HELP),
    shot_step: float = typer.Option(SHOT_STEP, help=SHOT_STEP_HELP),
    steps: int = typer.Option(STEPS_CPU, help=STEPS_HELP),
    checkpoint_every: int = typer.Option(CHECKPOINT_EVERY, help=CHECKPOINT_HELP),
    dtype: str | None = typer.Option(None, help="Load the model in float32, bfloat16 or float16 and save it so (not for cofi, flop); statistics still add up in float64.",
                                     show_default="the checkpoint's dtype"),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
) -> None:
    """Prune MODEL to a MACs budget with unlabeled text, save it to OUT and report its quality and speed."""
    from .choices import parse_memory
    from .data import check_sources
    from .options import PruneOptions  # these three are torch-free: bad input fails before the heavy imports

    memory = None if stats_memory is None else _run(lambda: parse_memory(stats_memory))
    opts = PruneOptions(budget, method, reconstruct, allocation, samples, eval_samples, seq_len, batch_size, seed, latency_repeats, shot_step, steps,
                        checkpoint_every, dtype, memory, _numbers(latency_batch_sizes, "latency-batch-sizes", int), latency_seq_len, latency_threads,
                        self_texts)
    _run(opts.validate)
    _run(lambda: check_sources(data, _names(eval_data)))  # prune_model reads them again, for callers of the API
    from .single import prune_model

    report = _run(lambda: prune_model(model, data, opts, out, stats, force, _names(eval_data)))
    where = location(out)
    _print_report(f"{model} @ budget {budget} ({method}, {reconstruct}; calibrated on {report['calibration_corpus']})", report["metrics"], report["timings"], shown(where))
    load = f"load with gfprune_ray.load_pruned({str(where)!r})" if isinstance(where, Path) else "load a downloaded copy with gfprune_ray.load_pruned(FOLDER)"
    typer.echo(f"saved to {shown(where)} ({load})")


@app.command("eval")
def evaluate(
    path: str = typer.Argument(..., help="A folder written by `gfprune-ray prune` or a sweep, local or in object storage (s3://...)."),
    data: str | None = typer.Option(None, "--data", "-d", help=DATA_HELP + " Default: the data it was pruned with."),
    eval_data: str | None = typer.Option(None, "--eval-data", help=EVAL_DATA_HELP + " Default: those it was pruned with."),
    dense: str | None = typer.Option(None, help="Dense model to compare with (default: the one it was pruned from)."),
    eval_samples: int | None = typer.Option(None, help="Evaluation examples (default: as when pruned)."),
    samples: int | None = typer.Option(None, help="Calibration examples left out of evaluation (default: as when pruned)."),
    seq_len: int | None = typer.Option(None, help="Tokens per example (default: as when pruned)."),
    batch_size: int | None = typer.Option(None, help="Sequences per forward pass (default: as when pruned)."),
    seed: int | None = typer.Option(None, help="Seed of the data split (default: as when pruned, so no calibration text is scored)."),
    latency_repeats: int | None = typer.Option(None, help=LATENCY_HELP, show_default="as when pruned"),
    latency_batch_sizes: str | None = typer.Option(None, help=LATENCY_BATCH_HELP, show_default="as when pruned"),
    latency_seq_len: int | None = typer.Option(None, help=LATENCY_SEQ_HELP, show_default="as when pruned"),
    latency_threads: int | None = typer.Option(None, help=LATENCY_THREADS_HELP, show_default="as when pruned"),
) -> None:
    """Measure a pruned model against its dense source: quality, MACs, parameters, latency.

    Without options it evaluates on the examples that `prune` held back from calibration."""
    from .data import check_sources
    from .options import saved_options
    from .storage import read_record_at  # these three are torch-free: bad input fails before the heavy imports

    overrides = dict(data=data, eval_data=_names(eval_data), eval_samples=eval_samples, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
                     latency_repeats=latency_repeats, latency_batch_sizes=_numbers(latency_batch_sizes, "latency-batch-sizes", int),
                     latency_seq_len=latency_seq_len, latency_threads=latency_threads)
    _, calibration_data, eval_sources = _run(lambda: saved_options(read_record_at(location(path)), overrides))
    _run(lambda: check_sources(calibration_data, eval_sources))  # evaluate_saved reads the record and sources again, for callers of the API
    from .single import evaluate_saved

    report = _run(lambda: evaluate_saved(path, overrides, dense))
    _print_report(report["model"], report["metrics"], folder=report["model"])


def _note_untrusted_speedups(records: list[dict], out: Location, saved: bool) -> None:
    from collections import Counter

    from .latency import doubt, timed_batches

    timed = [r for r in records if timed_batches(r)]
    first_doubt = (next((why for b in timed_batches(r) if (why := doubt(r, b))), None) for r in timed)
    reasons = Counter(why for why in first_doubt if why)
    if not reasons:
        return
    advice = []
    if reasons["few runs"]:
        advice.append("under 3 passes tell no spread: use --latency-repeats 3 or more")
    if reasons["busy machine"] or reasons["noisy"]:
        again = f"gfprune-ray eval {shown(out)}/<model>/<method>-<budget>" if saved else "gfprune-ray eval on a saved model (--save-models)"
        advice.append(f"other work or jitter bent the timing: measure again on a quiet machine with {again}")
    counts = ", ".join(f"{why}: {n}" for why, n in reasons.items())
    typer.echo(f"note: {sum(reasons.values())} of {len(timed)} units' speedups cannot be trusted ({counts}); {'; '.join(advice)}", err=True)


def _numbers(text: str | None, what: str, kind: type[int] | type[float] = float) -> list | None:
    if text is None:
        return None
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"--{what} expects comma-separated {'whole numbers' if kind is int else 'numbers'}, got {text!r}")


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


@app.command()
def sweep(
    models: Path | None = typer.Option(
        None, "--models", "-m", help="Models file: one local folder or hub id per line, optional key=value overrides (budgets=0.8,0.6 method=gfp seq-len=64 task=lm); # comments."
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="Campaign YAML (same keys as these options, with underscores); options given here override it."),
    budgets: str | None = typer.Option(None, "--budgets", "-b", help="Fractions of prunable MACs to keep, comma-separated, each in (0, 1].", show_default="0.9,0.8,0.7,0.6"),
    methods: str | None = typer.Option(None, "--methods", help="Methods, comma-separated: gfp, gfp-r2, gfp-d2, fluctuation, magnitude, random, llm-surgeon, cofi, flop.", show_default="gfp"),
    data: str | None = typer.Option(None, "--data", "-d", help=DATA_HELP + " A datasets.save_to_disk folder works too.", show_default="pydoc"),
    eval_data: str | None = typer.Option(None, "--eval-data", help=EVAL_DATA_HELP + " Finished units of a rerun are measured on corpora they lack."),
    samples: int | None = typer.Option(None, help="Calibration examples (every 5th is held out to tune reconstruction).", show_default="256"),
    eval_samples: int | None = typer.Option(None, help="Evaluation examples, disjoint from calibration.", show_default="256"),
    seq_len: int | None = typer.Option(None, help="Tokens per example.", show_default="128"),
    batch_size: int | None = typer.Option(None, help="Sequences per forward pass.", show_default="32"),
    seed: int | None = typer.Option(None, help="Seed of the data split, of the targets the statistics sample from the model (no labels) and of the random method.", show_default="0"),
    self_texts: int | None = typer.Option(None, help=SELF_TEXTS_HELP, show_default="a quarter of --samples"),
    reconstruct: str | None = typer.Option(None, help="New weights for kept units: full, scale or none.", show_default="full"),
    allocation: str | None = typer.Option(None, help="global or uniform (same ratio per layer).", show_default="global"),
    workers: int | None = typer.Option(None, help="Collection actors per model (one GPU each where the cluster has GPUs).", show_default="1"),
    out: str | None = typer.Option(None, "--out", "-o", help="Pruned models go to OUT/<model>/<method>-<budget>; the summary table and plot to OUT. "
                                   "On a cluster, a folder every node sees or object storage: " + OBJECT_STORAGE_HELP, show_default="runs/sweep"),
    experiment: str | None = typer.Option(None, help="MLflow experiment name.", show_default="gfprune"),
    address: str | None = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)."),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."),
    save_models: bool | None = typer.Option(None, "--save-models/--no-save-models", help="Write pruned models (to OUT and as MLflow artifacts).", show_default="save"),
    register: str | None = typer.Option(None, help="Register every pruned model as a version of this MLflow registered model (each is also logged as an MLflow model of its unit run)."),
    cache_dir: Path | None = typer.Option(None, help="Statistics cache, reused by later campaigns (default: GFPRUNE_RAY_CACHE or ~/.cache/gfprune-ray)."),
    latency_repeats: int | None = typer.Option(None, help=LATENCY_HELP, show_default="5"),
    latency_batch_sizes: str | None = typer.Option(None, help=LATENCY_BATCH_HELP, show_default="1,32"),
    latency_seq_len: int | None = typer.Option(None, help=LATENCY_SEQ_HELP, show_default="128"),
    latency_threads: int | None = typer.Option(None, help=LATENCY_THREADS_HELP, show_default="1"),
    shot_step: float | None = typer.Option(None, help=SHOT_STEP_HELP + " A sweep runs the shots of its lowest budget once; the other "
                                           "budgets branch off that path.", show_default=str(SHOT_STEP)),
    steps: int | None = typer.Option(None, help=STEPS_HELP, show_default=str(STEPS_CPU)),
    checkpoint_every: int | None = typer.Option(None, help=CHECKPOINT_HELP, show_default=str(CHECKPOINT_EVERY)),
    stats_memory: str | None = typer.Option(None, help=STATS_MEMORY_HELP + " Per collection actor.",
                                            show_default="an eighth of the smallest node's memory, shared by its actors"),
    dtype: str | None = typer.Option(None, help="Load the models in float32, bfloat16 or float16 and save them so (a models-file line "
                                     "may say dtype=...; not for cofi, flop); statistics still add up in float64.", show_default="each checkpoint's dtype"),
) -> None:
    """Prune many models at many MACs budgets on Ray; record every result in MLflow.

    Statistics are collected once per model and reused for every method and budget (and by later
    campaigns). Rerunning the same campaign skips the units that finished. Exits with 1 when a
    model or unit failed (the others still finish), with 2 on bad input."""
    from .data import check_sources
    from .farm.campaign import load_campaign  # both torch-free: bad input fails before the farm's imports

    options = {
        "budgets": _numbers(budgets, "budgets"), "methods": _names(methods), "data": data, "eval_data": _names(eval_data), "samples": samples,
        "eval_samples": eval_samples, "seq_len": seq_len, "batch_size": batch_size, "seed": seed, "self_texts": self_texts,
        "reconstruction": reconstruct, "allocation": allocation, "workers": workers, "out": out, "experiment": experiment,
        "address": address, "tracking_uri": tracking_uri, "save_models": save_models, "register_model": register, "cache_dir": cache_dir,
        "latency_repeats": latency_repeats, "latency_batch_sizes": _numbers(latency_batch_sizes, "latency-batch-sizes", int),
        "latency_seq_len": latency_seq_len, "latency_threads": latency_threads, "shot_step": shot_step, "steps": steps,
        "checkpoint_every": checkpoint_every, "stats_memory": stats_memory, "dtype": dtype,
    }
    campaign = _run(lambda: load_campaign(config, models, **options))
    _run(lambda: check_sources(campaign.data, campaign.eval_data))  # run_sweep checks again, for callers of the API
    from .farm.sweep import run_sweep

    result = _run(lambda: run_sweep(campaign))
    _note_untrusted_speedups(result.records, campaign.out, campaign.save_models)
    typer.echo(f"summary: {shown(result.summary['md'])}  plot: {shown(result.summary['plot'])}")
    typer.echo(f"MLflow runs of experiment {campaign.experiment!r}: {result.runs_url}")
    if result.failures:
        typer.echo(f"{len(result.failures)} failed:", err=True)
        for line in result.failures:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(1)


@app.command()
def report(
    experiment: str = typer.Argument(..., help="MLflow experiment name."),
    tracking_uri: str | None = typer.Option(None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)."),
    campaign: str | None = typer.Option(None, help="Campaign key (tag gfprune_campaign); default: the latest campaign."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the table as Markdown instead."),
) -> None:
    """Print a campaign's summary table from MLflow."""
    from .farm.report import print_table, to_markdown
    from .farm.tracking import Tracker

    def records():
        tracker = Tracker(tracking_uri, experiment, create=False)
        key = campaign or tracker.latest_campaign()
        found = tracker.unit_records(key) if key else []
        if not found:
            raise UserError(f"experiment {experiment!r} has no campaign results" + (f" for {key}" if key else ""))
        return key, found

    key, found = _run(records)
    if markdown:
        typer.echo(to_markdown(found), nl=False)
    else:
        print_table(found, f"{experiment}: campaign {key} ({len(found)} units)")


def main() -> None:
    app(prog_name="gfprune-ray")


if __name__ == "__main__":
    sys.exit(main())
