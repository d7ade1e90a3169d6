"""The latency of a pruned model beside its dense source, measured so that their ratio can be trusted.

A speedup is a ratio of two timings, and other work on the machine can bend either. Measured on
this project's 2-core machine (MiniLM against its cut to budget 0.6, 7 rounds per case): two torch
threads beside a 2-thread matrix-multiply loop made both models 22x slower, their per-round
ratios agreed within 1%, and the median speedup read 1.11 against 1.49 on the quiet machine: a
steady, wrong number that no spread can catch. What told it apart was CPU time: the process got
half the CPU seconds its threads' wall time allows. So a measurement here

- pins torch's threads (one by default: the same in `prune` and in the farm's one-CPU tasks);
- lets dense and pruned take turns on the same input, so drift hits both alike;
- goes on past the asked rounds while their speedups spread widely, up to EXTRA_TIME times
  the asked rounds' time, unless the machine is busy (more rounds cure jitter, not that bias);
- reports the CPU share the process got and the cores other work kept busy meanwhile, and says
  when its speedup cannot be trusted instead of printing it plainly.

torch is imported where it is used: the report and the CLI read `doubt` without it.
"""

from __future__ import annotations

import os
import re
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

SPREAD_LIMIT = 0.1  # interquartile range of the per-round speedups over their median
MIN_CPU_SHARE = 0.9  # CPU seconds over wall seconds x threads; quiet machines measured 0.99-1.0
EXTRA_TIME = 3.0  # a spread-out measurement goes on for at most this many times its asked rounds' time
MIN_WALL_FOR_LOAD = 0.5  # seconds of timing below which the other work's load is not told


@dataclass(frozen=True)
class LatencySettings:
    """What a measurement times: `repeats` rounds per batch size (0: no latency), at `seq_len`
    tokens (the length MACs are counted at as well), on `threads` torch threads."""

    repeats: int = 5
    batch_sizes: tuple[int, ...] = (1, 32)
    seq_len: int = 128
    threads: int = 1

    def within(self, max_positions: int | None) -> LatencySettings:
        """The same, at no more tokens than a model has positions for."""
        return replace(self, seq_len=min(self.seq_len, max_positions or self.seq_len))


@dataclass
class LoadReading:
    cpu_share: float  # CPU seconds the process got over wall seconds x threads
    other_cpus: float | None  # cores other work kept busy meanwhile (None where /proc/stat does not say)
    busy: bool  # the process was starved, or other work used a quarter of the cores (at least half a core)


@dataclass
class Latency:
    dense_s: float  # median wall time of one forward pass
    pruned_s: float
    rounds: int  # timed passes of each model
    spread: float  # interquartile range of the per-round speedups over their median; NaN below 3 rounds
    load: LoadReading  # over all the timed rounds

    def metrics(self, batch: int, ideal_speedup: float) -> dict:
        """MLflow-ready numbers, named for the batch size."""
        speedup = self.dense_s / self.pruned_s
        out = {
            f"latency_b{batch}_dense_s": self.dense_s,
            f"latency_b{batch}_s": self.pruned_s,
            f"speedup_b{batch}": speedup,
            f"speedup_b{batch}_vs_ideal": speedup / ideal_speedup,
            f"latency_b{batch}_rounds": float(self.rounds),
            f"latency_b{batch}_cpu_share": self.load.cpu_share,
            f"latency_b{batch}_busy": float(self.load.busy),
        }
        if self.spread == self.spread:  # not NaN: enough rounds to tell
            out[f"speedup_b{batch}_spread"] = self.spread
        if self.load.other_cpus is not None:
            out[f"latency_b{batch}_other_cpus"] = self.load.other_cpus
        out[f"speedup_b{batch}_trusted"] = float(doubt(out, batch) is None)
        return out


