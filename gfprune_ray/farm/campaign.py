"""A campaign: which models, which budgets and methods, which data, which options.

It comes from a models file plus command-line options, or from one YAML file; either way it is
validated by one pydantic schema before any work starts, and a malformed line of a models file is
reported as `file:line: reason`. A campaign expands into units, one per (model, method, budget),
each with a deterministic key of everything that changes its result: the key is what lets a
rerun find and skip finished units.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError, model_validator

# none of these imports torch, Ray or MLflow: a bad campaign fails at once (tests/test_sweep_cli.py)
from ..choices import (
    ALLOCATIONS,
    CHECKPOINT_EVERY,
    DTYPES,
    METHOD_NAMES,
    PACKAGED_PREFIX,
    RECONSTRUCTIONS,
    SHOT_STEP,
    STEPS_CPU,
    SURGEON,
    TRAINED_METHODS,
    looks_like_path,
    parse_memory,
)
from ..errors import UserError, first_line
from ..latency import LatencySettings
from ..packaged import cache_root
from ..storage import Location, RemoteFolder, location

# a local folder as an absolute path (tasks on other nodes resolve a relative one against their
# own working directory), or object storage given by its URI (storage.py)
OutLocation = Annotated[Location, PlainValidator(location), PlainSerializer(str)]

TASKS = ("auto", "embedding", "lm", "classification")
DEFAULT_BUDGETS = (0.9, 0.8, 0.7, 0.6)
# keys a models-file line may override, spelled as on the command line -> schema field
LINE_KEYS = {"budgets": "budgets", "method": "methods", "seq-len": "seq_len", "task": "task", "dtype": "dtype"}


def _one_of(allowed, what: str):
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(allowed)}")
        return value

    return AfterValidator(check)


Budget = Annotated[float, Field(gt=0, le=1, description="fraction of prunable MACs kept")]
Method = Annotated[str, _one_of(METHOD_NAMES, "method")]
Positive = Annotated[int, Field(ge=1)]
Dtype = Annotated[str, _one_of(DTYPES, "dtype")]
# evaluation corpora: a list, or one comma-separated string as on the command line
Sources = Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(lambda v: [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v)]


def _distinct(values: list) -> list:
    if len(set(values)) < len(values):
        raise ValueError(f"each value once, got {values}")
    return values


class ModelEntry(BaseModel):
    """One model of a campaign, with its optional overrides of the campaign-wide settings."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1)
    budgets: list[Budget] | None = Field(None, min_length=1)
    methods: list[Method] | None = Field(None, min_length=1)
    seq_len: Positive | None = None
    task: Literal[TASKS] = "auto"  # type: ignore[valid-type]
    dtype: Dtype | None = None

    @property
    def name(self) -> str:
        """A short, path-safe name: a local folder's name, or the hub id with / as --."""
        if Path(self.source).is_absolute():
            return Path(self.source).name
        return self.source.removeprefix(PACKAGED_PREFIX).replace("/", "--").replace(":", "-").lstrip(".-") or "model"


