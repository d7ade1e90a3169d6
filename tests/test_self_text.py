"""Text a causal LM writes itself, added to the calibration data (self_text.py)."""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import make_tokenizer, tiny_model

from gfprune_ray.curvature import draw
from gfprune_ray.errors import UserError
from gfprune_ray.models import adapter_for
from gfprune_ray.self_text import _sample, self_texts


def _sample_without_cache(model, start: int, rows: int, steps: int, rng: torch.Generator) -> list[list[int]]:
    """The definition: each token drawn from the model's next-token distribution given the whole
    prefix, recomputed from scratch at every step."""
    ids = torch.full((rows, 1), start, dtype=torch.long)
    with torch.no_grad():
        for _ in range(steps):
            probs = model(input_ids=ids).logits[:, -1].float().softmax(-1)
            ids = torch.cat([ids, draw(probs, rng)], 1)
    return ids[:, 1:].tolist()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_cached_sampling_draws_what_the_whole_prefix_gives(name):
    model = tiny_model(name)
    got = _sample(model, 0, 5, 9, torch.Generator().manual_seed(4), eos=None)
    want = _sample_without_cache(model, 0, 5, 9, torch.Generator().manual_seed(4))
    assert got == want and len({tuple(row) for row in got}) == 5  # different rows, not one text repeated


def test_texts_stop_at_end_of_text_and_depend_on_the_seed_only(tmp_path):
    model, tokenizer = tiny_model("llama"), make_tokenizer(tmp_path)
    eos = model.config.eos_token_id
    texts = self_texts(model, tokenizer, 12, 8, seed=3, batch_size=4)
    again = self_texts(model, tokenizer, 12, 8, seed=3, batch_size=4)
    other = self_texts(model, tokenizer, 12, 8, seed=4, batch_size=4)
    assert texts == again and texts != other and 0 < len(texts) <= 12
    # each text is its row's tokens up to the first end-of-text token, decoded without specials
    rows = []
    for first in range(0, 12, 4):
        rng = torch.Generator().manual_seed(zlib.crc32(f"self-text/3/{first}".encode()))
        rows += _sample_without_cache(model, model.config.bos_token_id, 4, 8, rng)
    cut = [row[: row.index(eos)] if eos in row else row for row in rows]
    want = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in cut]
    assert texts == [t for t in want if t]
    assert all(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= 8 for t in texts)


def test_only_language_models_write_text(tmp_path):
    assert adapter_for(tiny_model("llama")).is_lm and adapter_for(tiny_model("gpt2")).is_lm
    assert not adapter_for(tiny_model("bert")).is_lm
    model = tiny_model("llama")
    model.config.bos_token_id = model.config.eos_token_id = None
    with pytest.raises(UserError, match="no beginning- or end-of-text token"):
        self_texts(model, make_tokenizer(tmp_path), 2, 4, seed=0)
