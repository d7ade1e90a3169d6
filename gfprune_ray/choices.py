"""What a user may choose on the command line, in a models file or a campaign YAML, and the defaults.

Only names, numbers and string checks: no torch, Ray, MLflow or transformers, so that a command
refuses bad input in a fraction of a second instead of after seconds of imports (the campaign
schema validates against these before the farm is imported). The modules that implement a choice
take its name from here.
"""

from __future__ import annotations

from .errors import UserError

SCORE_METHODS: tuple[str, ...] = ("gfp", "gfp-r2", "gfp-d2", "fluctuation", "magnitude", "random")
SURGEON = "llm-surgeon"
COFI = "cofi"
FLOP = "flop"
TRAINED_METHODS: tuple[str, ...] = (COFI, FLOP)
METHOD_NAMES: tuple[str, ...] = (*SCORE_METHODS, SURGEON, *TRAINED_METHODS)

RECONSTRUCTIONS: tuple[str, ...] = ("full", "scale", "none")
ALLOCATIONS: tuple[str, ...] = ("global", "uniform")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")

# llm-surgeon: a shot removes at most this fraction of the prunable MACs (budget 0.5: 5 shots); each
# shot costs one forward and backward pass over the calibration text
SHOT_STEP = 0.1
STEPS_CPU = 200  # cofi, flop: a small model trains on a CPU in minutes (README)
CHECKPOINT_EVERY = 50  # cofi, flop: a killed run loses at most this many steps

PACKAGED_PREFIX = "pkg:"


def check_budget(budget: float) -> float:
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget {budget} is outside (0, 1]: it is the fraction of prunable MACs kept")
    return budget


def check_shot_step(step: float) -> float:
    if not 0.0 < step <= 1.0:
        raise ValueError(f"shot-step must be in (0, 1], got {step}: it is the most of the prunable MACs one llm-surgeon shot removes")
    return step


def looks_like_path(source: str) -> bool:
    """A model source that can only mean a local folder (a hub id has at most one slash)."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def parse_memory(text: str) -> int:
    """'6GB', '512MB', '2.5GiB' or a number of bytes -> bytes; a one-line error otherwise."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number):]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise UserError(f"--stats-memory: {text!r} is not a size (e.g. 6GB, 512MB)") from None
    if value < 1:
        raise UserError(f"--stats-memory: {text!r} must be positive")
    return int(value)
