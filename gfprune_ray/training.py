"""The training loop that CoFi and FLOP share: a gated student stepped toward a budget.

A `GatedStudent` owns the model being pruned, its hard-concrete gates and a `Lagrangian`; its
forward returns the whole loss (task loss plus the Lagrangian of the expected kept MACs against
the current target), so that one DDP wrapper around it syncs everything on several GPUs. Three
optimizers step it: the weights (AdamW), the gates (SGD for CoFi, Adam for FLOP: see the students)
and the two multipliers (Adam with maximize=True: the gradient ascent that makes the budget a
constraint rather than a wish).

A run has two phases, as CoFi's recipe has (prune, then fine-tune the pruned model): for `steps`
steps the gates are sampled and learn; then the student is `fix`ed to the gate values that
`finish` will deploy, and `finetune` x `steps` more steps train only the weights of that
structure, with no Lagrangian. The fixed values follow from the frozen gates, so a run resumed in
the second phase fixes the same ones.

`GatedTraining` holds all state of a run (student, optimizers, step, random generator, loss curve)
and saves it to a folder as safetensors plus JSON: no pickles, and a resumed run continues with
exactly the state it stopped with.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

    steps: int  # steps in which the gates learn, with the weights
    budget: float
    lr: float = 5e-5  # weights
    # multipliers: set on tiny models and MiniLM so that 200 steps land near the budget
    lambda_lr: float = 0.02
    # the gates' optimizer ("sgd" or "adam") and learning rate; None: the method's own
    # (`GatedStudent.gate_optimizer`, `gate_lr`)
    gate_optimizer: str | None = None
    gate_lr: float | None = None
    warmup: float = 0.5  # fraction of `steps` over which the target falls to the budget
    # then this fraction of `steps` again fine-tunes the fixed structure. Measured on MiniLM at
    # budget 0.5 (issue 6): the cut after 200 steps of gate training had fidelity 0.28, 0.51 after
    # 100 more steps of fine-tuning (the weights had learned to expect the gates' noise)
    finetune: float = 0.25
    finetune_lr: float = 2e-4  # weights, once the structure is fixed: a large deficit, few steps
    checkpoint_every: int = 0  # steps between checkpoints; 0: none
    seed: int = 0

    @property
    def total_steps(self) -> int:
        """Pruning steps, then fine-tuning steps."""
        return self.steps + round(self.steps * self.finetune)


class GatedStudent(nn.Module):
    """Base class of CoFi's and FLOP's students. Subclasses fill `gates` and define `task_loss`
    (what the model should still do, computed `with self.applied(self.gate_values(generator))`),
    `expected_kept` (E[kept prunable MACs] / dense), `final_gates` and `finish`."""

    # Adam suits gates of one granularity (FLOP's rank components): it moves each gate at about
    # the same speed, and the Lagrangian lands on the budget whatever the model's gradient scale
    gate_optimizer = "adam"
    gate_lr = 0.05

    def __init__(self):
        super().__init__()
        self.gates = nn.ModuleDict()
        self.lagrangian = Lagrangian()
        self.fixed: dict | None = None  # the final gate values, once the pruning phase is over
        self.trimmed = 0

    def task_loss(self, batch: dict, generator: torch.Generator | None) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def expected_kept(self) -> torch.Tensor:
        raise NotImplementedError

    def sampled_gates(self, generator: torch.Generator | None) -> dict:
        """One draw of every gate, keyed as `applied` expects."""
        raise NotImplementedError

    def final_gates(self, budget: float) -> dict:
        """The deterministic gate values that `finish` deploys, trimmed so the deployed model never
        exceeds `budget` (`self.trimmed` units or components zeroed)."""
        raise NotImplementedError

    def _use_gates(self, values: dict | None) -> None:
        """Make the model compute with these gate values (None: without gates)."""
        raise NotImplementedError

    def finish(self, budget: float) -> Masks:
        """Cut the model in place to the final gates; the masks of attention units and neurons kept."""
        raise NotImplementedError

    @contextmanager
    def applied(self, values: dict) -> Iterator[None]:
        self._use_gates(values)
        try:
            yield
        finally:
            self._use_gates(None)

    def gate_values(self, generator: torch.Generator | None) -> dict:
        """What a training step computes with: a draw while the gates learn, then the fixed values."""
        return self.fixed if self.fixed is not None else self.sampled_gates(generator)

    @torch.no_grad()
    def fix(self, budget: float) -> None:
        """End the pruning phase: from now on the model computes with its final gates (no gradient
        reaches them or the multipliers), so fine-tuning trains the model that will be deployed."""
        if self.fixed is None:
            self.fixed = self.final_gates(budget)

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
        parts = parts | {"task_loss": float(task.detach()), "expected_kept": float(kept.detach())}
        if self.fixed is not None:
            return task, parts | {"penalty": 0.0}
        # the Lagrangian is weighted by the number of gates: one gate's share of the kept fraction
        # shrinks with the model's width, and without the weight the multipliers would have to
        # grow as wide before a wide model's gates felt them (MiniLM's 9,000 gates did not move
        # in 100 steps). Scaling the gap instead would square the weight in the quadratic term
        # and push every gate down in lockstep (measured: all log_alpha within 0.1 at the end).
        penalty = self.gate_count() * self.lagrangian(kept, target)
        return task + penalty, parts | {"penalty": float(penalty.detach())}


def gate_optimizer_for(student: GatedStudent, schedule: Schedule) -> torch.optim.Optimizer:
    """The schedule's choice, else the method's. SGD makes a gate's step follow the size of its
    gradient; Adam divides it by the gate's own gradient scale (see `GatedStudent.gate_optimizer`)."""
    kind = schedule.gate_optimizer or student.gate_optimizer
    lr = schedule.gate_lr or student.gate_lr
    if kind == "sgd":
        return torch.optim.SGD(student.gates.parameters(), lr=lr)
    if kind == "adam":
        return torch.optim.Adam(student.gates.parameters(), lr=lr)
    raise ValueError(f"the gates' optimizer is 'sgd' or 'adam', not {kind!r}")


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
            "gates": gate_optimizer_for(inner, schedule),
            "lambdas": torch.optim.Adam(inner.lagrangian.parameters(), lr=schedule.lambda_lr, maximize=True),
        }
        self.step = 0
        self.generator = torch.Generator().manual_seed(schedule.seed)
        self.curve: list[dict] = []
        with torch.no_grad():
            self.start = float(inner.expected_kept())  # FLOP's full-rank factors cost more than dense

    @property
    def done(self) -> bool:
        return self.step >= self.schedule.total_steps

    def train_step(self, batch: dict) -> dict:
        self.student.train()
        s = self.schedule
        if self.step >= s.steps:
            unwrap(self.student).fix(s.budget)
            for group in self.optimizers["weights"].param_groups:
                group["lr"] = s.finetune_lr
        target = target_at(self.step, s.steps, s.budget, s.warmup, self.start)
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
