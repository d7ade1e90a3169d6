"""Mask search under a MACs budget: which units of which layers to keep.

`global_search` is the search of Kwon et al. (2022) as DESIGN 5 puts it: for every possible number
k of kept attention units, keep the k best units over all layers, fill what is left of the budget
with the best FFN neurons over all layers, and pick the k with the highest total kept score. It
is only sound when scores are in one currency across layers and kinds, which our methods provide.

With grouped-query attention a head's cost depends on the others (a K/V head is paid once per
group) and a layer can only keep n K/V groups of k query heads each. Per layer, the legal
structures (n, k) with their best heads (for each k, the n groups whose k best heads score most)
are points (MACs, score); the steps between consecutive vertices of their upper convex hull, from
the empty structure on, are the layer's attention *items*, with ratios score/MACs that decrease.
Items of all layers are ranked by ratio (a layer's in order) and take the place of heads in the
enumeration above. Without GQA every item is one head and the search is exactly the one above.

`uniform_search` keeps the same fraction of every layer's units (ranked within the layer), the
alternative that needs no comparable scores.

Masks never exceed the budget: whole units are kept only while they fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .choices import ALLOCATIONS, check_budget
from .flops import attention_macs, group_macs, kept_site_macs, prunable_macs, site_macs, unit_macs
from .models import KINDS, BlockGeometry, Kind

Site = tuple[int, Kind]


@dataclass
class Masks:
    """Boolean keep-masks per (layer, kind) site."""

    keep: dict[Site, torch.Tensor]

    def kept_macs(self, geoms: list[BlockGeometry], seq_len: float) -> float:
        return sum(kept_site_macs(geoms[i], kind, m, seq_len) for (i, kind), m in self.keep.items())

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


def _structures(scores: torch.Tensor, geom: BlockGeometry, seq_len: float) -> list[tuple[float, float, int, torch.Tensor]]:
    """A layer's legal attention structures, each with its best heads for `scores`, as (MACs,
    score, heads kept, mask), the empty structure first: for every k, the n groups whose k best
    heads score most, for every n."""
    g = geom.heads_per_unit
    empty = torch.zeros(len(scores), dtype=torch.bool)
    best, within = scores.to(torch.float64).reshape(-1, g).sort(dim=1, descending=True, stable=True)
    prefix = best.cumsum(1)  # prefix[j, k - 1]: the k best heads of group j
    out = [(0.0, 0.0, 0, empty)]
    for k in range(1, g + 1):
        order = torch.argsort(prefix[:, k - 1], descending=True, stable=True)
        totals = prefix[order, k - 1].cumsum(0)
        for n in range(1, len(order) + 1):
            groups = order[:n]
            mask = empty.clone()
            mask[(groups[:, None] * g + within[groups, :k]).reshape(-1)] = True
            out.append((attention_macs(geom, n, k, seq_len), float(totals[n - 1]), n * k, mask))
    return out


def _upper_hull(options: list[tuple[float, float, int, torch.Tensor]]) -> list[tuple[float, float, int, torch.Tensor]]:
    """Vertices of the upper convex hull of (MACs, score), from the first option (the empty
    structure) up to the best score; points on a hull edge stay vertices (finer steps)."""
    hull = [options[0]]
    for point in sorted(options[1:], key=lambda o: (o[0], -o[1])):
        if not point[1] > hull[-1][1]:  # no better than a cheaper structure
            continue
        while len(hull) >= 2:
            (c0, s0, *_), (c1, s1, *_) = hull[-2], hull[-1]
            if (s1 - s0) * (point[0] - c0) >= (point[1] - s0) * (c1 - c0):
                break
            hull.pop()  # strictly below the edge from hull[-2] to point
        hull.append(point)
    return hull


@dataclass
class _AttentionRanking:
    """Attention items of all layers, best ratio first: the heads of `_Ranking` generalized to
    grouped-query attention. `vertices[j][t]` is site j's mask once its first t items are taken."""

    sites: list[Site]
    vertices: list[list[torch.Tensor]]
    layer: torch.Tensor  # site position of each item
    order: torch.Tensor
    score: torch.Tensor
    cost: torch.Tensor

    def keep_best(self, count: int) -> dict[Site, torch.Tensor]:
        taken = torch.bincount(self.layer[self.order[:count]], minlength=len(self.sites))
        return {site: self.vertices[j][int(taken[j])].clone() for j, site in enumerate(self.sites)}


