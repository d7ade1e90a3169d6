"""Text input: files (text, JSONL, Parquet, or folders of them), the named corpora, hub datasets;
split into disjoint calibration and evaluation examples; tokenized into padded batches.

The named corpora (`corpora.py`: `pydoc`, bundled with every CPython and needing no download;
`austen`; `licenses`) are lists of paragraphs. A corpus name wins over a hub dataset name.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .corpora import CORPORA, MIN_PARAGRAPH_CHARS, pydoc_paragraphs  # noqa: F401 (re-exported)
from .errors import UserError

if TYPE_CHECKING:  # torch is imported where it is used: Ray Data workers load this module and need no torch
    import torch

BUNDLED = "pydoc"  # the default corpus: ships with Python
TEXT_SUFFIXES = {".txt", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
HELDOUT_EVERY = 5  # every 5th calibration example is held out to choose the ridge of `full`


@dataclass
class Examples:
    texts: list[str]
    labels: list[int] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> Examples:
        return Examples([self.texts[i] for i in idx], None if self.labels is None else [self.labels[i] for i in idx])


def _read_text_file(path: Path) -> Examples:
    try:
        content = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {exc.start})") from None
    return Examples([line.strip() for line in content.splitlines() if line.strip()])


def _from_records(records: list[dict], where: str) -> Examples:
    texts, labels = [], []
    for n, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{where}: record {n} has no string field 'text'")
        if record["text"].strip():
            texts.append(record["text"].strip())
            labels.append(record.get("label"))
    has_labels = labels and all(isinstance(x, int) for x in labels)
    return Examples(texts, labels if has_labels else None)


def _read_jsonl(path: Path) -> Examples:
    records = []
    text = _read_text_file(path).texts
    for n, line in enumerate(text, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return _from_records(records, str(path))


def _read_parquet(path: Path) -> Examples:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several error types for unreadable files
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    if "text" not in table.column_names:
        raise UserError(f"{path}: Parquet file has no 'text' column (columns: {', '.join(table.column_names)})")
    return _from_records(table.select([c for c in ("text", "label") if c in table.column_names]).to_pylist(), str(path))


def _read_file(path: Path) -> Examples:
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _read_jsonl(path)
    if suffix in PARQUET_SUFFIXES:
        return _read_parquet(path)
    return _read_text_file(path)


def is_hub_name(source: str) -> bool:
    """A source that is no existing path and does not look like one names a hub dataset."""
    path = Path(source)
    return not path.exists() and not path.suffix and not source.startswith((".", "/", "~"))


def check_source(source: str) -> None:
    """Fail early, before Ray or MLflow are touched, on a data path that does not exist or a named
    corpus that is not installed (reading one takes well under a second)."""
    if source in CORPORA:
        CORPORA[source]()
    elif not Path(source).exists() and not is_hub_name(source):
        raise UserError(f"data not found: {source}")


def check_sources(data: str, eval_data: list[str] | None) -> None:
    """check_source for the calibration data and every evaluation corpus."""
    for source in evaluation_sources(data, eval_data).values():
        check_source(source)


def load_hf_dataset(source: str):
    """A `datasets.Dataset` with its `text` (and `label`) columns: the train split of a hub
    dataset, or a `save_to_disk` folder. Failures are one line for the user."""
    import datasets

    try:
        if Path(source).is_dir():
            loaded = datasets.load_from_disk(source)
            dataset = loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            dataset = datasets.load_dataset(source, split="train")
    except Exception as exc:  # no network, unknown name, unreadable folder
        raise UserError(f"data not found: {source!r} is neither a file nor a loadable dataset ({type(exc).__name__})") from None
    if "text" not in dataset.column_names:
        raise UserError(f"dataset {source!r} has no 'text' column")
    return dataset.select_columns([c for c in ("text", "label") if c in dataset.column_names])


def _read_hub(name: str) -> Examples:
    return _from_records(load_hf_dataset(name).to_list(), name)


def read_examples(source: str) -> Examples:
    """All examples of a data source: a named corpus (`CORPORA`), a file, a folder of files, or a hub dataset name."""
    if source in CORPORA:
        examples = Examples(CORPORA[source]())
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES)
            parts = [_read_file(p) for p in files]
            texts = [t for p in parts for t in p.texts]
            labels = [x for p in parts for x in p.labels] if parts and all(p.labels for p in parts) else None
            examples = Examples(texts, labels)
        elif path.exists():
            examples = _read_file(path)
        elif not is_hub_name(source):
            raise UserError(f"data not found: {source}")
        else:
            examples = _read_hub(source)
    if not examples.texts:
        raise UserError(f"{source}: no text examples")
    return examples


def _same_source(a: str, b: str) -> bool:
    """Two spellings of one source: equal names, or paths to the same file or folder."""
    if a == b:
        return True
    if a in CORPORA or b in CORPORA or not (Path(a).exists() and Path(b).exists()):
        return False
    return Path(a).resolve() == Path(b).resolve()


def source_label(source: str) -> str:
    """A source's name in metric names (`relative_quality/<label>`): the corpus name, a file's
    stem, a folder's name or a hub name (/ as --), in the characters MLflow allows."""
    if source in CORPORA:
        return source
    path = Path(source)
    if path.exists():
        name = path.stem if path.is_file() else path.resolve().name
    else:
        name = source.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", name).strip(" .") or "data"


