"""Rich progress bars and tables for the command line (quiet when not on a terminal)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console(stderr=True)


def warn(message: str) -> None:
    """One line on stderr, above any live progress display: something the user should know."""
    console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


@contextmanager
def bar(description: str, total: int) -> Iterator:
    """A progress bar; yields a function to call once per finished step."""
    progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False)
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda *_: progress.advance(task)


def table(title: str, rows: list[tuple[str, str]]) -> None:
    t = Table(title=title, show_header=False)
    t.add_column("metric", style="bold")
    t.add_column("value", justify="right")
    for name, value in rows:
        t.add_row(name, value)
    Console().print(t)


STAGES = ("collect", "score", "search", "reconstruct", "train", "evaluate")


class StageProgress:
    """One display with a bar per farm stage across all models; totals grow as work is submitted."""

    def __init__(self, stages: tuple[str, ...] = STAGES):
        self.progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)
        self.tasks = {s: self.progress.add_task(s, total=0) for s in stages}

    def __enter__(self) -> StageProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def add(self, stage: str, n: int) -> None:
        task = self.tasks[stage]
        self.progress.update(task, total=self.progress.tasks[task].total + n)

    def set_done(self, stage: str, done: int) -> None:
        task = self.tasks[stage]
        self.progress.update(task, completed=min(done, self.progress.tasks[task].total))
