"""LLM Surgeon on the farm: every shot is one round of the farm.

    curvature (actors)     the model's Collector actors rebuild the model as pruned so far (from
                           the state) and sum A and G over their shards
    add_pair (tasks)       reduce the shards per site, as for the other statistics
    site_costs (tasks)     one per site: the removal cost of every remaining unit
    shot_search (task)     global masks to the shot's MACs target
    site_update (tasks)    one per site that loses units: the joint correlated update
    advance (task)         the new state, input of the next shot

A model's budgets share their shots: the shot targets (`surgeon.shot_targets`) do not depend on
the budget, so the budgets' paths form a tree whose trunk is the lowest budget's path, and each
shot (with the curvature it needs) is submitted once per distinct path. Budgets 0.9 to 0.5 at
step 0.1 cost the 5 shots of 0.5 alone. All shots are submitted at once, depth by depth, as a
graph of object refs: the driver never waits, and an actor collects one branch's next shot while
another branch's costs and updates run. The chain of a budget ends in `outputs`, which gives
exactly what `search` and `reconstruct_site` give the other methods, so evaluation, MLflow logging
and resume are shared.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from ..curvature import SiteCurvature
from ..methods import surgeon
from ..methods.surgeon import SurgeonState
from ..models import BlockGeometry, UnitWeights
from ..search import Site
from .stages import PER_SITE, Timed, reduce_tree, ref_list, set_threads, shard_batches


@ray.remote(**PER_SITE)
def site_costs(weights: UnitWeights, state: SurgeonState, curvature: Timed, site: Site) -> Timed:
    set_threads(1)
    start = time.perf_counter()
    if curvature.value is None:  # the site has no units left
        return Timed(None, 0.0)
    costs = surgeon.unit_costs(state.site_weights(site, weights), SiteCurvature(*curvature.value))
    return Timed(costs, time.perf_counter() - start)


@ray.remote(num_cpus=1)
def shot_search(state: SurgeonState, geometries: list[BlockGeometry], target: float, seq_len: float, sites: list[Site], *costs: Timed) -> Timed:
    start = time.perf_counter()
    scores = {site: c.value for site, c in zip(sites, costs) if c.value is not None}
    return Timed(surgeon.shot_masks(scores, state, geometries, target, seq_len), time.perf_counter() - start)


@ray.remote(**PER_SITE)
def site_update(weights: UnitWeights, state: SurgeonState, masks: Timed, curvature: Timed, site: Site) -> Timed:
    """The joint correlated update of one site, or None where the shot removes nothing there."""
    set_threads(1)
    start = time.perf_counter()
    keep = masks.value.keep.get(site)
    if keep is None or bool(keep.all()):
        return Timed(None, 0.0)
    update = surgeon.surgeon_update(state.site_weights(site, weights), keep, SiteCurvature(*curvature.value))
    return Timed(update, time.perf_counter() - start)


@ray.remote(num_cpus=1)
def advance(state: SurgeonState, masks: Timed, sites: list[Site], collect: Timed, *timed: Timed) -> SurgeonState:
    """The state after a shot; `timed` holds the shot's costs, then its updates, one per site."""
    costs, updates = timed[: len(sites)], timed[len(sites) :]
    timings = {
        "collect_s": collect.seconds,
        "score_s": sum(c.seconds for c in costs),
        "search_s": masks.seconds,
        "reconstruct_s": sum(u.seconds for u in updates),
    }
    return state.advance(masks.value, {s: u.value for s, u in zip(sites, updates) if u.value is not None}, timings)


@ray.remote(num_cpus=1)
def outputs(state: SurgeonState, geometries: list[BlockGeometry], sites: list[Site]) -> tuple:
    """(masks, timings, one reconstruction per site): the inputs `evaluate_unit` takes."""
    recs = tuple(Timed(state.weights.get(site), 0.0) for site in sites)
    timings = dict(state.timings) | {"shots": float(state.shots_done)}
    return (Timed(state.masks(geometries), state.timings.get("search_s", 0.0)), timings) + recs


