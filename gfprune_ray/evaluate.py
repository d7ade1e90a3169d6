"""Measuring a pruned model against its dense original: quality, MACs, parameters, latency.

Quality is reported per model kind and never folded into one easy number:
- causal LMs: perplexity on held-out text (relative quality = dense ppl / pruned ppl);
- encoders: fidelity, the mean cosine similarity of the pruned model's sentence embeddings
  (mean pooling over non-padding tokens, L2-normalised) to the dense model's; and accuracy when
  the model has a classification head and the data has labels.
Each is measured per evaluation corpus (`CorpusReferences`): the calibration data's held-back
examples and any other corpora, so that a model pruned on one domain is judged on others too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .cpu_precision import float32_products
from .flops import model_macs
from .latency import LatencySettings, available_cpus, paired_latency
from .models import Adapter


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix, model)


@torch.inference_mode()
def sentence_embeddings(model: nn.Module, batches: list[dict], on_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (the sentence-transformers recipe)."""
    out = []
    with float32_products(model):
        for batch in batches:
            hidden = _base(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
            if on_batch:
                on_batch()
    return torch.cat(out)


def fidelity(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows of two sets of normalised embeddings."""
    return float((reference * embeddings).sum(-1).mean())


@torch.inference_mode()
def perplexity(model: nn.Module, batches: list[dict], on_batch: Callable[[], None] | None = None) -> float:
    """exp of the mean next-token cross-entropy over non-padding tokens."""
    total, count = 0.0, 0
    with float32_products(model):
        for batch in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((target != -100).sum())
            if on_batch:
                on_batch()
    return float(torch.exp(torch.tensor(total / max(count, 1))))


@torch.inference_mode()
def accuracy(model: nn.Module, batches: list[dict], labels: list[int]) -> float:
    with float32_products(model):
        predictions = torch.cat([model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1) for b in batches])
    return float((predictions == torch.tensor(labels)).double().mean())


def has_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


class QualityReference:
    """What the dense model scores on the evaluation batches, computed once and reused per prune."""

    def __init__(self, dense: nn.Module, adapter: Adapter, batches: list[dict], labels: list[int] | None = None, on_batch=None, task: str = "auto"):
        """`task`: auto (perplexity for causal LMs, else fidelity; accuracy too when there are
        labels and a classifier), embedding (fidelity only), lm or classification (required)."""
        # perplexity needs an LM head; a bare decoder (GPT2Model) is judged by fidelity like an encoder
        is_lm = adapter.is_lm
        if task == "lm" and not is_lm:
            raise ValueError(f"task=lm needs a causal language model with an LM head, not {type(dense).__name__}")
        if task == "classification" and (labels is None or not has_classifier(dense)):
            raise ValueError("task=classification needs a sequence classifier and integer labels in the data")
        self.causal = is_lm and task != "embedding"
        self.batches = batches
        self.labels = labels if labels is not None and has_classifier(dense) and task != "embedding" else None
        if self.causal:
            self.dense_value = perplexity(dense, batches, on_batch)
        else:
            self.embeddings = sentence_embeddings(dense, batches, on_batch)
            self.dense_value = 1.0
        self.dense_accuracy = accuracy(dense, batches, self.labels) if self.labels is not None else None

    def measure(self, model: nn.Module, on_batch=None) -> dict:
        """Quality of `model` next to the dense model's, as a flat dict of metrics."""
        if self.causal:
            ppl = perplexity(model, self.batches, on_batch)
            result = {"quality_metric": "perplexity", "perplexity": ppl, "dense_perplexity": self.dense_value, "relative_quality": self.dense_value / ppl}
        else:
            value = fidelity(self.embeddings, sentence_embeddings(model, self.batches, on_batch))
            result = {"quality_metric": "fidelity", "fidelity": value, "relative_quality": value}
        if self.labels is not None:
            result["accuracy"] = accuracy(model, self.batches, self.labels)
            result["dense_accuracy"] = self.dense_accuracy
        return result


class CorpusReferences:
    """One QualityReference per evaluation corpus (label -> reference), the calibration corpus's
    among them. `measure` reports the calibration corpus's metrics under their plain names (as a
    single reference does) and every corpus's as `<metric>/<label>`."""

    def __init__(self, references: dict[str, QualityReference], calibration: str):
        if calibration not in references:
            raise ValueError(f"no reference for the calibration corpus {calibration!r}")
        self.references, self.calibration = references, calibration

    @classmethod
    def build(cls, dense: nn.Module, adapter: Adapter, corpora: dict[str, tuple[list[dict], list[int] | None]], calibration: str,
              on_batch=None, task: str = "auto") -> CorpusReferences:
        """References from label -> (batches, labels). `task` applies to the calibration corpus; a
        classification task falls back to auto on a corpus without labels."""
        refs = {}
        for label, (batches, labels) in corpora.items():
            own = "auto" if task == "classification" and labels is None and label != calibration else task
            refs[label] = QualityReference(dense, adapter, batches, labels, on_batch, task=own)
        return cls(refs, calibration)

    def __len__(self) -> int:
        """Batches that one measurement runs through the model."""
        return sum(len(r.batches) for r in self.references.values())

    def measure(self, model: nn.Module, on_batch=None) -> dict:
        per_corpus = {label: ref.measure(model, on_batch) for label, ref in self.references.items()}
        result = dict(per_corpus[self.calibration])
        for label, metrics in per_corpus.items():
            result |= {f"{k}/{label}": v for k, v in metrics.items() if k != "quality_metric"}
        return result


def dense_counts(adapter: Adapter, seq_len: int = 128) -> dict:
    """MACs and parameters of a model before it is cut, for `efficiency`."""
    return {"dense_macs": model_macs(adapter, seq_len), "dense_params": count_params(adapter.model)}


def efficiency(dense_adapter: Adapter | None, pruned_adapter: Adapter, latency: LatencySettings = LatencySettings(),
               counts: dict | None = None) -> dict:
    """MACs at `latency.seq_len` tokens, parameters and measured latency of dense and pruned, with
    the ideal speedup beside it (latency.py says how the latency is made trustworthy). With the
    dense model's `counts` and no latency (repeats 0) the dense model itself is not needed: a
    caller can cut it in place instead of keeping a second copy."""
    seq_len = latency.seq_len
    counts = counts or dense_counts(dense_adapter, seq_len)
    pruned_macs = model_macs(pruned_adapter, seq_len)
    result = {
        "dense_macs": counts["dense_macs"],
        "macs": pruned_macs,
        "macs_ratio": pruned_macs / counts["dense_macs"],
        "ideal_speedup": counts["dense_macs"] / pruned_macs,
        "dense_params": counts["dense_params"],
        "params": count_params(pruned_adapter.model),
        "latency_seq_len": seq_len,
    }
    threads = min(latency.threads, len(available_cpus()))  # more would wait for each other, not speed up
    if latency.repeats > 0:  # 0 repeats: no latency, only the counts
        result["latency_threads"] = threads
    for b in latency.batch_sizes if latency.repeats > 0 else ():
        timed = paired_latency(dense_adapter.model, pruned_adapter.model, b, seq_len, latency.repeats, threads)
        result |= timed.metrics(b, result["ideal_speedup"])
    return result
