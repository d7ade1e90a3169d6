"""What the training-based methods (CoFi, FLOP) have in common at the level of a whole unit:
build the student (which trains and cuts itself: `GatedStudent.finish`), say what was kept."""

from __future__ import annotations

from ..choices import COFI, FLOP, TRAINED_METHODS
from ..flops import kept_prunable_macs, prunable_macs
from ..models import Adapter
from ..training import GatedStudent
from .cofi import CoFiStudent
from .flop import FlopStudent

# Training steps (choices.STEPS_CPU on a CPU). GPU: the papers train for epochs (CoFi: 20 epochs
# with distillation on GLUE tasks); at batch 32 that is on the order of 10,000 steps, the default
# to use with --steps on a GPU cluster.
STEPS_GPU = 10_000


def student_for(method: str, adapter: Adapter, seq_len: float) -> GatedStudent:
    if method == COFI:
        return CoFiStudent(adapter, seq_len)
    if method == FLOP:
        return FlopStudent(adapter, seq_len)
    raise ValueError(f"{method!r} is not a training-based method; those are: {', '.join(TRAINED_METHODS)}")


def kept_fraction(adapter: Adapter, dense_geoms, seq_len: float) -> float:
    """Prunable MACs the cut model keeps, over the dense model's."""
    return kept_prunable_macs(adapter, seq_len) / prunable_macs(dense_geoms, seq_len)
