"""Scoring methods: one module each, all behind one signature.

A method maps (weights of one site, statistics of that site, rng) to one score per unit; a higher
score means more important. The global search compares scores across layers and between heads and
neurons, so scores must be comparable there: gfp, gfp-d2 and fluctuation estimate the energy that
removing the unit takes out of the block output; magnitude and random are additive over the unit's
weights (squared norm; a random value times the weight count), so a head weighs as much as the
neurons of the same size. gfp-r2 alone is only comparable within a layer (use it with uniform
allocation; the benchmark shows what happens globally).

llm-surgeon is not a score function: it needs curvature on the partly pruned model in every shot
and writes its own weights (`surgeon.py`, run by `pipeline.plan_llm_surgeon` and the farm).
cofi and flop are not either: they train hard-concrete gates with the weights (`cofi.py`,
`flop.py`, `trained.py`; run under Ray Train by `train_ray.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..choices import SCORE_METHODS
from ..models import UnitWeights
from ..stats import GramStats
from .baselines import fluctuation_scores, magnitude_scores, random_scores
from .gfp import gfp_d2_scores, gfp_r2_scores, gfp_scores

ScoreFn = Callable[[UnitWeights, GramStats, torch.Generator], torch.Tensor]

METHODS: dict[str, ScoreFn] = {
    "gfp": gfp_scores,
    "gfp-r2": gfp_r2_scores,
    "gfp-d2": gfp_d2_scores,
    "fluctuation": fluctuation_scores,
    "magnitude": magnitude_scores,
    "random": random_scores,
}

assert tuple(METHODS) == SCORE_METHODS, "choices.SCORE_METHODS names exactly the score functions"


def get_method(name: str) -> ScoreFn:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "METHOD_NAMES", "SURGEON", "TRAINED_METHODS", "ScoreFn", "get_method"]
