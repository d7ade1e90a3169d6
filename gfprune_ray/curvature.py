"""Curvature statistics for LLM Surgeon: the two Kronecker factors of the loss curvature of every
output projection, from one forward and one backward pass per batch.

For an output projection y = W x the curvature of the loss in W is approximated by G (x) A:
- A = sum_t x_t x_t^T over tokens, the input Gram matrix, recorded exactly as `stats.py` records
  it (split into fit and held-out rows);
- G = sum_t g_t g_t^T, with g_t the gradient of the loss at the projection's output y_t.

No labels are needed: the loss is the negative log-likelihood of targets *sampled from the model's
own predictions*, which makes E[g g^T] the Fisher of the model's predictive distribution:
- logits per token (causal LM, masked-LM head): one token per position from softmax(logits);
- logits per sequence (classifier): one class per sequence;
- no head (a sentence encoder such as MiniLM): the last hidden state h_t is the mean of a Gaussian
  with identity covariance and the target is h_t + eps_t, eps_t ~ N(0, I). The gradient at h_t is
  then -eps_t, and the Fisher of this Gaussian is the Gauss-Newton matrix of the output
  distillation loss 1/2 |h'_t - h_t|^2: the loss that matters when the output is an embedding.

Each example's targets come from a generator seeded by its own tokens and the seed, so G does not
depend on how examples are batched or sharded, and the statistics of shards add up exactly. The
loss is a sum over tokens (not a mean), for the same reason.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .cpu_precision import float32_products
from .models import Adapter
from .stats import BatchRouting, GramStats, ModelStats, Site, empty_stats, record_inputs


@dataclass
class SiteCurvature:
    """A (fit and held-out parts) and G of one output projection."""

    fit: GramStats
    heldout: GramStats
    grad: GramStats

    @property
    def inputs(self) -> GramStats:
        return self.fit + self.heldout


@dataclass
class Curvature:
    """Curvature statistics of every site of a model; sums, so shards add up."""

    fit: ModelStats
    heldout: ModelStats
    grads: ModelStats

    def __add__(self, other: Curvature) -> Curvature:
        return Curvature(self.fit + other.fit, self.heldout + other.heldout, self.grads + other.grads)

    def __getitem__(self, site: Site) -> SiteCurvature:
        return SiteCurvature(self.fit[site], self.heldout[site], self.grads[site])

    @property
    def sites(self) -> list[Site]:
        return list(self.fit.sites)


def example_generator(ids: torch.Tensor, seed: int) -> torch.Generator:
    """A generator determined by one example's tokens and the seed."""
    return torch.Generator().manual_seed(zlib.crc32(ids.to("cpu", torch.int64).numpy().tobytes(), seed & 0xFFFFFFFF))


def draw(probs: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """One class per row of `probs`, drawn on the CPU (where the generator lives) by inverting its
    cumulative distribution with one uniform number per row. torch.multinomial draws one random
    number per class: over SmolLM2's 49,152 words it took 2.2 s per 1,600 tokens, half a forward
    pass; this takes 0.15 s. The cumulative sums are float64, so their rounding is far below any
    class's probability that matters."""
    cdf = probs.detach().to("cpu", torch.float64).cumsum(-1)
    u = torch.rand((cdf.shape[0], 1), generator=rng, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1).to(probs.device)


def sampled_loss(outputs, input_ids: torch.Tensor, attention_mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Negative log-likelihood of targets sampled from the model's own predictive distribution,
    summed over non-padding tokens (see the module docstring).

    Targets are drawn per example, but the loss is one expression over the whole batch: a loss
    per example would make the backward pass fill a batch-sized zero gradient for each of them."""
    logits = getattr(outputs, "logits", None)
    mask = attention_mask.bool()
    counts = mask.sum(1).tolist()
    rngs = [example_generator(ids[keep], seed) for ids, keep in zip(input_ids, mask)]
    if logits is not None and logits.dim() == 2:  # one prediction per sequence
        own = logits.float()
        probs = own.detach().softmax(-1)
        target = torch.cat([draw(probs[row : row + 1], rng) for row, rng in enumerate(rngs)]).flatten()
        return torch.nn.functional.cross_entropy(own, target, reduction="sum")
    if logits is not None:  # one prediction per token; boolean indexing keeps rows in order
        own = logits[mask].float()
        probs = own.detach().softmax(-1)
        target = torch.cat([draw(p, rng) for p, rng in zip(probs.split(counts), rngs)]).flatten()
        return torch.nn.functional.cross_entropy(own, target, reduction="sum")
    # Gaussian around the last hidden state: the loss's gradient at h is -eps
    hidden = outputs.last_hidden_state[mask].float()
    eps = torch.cat([torch.randn((n, hidden.shape[-1]), generator=rng) for n, rng in zip(counts, rngs)])
    return -(eps.to(hidden.device) * hidden).sum()


def record_output_gradients(adapter: Adapter, grads: ModelStats, routing: BatchRouting) -> list:
    """Forward hooks that hang a gradient hook on every site's output: its backward adds g g^T."""

    def hook_for(key: Site):
        def on_grad(g: torch.Tensor) -> None:
            grads.sites[key].add_(routing.tokens_of(g))

        def hook(_module, _args, output):
            if output.requires_grad:
                output.register_hook(on_grad)

        return hook

    return [adapter.output_projection(i, kind).register_forward_hook(hook_for((i, kind))) for (i, kind) in grads.sites]


@contextmanager
def activation_gradients(model: torch.nn.Module) -> Iterator[None]:
    """Inside: grad mode on, parameters get no gradients, and the input embeddings are made to
    require one instead, so a backward pass computes gradients of activations only, none of the
    weights. Parameters and hooks are restored on exit."""
    params = [p for p in model.parameters() if p.requires_grad]
    handle = model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_())
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        handle.remove()
        for p in params:
            p.requires_grad_(True)


def collect_curvature(
    adapter: Adapter,
    batches: Iterable[dict[str, torch.Tensor]],
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
    sites: Iterable[Site] | None = None,
) -> Curvature:
    """A (fit / held-out by the rows' `heldout` flag) and G of `sites` (default: every site) over
    `batches`, one forward and one backward pass (`activation_gradients`) per batch. A group of
    sites gets exactly the values a pass over every site gives them: each accumulator sees the
    same products in the same order."""
    fit, heldout = empty_stats(adapter, sites), empty_stats(adapter, sites)
    grads = ModelStats({site: GramStats.zeros(adapter.hidden_size) for site in fit.sites})
    routing = BatchRouting()
    model = adapter.model
    handles = record_inputs(adapter, fit, heldout, routing) + record_output_gradients(adapter, grads, routing)
    was_training = model.training
    model.eval()
    try:
        with activation_gradients(model), float32_products(model):
            for batch in batches:
                tokens = routing.start(batch)
                ids, mask = batch["input_ids"], batch["attention_mask"]
                sampled_loss(model(input_ids=ids, attention_mask=mask), ids, mask, seed).backward()
                if on_batch is not None:
                    on_batch(tokens)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return Curvature(fit, heldout, grads)
