"""The training loop that CoFi and FLOP share: a gated student stepped toward a budget.

A `GatedStudent` owns the model being pruned, its hard-concrete gates and a `Lagrangian`; its
forward returns the whole loss (task loss plus the Lagrangian of the expected kept MACs against
the current target), so that one DDP wrapper around it syncs everything on several GPUs. Three
optimizers step it: the weights (AdamW), the gates (Adam) and the two multipliers (Adam with
maximize=True: the gradient ascent that makes the budget a constraint rather than a wish).

`GatedTraining` holds all state of a run (student, optimizers, step, random generator, loss curve)
and saves it to a folder as safetensors plus JSON: no pickles, and a resumed run continues with
exactly the state it stopped with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .gates import HardConcreteGates, Lagrangian, target_at
from .search import Masks

STATE_TENSORS = "training.safetensors"
STATE_JSON = "training.json"


@dataclass
class Schedule:
    """How long and how fast to train. The defaults suit a short CPU run on a small model."""

    steps: int
    budget: float
    lr: float = 5e-5  # weights
    # gates and multipliers: tuned on tiny models and MiniLM so that 200 steps land on the budget;
    # faster multipliers overshoot and oscillate (the gates lag them through Adam's momentum)
    gate_lr: float = 0.05
    lambda_lr: float = 0.02
    warmup: float = 0.5  # fraction of steps over which the target falls to the budget
    checkpoint_every: int = 0  # steps between checkpoints; 0: none
    seed: int = 0


class GatedStudent(nn.Module):
    """Base class of CoFi's and FLOP's students. Subclasses fill `gates` and define `task_loss`
    (what the model should still do) and `expected_kept` (E[kept prunable MACs] / dense)."""

    def __init__(self):
        super().__init__()
        self.gates = nn.ModuleDict()
        self.lagrangian = Lagrangian()

    def task_loss(self, batch: dict, generator: torch.Generator | None) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def expected_kept(self) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, budget: float) -> Masks:
        """Cut the model in place to the deterministic gates, never above `budget`; the masks of
        attention units and neurons kept."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> GatedStudent:
        """Gates sample in training; the model itself stays in eval mode, so its dropout is off
        (attention kernels read the attention module's flag, not only nn.Dropout's). The gates'
        noise is the regularizer, and without dropout's draws from torch's global generator a
        run is reproducible and resumes bit for bit from a checkpoint."""
        super().train(mode)
        self.model.eval()
        return self

    def weight_parameters(self) -> list[nn.Parameter]:
        gated = {id(p) for p in self.gates.parameters()} | {id(p) for p in self.lagrangian.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in gated]

    def gate_count(self) -> int:
        return sum(len(g) for g in self.gates.values())

    def forward(self, batch: dict, target: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        task, parts = self.task_loss(batch, generator)
        kept = self.expected_kept()
        # the Lagrangian is weighted by the number of gates: one gate's share of the kept fraction
        # shrinks with the model's width, and without the weight the multipliers would have to
        # grow as wide before a wide model's gates felt them (MiniLM's 9,000 gates did not move
        # in 100 steps). Scaling the gap instead would square the weight in the quadratic term
        # and push every gate down in lockstep (measured: all log_alpha within 0.1 at the end).
        penalty = self.gate_count() * self.lagrangian(kept, target)
        return task + penalty, parts | {"task_loss": float(task.detach()), "expected_kept": float(kept.detach()), "penalty": float(penalty.detach())}


def unwrap(student: nn.Module) -> GatedStudent:
    """The student inside a DDP wrapper (or the student itself)."""
    return getattr(student, "module", student)


class GatedTraining:
    """All state of one training run, one step at a time."""

    def __init__(self, student: nn.Module, schedule: Schedule):
        self.student = student
        self.schedule = schedule
        inner = unwrap(student)
        self.optimizers = {
            "weights": torch.optim.AdamW(inner.weight_parameters(), lr=schedule.lr, weight_decay=0.0),
            "gates": torch.optim.Adam(inner.gates.parameters(), lr=schedule.gate_lr),
            "lambdas": torch.optim.Adam(inner.lagrangian.parameters(), lr=schedule.lambda_lr, maximize=True),
        }
        self.step = 0
        self.generator = torch.Generator().manual_seed(schedule.seed)
        self.curve: list[dict] = []
        with torch.no_grad():
            self.start = float(inner.expected_kept())  # FLOP's full-rank factors cost more than dense

    @property
    def done(self) -> bool:
        return self.step >= self.schedule.steps

    def train_step(self, batch: dict) -> dict:
        self.student.train()
        target = target_at(self.step, self.schedule.steps, self.schedule.budget, self.schedule.warmup, self.start)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss, parts = self.student(batch, target, self.generator)
        loss.backward()
        for opt in self.optimizers.values():
            opt.step()
        lagrangian = unwrap(self.student).lagrangian
        row = {"step": self.step, "loss": float(loss.detach()), "target": target, **parts,
               "lambda1": lagrangian.lambda1.item(), "lambda2": lagrangian.lambda2.item()}
        self.curve.append(row)
        self.step += 1
        return row

    # ---- checkpoints: safetensors for tensors, JSON for the rest -------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        tree = {
            "student": _flatten(unwrap(self.student).state_dict(), "student", tensors),
            "optimizers": {name: _flatten(opt.state_dict(), f"opt/{name}", tensors) for name, opt in self.optimizers.items()},
            "generator": _flatten(self.generator.get_state(), "generator", tensors),
            "step": self.step,
            "curve": self.curve,
            "schedule": asdict(self.schedule),
        }
        save_file(tensors, str(folder / STATE_TENSORS))
        (folder / STATE_JSON).write_text(json.dumps(tree))

    def load(self, folder: str | Path) -> None:
        folder = Path(folder)
        tensors = load_file(str(folder / STATE_TENSORS))
        tree = json.loads((folder / STATE_JSON).read_text())
        unwrap(self.student).load_state_dict(_unflatten(tree["student"], tensors))
        for name, opt in self.optimizers.items():
            opt.load_state_dict(_unflatten(tree["optimizers"][name], tensors))
        self.generator.set_state(_unflatten(tree["generator"], tensors))
        self.step = tree["step"]
        self.curve = tree["curve"]


