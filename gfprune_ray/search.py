"""Mask search under a MACs budget: which units of which layers to keep.

`global_search` is the search of Kwon et al. (2022) as DESIGN 5 puts it: for every possible number
k of kept attention units, keep the k best units over all layers, fill what is left of the budget
with the best FFN neurons over all layers, and pick the k with the highest total kept score. It
is only sound when scores are in one currency across layers and kinds, which our methods provide.

`uniform_search` keeps the same fraction of every layer's units (ranked within the layer), the
alternative that needs no comparable scores.

Masks never exceed the budget: whole units are kept only while they fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .flops import check_budget, prunable_macs, unit_macs
from .models import KINDS, BlockGeometry, Kind

Site = tuple[int, Kind]


@dataclass
class Masks:
    """Boolean keep-masks per (layer, kind) site."""

    keep: dict[Site, torch.Tensor]

    def kept_macs(self, geoms: list[BlockGeometry], seq_len: float) -> float:
        return sum(int(m.sum()) * unit_macs(geoms[i], kind, seq_len) for (i, kind), m in self.keep.items())

    def kept_fraction(self, geoms: list[BlockGeometry], seq_len: float) -> float:
        """Fraction of the prunable MACs these masks keep: what the budget bounds."""
        return self.kept_macs(geoms, seq_len) / prunable_macs(geoms, seq_len)

    def kept_indices(self, site: Site) -> torch.Tensor:
        return self.keep[site].nonzero().flatten()

    def to_json(self) -> dict:
        return {f"{i}.{kind}": self.kept_indices((i, kind)).tolist() for (i, kind) in sorted(self.keep)}

    @classmethod
    def from_json(cls, data: dict, geoms: list[BlockGeometry]) -> Masks:
        keep = {}
        for key, kept in data.items():
            layer, kind = key.split(".")
            mask = torch.zeros(geoms[int(layer)].count(kind), dtype=torch.bool)
            mask[torch.tensor(kept, dtype=torch.long)] = True
            keep[(int(layer), kind)] = mask
        return cls(keep)


def full_masks(geoms: list[BlockGeometry]) -> Masks:
    return Masks({(i, k): torch.ones(g.count(k), dtype=torch.bool) for i, g in enumerate(geoms) for k in KINDS if g.count(k)})


@dataclass
class _Ranking:
    """All units of one kind over all layers, best first, with running totals of score and cost."""

    sites: list[Site]
    sizes: list[int]
    order: torch.Tensor  # positions in the concatenated units, best first
    score: torch.Tensor  # score[k]: total score of the k best units (score[0] = 0)
    cost: torch.Tensor  # cost[k]: their total MACs

    def keep_best(self, count: int) -> dict[Site, torch.Tensor]:
        flat = torch.zeros(sum(self.sizes), dtype=torch.bool)
        flat[self.order[:count]] = True
        return {site: mask.clone() for site, mask in zip(self.sites, flat.split(self.sizes))}


def _rank(scores: dict[Site, torch.Tensor], geoms: list[BlockGeometry], kind: Kind, seq_len: float) -> _Ranking:
    sites = sorted(s for s in scores if s[1] == kind)
    sizes = [len(scores[s]) for s in sites]
    f64 = torch.float64
    values = torch.cat([scores[s].to(f64) for s in sites]) if sites else torch.zeros(0, dtype=f64)
    costs = torch.tensor([unit_macs(geoms[s[0]], kind, seq_len) for s in sites for _ in range(len(scores[s]))], dtype=f64)
    order = torch.argsort(values, descending=True, stable=True)
    zero = torch.zeros(1, dtype=f64)
    return _Ranking(sites, sizes, order, torch.cat([zero, values[order].cumsum(0)]), torch.cat([zero, costs[order].cumsum(0)]))


def global_search(scores: dict[Site, torch.Tensor], geoms: list[BlockGeometry], budget: float, seq_len: float) -> Masks:
    """Keep the best units globally under `budget` (fraction of prunable MACs kept)."""
    check_budget(budget)
    limit = budget * prunable_macs(geoms, seq_len) * (1 + 1e-12)
    heads, neurons = _rank(scores, geoms, "attn", seq_len), _rank(scores, geoms, "ffn", seq_len)
    # for every head count k: the most neurons m that still fit, neurons.cost[m] <= limit - heads.cost[k]
    m = torch.searchsorted(neurons.cost, (limit - heads.cost).clamp(min=0), right=True) - 1
    total = heads.score + neurons.score[m.clamp(min=0)]
    total[heads.cost > limit] = -torch.inf
    k = int(torch.argmax(total))
    return Masks(heads.keep_best(k) | neurons.keep_best(int(m[k])))


def uniform_search(scores: dict[Site, torch.Tensor], geoms: list[BlockGeometry], budget: float, seq_len: float) -> Masks:
    """Keep the same fraction of every layer: floor(budget * units) best attention units, then as
    many of the layer's best neurons as the rest of the layer's share of the budget pays for."""
    check_budget(budget)
    keep = {}
    for i, geom in enumerate(geoms):
        layer_limit = budget * sum(geom.count(k) * unit_macs(geom, k, seq_len) for k in KINDS) * (1 + 1e-12)
        n_units = int(budget * geom.units + 1e-9)
        spent = n_units * unit_macs(geom, "attn", seq_len)
        n_neurons = min(geom.ffn, int((layer_limit - spent) / unit_macs(geom, "ffn", seq_len)))
        for kind, count in (("attn", n_units), ("ffn", n_neurons)):
            if (i, kind) in scores:
                mask = torch.zeros(geom.count(kind), dtype=torch.bool)
                mask[torch.argsort(scores[(i, kind)], descending=True, stable=True)[:count]] = True
                keep[(i, kind)] = mask
    return Masks(keep)


SEARCHES = {"global": global_search, "uniform": uniform_search}