def evaluation_sources(data: str, eval_data: list[str] | None) -> dict[str, str]:
    """label -> source of every evaluation corpus, the calibration data first; a source that
    repeats the calibration data (or an earlier one) is dropped, repeated labels get -2, -3, ..."""
    sources = [data]
    for source in eval_data or []:
        source = source.strip()
        if source and not any(_same_source(source, s) for s in sources):
            sources.append(source)
    out: dict[str, str] = {}
    for source in sources:
        label, n = source_label(source), 1
        while (label if n == 1 else f"{label}-{n}") in out:
            n += 1
        out[label if n == 1 else f"{label}-{n}"] = source
    return out


def example_key(seed: int, text: str) -> int:
    """A seeded pseudo-random sort key of one example (63 bits, fits an int64 column).

    Sorting by this key is the seeded shuffle: it needs no global index, so the farm can select
    the same examples from Ray Data (the smallest keys) as the single process does here."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") >> 1


def split_sizes(total: int, calibration: int, evaluation: int) -> tuple[int, int]:
    """(calibration, evaluation) counts: evaluation takes at most half of the examples."""
    if total < 2:
        raise UserError(f"need at least 2 examples to split calibration from evaluation, got {total}")
    n_eval = min(evaluation, total // 2)
    return min(calibration, total - n_eval), n_eval


def checked_split_sizes(source: str | None, total: int, calibration: int, evaluation: int, eval_only: bool = False) -> tuple[int, int]:
    """`split_sizes`, with a warning naming `source` when it has fewer examples than asked: the
    numbers rest on them, and a command that silently used 3 examples for 64 misleads."""
    n_calib, n_eval = split_sizes(total, calibration, evaluation)
    if source is not None and (n_eval < evaluation or (n_calib < calibration and not eval_only)):
        from .progress import warn

        used = f"evaluating on {n_eval} (--eval-samples {evaluation})"
        if not eval_only:
            used = f"calibrating on {n_calib} (--samples {calibration}) and {used}"
        warn(f"{source} has {total} examples, fewer than asked: {used}")
    return n_calib, n_eval


def split_examples(examples: Examples, calibration: int, evaluation: int, seed: int, source: str | None = None,
                   eval_only: bool = False) -> tuple[Examples, Examples]:
    """Disjoint, seeded calibration and evaluation examples: in seeded-key order, the first
    `evaluation` are evaluated, the next `calibration` calibrate. Naming the `source` warns when
    it is too small for the counts asked."""
    order = sorted(range(len(examples)), key=lambda i: (example_key(seed, examples.texts[i]), i))
    n_calib, n_eval = checked_split_sizes(source, len(order), calibration, evaluation, eval_only)
    return examples.subset(order[n_eval : n_eval + n_calib]), examples.subset(order[:n_eval])


def heldout_flags(total: int) -> list[bool]:
    """Which of `total` calibration examples are held out: every HELDOUT_EVERY-th one (the last
    one when there are fewer). By example position, so independent of the batch size."""
    if total < 2:
        raise ValueError(f"need at least 2 calibration examples to hold one out, got {total}")
    if total < HELDOUT_EVERY:
        return [i == total - 1 for i in range(total)]
    return [i % HELDOUT_EVERY == HELDOUT_EVERY - 1 for i in range(total)]


def prepare_tokenizer(tokenizer):
    """Decoders often have no pad token; batching needs one (padding is masked out anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def tokenize(tokenizer, texts: list[str], seq_len: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Padded batches of input_ids and attention_mask, truncated to seq_len tokens."""
    prepare_tokenizer(tokenizer)
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], truncation=True, max_length=seq_len, padding=True, return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


def batches_fingerprint(batches: list[dict[str, torch.Tensor]]) -> str:
    import torch

    digest = hashlib.sha256()
    for batch in batches:
        ids = batch["input_ids"][batch["attention_mask"].bool()]
        digest.update(ids.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def mean_tokens_per_sequence(batches: list[dict[str, torch.Tensor]]) -> float:
    """The mean sequence length s of the FLOPs model."""
    import torch

    lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).to(torch.float64)
    return float(lengths.mean())


def with_labels(batches: list[dict[str, torch.Tensor]], labels: list[int] | None) -> list[dict[str, torch.Tensor]]:
    """The batches with each row's integer label as `labels` (a classifier's cross-entropy in
    training); unchanged when there are no labels."""
    if labels is None:
        return batches
    import torch

    out, offset = [], 0
    for batch in batches:
        n = len(batch["input_ids"])
        out.append(batch | {"labels": torch.tensor(labels[offset : offset + n], dtype=torch.long)})
        offset += n
    if offset != len(labels):
        raise ValueError(f"{len(labels)} labels for {offset} rows")
    return out