def _flatten(value, key: str, tensors: dict[str, torch.Tensor]):
    """`value` with every tensor moved into `tensors` under a path key; dicts keep int keys."""
    if isinstance(value, torch.Tensor):
        # a copy per key: safetensors refuses tensors that share storage (tied embeddings)
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"items": [[k, _flatten(v, f"{key}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list": [_flatten(v, f"{key}/{n}", tensors) for n, v in enumerate(value)]}
    return {"value": value}


def _unflatten(node, tensors: dict[str, torch.Tensor]):
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "items" in node:
        return {k: _unflatten(v, tensors) for k, v in node["items"]}
    if "list" in node:
        return [_unflatten(v, tensors) for v in node["list"]]
    return node["value"]


def batch_for(step: int, batches: list[dict], rank: int = 0, world: int = 1) -> dict:
    """The batch a worker trains on at `step`: the calibration batches in a fixed cycle, split over
    DDP ranks, so a resumed run sees the batches it would have seen."""
    return batches[(step * world + rank) % len(batches)]


def run_training(
    training: GatedTraining,
    batches: list[dict],
    on_step: Callable[[dict], None] | None = None,
    checkpoint: Callable[[GatedTraining], None] | None = None,
    rank: int = 0,
    world: int = 1,
) -> GatedTraining:
    """Step until the schedule is done, calling `checkpoint` every `checkpoint_every` steps."""
    if not batches:
        raise ValueError("training needs at least one batch")
    every = training.schedule.checkpoint_every
    while not training.done:
        row = training.train_step(batch_for(training.step, batches, rank, world))
        if on_step is not None:
            on_step(row)
        if checkpoint is not None and every and training.step % every == 0 and not training.done:
            checkpoint(training)
    return training


def gate_set(sizes: dict[str, int]) -> nn.ModuleDict:
    """A ModuleDict of hard-concrete gate vectors by name."""
    return nn.ModuleDict({name: HardConcreteGates(n) for name, n in sizes.items()})
