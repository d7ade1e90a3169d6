"""A campaign's results as one table (CSV, Markdown, terminal) and one quality-vs-MACs plot.

The table has a relative-quality column per evaluation corpus, the calibration corpus's marked
`(calib)`; the plot shows the calibration corpus's."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..latency import doubt, timed_batches

# (column, record key, format); records are flat dicts of a unit's params and metrics, plus the
# derived fields `with_derived` adds (keys starting with "_")
COLUMNS = [
    ("model", "model", "{}"),
    ("method", "method", "{}"),
    ("budget", "budget", "{}"),
    ("MACs kept", "_macs_kept", "{}"),
    ("quality", "_quality", "{}"),
    ("relative quality", "relative_quality", "{:.5f}"),
    ("accuracy", "accuracy", "{:.4f}"),
    ("params", "params", "{:,.0f}"),
    ("speedup", "_speedup", "{}"),
    ("vs ideal", "_speedup_vs_ideal", "{:.2f}"),
    ("status", "status", "{}"),
]


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def with_derived(record: dict, shared: dict | None = None) -> dict:
    """The record with the cells that combine fields: the quality value named by its metric, the
    whole model's MACs ratio with the sequence length it was counted at, and the speedup marked
    when its measurement cannot be trusted (latency.doubt), at the largest batch size timed. What
    `shared` says every row has in common (`quality_metric`, `latency_seq_len`,
    `_speedup_batch`) goes to the header instead."""
    shared = shared or {}
    out = dict(record)
    metric = record.get("quality_metric")
    if metric and _number(record.get(metric)) is not None:
        number = _number(record[metric])
        value = f"{number:.5f}" if abs(number) < 10 else f"{number:,.2f}"  # 0.99999 is not 1; a perplexity needs no 5 digits
        out["_quality"] = value if "quality_metric" in shared else f"{metric} {value}"
    ratio = _number(record.get("macs_ratio"))
    if ratio is not None:
        at = _number(record.get("latency_seq_len"))
        out["_macs_kept"] = f"{ratio:.3f}" + ("" if "latency_seq_len" in shared or not at else f" @{at:.0f} tok")
    batch = speedup_batch(record)
    if batch is not None:
        reason = doubt(record, batch)
        at = "" if "_speedup_batch" in shared else f" @b{batch}"
        out["_speedup"] = f"{_number(record[f'speedup_b{batch}']):.2f}{at}" + (f" ({reason})" if reason else "")
        out["_speedup_vs_ideal"] = record.get(f"speedup_b{batch}_vs_ideal")
    return out


def speedup_batch(record: dict) -> int | None:
    """The largest batch size a record has a speedup for (the table's speedup column shows it)."""
    return max(timed_batches(record), default=None)


def shared_fields(records: list[dict]) -> dict:
    """`quality_metric`, `latency_seq_len` and the speedup's batch size where every row that has
    one has the same."""
    out = {}
    batches = {speedup_batch(r) for r in records} - {None}
    if len(batches) == 1:
        out["_speedup_batch"] = batches.pop()
    for key in ("quality_metric", "latency_seq_len"):
        values = {str(r[key]) for r in records if r.get(key) not in (None, "")}
        if len(values) == 1:
            out[key] = values.pop()
    return out


def _sort_key(record: dict):
    return (str(record.get("model", "")), str(record.get("method", "")), -float(record.get("budget", 0) or 0))


def _cell(record: dict, key: str, fmt: str) -> str:
    value = record.get(key)
    if value is None or value == "":
        return ""
    try:
        return fmt.format(float(value) if fmt != "{}" else value)
    except (TypeError, ValueError):
        return str(value)


CORPUS_METRIC = "relative_quality/"  # + label: a unit's relative quality on one evaluation corpus


def columns(records: list[dict]) -> list[tuple[str, str, str]]:
    """COLUMNS with one relative-quality column per evaluation corpus (the calibration corpus's
    first, marked), in place of the plain one where every record has its calibration corpus's."""
    calibration = {str(r["calibration_corpus"]) for r in records if r.get("calibration_corpus")}
    labels = sorted({k.removeprefix(CORPUS_METRIC) for r in records for k in r if k.startswith(CORPUS_METRIC)},
                    key=lambda label: (label not in calibration, label))
    corpora = [(f"{label} (calib)" if label in calibration else label, CORPUS_METRIC + label, "{:.5f}") for label in labels]
    redundant = corpora and all(r.get("relative_quality") in (None, "") or f"{CORPUS_METRIC}{r.get('calibration_corpus')}" in r for r in records)
    out = []
    for column in COLUMNS:
        if column[1] != "relative_quality":
            out.append(column)
            continue
        out += ([] if redundant else [column]) + corpora
    return out


def table_rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    shared = shared_fields(records)
    headers = {"_quality": shared.get("quality_metric", "quality")}
    if "latency_seq_len" in shared:
        headers["_macs_kept"] = f"MACs kept @{float(shared['latency_seq_len']):.0f} tok"
    if "_speedup_batch" in shared:
        headers["_speedup"] = f"speedup b{shared['_speedup_batch']}"
    records = [with_derived(r, shared) for r in sorted(records, key=_sort_key)]
    used = [(headers.get(c[1], c[0]), *c[1:]) for c in columns(records) if any(r.get(c[1]) not in (None, "") for r in records)]
    return [c[0] for c in used], [[_cell(r, key, fmt) for _, key, fmt in used] for r in records]


def to_csv(records: list[dict]) -> str:
    header, rows = table_rows(records)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def to_markdown(records: list[dict]) -> str:
    header, rows = table_rows(records)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> Path:
    """Relative quality against the fraction of the model's MACs kept, a line per model and method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in records:
        if r.get("status") == "FINISHED" and r.get("macs_ratio") is not None and r.get("relative_quality") is not None:
            lines.setdefault((r["model"], r["method"]), []).append((float(r["macs_ratio"]), float(r["relative_quality"])))
    for (model, method), points in sorted(lines.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{model} / {method}")
    lengths = sorted({f"{float(r['latency_seq_len']):.0f}" for r in records if _number(r.get("latency_seq_len"))})
    ax.set_xlabel(f"MACs kept (pruned / dense, whole model at {' or '.join(lengths) or '?'} tokens)")
    ax.set_ylabel("relative quality (fidelity, or dense ppl / pruned ppl)")
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_table(records: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(records)
    table = Table(title=title)
    for name in header:
        table.add_column(name, justify="left" if name in ("model", "method", "quality", "status") else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    # a pipe or a log file gets 80 columns by default, which truncates every cell of this table
    Console(width=max(console.width, 150) if not console.is_terminal else None).print(table)


def campaign_description(experiment: str, key: str, records: list[dict]) -> str:
    """The campaign run's description in MLflow: what it is, and its table."""
    done = sum(r.get("status") == "FINISHED" for r in records)
    head = f"**{experiment}**, campaign {key}: {done} of {len(records)} units finished. Relative quality is the pruned model's " \
           "quality over the dense model's on the same text (fidelity; or dense perplexity / pruned perplexity).\n\n"
    table = to_markdown(records)
    return head + (table if len(head) + len(table) <= 7900 else "(the table is too long for a description: see summary.md)\n")


def write_summary(records: list[dict], folder: Path) -> dict[str, Path]:
    """summary.csv, summary.md and quality_vs_macs.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "summary.csv", "md": folder / "summary.md", "plot": folder / "quality_vs_macs.png"}
    paths["csv"].write_text(to_csv(records))
    paths["md"].write_text(to_markdown(records))
    plot(records, paths["plot"])
    return paths
