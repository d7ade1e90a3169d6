"""The options of one prune, checked before anything heavy is imported.

Like choices.py this imports no torch, Ray, MLflow or transformers: `gfprune-ray prune` with a bad
option or a missing data file answers in a fraction of a second instead of after seconds of imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .choices import ALLOCATIONS, CHECKPOINT_EVERY, DTYPES, METHOD_NAMES, RECONSTRUCTIONS, SHOT_STEP, STEPS_CPU, TRAINED_METHODS, check_budget, check_shot_step
from .errors import UserError
from .latency import LatencySettings


@dataclass
class PruneOptions:
    """The options of one prune (`gfprune-ray prune`, `eval`); see the command's --help."""

    budget: float = 0.6
    method: str = "gfp"
    reconstruction: str = "full"
    allocation: str = "global"
    samples: int = 256
    eval_samples: int = 256
    seq_len: int = 128
    batch_size: int = 32
    seed: int = 0
    latency_repeats: int = 5
    shot_step: float = SHOT_STEP  # llm-surgeon only: the most of the prunable MACs one shot removes
    steps: int = STEPS_CPU  # cofi and flop only: training steps
    checkpoint_every: int = CHECKPOINT_EVERY  # cofi and flop only: steps between checkpoints
    dtype: str | None = None  # the model's dtype; None: the checkpoint's own
    stats_memory: int | None = None  # bytes of statistics collected in one pass; None: an eighth of RAM
    latency_batch_sizes: list[int] = field(default_factory=lambda: list(LatencySettings.batch_sizes))
    latency_seq_len: int = LatencySettings.seq_len  # capped at the model's positions
    latency_threads: int = LatencySettings.threads
    self_texts: int | None = None  # texts a causal LM writes itself for its calibration; None: a quarter of samples

    def validate(self) -> PruneOptions:
        try:
            check_budget(self.budget)
            check_shot_step(self.shot_step)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        for name, value, allowed in (
            ("method", self.method, METHOD_NAMES),
            ("reconstruction", self.reconstruction, RECONSTRUCTIONS),
            ("allocation", self.allocation, ALLOCATIONS),
        ):
            if value not in allowed:
                raise UserError(f"unknown {name} {value!r}; choose one of: {', '.join(allowed)}")
        for name in ("samples", "eval_samples", "seq_len", "batch_size", "steps", "checkpoint_every", "latency_seq_len", "latency_threads"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        if self.dtype is not None and self.method in TRAINED_METHODS:
            raise UserError(f"--dtype does not apply to {self.method}: it trains in the checkpoint's dtype")
        if self.self_texts is not None and self.self_texts < 0:
            raise UserError(f"self-texts must be 0 (none) or more, got {self.self_texts}")
        if self.latency_repeats < 0:
            raise UserError(f"latency-repeats must be 0 (no latency) or more, got {self.latency_repeats}")
        if not self.latency_batch_sizes or min(self.latency_batch_sizes) < 1 or len(set(self.latency_batch_sizes)) < len(self.latency_batch_sizes):
            raise UserError(f"latency-batch-sizes must be one or more different sizes of at least 1, got {self.latency_batch_sizes}")
        return self

    def self_text_count(self) -> int:
        return self_text_count(self.samples, self.self_texts)

    def latency(self, max_positions: int | None) -> LatencySettings:
        """How to time a model with `max_positions` positions (None: unbounded)."""
        return LatencySettings(self.latency_repeats, tuple(self.latency_batch_sizes), self.latency_seq_len, self.latency_threads).within(max_positions)


def self_text_count(samples: int, self_texts: int | None) -> int:
    """How many texts a causal LM writes for its own calibration: `self_texts`, by default a
    quarter of the calibration examples (README, "Text the model writes itself")."""
    return samples // 4 if self_texts is None else self_texts


def saved_options(record: dict, overrides: dict) -> tuple[PruneOptions, str, list[str]]:
    """(options, data, eval_data) to measure a saved run again: as recorded at pruning time (so
    the evaluation examples are the held-back ones), each replaced by an `overrides` value that is
    not None. Options a record names that PruneOptions no longer has are ignored."""
    recorded = {k: v for k, v in record.get("options", {}).items() if k in PruneOptions.__dataclass_fields__}
    settings = {"data": record.get("data", "pydoc"), "eval_data": record.get("eval_data", [])} | recorded
    settings |= {k: v for k, v in overrides.items() if v is not None}
    data, eval_data = settings.pop("data"), settings.pop("eval_data")
    return PruneOptions(**settings).validate(), data, eval_data