def _rank_attention(scores: dict[Site, torch.Tensor], geoms: list[BlockGeometry], seq_len: float) -> _AttentionRanking:
    f64 = torch.float64
    sites = sorted(s for s in scores if s[1] == "attn")
    vertices, costs, gains = [], [], []
    for site in sites:
        values, geom = scores[site].to(f64), geoms[site[0]]
        if geom.heads_per_unit == 1:  # every head its own group: the items are the heads, best first
            order = torch.argsort(values, descending=True, stable=True)
            masks = [torch.zeros(len(values), dtype=torch.bool)]
            for head in order:
                masks.append(masks[-1].clone())
                masks[-1][head] = True
            vertices.append(masks)
            costs.append(torch.full((len(values),), group_macs(geom, 1, seq_len), dtype=f64))
            gains.append(values[order])
        else:
            hull = _upper_hull(_structures(values, geom, seq_len))
            vertices.append([v[3] for v in hull])
            costs.append(torch.tensor([b[0] - a[0] for a, b in zip(hull, hull[1:])], dtype=f64))
            gains.append(torch.tensor([b[1] - a[1] for a, b in zip(hull, hull[1:])], dtype=f64))
    cost = torch.cat(costs) if sites else torch.zeros(0, dtype=f64)
    ref = cost.max() if len(cost) else torch.tensor(1.0, dtype=f64)
    # rank by score per MAC, scaled by one reference cost so that items of equal cost (every head
    # without GQA) rank by score exactly; a layer's ratios never rise from one item to the next
    keys = [_non_increasing(gain * (ref / c)) for gain, c in zip(gains, costs)]
    key = torch.cat(keys) if sites else torch.zeros(0, dtype=f64)
    gain = torch.cat(gains) if sites else torch.zeros(0, dtype=f64)
    layer = torch.cat([torch.full((len(c),), j, dtype=torch.long) for j, c in enumerate(costs)]) if sites else torch.zeros(0, dtype=torch.long)
    order = torch.argsort(key, descending=True, stable=True)
    zero = torch.zeros(1, dtype=f64)
    return _AttentionRanking(sites, vertices, layer, order, torch.cat([zero, gain[order].cumsum(0)]), torch.cat([zero, cost[order].cumsum(0)]))


def _non_increasing(values: torch.Tensor) -> torch.Tensor:
    """The running minimum: rounding must not let a later step of a layer outrank an earlier one."""
    return values.cummin(0).values if len(values) else values


def global_search(scores: dict[Site, torch.Tensor], geoms: list[BlockGeometry], budget: float, seq_len: float) -> Masks:
    """Keep the best units globally under `budget` (fraction of prunable MACs kept)."""
    check_budget(budget)
    limit = budget * prunable_macs(geoms, seq_len) * (1 + 1e-12)
    heads, neurons = _rank_attention(scores, geoms, seq_len), _rank(scores, geoms, "ffn", seq_len)
    # for every head count k: the most neurons m that still fit, neurons.cost[m] <= limit - heads.cost[k]
    m = torch.searchsorted(neurons.cost, (limit - heads.cost).clamp(min=0), right=True) - 1
    total = heads.score + neurons.score[m.clamp(min=0)]
    total[heads.cost > limit] = -torch.inf
    k = int(torch.argmax(total))
    return Masks(heads.keep_best(k) | neurons.keep_best(int(m[k])))


def uniform_search(scores: dict[Site, torch.Tensor], geoms: list[BlockGeometry], budget: float, seq_len: float) -> Masks:
    """Keep the same fraction of every layer: floor(budget * units) best attention units, then as
    many of the layer's best neurons as the rest of the layer's share of the budget pays for.

    With grouped-query attention: the legal structure with the most heads, and the best score
    among those, that keeps at most floor(budget * units) heads and costs at most as many average
    heads of the layer."""
    check_budget(budget)
    keep = {}
    for i, geom in enumerate(geoms):
        layer_limit = budget * sum(site_macs(geom, k, seq_len) for k in KINDS) * (1 + 1e-12)
        n_units = int(budget * geom.units + 1e-9)
        spent, attention = 0.0, torch.zeros(geom.units, dtype=torch.bool)
        if geom.units:
            values = scores.get((i, "attn"), torch.zeros(geom.units))
            allowed = n_units * unit_macs(geom, "attn", seq_len) * (1 + 1e-12)
            legal = [o for o in _structures(values, geom, seq_len) if o[2] <= n_units and o[0] <= allowed]
            spent, _, _, attention = max(legal, key=lambda o: (o[2], o[1], -o[0]))
        n_neurons = min(geom.ffn, int((layer_limit - spent) / unit_macs(geom, "ffn", seq_len)))
        if (i, "attn") in scores:
            keep[(i, "attn")] = attention
        if (i, "ffn") in scores:
            mask = torch.zeros(geom.ffn, dtype=torch.bool)
            mask[torch.argsort(scores[(i, "ffn")], descending=True, stable=True)[:n_neurons]] = True
            keep[(i, "ffn")] = mask
    return Masks(keep)


SEARCHES = {"global": global_search, "uniform": uniform_search}
assert tuple(SEARCHES) == ALLOCATIONS, "choices.ALLOCATIONS names exactly the searches"
