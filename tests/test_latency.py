"""Latency that can be trusted: paired timing, more rounds while noisy, a busy machine told apart."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import time

import torch

from conftest import tiny_model
from gfprune_ray.latency import EXTRA_TIME, MIN_CPU_SHARE, SPREAD_LIMIT, LatencySettings, doubt, explain, paired_latency, timed_batches


class Delayed(torch.nn.Module):
    """A real model whose forward pass first spins for the next of `delays` seconds (on the CPU,
    as a model's work would): a machine whose speed jumps between passes, with the jumps known."""

    def __init__(self, model: torch.nn.Module, delays):
        super().__init__()
        self.model, self.config, self.delays = model, model.config, itertools.cycle(delays)

    def forward(self, **batch):
        end = time.perf_counter() + next(self.delays)
        while time.perf_counter() < end:
            pass
        return self.model(**batch)


def test_paired_latency_times_both_models_on_the_same_input():
    small = tiny_model("bert")
    big = type(small)(small.config.__class__(**{**small.config.to_dict(), "num_hidden_layers": 8})).eval()
    timed = paired_latency(big, small, batch_size=4, seq_len=32, repeats=5)
    assert timed.dense_s > timed.pruned_s > 0  # four times the layers is slower, even on a noisy machine
    assert timed.rounds >= 5 and 0 <= timed.spread < 10
    assert 0 < timed.load.cpu_share < 1.5
    few = paired_latency(big, small, batch_size=4, seq_len=32, repeats=2)
    assert few.rounds == 2 and math.isnan(few.spread), "two rounds tell no spread, and no more are added"


def test_threads_are_pinned_for_the_measurement_and_given_back():
    model = tiny_model("bert")
    before = torch.get_num_threads()
    seen = []
    probe = Delayed(model, [0.0])
    probe.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    paired_latency(probe, model, batch_size=2, seq_len=8, repeats=3, threads=1)
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_a_steady_pair_stops_at_the_asked_rounds_and_a_jumpy_one_goes_on_to_its_time_cap():
    model = tiny_model("bert")
    steady = paired_latency(Delayed(model, [0.02]), Delayed(model, [0.02]), batch_size=1, seq_len=8, repeats=5)
    assert steady.rounds == 5 and (steady.spread <= SPREAD_LIMIT or steady.load.busy), steady
    start = time.perf_counter()
    jumpy = paired_latency(Delayed(model, [0.01]), Delayed(model, [0.001, 0.04]), batch_size=1, seq_len=8, repeats=5)
    spent = time.perf_counter() - start
    assert jumpy.spread > SPREAD_LIMIT and spent < 3.0
    # the cap lets the rounds go on for EXTRA_TIME times the first five rounds' time; those hold
    # three slow passes of the pruned model and two fast ones, later rounds half of each
    assert 5 <= jumpy.rounds <= 2 * (1 + EXTRA_TIME) * 5, jumpy
    if jumpy.load.busy:  # other work on the machine (seen once half a second is timed): extra rounds stop
        assert doubt(jumpy.metrics(1, 1.0), 1) == "busy machine"
    else:
        assert jumpy.rounds >= 2 * 5 and doubt(jumpy.metrics(1, 1.0), 1) == "noisy", jumpy


def _spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_a_machine_busy_with_other_work_is_flagged_even_when_the_rounds_agree():
    """Twice as many busy processes as cores: this process gets well under its threads' time,
    which is what bends a speedup on a loaded machine while its rounds still agree (latency.py)."""
    small = tiny_model("bert")
    big = type(small)(small.config.__class__(**{**small.config.to_dict(), "num_hidden_layers": 4})).eval()
    spinners = _spinners(2 * (os.cpu_count() or 1))
    try:
        time.sleep(0.3)
        timed = paired_latency(big, small, batch_size=8, seq_len=32, repeats=30)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert timed.load.cpu_share < MIN_CPU_SHARE and timed.load.busy, timed
    metrics = timed.metrics(8, 2.0)
    assert metrics["latency_b8_busy"] == 1.0 and metrics["speedup_b8_trusted"] == 0.0
    assert doubt(metrics, 8) == "busy machine" and "busy" in explain(metrics, 8)


def test_doubt_reads_recorded_metrics_as_mlflow_gives_them():
    quiet = {"speedup_b32": "1.4", "speedup_b32_spread": "0.03", "latency_b32_busy": "0.0", "latency_b32_cpu_share": "0.99"}
    assert doubt(quiet, 32) is None and explain(quiet, 32) is None
    assert doubt(quiet | {"speedup_b32_spread": "0.25"}, 32) == "noisy"
    assert doubt(quiet | {"latency_b32_busy": "1.0"}, 32) == "busy machine"
    assert "62%" in explain(quiet | {"latency_b32_busy": 1.0, "latency_b32_cpu_share": 0.62}, 32)
    assert doubt({"speedup_b32": 1.4}, 32) == "few runs"
    assert doubt({"speedup_b32": 1.4, "speedup_b32_spread": 0.02}, 32) is None, "a record from before the CPU share: its spread decides"
    assert timed_batches({"speedup_b32": 1.0, "speedup_b1": 2.0, "speedup_b32_vs_ideal": 0.9, "speedup_b8": None}) == [1, 32]


def test_settings_stay_within_a_models_positions():
    assert LatencySettings(seq_len=128).within(64).seq_len == 64
    assert LatencySettings(seq_len=128).within(None).seq_len == 128
    assert LatencySettings(seq_len=32).within(512).seq_len == 32


def test_no_more_threads_than_the_process_has_cpus():
    """Threads beyond the CPUs wait for each other and would read as a busy machine."""
    from gfprune_ray.evaluate import efficiency
    from gfprune_ray.latency import available_cpus
    from gfprune_ray.models import adapter_for

    small = tiny_model("bert")
    big = type(small)(small.config.__class__(**{**small.config.to_dict(), "num_hidden_layers": 4})).eval()
    result = efficiency(adapter_for(big), adapter_for(small), LatencySettings(repeats=1, batch_sizes=(2,), seq_len=8, threads=len(available_cpus()) + 3))
    assert result["latency_threads"] == len(available_cpus()) and result["latency_b2_s"] > 0
