"""Statistics travel through Ray's object store without copies, and nothing that reads them writes
into them.

A reader maps the object store's memory (stats.GramStats.__reduce__), so a task that wrote into
its statistics would silently change the input of every later task on that node. The first test
pins the mechanism (pickle protocol 5 with out-of-band buffers, which Ray uses); the second runs
every farm stage that consumes statistics on a real Ray and checks the stored object afterwards."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import ray
import torch
from conftest import tiny_batches, tiny_model

from gfprune_ray.curvature import collect_curvature
from gfprune_ray.farm import stages, surgeon_shots
from gfprune_ray.methods import METHODS
from gfprune_ray.methods.surgeon import SurgeonState
from gfprune_ray.models import adapter_for
from gfprune_ray.reconstruct import MODES
from gfprune_ray.stats import GramStats, model_sites

pytestmark = pytest.mark.timeout(300)


def _random_stats(width: int) -> GramStats:
    stats = GramStats.zeros(width)
    stats.add_(torch.randn(50, width, generator=torch.Generator().manual_seed(width)))
    return stats


def _address(buffer: pickle.PickleBuffer) -> int:
    return np.frombuffer(buffer.raw(), dtype=np.uint8).ctypes.data


def test_statistics_leave_and_enter_a_pickle_out_of_band_without_a_copy():
    stats = _random_stats(96)
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(stats, protocol=5, buffer_callback=buffers.append)
    assert len(stream) < 1024, "the Gram must not be copied into the pickle stream"
    assert sorted(b.raw().nbytes for b in buffers) == sorted(t.numel() * 8 for t in (stats.n, stats.gram, stats.total))
    assert stats.gram.data_ptr() in {_address(b) for b in buffers}, "the buffer handed out must be the Gram's own memory"
    back = pickle.loads(stream, buffers=buffers)
    assert back.gram.data_ptr() == stats.gram.data_ptr(), "a reader must map the buffer, not copy it"
    for got, want in ((back.n, stats.n), (back.gram, stats.gram), (back.total, stats.total)):
        assert got.dtype == want.dtype == torch.float64 and torch.equal(got, want)
    # an ordinary pickle and a deep copy still give independent statistics
    for twin in (pickle.loads(pickle.dumps(stats)), copy.deepcopy(stats)):
        assert torch.equal(twin.gram, stats.gram) and twin.gram.data_ptr() != stats.gram.data_ptr()
        twin.gram += 1
        assert not torch.equal(twin.gram, stats.gram)


def _site_pairs(family: str) -> tuple:
    """A tiny model's adapter and, per site, its (fit, heldout, grads) statistics as collected."""
    adapter = adapter_for(tiny_model(family))
    curvature = collect_curvature(adapter, tiny_batches(4), seed=0)
    sites = model_sites(adapter.geometries())
    return adapter, sites, {s: (curvature.fit[s], curvature.heldout[s], curvature.grads[s]) for s in sites}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_no_farm_stage_writes_into_the_statistics_it_reads(local_ray, tmp_path, family):
    adapter, sites, pairs = _site_pairs(family)
    geoms = adapter.geometries()
    want = {s: copy.deepcopy(p) for s, p in pairs.items()}
    stored = {s: ray.put(stages.Timed(p, 0.0)) for s, p in pairs.items()}
    weights = {s: ray.put(adapter.unit_weights(*s)) for s in sites}
    first, second = (ray.get(stored[sites[-1]]).value[0].gram for _ in range(2))
    assert first.data_ptr() == second.data_ptr(), "readers must map the stored object (else this test checks nothing)"

    work = []
    for method in METHODS:
        scores = [stages.score_site.remote(method, weights[s], stored[s], 0, s) for s in sites]
        masks = stages.search.remote("global", 0.5, 12.0, geoms, sites, *scores)
        work += [stages.reconstruct_site.remote(mode, masks, s, weights[s], stored[s]) for mode in MODES for s in sites]
    state = ray.put(SurgeonState.dense(geoms))
    costs = [surgeon_shots.site_costs.remote(weights[s], state, stored[s], s) for s in sites]
    shot = surgeon_shots.shot_search.remote(state, geoms, 0.6, 12.0, sites, *costs)
    work += [surgeon_shots.site_update.remote(weights[s], state, shot, stored[s], s) for s in sites]
    work += [stages.add_pair.remote(stored[s], stored[s]) for s in sites]
    work += [stages.save_site.remote(str(tmp_path / "cache"), "fp", s, stored[s]) for s in sites]
    ray.get(work)

    for site in sites:
        after = ray.get(stored[site]).value
        for part_after, part_want in zip(after, want[site]):
            for field in ("n", "gram", "total"):
                assert torch.equal(getattr(part_after, field), getattr(part_want, field)), (site, field)