@dataclass
class ShotPlan:
    """What a model's LLM Surgeon chains need: its actors and their shards, and the model."""

    actors: list
    shards: list
    sites: list[Site]
    geometries: list[BlockGeometry]
    weights: dict[Site, ray.ObjectRef]  # dense UnitWeights per site
    seq_len: float
    batch_size: int
    seed: int
    groups: list[list[Site]]  # collected one group per pass (memory-bounded statistics)
    counter: object = None


@dataclass
class Chain:
    """One budget's run: the state its last shot leads to, and its outputs."""

    budget: float
    state: ray.ObjectRef
    outputs: tuple  # (masks ref, timings ref, [recs refs])


Track = Callable[[str, list], None]


@ray.remote(num_cpus=0)
def add_seconds(*timed: Timed) -> Timed:
    """The seconds of a collection round done in several passes (groups of sites)."""
    return Timed(None, sum(t.seconds for t in timed))


def submit_curvature(plan: ShotPlan, state: ray.ObjectRef) -> tuple[dict[Site, ray.ObjectRef], ray.ObjectRef]:
    """One collection round on the actors, a pass per group of sites: reduced curvature per site,
    and the round's seconds."""
    curvature, seconds = {}, []
    for group in plan.groups:
        n = len(group) + 1
        partials = [
            ref_list(actor.curvature.options(num_returns=n).remote(part, plan.batch_size, state, group, plan.seed, plan.counter), n)
            for actor, part in zip(plan.actors, plan.shards)
        ]
        reduced = [reduce_tree([p[j] for p in partials]) for j in range(n)]
        curvature |= dict(zip(group, reduced[:-1]))
        seconds.append(reduced[-1])
    return curvature, seconds[0] if len(seconds) == 1 else add_seconds.remote(*seconds)


def submit_shot(plan: ShotPlan, state: ray.ObjectRef, curvature: dict, seconds: ray.ObjectRef, target: float, track: Track) -> ray.ObjectRef:
    """Costs, search, updates and the next state of one shot; returns the next state's ref."""
    costs = [site_costs.remote(plan.weights[s], state, curvature[s], s) for s in plan.sites]
    masks = shot_search.remote(state, plan.geometries, target, plan.seq_len, plan.sites, *costs)
    updates = [site_update.remote(plan.weights[s], state, masks, curvature[s], s) for s in plan.sites]
    track("score", costs)
    track("search", [masks])
    track("reconstruct", updates)
    return advance.remote(state, masks, plan.sites, seconds, *costs, *updates)


def submit_chains(plan: ShotPlan, budgets: list[float], step: float, track: Track) -> tuple[list[Chain], int]:
    """Every budget's shots as one tree of object refs: a shot is submitted once per distinct
    path of targets, and the curvature of a state once, however many shots start from it.
    Returns one chain per budget and the number of batches the actors will report to the counter."""
    paths = [tuple(surgeon.shot_targets(b, step)) for b in budgets]
    states: dict[tuple, ray.ObjectRef] = {(): ray.put(SurgeonState.dense(plan.geometries))}
    curvatures: dict[tuple, tuple] = {}  # path so far -> (curvature per site, seconds ref)
    for depth in range(max(len(p) for p in paths)):
        for path in dict.fromkeys(p[: depth + 1] for p in paths if len(p) > depth):
            parent = path[:-1]
            if parent not in curvatures:
                curvatures[parent] = submit_curvature(plan, states[parent])
            states[path] = submit_shot(plan, states[parent], *curvatures[parent], path[-1], track)
    chains = []
    for budget, path in zip(budgets, paths):
        refs = outputs.options(num_returns=2 + len(plan.sites)).remote(states[path], plan.geometries, plan.sites)
        chains.append(Chain(budget, states[path], (refs[0], refs[1], list(refs[2:]))))
    return chains, shard_batches(plan.shards, plan.batch_size) * len(plan.groups) * len(curvatures)
