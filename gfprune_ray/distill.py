"""Label-free training objectives for the gated students: distillation from the frozen dense model
(CoFi, and FLOP on encoders) and next-token prediction (FLOP on decoders).

Distillation has two parts, as in CoFi (Xia et al. 2022):
- prediction: KL(teacher || student) of the output distributions where the model has logits (LM
  heads per token, classifiers per sequence); a bare encoder has none, so its last hidden states
  are matched instead (relative squared error);
- layers: the hidden states of a few teacher layers are matched by the student layers that a
  learned linear map (shared, initialised to the identity) brings closest to them. The matching is
  recomputed every step and kept in order: from the top teacher layer down, each takes the best
  student layer below the one the teacher layer above it took. A pruned student may do the work
  of teacher layer 9 in its layer 7; a fixed one-to-one mapping would fight that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MATCHED_LAYERS = 4  # teacher layers matched: CoFi matches 4 of BERT-base's 12


def relative_error(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum |s - t|^2 / sum |t|^2 over non-padding tokens: a scale-free hidden-state distance."""
    m = mask[..., None].to(student.dtype)
    return ((student - teacher) ** 2 * m).sum() / ((teacher**2) * m).sum().clamp(min=1e-12)


def output_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean KL(teacher || student) per token (3-d logits) or per sequence (2-d logits)."""
    kl = F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1), log_target=True, reduction="none").sum(-1)
    if kl.dim() == 1 or mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1)


def teacher_layers(num_layers: int, count: int = MATCHED_LAYERS) -> list[int]:
    """Evenly spaced teacher layers ending with the last one (3, 6, 9, 12 of 12; all of 2)."""
    n = min(count, num_layers)
    return sorted({round((k + 1) * num_layers / n) - 1 for k in range(n)})


def match_layers(errors: torch.Tensor) -> list[int]:
    """Student layer per teacher layer from an errors matrix (teacher rows, student columns), in
    order: from the last teacher layer down, each takes its best student layer below the previous
    choice (the last teacher layer may take any). Teacher rows beyond the layers left take the
    lowest student layer."""
    choice: list[int] = []
    limit = errors.shape[1]
    for row in reversed(range(errors.shape[0])):
        allowed = errors[row, :limit] if limit > 0 else errors[row, :1]
        j = int(torch.argmin(allowed))
        choice.append(j)
        limit = j
    return choice[::-1]


def layer_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor], mapping: nn.Module, matched: list[int], mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Sum over the matched teacher layers of the relative error of the mapped student layer chosen
    by `match_layers`; also returns that choice."""
    mapped = [mapping(h) for h in student_hidden]
    errors = torch.stack([torch.stack([relative_error(s, teacher_hidden[t], mask) for s in mapped]) for t in matched])
    choice = match_layers(errors.detach())
    loss = sum(errors[row, j] for row, j in enumerate(choice))
    return loss, choice


def identity_map(width: int) -> nn.Linear:
    mapping = nn.Linear(width, width)
    with torch.no_grad():
        mapping.weight.copy_(torch.eye(width))
        mapping.bias.zero_()
    return mapping


def prediction_loss(student_out, teacher_out, mask: torch.Tensor) -> torch.Tensor:
    logits = getattr(student_out, "logits", None)
    if logits is not None:
        return output_kl(logits, teacher_out.logits, mask)
    return relative_error(student_out.last_hidden_state, teacher_out.last_hidden_state, mask)


def distillation_loss(student_out, teacher_out, mapping: nn.Module, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Prediction plus layer distillation; both outputs need `output_hidden_states=True`."""
    student_hidden = list(student_out.hidden_states[1:])
    teacher_hidden = list(teacher_out.hidden_states[1:])
    matched = teacher_layers(len(teacher_hidden))
    pred = prediction_loss(student_out, teacher_out, mask)
    layers, choice = layer_loss(student_hidden, teacher_hidden, mapping, matched, mask)
    return pred + layers, {"prediction_loss": float(pred.detach()), "layer_loss": float(layers.detach()), "matching": choice}


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over non-padding targets."""
    target = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)
