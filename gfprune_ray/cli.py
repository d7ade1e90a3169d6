"""The gfprune-ray command line."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from .errors import UserError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="Label-free structured pruning of transformer language models: fewer heads, fewer FFN neurons, "
    "closed-form reconstruction, no labels and no retraining.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DATA_HELP = "Text file (one example per line), JSONL or Parquet with a 'text' column, a folder of those, 'pydoc' for the bundled English corpus, or a hub dataset name."
MODEL_HELP = "Local model folder, hub id, or pkg:all-minilm-l6-v2 for the packaged MiniLM."


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


def _print_report(title: str, metrics: dict, timings: dict | None = None) -> None:
    from .progress import table

    rows = [(k, _fmt(v)) for k, v in metrics.items()]
    rows += [(k, f"{v:.2f}") for k, v in (timings or {}).items()]
    table(title, rows)


@app.command()
def prune(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the pruned model (must not exist, or be empty)."),
    data: str = typer.Option("pydoc", "--data", "-d", help=DATA_HELP),
    budget: float = typer.Option(0.6, "--budget", "-b", help="Fraction of the prunable MACs to keep, in (0, 1]."),
    method: str = typer.Option("gfp", help="Unit scores: gfp, gfp-r2, gfp-d2, fluctuation, magnitude, random."),
    reconstruct: str = typer.Option("full", help="New weights for kept units: full, scale or none."),
    allocation: str = typer.Option("global", help="global: rank units across layers; uniform: same ratio in every layer."),
    samples: int = typer.Option(256, help="Calibration examples (every 5th is held out to tune reconstruction)."),
    eval_samples: int = typer.Option(256, help="Evaluation examples, disjoint from calibration."),
    seq_len: int = typer.Option(128, help="Tokens per example (longer ones are truncated)."),
    batch_size: int = typer.Option(32, help="Sequences per forward pass."),
    seed: int = typer.Option(0, help="Seed of the data split and of the random method."),
    stats: Path | None = typer.Option(None, help="Statistics file: reused when it exists (refused if it belongs to another model or data), written otherwise."),
    latency_repeats: int = typer.Option(5, help="Timed forward passes per latency measurement (the median is reported)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty output folder."),
) -> None:
    """Prune MODEL to a MACs budget with unlabeled text, save it to OUT and report its quality and speed."""
    from .single import PruneOptions, prune_model

    opts = PruneOptions(budget, method, reconstruct, allocation, samples, eval_samples, seq_len, batch_size, seed, latency_repeats)
    report = _run(lambda: prune_model(model, data, opts, out, stats, force))
    _print_report(f"{model} @ budget {budget} ({method}, {reconstruct})", report["metrics"], report["timings"])
    typer.echo(f"saved to {out} (load with gfprune_ray.load_pruned({str(out)!r}))")


@app.command("eval")
def evaluate(
    path: Path = typer.Argument(..., help="A folder written by `gfprune-ray prune`."),
    data: str | None = typer.Option(None, "--data", "-d", help=DATA_HELP + " Default: the data it was pruned with."),
    dense: str | None = typer.Option(None, help="Dense model to compare with (default: the one it was pruned from)."),
    eval_samples: int | None = typer.Option(None, help="Evaluation examples (default: as when pruned)."),
    samples: int | None = typer.Option(None, help="Calibration examples left out of evaluation (default: as when pruned)."),
    seq_len: int | None = typer.Option(None, help="Tokens per example (default: as when pruned)."),
    batch_size: int | None = typer.Option(None, help="Sequences per forward pass (default: as when pruned)."),
    seed: int | None = typer.Option(None, help="Seed of the data split (default: as when pruned, so no calibration text is scored)."),
    latency_repeats: int | None = typer.Option(None, help="Timed forward passes per latency measurement."),
) -> None:
    """Measure a pruned model against its dense source: quality, MACs, parameters, latency.

    Without options it evaluates on the examples that `prune` held back from calibration."""
    from .single import evaluate_saved

    overrides = dict(data=data, eval_samples=eval_samples, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed, latency_repeats=latency_repeats)
    report = _run(lambda: evaluate_saved(path, overrides, dense))
    _print_report(f"{path}", report["metrics"])


def main() -> None:
    app(prog_name="gfprune-ray")


if __name__ == "__main__":
    sys.exit(main())
