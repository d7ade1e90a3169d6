"""Data input: every supported format reads the same examples; splits are disjoint and seeded."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gfprune_ray.data import (
    Examples,
    batches_fingerprint,
    mean_tokens_per_sequence,
    pydoc_paragraphs,
    read_examples,
    split_examples,
)
from gfprune_ray.errors import UserError

TEXTS = [f"example number {i} with a few words" for i in range(12)]


def test_text_jsonl_parquet_and_folder_read_the_same_examples(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(TEXTS) + "\n\n   \n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(TEXTS)))
    pq.write_table(pa.table({"text": TEXTS, "label": [i % 2 for i in range(12)]}), tmp_path / "c.parquet")
    assert read_examples(str(tmp_path / "a.txt")).texts == TEXTS
    jsonl = read_examples(str(tmp_path / "b.jsonl"))
    parquet = read_examples(str(tmp_path / "c.parquet"))
    assert jsonl.texts == parquet.texts == TEXTS
    assert jsonl.labels == parquet.labels == [i % 2 for i in range(12)]
    folder = read_examples(str(tmp_path))
    assert folder.texts == TEXTS * 3
    assert folder.labels is None  # the text file has no labels, so the folder as a whole has none


def test_parquet_without_text_column_is_a_user_error(tmp_path):
    pq.write_table(pa.table({"body": TEXTS}), tmp_path / "x.parquet")
    with pytest.raises(UserError, match="x.parquet.*'text'"):
        read_examples(str(tmp_path / "x.parquet"))


def test_pydoc_corpus_is_real_prose():
    paragraphs = pydoc_paragraphs()
    assert len(paragraphs) > 1000
    assert all(len(p) >= 80 for p in paragraphs)
    assert sum(len(p) for p in paragraphs) > 300_000


def test_split_is_disjoint_seeded_and_bounded():
    examples = Examples([f"t{i}" for i in range(100)], list(range(100)))
    calib, evaluation = split_examples(examples, 30, 20, seed=1)
    assert len(calib) == 30 and len(evaluation) == 20
    assert not set(calib.texts) & set(evaluation.texts)
    assert [f"t{label}" for label in evaluation.labels] == evaluation.texts
    again, _ = split_examples(examples, 30, 20, seed=1)
    other, _ = split_examples(examples, 30, 20, seed=2)
    assert again.texts == calib.texts and other.texts != calib.texts
    small_calib, small_eval = split_examples(examples, 500, 500, seed=0)  # asks for more than there is
    assert len(small_eval) == 50 and len(small_calib) == 50


def test_fingerprint_and_mean_length_ignore_padding():
    import torch

    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids != 0).long()
    padded = {"input_ids": torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1), "attention_mask": torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], 1)}
    plain = {"input_ids": ids, "attention_mask": mask}
    assert batches_fingerprint([plain]) == batches_fingerprint([padded])
    assert mean_tokens_per_sequence([plain]) == mean_tokens_per_sequence([padded]) == 2.5