class Campaign(BaseModel):
    """Everything a sweep needs; field names are the YAML keys and the CLI flags (with dashes)."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry] = Field(min_length=1)
    experiment: str = Field("gfprune", min_length=1)
    budgets: list[Budget] = Field(list(DEFAULT_BUDGETS), min_length=1)
    methods: list[Method] = Field(["gfp"], min_length=1)
    data: str = "pydoc"
    eval_data: Sources = []  # measured besides the calibration data; not part of a unit's key (README)
    samples: Annotated[int, Field(ge=2)] = 256
    eval_samples: Positive = 256
    seq_len: Positive = 128
    batch_size: Positive = 32
    seed: Annotated[int, Field(ge=0)] = 0
    self_texts: Annotated[int | None, Field(ge=0)] = None  # causal LMs: texts each writes for its calibration; None: samples // 4
    reconstruction: Annotated[str, _one_of(RECONSTRUCTIONS, "reconstruction")] = "full"
    allocation: Annotated[str, _one_of(ALLOCATIONS, "allocation")] = "global"
    workers: Positive = 1
    out: Annotated[OutLocation, Field(validate_default=True)] = Path("runs/sweep")
    save_models: bool = True
    register_model: str | None = Field(None, min_length=1)  # --register: MLflow registered model that every saved pruned model becomes a version of
    cache_dir: Path | None = None
    address: str | None = None
    tracking_uri: str | None = None
    latency_repeats: Annotated[int, Field(ge=0)] = LatencySettings.repeats  # 0: no latency measured
    latency_batch_sizes: Annotated[list[Positive], AfterValidator(_distinct)] = Field(list(LatencySettings.batch_sizes), min_length=1)
    latency_seq_len: Positive = LatencySettings.seq_len  # capped at each model's positions
    latency_threads: Positive = LatencySettings.threads
    shot_step: Annotated[float, Field(gt=0, le=1)] = SHOT_STEP  # llm-surgeon: the most of the prunable MACs one shot removes
    steps: Positive = STEPS_CPU  # cofi, flop: training steps per unit
    checkpoint_every: Positive = CHECKPOINT_EVERY  # cofi, flop: steps between checkpoints
    # bytes of statistics one collection actor holds in a pass ('6GB', '512MB'); None: from the nodes
    stats_memory: Annotated[int | None, BeforeValidator(lambda v: parse_memory(str(v)) if v is not None else None)] = None
    dtype: Dtype | None = None  # the models' dtype (a models-file line may override it); None: each checkpoint's own

    @model_validator(mode="after")
    def _dtype_applies(self) -> Campaign:
        """cofi and flop train in the checkpoint's dtype, as `prune` says: a dtype asked for a
        model they run on is refused before any work, not ignored."""
        for entry in self.models:
            trained = [m for m in (entry.methods or self.methods) if m in TRAINED_METHODS]
            if self.dtype_of(entry) and trained:
                raise ValueError(f"dtype does not apply to {', '.join(trained)} ({entry.source}): they train in the checkpoint's dtype")
        return self

    def latency(self) -> LatencySettings:
        """How units are timed (before capping at a model's positions)."""
        return LatencySettings(self.latency_repeats, tuple(self.latency_batch_sizes), self.latency_seq_len, self.latency_threads)

    def reconstruction_of(self, method: str) -> str:
        """llm-surgeon writes its own weights (correlated updates), cofi and flop train theirs; the
        others use `reconstruction`."""
        if method == SURGEON:
            return "correlated"
        return "trained" if method in TRAINED_METHODS else self.reconstruction

    def method_options(self, method: str) -> dict:
        """Options that change only this method's results (self_texts only when given: the keys of
        campaigns from before it existed stay the same)."""
        if method in TRAINED_METHODS:
            return {"steps": self.steps}
        own = {} if self.self_texts is None else {"self_texts": self.self_texts}
        return own | ({"shot_step": self.shot_step} if method == SURGEON else {})

    def names(self) -> list[str]:
        """One distinct name per model entry (a repeated name gets -2, -3, ...)."""
        counts: dict[str, int] = {}
        out = []
        for entry in self.models:
            counts[entry.name] = counts.get(entry.name, 0) + 1
            out.append(entry.name if counts[entry.name] == 1 else f"{entry.name}-{counts[entry.name]}")
        return out

    def units(self) -> list[Unit]:
        """Every (model, method, budget) of the campaign, in a stable order, duplicates dropped."""
        seen, out = set(), []
        for entry, name in zip(self.models, self.names()):
            for method in entry.methods or self.methods:
                for budget in entry.budgets or self.budgets:
                    unit = Unit(entry, name, method, float(budget), self)
                    if unit.key not in seen:
                        seen.add(unit.key)
                        out.append(unit)
        return out

    def seq_len_of(self, entry: ModelEntry) -> int:
        return entry.seq_len or self.seq_len

    def dtype_of(self, entry: ModelEntry) -> str | None:
        return entry.dtype or self.dtype

    def model_options(self, entry: ModelEntry) -> dict:
        """Options that change only this model's results, where given: a unit's key and its
        recorded options both take them, so campaigns that never gave one keep their keys."""
        dtype = self.dtype_of(entry)
        return {"dtype": dtype} if dtype else {}

    @property
    def key(self) -> str:
        """A campaign lives in its MLflow experiment: rerunning into the same experiment resumes
        it, and a campaign grown by models or budgets runs only its new units."""
        return _digest({"experiment": self.experiment})

    def stats_dir(self) -> Path:
        """The statistics cache, absolute: per-site tasks write it from their own directories."""
        base = self.cache_dir if self.cache_dir is not None else cache_root() / "stats"
        return base.expanduser().absolute()


class Unit:
    """One (model, method, budget) of a campaign: the unit of work, of resume and of an MLflow run."""

    def __init__(self, entry: ModelEntry, name: str, method: str, budget: float, campaign: Campaign):
        self.entry, self.name, self.method, self.budget = entry, name, method, budget
        self.key = _digest({
            "model": entry.source,
            "method": method,
            "budget": budget,
            "task": entry.task,
            "seq_len": campaign.seq_len_of(entry),
            "reconstruction": campaign.reconstruction_of(method),
            **{k: getattr(campaign, k) for k in ("data", "samples", "eval_samples", "seed", "allocation")},
            **campaign.method_options(method),
            **campaign.model_options(entry),
        })

    @property
    def label(self) -> str:
        return f"{self.name}/{self.method}-{self.budget:g}"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _validation_message(where: str, exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {field}: {message}" if field else f"{where}: {message}"


# ---- models files --------------------------------------------------------------------------


def _resolve_source(source: str, base: Path, where: str) -> str:
    """Local folders are taken relative to the models file; hub ids and pkg: names stay as they are."""
    if source.startswith(PACKAGED_PREFIX):
        return source
    path = (base / Path(source).expanduser()).resolve()
    if path.exists():
        return str(path)
    if looks_like_path(source):
        raise UserError(f"{where}: model folder not found: {source}")
    return source


def parse_model_line(line: str, base: Path, where: str) -> ModelEntry | None:
    """One models-file line -> ModelEntry; None for comments and blank lines."""
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    try:
        source, *pairs = shlex.split(line)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None
    fields: dict = {"source": _resolve_source(source, base, where)}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value:
            raise UserError(f"{where}: expected key=value after the model, got {pair!r}")
        if key not in LINE_KEYS:
            raise UserError(f"{where}: unknown key {key!r}; known: {', '.join(LINE_KEYS)}")
        fields[LINE_KEYS[key]] = value.split(",") if key in ("budgets", "method") else value
    try:
        return ModelEntry(**fields)
    except ValidationError as exc:
        raise UserError(_validation_message(where, exc)) from None


def read_models_file(path: str | Path) -> list[ModelEntry]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"models file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    entries = [parse_model_line(line, path.parent, f"{path}:{n}") for n, line in enumerate(lines, 1)]
    entries = [e for e in entries if e is not None]
    if not entries:
        raise UserError(f"{path}: no models (one model per line; # starts a comment)")
    return entries


# ---- building a campaign -------------------------------------------------------------------


def _models_from_yaml(value, base: Path, where: str) -> list:
    """`models:` of a YAML campaign: a models file, or a list of models-file lines or mappings."""
    if isinstance(value, str):
        return read_models_file(base / value)
    if not isinstance(value, list):
        return value  # the schema reports it
    out = []
    for n, item in enumerate(value):
        if isinstance(item, str):
            entry = parse_model_line(item, base, f"{where}: models[{n}]")
            if entry is not None:
                out.append(entry)
        else:
            if isinstance(item, dict) and isinstance(item.get("source"), str):
                item = item | {"source": _resolve_source(item["source"], base, f"{where}: models[{n}]")}
            out.append(item)
    return out


def load_campaign(config: Path | None = None, models: Path | None = None, **options) -> Campaign:
    """A validated campaign from a YAML file and/or a models file; options that are not None
    override what the YAML file says."""
    fields: dict = {}
    where = "command line"
    if config is not None:
        config = Path(config)
        where = str(config)
        try:
            loaded = yaml.safe_load(config.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"campaign file not found: {config}") from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UserError(f"{config}: not valid YAML ({first_line(exc)})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{config}: expected a mapping of campaign settings")
        fields = dict(loaded)
        if "models" in fields:
            fields["models"] = _models_from_yaml(fields["models"], config.parent, where)
        for key in ("out", "cache_dir"):  # paths in the file are relative to the file
            if isinstance(fields.get(key), str) and not isinstance(location(fields[key]), RemoteFolder):
                fields[key] = config.parent / fields[key]
    if models is not None:
        fields["models"] = read_models_file(models)
    fields.update({k: v for k, v in options.items() if v is not None})
    if "models" not in fields:
        raise UserError("no models: pass --models FILE or --config CAMPAIGN.yaml")
    try:
        return Campaign(**fields)
    except ValidationError as exc:
        raise UserError(_validation_message(where, exc)) from None
