"""FLOP (Wang, Wohlwend and Lei, EMNLP 2020): factorized low-rank pruning.

Every linear layer of every block is rewritten from its SVD, W = U S V^T = P Q with P = U S^(1/2)
and Q = S^(1/2) V^T, as x -> P diag(z) Q x + b, with one hard-concrete gate per rank-1 component.
With all gates open this is the original layer. The factors train with the gates on the model's
own objective: next-token prediction for a decoder with an LM head, distillation from the frozen
dense model otherwise (an encoder has no objective of its own without labels).

A factorized matrix of rank k costs k (in + out) MACs per token against in * out for the dense
one, so the expected kept MACs are sum over matrices of E[k] (in + out), plus the attention-score
MACs that FLOP leaves alone, over the dense prunable MACs. At the end, components with a zero
deterministic gate are dropped and the gate values folded into Q: the layer becomes two thin
linear layers, or, where k (in + out) >= in * out would cost more, one dense layer again.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..choices import FLOP
from ..distill import distillation_loss, identity_map, lm_loss
from ..flops import prunable_macs
from ..models import Adapter
from ..models import layers as L
from ..models.base import set_path
from ..search import Masks, full_masks
from ..training import GatedStudent, gate_set

NAME = FLOP


class GatedFactorized(nn.Module):
    """x -> P diag(z) Q x + b, z set by the student before each forward (ones when unset)."""

    def __init__(self, module: L.LinearLike):
        super().__init__()
        weight = L.weight_of(module).detach().float()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = s.sqrt()
        dtype = L.weight_of(module).dtype
        self.p = nn.Parameter((u * root).to(dtype))
        self.q = nn.Parameter((root[:, None] * vh).to(dtype))
        bias = L.bias_of(module)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.conv1d = isinstance(module, Conv1D)
        self.z: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.q.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.p.shape[0], self.q.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.q.T
        if self.z is not None:
            h = h * self.z.to(h.dtype)
        y = h @ self.p.T
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def thin(self, z: torch.Tensor) -> nn.Module:
        """The deployed layer for deterministic gates z: two thin layers, or one dense if cheaper."""
        keep = z > 0
        p, q = self.p[:, keep], z[keep, None].to(self.q.dtype) * self.q[keep]
        n_out, n_in = self.shape
        if int(keep.sum()) * (n_in + n_out) >= n_in * n_out:
            template = Conv1D(n_out, n_in) if self.conv1d else nn.Linear(n_in, n_out, bias=self.bias is not None)
            return L.build_like(template, p @ q, self.bias)
        layer = L.FactorizedLinear(n_in, int(keep.sum()), n_out, bias=self.bias is not None, dtype=q.dtype)
        layer.first.weight.copy_(q)
        layer.second.weight.copy_(p)
        if self.bias is not None:
            layer.second.bias.copy_(self.bias)
        return layer


def deployed_macs(rank: int, shape: tuple[int, int]) -> int:
    """MACs per token of a layer of this rank as `GatedFactorized.thin` deploys it."""
    n_out, n_in = shape
    return min(rank * (n_in + n_out), n_in * n_out)


class FlopStudent(GatedStudent):
    def __init__(self, adapter: Adapter, seq_len: float):
        super().__init__()
        self.adapter = adapter
        self.model = adapter.model
        self.lm = adapter.is_lm
        # the teacher is needed only for distillation (a list: not a submodule, not saved)
        self.teacher = [] if self.lm else [copy.deepcopy(adapter.model).eval().requires_grad_(False)]
        self.mapping = None if self.lm else identity_map(adapter.hidden_size)
        self.geoms = adapter.geometries()
        self.dense_macs = prunable_macs(self.geoms, seq_len)
        self.paths = adapter.linear_paths()
        self.layers: dict[str, GatedFactorized] = {}
        dense_linear = 0
        for path in self.paths:
            layer = GatedFactorized(self.model.get_submodule(path))
            set_path(self.model, path, layer)
            self.layers[path] = layer
            dense_linear += layer.shape[0] * layer.shape[1]
        self.score_macs = self.dense_macs - dense_linear  # attention scores: FLOP does not touch them
        self.gates = gate_set({_key(p): layer.rank for p, layer in self.layers.items()})

    def sampled_gates(self, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        return {path: self.gates[_key(path)].sample(generator) for path in self.layers}

    def _use_gates(self, values: dict[str, torch.Tensor] | None) -> None:
        for path, layer in self.layers.items():
            layer.z = None if values is None else values[path]

    def task_loss(self, batch: dict, generator: torch.Generator | None) -> tuple[torch.Tensor, dict]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with self.applied(self.gate_values(generator)):
            if self.lm:
                loss = lm_loss(self.model(input_ids=ids, attention_mask=mask).logits, ids, mask)
                return loss, {"lm_loss": loss.item()}
            inputs = {"input_ids": ids, "attention_mask": mask, "output_hidden_states": True}
            with torch.no_grad():
                teacher_out = self.teacher[0](**inputs)
            return distillation_loss(self.model(**inputs), teacher_out, self.mapping, mask)

    def expected_kept(self) -> torch.Tensor:
        total = torch.tensor(float(self.score_macs))
        for path, layer in self.layers.items():
            total = total + self.gates[_key(path)].keep_probability().sum() * sum(layer.shape)
        return total / self.dense_macs

    def final_gates(self, budget: float) -> dict[str, torch.Tensor]:
        """Each matrix's deterministic gates, then the smallest components zeroed while the
        deployed MACs exceed the budget (`self.trimmed` of them)."""
        values = {path: self.gates[_key(path)].deterministic() for path in self.layers}
        self.trimmed = self._trim(values, budget)
        return values

    @torch.no_grad()
    def finish(self, budget: float) -> Masks:
        """Replace every gated layer by its deployed form for the final gates. Returns the masks of
        attention units and neurons: all kept, since FLOP cuts ranks instead."""
        self.fix(budget)
        for path, layer in self.layers.items():
            set_path(self.model, path, layer.thin(self.fixed[path]))
        return full_masks(self.geoms)

    def kept_fraction(self, values: dict[str, torch.Tensor]) -> float:
        deployed = sum(deployed_macs(int((values[p] > 0).sum()), layer.shape) for p, layer in self.layers.items())
        return (self.score_macs + deployed) / self.dense_macs

    def _trim(self, values: dict[str, torch.Tensor], budget: float) -> int:
        if self.kept_fraction(values) <= budget * (1 + 1e-12):
            return 0
        components = sorted((float(z[c]), path, int(c)) for path, z in values.items() for c in (z > 0).nonzero().flatten())
        ranks = {p: int((z > 0).sum()) for p, z in values.items()}
        deployed = {p: deployed_macs(ranks[p], self.layers[p].shape) for p in values}
        total = self.score_macs + sum(deployed.values())
        trimmed = 0
        for _, path, c in components:
            if total <= budget * self.dense_macs * (1 + 1e-12):
                break
            values[path][c] = 0.0
            ranks[path] -= 1
            new = deployed_macs(ranks[path], self.layers[path].shape)
            total += new - deployed[path]
            deployed[path] = new
            trimmed += 1
        return trimmed


def _key(path: str) -> str:
    return path.replace(".", "-")  # ModuleDict keys cannot hold dots
