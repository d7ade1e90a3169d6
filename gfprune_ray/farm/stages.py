"""The farm's Ray stages: each one a remote call around a pure function of the core.

    describe (task)          load the model once: fingerprint, geometry, per-site weights
    Collector (actors)       each holds the model and sums statistics over one shard of the text
                             (or LLM Surgeon's curvature: see surgeon_shots.py)
    add_pair (tasks)         a tree of additions reduces the shards' statistics, per site
    score_site (tasks)       one per (model, method, site)
    search (task)            one per (model, method, budget): masks under the MACs budget
    reconstruct_site (tasks) one per (model, method, budget, site): new output weights
    reference (task)         one per model: what the dense model scores on each evaluation corpus
    evaluate_unit (task)     one per (model, method, budget): cut, measure, write the pruned model
                             to its folder under OUT (storage every node sees on a cluster, or
                             object storage: storage.py)

Arguments are object refs wherever a stage consumes another's output, so statistics and weights
move between workers through the object store, not through the driver; pruned models go from the
task that builds them straight to their storage, and only their folder's path reaches the driver. Every
stage returns a `Timed` value so the driver can record how long each piece of work took where it
ran.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import ray
import torch

from ..curvature import collect_curvature
from ..errors import UserError, first_line
from ..evaluate import CorpusReferences, dense_counts, efficiency
from ..latency import LatencySettings
from ..memory import release_memory
from ..methods import get_method
from ..methods.surgeon import SurgeonState
from ..models import BlockGeometry, UnitWeights, adapter_for
from ..storage import location, staged_folder
from ..pipeline import site_generator, surgeon_model
from ..reconstruct import reconstruct
from ..search import SEARCHES, Site
from ..self_text import self_texts
from ..stats import GRADS_PART, STATS_MEMORY_SHARE, model_sites, weights_fingerprint
from ..stats_store import DamagedStats, read_site, write_site
from ..surgery import apply_pruning, save_pruned
from .ray_data import iter_torch_batches, shard

# Per-site algebra (scores, least-squares refits, LLM Surgeon's costs and updates) is the farm's
# CPU-heavy fan-out: spread it over the nodes. Left to Ray's default, a burst of short tasks
# queues on the node that submits it while another node's cores stay idle.
PER_SITE = {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
LOCAL_OBJECT_STORE = 1536 * 1024**2  # the default would reserve ~30% of RAM for the object store
RETRIES = 2
CONNECT_TIMEOUT_S = 5.0


class Timed(NamedTuple):
    value: Any
    seconds: float


def check_address(address: str | None = None) -> None:
    """Fail in one line when the Ray cluster at `address` (or RAY_ADDRESS) cannot be reached:
    ray.init would retry for minutes. `auto` and no address are left to ray.init."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UserError(f"Ray address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); is it running? (`ray status` on its head node)") from None


