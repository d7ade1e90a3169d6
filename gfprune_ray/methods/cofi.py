"""CoFi (Xia, Zhong and Chen, ACL 2022): coarse and fine hard-concrete masks trained jointly with
the weights by distillation from the frozen dense model, steered to the budget by a Lagrangian.

Gates per layer: one on the whole attention block, one per KV group (with grouped-query attention
its K/V head and the query heads that share it; a head without GQA), one on the whole FFN, one per
FFN neuron; and one per hidden dimension, shared by all layers. CoFi gates whole KV groups, not the
query heads that the other methods rank: any pattern of group gates is a structure transformers can
run, while query-head gates would need one number of heads per kept group. A unit's
output is multiplied by its own gate and by its block's gate, at the input of the block's output
projection (through the adapter, by a hook), so a closed block leaves exactly its output bias:
what the core's surgery leaves when it removes the block. A hidden gate multiplies its dimension
wherever the residual stream is written (embedding tables, output projections, norms), and the
norms compute their statistics over the open dimensions only, as the narrower model will.
Expected kept MACs are the core's MACs model with every unit weighted by P(block on) P(unit on)
and the width d replaced by the expected number of open hidden dimensions.

Hidden dimensions are gated only where the model's output does not live in the stream (an LM
head or a classifier reads it): a bare encoder's output is its hidden states, so their width is
its interface (MiniLM's sentence embeddings) and stays.

At the end the deterministic gates decide (`_deterministic`), the unit and block gate values the
trained model relies on are folded into the output-projection columns, the masks go through the
core's surgery, and the closed hidden dimensions are cut from the stream (`Adapter.cut_hidden`).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from ..choices import COFI
from ..distill import distillation_loss, identity_map
from ..evaluate import has_classifier
from ..flops import group_macs, prunable_macs, unit_macs
from ..models import KINDS, Adapter, BlockGeometry, Kind
from ..models import layers as L
from ..search import Masks, Site
from ..surgery import apply_pruning
from ..training import GatedStudent, gate_set

NAME = COFI
HIDDEN = "hidden"


def _unit_key(site: Site) -> str:
    return f"{site[0]}-{site[1]}"


def _block_key(site: Site) -> str:
    return f"{site[0]}-{site[1]}-block"


def _gated(geom: BlockGeometry, kind: Kind) -> tuple[int, int]:
    """(gates, context columns per gate) of a site: a gate per KV group, or per FFN neuron."""
    return (geom.kv_heads, geom.heads_per_unit * geom.head_dim) if kind == "attn" else (geom.ffn, 1)


def _gate_macs(geom: BlockGeometry, kind: Kind, seq_len: float) -> float:
    """MACs per token of what one unit gate controls: a whole KV group, or a neuron."""
    return group_macs(geom, geom.heads_per_unit, seq_len) if kind == "attn" else unit_macs(geom, kind, seq_len)


class CoFiStudent(GatedStudent):
    # Plain SGD: gates of several granularities. A gate's step then follows the size of its
    # gradient, so a block gate, which controls a whole block's MACs and output, moves as much
    # faster than a neuron's as the Lagrangian's trade-off says. Adam divides every gate's gradient
    # by its own scale: once the penalty dominates, each gate steps down at the same speed, whatever
    # it costs or does. Measured on MiniLM at budget 0.5 (`bench/trained_probe.py`, README): with
    # Adam the block gates stalled at P(on) 0.69 to 0.76 (deployed at a fraction of their output)
    # and fidelity was 0.37; with SGD FFN blocks close, the rest stays, fidelity 0.72. No momentum:
    # with it the gates overshot the budget (MiniLM 0.45 for 0.5, tiny models 0.1 to 0.35 below)
    # and, once closed, get no gradient to come back.
    gate_optimizer = "sgd"
    gate_lr = 0.1

    def __init__(self, adapter: Adapter, seq_len: float):
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model
        self.teacher = [copy.deepcopy(adapter.model).eval().requires_grad_(False)]  # a list: not a submodule, not saved
        self.seq_len = seq_len
        self.geoms = adapter.geometries()
        self.sites: list[Site] = [(i, k) for i, g in enumerate(self.geoms) for k in KINDS if g.count(k)]
        sizes = {}
        for site in self.sites:
            sizes[_unit_key(site)] = _gated(self.geoms[site[0]], site[1])[0]
            sizes[_block_key(site)] = 1
        self.hidden = adapter.supports_hidden_cut and has_output_head(adapter.model)
        if self.hidden:
            sizes[HIDDEN] = adapter.hidden_size
        self.gates = gate_set(sizes)
        self.mapping = identity_map(adapter.hidden_size)
        self._current: dict = {}
        self._hooks = [self._hook(site) for site in self.sites]
        if self.hidden:
            self._hooks += self._hidden_hooks()

    def _hook(self, site: Site):
        module = self.adapter.output_projection(*site)
        width = _gated(self.geoms[site[0]], site[1])[1]

        def scale_inputs(_module, args):
            z = self._current.get(site)
            return None if z is None else (args[0] * z.repeat_interleave(width).to(args[0].dtype),)

        return module.register_forward_pre_hook(scale_inputs)

    def _hidden_hooks(self) -> list:
        def scale_output(_module, _args, output):
            z = self._current.get(HIDDEN)
            return None if z is None else output * z.to(output.dtype)

        def gated_norm(module, args, output):
            z = self._current.get(HIDDEN)
            if z is None:
                return None
            return L.norm_over(module, args[0], (z != 0).nonzero().flatten()) * z.to(output.dtype)

        writers = [self.adapter.output_projection(*site) for site in self.sites]
        hooks = [m.register_forward_hook(scale_output) for m in self.adapter.stream_sources() + writers]
        return hooks + [m.register_forward_hook(gated_norm) for m in self.adapter.stream_norms()]

    def sampled_gates(self, generator: torch.Generator | None) -> dict:
        """Per site, each unit's gate times its block's gate; and the hidden dimensions' gates."""
        values: dict = {site: self.gates[_unit_key(site)].sample(generator) * self.gates[_block_key(site)].sample(generator) for site in self.sites}
        if self.hidden:
            values[HIDDEN] = self.gates[HIDDEN].sample(generator)
        return values

    def final_gates(self, budget: float) -> dict:
        """Per site, its expected number of units (`_deterministic`); hidden dimensions 0 or 1 (a
        soft value would have to be folded into embeddings that an LM head may share); then the
        smallest unit gates zeroed while the cut model would exceed the budget."""
        values: dict = {site: self._deterministic(site) for site in self.sites}
        geoms = self.geoms
        if self.hidden:
            hidden = self.gates[HIDDEN]
            values[HIDDEN] = (hidden.deterministic() > 0).to(hidden.log_alpha.dtype)
            geoms = [replace(g, d=int(values[HIDDEN].sum())) for g in self.geoms]
        sites = {site: values[site] for site in self.sites}  # the same tensors: trimmed in place
        self.trimmed = trim_to_budget(sites, geoms, budget * prunable_macs(self.geoms, self.seq_len), self.seq_len)
        return values

    def _deterministic(self, site: Site) -> torch.Tensor:
        """A site keeps round(P(block on) * sum of its units' P(on)) units, its expected count, so
        a block that is half on in expectation is not deployed whole (nor dropped whole)."""
        units, block = self.gates[_unit_key(site)], self.gates[_block_key(site)]
        expected = (block.keep_probability()[0] * units.keep_probability().sum()).item()
        return units.deterministic(keep=int(round(expected))) * block.soft()[0]

    def _use_gates(self, values: dict | None) -> None:
        self._current = values or {}

    def task_loss(self, batch: dict, generator: torch.Generator | None) -> tuple[torch.Tensor, dict]:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "output_hidden_states": True}
        with torch.no_grad():
            teacher_out = self.teacher[0](**inputs)
        with self.applied(self.gate_values(generator)):
            student_out = self.model(**inputs)
        loss, parts = distillation_loss(student_out, teacher_out, self.mapping, batch["attention_mask"])
        if "labels" in batch and has_classifier(self.model):
            ce = nn.functional.cross_entropy(student_out.logits, batch["labels"])
            loss = loss + ce
            parts["label_loss"] = ce.item()
        return loss, parts

    def expected_kept(self) -> torch.Tensor:
        width = self.gates[HIDDEN].keep_probability().sum() if self.hidden else None
        total = torch.zeros(())
        for i, kind in self.sites:
            p_block = self.gates[_block_key((i, kind))].keep_probability()[0]
            p_units = self.gates[_unit_key((i, kind))].keep_probability().sum()
            geom = self.geoms[i] if width is None else replace(self.geoms[i], d=width)
            total = total + p_block * p_units * _gate_macs(geom, kind, self.seq_len)
        return total / prunable_macs(self.geoms, self.seq_len)

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @torch.no_grad()
    def finish(self, budget: float) -> Masks:
        """Cut the model in place: the final gates (`fix`), their values folded into the output
        projections, the core's surgery, then the closed hidden dimensions. Returns the masks."""
        self.fix(budget)
        self.close()
        for site in self.sites:
            module = self.adapter.output_projection(*site)
            z = self.fixed[site].repeat_interleave(_gated(self.geoms[site[0]], site[1])[1])
            L.assign(module, L.weight_of(module) * z.to(L.weight_of(module).dtype), None)
        # masks over units: a KV group's gate keeps or drops each of its query heads
        masks = Masks({(i, kind): (self.fixed[(i, kind)] > 0).repeat_interleave(self.geoms[i].heads_per_unit if kind == "attn" else 1)
                       for i, kind in self.sites})
        apply_pruning(self.adapter, masks)
        if self.hidden and int(self.fixed[HIDDEN].sum()) < self.adapter.hidden_size:
            self.adapter.cut_hidden(self.fixed[HIDDEN].nonzero().flatten())
        return masks


def has_output_head(model: nn.Module) -> bool:
    """An LM head or a classifier maps the stream to the model's output."""
    return model.get_output_embeddings() is not None or has_classifier(model)


def trim_to_budget(values: dict[Site, torch.Tensor], geoms, limit: float, seq_len: float) -> int:
    """Zero the smallest nonzero gates, one unit at a time, until the kept MACs (of units in
    `geoms`, the cut model's shapes) fit `limit` MACs. Gates trained to the budget land within a
    few units of it; this makes 'never above' exact."""
    limit = limit * (1 + 1e-12)
    total = sum(int((z > 0).sum()) * _gate_macs(geoms[i], kind, seq_len) for (i, kind), z in values.items())
    if total <= limit:
        return 0
    units = sorted((float(z[u]), site, int(u)) for site, z in values.items() for u in (z > 0).nonzero().flatten())
    trimmed = 0
    for _, site, unit in units:
        if total <= limit:
            break
        values[site][unit] = 0.0
        total -= _gate_macs(geoms[site[0]], site[1], seq_len)
        trimmed += 1
    return trimmed