def _recorded(metrics: dict, key: str) -> float | None:
    try:
        value = float(metrics[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if value == value else None


SPEEDUP = re.compile(r"speedup_b(\d+)$")


def timed_batches(metrics: dict) -> list[int]:
    """The batch sizes a unit's metrics have a speedup for, smallest first."""
    return sorted(int(m.group(1)) for key in metrics if (m := SPEEDUP.match(key)) and _recorded(metrics, key) is not None)


def doubt(metrics: dict, batch: int) -> str | None:
    """Why the speedup at `batch` in a unit's metrics cannot be trusted ('few runs', 'busy machine',
    'noisy'), or None. Reads recorded values (numbers or MLflow's strings); a record from before
    the CPU share was measured is judged by its spread alone."""
    spread = _recorded(metrics, f"speedup_b{batch}_spread")
    if spread is None:
        return "few runs"
    if _recorded(metrics, f"latency_b{batch}_busy"):
        return "busy machine"
    return "noisy" if spread > SPREAD_LIMIT else None


def explain(metrics: dict, batch: int) -> str | None:
    """`doubt` as a sentence with its numbers, or None."""
    reason = doubt(metrics, batch)
    if reason is None:
        return None
    if reason == "few runs":
        return f"the speedup at batch {batch} rests on fewer than 3 timed passes: no spread can be told"
    spread = _recorded(metrics, f"speedup_b{batch}_spread")
    if reason == "noisy":
        return f"the speedup at batch {batch} varied by {spread:.0%} between passes (interquartile range over median)"
    share, other = _recorded(metrics, f"latency_b{batch}_cpu_share"), _recorded(metrics, f"latency_b{batch}_other_cpus")
    got = [] if share is None else [f"this process got {share:.0%} of its threads' time"]
    got += [] if other is None else [f"other work kept {other:.1f} cores busy"]
    return f"the machine was busy while batch {batch} was timed ({', '.join(got) or 'as recorded'})"


def _spread(ratios: list[float]) -> float:
    if len(ratios) < 3:
        return float("nan")
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return (q3 - q1) / statistics.median(ratios)


def available_cpus() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def busy_cpu_seconds(cpus: set[int]) -> float | None:
    """Seconds the given CPUs have spent on any work since boot (Linux's /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            lines = [line.split() for line in stat if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return None
    ticks, seen = 0, set()
    for name, *fields in lines:
        if int(name[3:]) in cpus:
            values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            ticks += sum(values) - values[3] - values[4]
            seen.add(int(name[3:]))
    if seen != cpus:  # a view of /proc/stat that numbers CPUs otherwise (some containers): no reading
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


class _Load:
    """What the machine gave this process, and what other work took, since it was made."""

    def __init__(self, cpus: set[int], threads: int):
        self.cpus, self.threads = cpus, threads
        self.machine, self.cpu, self.start = busy_cpu_seconds(cpus), time.process_time(), time.perf_counter()

    def wall(self) -> float:
        return time.perf_counter() - self.start

    def read(self) -> LoadReading:
        wall, cpu, machine = self.wall(), time.process_time() - self.cpu, busy_cpu_seconds(self.cpus)
        share = cpu / (wall * self.threads)
        other = None  # /proc/stat counts in ticks of 10 ms: too coarse to tell under half a second
        if self.machine is not None and machine is not None and wall >= MIN_WALL_FOR_LOAD:
            other = max(0.0, (machine - self.machine - cpu) / wall)
        busy = share < MIN_CPU_SHARE or (other is not None and other > max(0.5, len(self.cpus) / 4))
        return LoadReading(share, other, busy)


@contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def paired_latency(dense, pruned, batch_size: int, seq_len: int, repeats: int = 5, threads: int = 1) -> Latency:
    """Time `repeats` (or more, while their speedups spread widely) forward passes of each model
    on the same random tokens, taking turns after one warm-up pass each. `threads` should not
    exceed `available_cpus()`: threads that wait for each other read as a busy machine."""
    import torch

    ids = torch.randint(3, dense.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    times: dict[int, list[float]] = {id(dense): [], id(pruned): []}
    with pinned_threads(threads), torch.inference_mode():
        for model in (dense, pruned):
            model(input_ids=ids, attention_mask=mask)
        load = _Load(available_cpus(), threads)
        deadline = float("inf")
        while True:
            for model in (dense, pruned):
                begin = time.perf_counter()
                model(input_ids=ids, attention_mask=mask)
                times[id(model)].append(time.perf_counter() - begin)
            dense_t, pruned_t = times[id(dense)], times[id(pruned)]
            if len(dense_t) == repeats:
                deadline = time.perf_counter() + load.wall() * EXTRA_TIME
            spread = _spread([d / p for d, p in zip(dense_t, pruned_t)])
            # more rounds help a quiet machine's jitter, not a busy machine's bias: stop there
            noisy = spread > SPREAD_LIMIT and time.perf_counter() < deadline and not load.read().busy
            if len(dense_t) >= repeats and not noisy:
                break
        reading = load.read()
    return Latency(statistics.median(dense_t), statistics.median(pruned_t), len(dense_t), spread, reading)
