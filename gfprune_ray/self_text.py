"""Calibration text a causal language model writes itself.

A prune sees only its calibration text: units that text leaves idle look idle, and the refit
learns how that text's activations relate. Calibrated on a narrow corpus (documentation, one
product's tickets), a decoder loses what other text needs (README, "Quality on text it was not
calibrated on"). A causal LM can show what it does in general: text sampled from its own
distribution, starting from nothing, is drawn from whatever it was trained on (the
self-calibration of Williams et al. 2024). A share of such text beside the user's keeps the
statistics from seeing one domain only.

Sampling inverts each step's cumulative distribution with one seeded uniform number per row
(`curvature.draw`), so the texts depend on the seed and the model, not on the process or the
number of threads (a flip needs a number within rounding of a class boundary).
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Callable

import torch

from .cpu_precision import float32_products
from .curvature import draw
from .errors import UserError

SELF_TEXT_TOKENS = 64  # the most tokens of one text: about a paragraph, like the calibration examples


def self_texts(model, tokenizer, n: int, max_tokens: int, seed: int, batch_size: int = 32,
               on_batch: Callable[[], None] | None = None) -> list[str]:
    """Up to `n` texts of at most `max_tokens` tokens sampled from the model (temperature 1),
    each started from the beginning-of-text token and cut at its first end-of-text token; empty
    ones are dropped. `on_batch` is called after each batch of `batch_size` texts."""
    start, eos = _token(model, tokenizer, "bos"), _token(model, tokenizer, "eos")
    if start is None:
        start = eos
    if start is None:
        raise UserError(f"{type(model).__name__} names no beginning- or end-of-text token to start its own text from")
    texts = []
    for first in range(0, n, batch_size):
        rng = torch.Generator().manual_seed(zlib.crc32(f"self-text/{seed}/{first}".encode()))
        rows = _sample(model, start, min(batch_size, n - first), max_tokens, rng, eos)
        texts += [tokenizer.decode(_until(row, eos), skip_special_tokens=True).strip() for row in rows]
        if on_batch is not None:
            on_batch()
    return [text for text in texts if text]


def _token(model, tokenizer, kind: str) -> int | None:
    """The tokenizer's `kind` ("bos", "eos") token id, else the model config's."""
    token = getattr(tokenizer, f"{kind}_token_id", None)
    return token if token is not None else getattr(model.config, f"{kind}_token_id", None)


def _sample(model, start: int, rows: int, max_tokens: int, rng: torch.Generator, eos: int | None) -> list[list[int]]:
    device = next(model.parameters()).device
    ids = torch.full((rows, 1), start, dtype=torch.long, device=device)
    # transformers 5.25 renamed the key-value cache `cache` (`past_key_values` until then)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    step, past, written, ended = ids, None, [], torch.zeros(rows, dtype=torch.bool)
    with torch.inference_mode(), float32_products(model):
        for _ in range(max_tokens):
            out = model(input_ids=step, use_cache=True, **{key: past})
            past = getattr(out, key)
            step = draw(out.logits[:, -1].float().softmax(-1), rng)
            written.append(step.cpu())
            if eos is not None:
                ended |= written[-1].flatten() == eos
                if ended.all():
                    break
    return torch.cat(written, 1).tolist() if written else [[] for _ in range(rows)]


def _until(row: list[int], eos: int | None) -> list[int]:
    return row[: row.index(eos)] if eos is not None and eos in row else row