def connect(address: str | None = None) -> None:
    """Attach to the Ray cluster at `address` (or RAY_ADDRESS); else start an embedded one."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray Train's controller looks at its workers every 2 s by default, and a checkpoint or the
    # end of training waits for that look (measured on a tiny CoFi prune with 6 checkpoints:
    # training 35-39 s at 2 s, 27-28 s at 0.2 s). Workers inherit this in an embedded cluster.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if ray.is_initialized():
        return
    common = {"logging_level": logging.WARNING, "log_to_driver": False}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address)
        try:
            ray.init(address=address, **common)  # a real cluster keeps whatever auth it is set up with
        except Exception as exc:  # noqa: BLE001 - ray.init raises ConnectionError, RuntimeError, ValueError...
            raise UserError(f"cannot connect to the Ray cluster at {address}: {first_line(exc)}") from None
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private in-process cluster needs no token
        # "local": a fresh embedded cluster even when `ray start` runs one on this machine (ray.init
        # would attach to that one, and refuse the object store size)
        ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE, **common)
    quiet_ray_data()


def quiet_ray_data() -> None:
    """Ray Data keeps row order (the selection and the fingerprint rely on it), draws no bars of
    its own (the farm draws one display for all stages) and sorts small data in few partitions."""
    import ray.data  # importing configures its logger: set the level after that

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True
    # the default of 200 sort partitions costs seconds of task overhead on a small machine
    context.default_hash_shuffle_parallelism = max(4, 2 * int(ray.cluster_resources().get("CPU", 2)))


def gpus_available() -> bool:
    return ray.cluster_resources().get("GPU", 0) >= 1


def evaluation_cpus(threads: int) -> int:
    """CPUs an evaluate task reserves for latency on `threads` threads: no more than the largest
    node has (a task asking more would never be scheduled)."""
    largest = max(n.get("Resources", {}).get("CPU", 1) for n in ray.nodes() if n.get("Alive"))
    return max(1, min(threads, int(largest)))


def set_threads(n: float) -> None:
    # Ray sets OMP_NUM_THREADS to a task's CPU count; torch must be told as well
    torch.set_num_threads(max(1, int(n)))


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _load(source: str, dtype: str | None = None):
    from ..loading import load_model

    model, tokenizer = load_model(source, dtype=dtype)
    return adapter_for(model), tokenizer


def ref_list(refs, n: int) -> list:
    """A call with num_returns=1 gives one ref, not a list of one."""
    return [refs] if n == 1 else list(refs)


# ---- describe ------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    fingerprint: str
    geometries: list[BlockGeometry]
    sites: list[Site]
    max_positions: int | None
    architecture: str
    writes_text: bool  # an LM (Adapter.is_lm), which writes text for its own calibration (self_text.py)


@ray.remote(num_cpus=1)
def describe(source: str, dtype: str | None = None) -> ModelInfo:
    adapter, _ = _load(source, dtype)
    geoms = adapter.geometries()
    sites = model_sites(geoms)
    return ModelInfo(weights_fingerprint(adapter.model), geoms, sites, adapter.max_positions(), type(adapter.model).__name__, adapter.is_lm)


@ray.remote
def write_self_texts(source: str, n: int, max_tokens: int, seed: int, batch_size: int, dtype: str | None = None) -> list[str]:
    """The texts a causal LM writes for its own calibration, as `prune` has it write them."""
    adapter, tokenizer = _load(source, dtype)
    adapter.model.to(_device())
    return self_texts(adapter.model, tokenizer, n, max_tokens, seed, batch_size)


@ray.remote(num_cpus=1)
def site_weights(source: str, sites: list[Site], dtype: str | None = None) -> tuple[UnitWeights, ...]:
    adapter, _ = _load(source, dtype)
    weights = tuple(adapter.unit_weights(*site) for site in sites)
    return weights if len(weights) > 1 else weights[0]


def submit_site_weights(source: str, sites: list[Site], dtype: str | None = None) -> dict[Site, ray.ObjectRef]:
    return dict(zip(sites, ref_list(site_weights.options(num_returns=len(sites)).remote(source, sites, dtype), len(sites))))


# ---- collect and reduce --------------------------------------------------------------------


@ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)
class Collector:
    """Holds one model and sums statistics over the shards it is given.

    Every call is a pure function of its arguments (no state carries over between calls), so
    when the actor dies Ray restarts it and re-runs the call, and the result is still exact."""

    def __init__(self, source: str, threads: float, dtype: str | None = None):
        set_threads(threads)
        self.adapter, _ = _load(source, dtype)
        self.adapter.model.to(_device())

    def _batches(self, shard_ds, batch_size: int, counter):
        device = _device()
        for batch in iter_torch_batches(shard_ds, batch_size):
            yield {k: v.to(device) for k, v in batch.items()}
            if counter is not None:
                counter.add.remote(1, os.getpid())

    def collect(self, shard_ds, batch_size: int, seed: int, sites: list[Site], counter=None) -> tuple:
        """(fit, heldout) input statistics and the output curvature of each of `sites` (one group
        of a model's sites: a pass holds only theirs), for the scoring methods; the curvature's
        targets are seeded per example, so shards add up exactly."""
        release_memory()  # the previous group's statistics, gone to the object store
        start = time.perf_counter()
        c = collect_curvature(self.adapter, self._batches(shard_ds, batch_size, counter), seed, sites=sites)
        seconds = time.perf_counter() - start
        pairs = tuple(Timed((c.fit.sites[s], c.heldout.sites[s], c.grads.sites[s]), seconds) for s in sites)
        return pairs if len(pairs) > 1 else pairs[0]

    def curvature(self, shard_ds, batch_size: int, state: SurgeonState, sites: list[Site], seed: int, counter=None) -> tuple:
        """LLM Surgeon's (fit A, held-out A, G) per site of `sites` (one group) of the model as
        pruned so far by `state` (None where the site has lost every unit), then the seconds."""
        start = time.perf_counter()
        current = surgeon_model(self.adapter, state)
        present = set(model_sites(current.geometries()))  # a site that lost every unit has nothing to collect
        curvature = collect_curvature(current, self._batches(shard_ds, batch_size, counter), seed, sites=[s for s in sites if s in present])
        seconds = time.perf_counter() - start
        values = [(curvature.fit[s], curvature.heldout[s], curvature.grads[s]) if s in curvature.fit.sites else None for s in sites]
        return tuple(Timed(v, seconds) for v in values) + (Timed(None, seconds),)


@ray.remote(num_cpus=0)
class Counter:
    """Progress of work that reports in pieces (batches collected), polled by the driver; it also
    knows which worker processes reported, which lets a test kill one of them mid-run."""

    def __init__(self):
        self.count = 0
        self.pids: set[int] = set()

    def add(self, n: int, pid: int | None = None) -> None:
        self.count += n
        if pid is not None:
            self.pids.add(pid)

    def value(self) -> int:
        return self.count

    def workers(self) -> list[int]:
        return sorted(self.pids)


@ray.remote(num_cpus=1)
def add_pair(a: Timed, b: Timed) -> Timed:
    """Two shards' statistics of one site, added field by field (None: the site has no units)."""
    if a.value is None:
        return Timed(None, max(a.seconds, b.seconds))
    return Timed(tuple(x + y for x, y in zip(a.value, b.value)), max(a.seconds, b.seconds))


def reduce_tree(refs: list[ray.ObjectRef]) -> ray.ObjectRef:
    """Sum partial statistics pairwise, level by level: log2(n) rounds of tasks, no driver loop
    over the data."""
    while len(refs) > 1:
        paired = [add_pair.remote(refs[i], refs[i + 1]) for i in range(0, len(refs) - 1, 2)]
        refs = paired + ([refs[-1]] if len(refs) % 2 else [])
    return refs[0]


def collector_resources(workers: int, long_lived: bool = False) -> tuple[dict, int]:
    """(Ray resources, torch threads) of one collection actor.

    One GPU per actor where the cluster has GPUs. On CPUs an actor asks Ray for one CPU but runs
    an equal share of a node's cores as torch threads: asking for the whole share would make it
    wait until every small task (reference, weights) has left the node. A long-lived actor (it
    serves every shot of LLM Surgeon) asks for no CPU at all, since between shots it waits for
    tasks that need the CPU it would otherwise hold; it then shares the cores with those tasks,
    so it leaves one core of its share to them (oversubscribed torch threads stall each other)."""
    if gpus_available():
        return {"num_gpus": 1, "num_cpus": 0 if long_lived else 1}, 1
    per_node = max(n.get("Resources", {}).get("CPU", 1) for n in ray.nodes() if n.get("Alive"))
    share = int(per_node // workers)
    return {"num_cpus": 0 if long_lived else 1}, max(1, share - 1 if long_lived else share)


def start_collectors(source: str, workers: int, long_lived: bool = False, dtype: str | None = None) -> list:
    """`workers` actors holding the model. Ray ends each once its handle is dropped and its
    calls have finished."""
    resources, threads = collector_resources(workers, long_lived)
    placements = actor_placements(workers, resources)
    return [Collector.options(**resources, scheduling_strategy=where).remote(source, threads, dtype) for where in placements]


def actor_placements(workers: int, resources: dict) -> list:
    """Scheduling strategies that deal `workers` actors round-robin over the alive nodes able to
    hold one: each actor holds a whole model, so they belong on different nodes. Ray's own SPREAD
    is a hint that a busy cluster ignores (two actors on one node of two, seen in CI); a soft node
    affinity still lets Ray place an actor elsewhere when its node is full."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    needed = {"CPU": resources.get("num_cpus", 0), "GPU": resources.get("num_gpus", 0)}
    nodes = sorted(n["NodeID"] for n in ray.nodes()
                   if n.get("Alive") and all(n.get("Resources", {}).get(k, 0) >= v for k, v in needed.items()))
    if not nodes:
        return ["SPREAD"] * workers
    return [NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=True) for i in range(workers)]


def shard_batches(shards: list, batch_size: int) -> int:
    """Batches that a pass of the actors over `shards` reports to the counter."""
    return sum(-(-part.count() // batch_size) for part in shards)


def submit_collection(source: str, data, groups: list[list[Site]], workers: int, batch_size: int, seed: int = 0, counter=None,
                      actors: list | None = None, dtype: str | None = None) -> tuple[dict[Site, ray.ObjectRef], int]:
    """Collect on disjoint shards, one per actor (started here unless given), one pass per group
    of sites. Returns one reduced (fit, heldout, grads) ref per site and the number of batches the
    actors will report to `counter`.

    Each actor runs its passes in order, so it holds one group's statistics at a time; a group's
    reduction starts as soon as its pass ends on every shard. Sharding runs Ray Data tasks, so it
    comes before the actors start: on a small machine actors holding every CPU would leave those
    tasks waiting forever."""
    shards = shard(data, len(actors) if actors else workers)
    actors = actors or start_collectors(source, len(shards), dtype=dtype)
    reduced = {}
    for group in groups:
        partials = [ref_list(actor.collect.options(num_returns=len(group)).remote(part, batch_size, seed, group, counter), len(group))
                    for actor, part in zip(actors, shards)]
        reduced |= {site: reduce_tree([p[j] for p in partials]) for j, site in enumerate(group)}
    return reduced, shard_batches(shards, batch_size) * len(groups)


def default_stats_memory(workers: int) -> int:
    """Statistics bytes per collection actor when --stats-memory is not given: the share of memory
    `prune` takes (an eighth) of the memory Ray gives tasks on the smallest node, shared by the
    actors that node may hold. An actor holds its pass's statistics and, while it returns them,
    their copy in the object store; the model and the per-site tasks need the rest."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    memory = min(n.get("Resources", {}).get("memory", 0) for n in nodes)
    per_node = -(-workers // max(1, len(nodes)))
    return max(1, int(memory) // STATS_MEMORY_SHARE // per_node)


# ---- the statistics cache (on the driver's node) ------------------------------------------


def on_driver_node() -> dict:
    """Task options that run it on this process's node, where the statistics cache is."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


@ray.remote(num_cpus=1)
def save_site(folder: str, fingerprint: str, site: Site, pair: Timed) -> dict[str, int]:
    """Write one reduced site to the cache folder; returns each part's token count."""
    fit, held, grads = pair.value
    write_site(Path(folder), site, {"fit": fit, "heldout": held, GRADS_PART: grads}, fingerprint)
    return {"fit": int(fit.n), "heldout": int(held.n), GRADS_PART: int(grads.n)}


@ray.remote(num_cpus=1, num_returns=2)
def load_site(folder: str, site: Site) -> tuple[Timed | None, str | None]:
    """One cached site, as collection gives it, or (None, why) when its file is damaged."""
    try:
        parts = read_site(Path(folder), site)
    except DamagedStats as exc:
        return None, str(exc)
    return Timed((parts["fit"], parts["heldout"], parts[GRADS_PART]), 0.0), None


# ---- score, search, reconstruct ------------------------------------------------------------


@ray.remote(**PER_SITE)
def score_site(method: str, weights: UnitWeights, pair: Timed, seed: int, site: Site) -> Timed:
    set_threads(1)
    release_memory()  # what an earlier task on this worker freed (see memory.py)
    start = time.perf_counter()
    fit, held, grads = pair.value
    scores = get_method(method)(weights, fit + held, site_generator(seed, site), grads=grads)
    return Timed(scores, time.perf_counter() - start)


@ray.remote(num_cpus=1)
def search(allocation: str, budget: float, seq_len: float, geometries: list[BlockGeometry], sites: list[Site], *scores: Timed) -> Timed:
    start = time.perf_counter()
    masks = SEARCHES[allocation](dict(zip(sites, (s.value for s in scores))), geometries, budget, seq_len)
    return Timed(masks, time.perf_counter() - start)


@ray.remote(**PER_SITE)
def reconstruct_site(mode: str, masks: Timed, site: Site, weights: UnitWeights, pair: Timed) -> Timed:
    """New weights for one site, or None where the masks keep every unit of it."""
    set_threads(1)
    release_memory()
    start = time.perf_counter()
    keep = masks.value.keep[site]
    result = None
    if not bool(keep.all()):
        fit, held = pair.value[:2]
        result = reconstruct(mode, weights.out, weights.bias, keep.nonzero().flatten(), weights.width, fit, held).in_dtype(weights.out.dtype)
    return Timed(result, time.perf_counter() - start)


# ---- evaluate ------------------------------------------------------------------------------


def _batches_and_labels(eval_data, batch_size: int) -> tuple[list[dict], list[int] | None]:
    batches = [{k: v for k, v in b.items() if k != "heldout"} for b in iter_torch_batches(eval_data, batch_size)]
    labels = None
    if "label" in eval_data.columns():
        labels = [int(r["label"]) for r in eval_data.select_columns(["label"]).iter_rows()]
    return batches, labels


@ray.remote(num_cpus=1)
def reference(source: str, corpora: dict, calibration: str, batch_size: int, task: str, dtype: str | None = None) -> CorpusReferences:
    """The dense model's scores on every evaluation corpus (label -> tokenized dataset), computed
    once per model and shared by all its units."""
    set_threads(1)
    adapter, _ = _load(source, dtype)
    data = {label: _batches_and_labels(ds, batch_size) for label, ds in corpora.items()}
    return CorpusReferences.build(adapter.model, adapter, data, calibration, task=task)


@dataclass
class EvalSpec:
    source: str
    sites: list[Site]
    latency: LatencySettings  # within the model's positions
    folder: str | None  # where the pruned model goes, a path or a URI (None: not saved)
    record: dict  # written as gfprune.json beside a saved model
    dtype: str | None = None  # the model's dtype as the campaign loads it (None: the checkpoint's)


@ray.remote(num_cpus=1)
def evaluate_unit(spec: EvalSpec, ref: CorpusReferences, masks: Timed, *recs: Timed, timings: dict | None = None) -> dict:
    """Cut a copy of the model, measure it against the dense one, save it to `spec.folder`.
    `timings` (seconds of stages that ran before, e.g. LLM Surgeon's shots) replace the defaults."""
    set_threads(1)
    start = time.perf_counter()
    dense, tokenizer = _load(spec.source, spec.dtype)
    counts = dense_counts(dense, spec.latency.seq_len)
    kept = masks.value.kept_fraction(dense.geometries(), spec.record["mean_seq_len"])
    # latency times both models side by side; without it the dense model is cut in place (one copy)
    pruned = adapter_for(copy.deepcopy(dense.model)) if spec.latency.repeats > 0 else dense
    weights = {site: r.value for site, r in zip(spec.sites, recs) if r.value is not None}
    apply_pruning(pruned, masks.value, weights)
    dense = dense if spec.latency.repeats > 0 else None
    result = measure_and_save(spec, ref, dense, pruned, tokenizer, masks.value.to_json(), {"kept_prunable_macs": kept}, counts)
    timings = {"search_s": masks.seconds, "reconstruct_s": sum(r.seconds for r in recs)} | (timings or {})
    timings["evaluate_s"] = time.perf_counter() - start
    return result | {"timings": timings}


def measure_and_save(spec: EvalSpec, ref: CorpusReferences, dense, pruned, tokenizer, masks_json: dict, extra: dict,
                     counts: dict | None = None) -> dict:
    """Quality and efficiency of a cut model next to the dense one; the model saved in its folder
    (written aside and put in place at the end: a folder left by a killed attempt is replaced).
    Returning the folder's path, not its files, keeps a 7B model out of the object store."""
    efficient = efficiency(dense, pruned, spec.latency, counts)
    metrics = ref.measure(pruned.model) | efficient | extra
    if spec.folder is not None:
        record = spec.record | {"metrics": metrics, "sizes": pruned.sizes(), "masks": masks_json}
        with staged_folder(location(spec.folder), force=True) as staging:
            save_pruned(pruned.model, staging, tokenizer, record)
    return {"metrics": metrics, "masks": masks_json, "sizes": pruned.sizes(), "folder": spec.folder, "host": socket.gethostname()}
