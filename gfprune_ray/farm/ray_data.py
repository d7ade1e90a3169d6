"""The campaign's text on Ray Data: read in parallel, select, tokenize in parallel, shard.

Examples are chosen exactly as the single process chooses them (`data.split_examples`): sorted by
a seeded per-example key, the first ones evaluate and the next ones calibrate. A selection by key
needs no global index, so the selection does not depend on how files are split into blocks, and a
sweep prunes with the very examples that `gfprune-ray prune` would use.

Ray Data workers import this module to run its functions: it imports no torch at module level,
which saves each fresh worker seconds.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import numpy as np
import ray

from ..data import (
    CORPORA,
    JSON_SUFFIXES,
    PARQUET_SUFFIXES,
    TEXT_SUFFIXES,
    example_key,
    check_source,
    heldout_flags,
    is_hub_name,
    load_hf_dataset,
    checked_split_sizes,
)
from ..errors import UserError

# "ValueError: ...", "pyarrow.lib.ArrowInvalid: ...": an error line of a traceback, not Ray's own
_ERROR_LINE = re.compile(r"^(?!ray\.)[A-Za-z_][\w.]*: \S")
CORPUS_ROWS_PER_BLOCK = 1000  # examples of a bundled corpus per Ray Data block
MAX_BLOCKS = 16  # enough blocks to keep a node's CPUs busy; each more is a task of overhead


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def _text_and_label(batch: dict) -> dict:
    """The columns the farm reads, checked inside the reading tasks. Asking a lazily read dataset
    for its columns runs part of the read and cancels the rest, and Ray 2.60's driver can abort
    when a cancelled task's reply races its cancellation ("Tried to complete task that was not
    pending": it killed a test process after `read_text(...).columns()`)."""
    if "text" not in batch:
        raise ValueError(f"records have no 'text' field (found: {', '.join(batch) or 'nothing'})")
    return {k: batch[k] for k in ("text", "label") if k in batch}


def _read_files(files: list[Path]) -> ray.data.Dataset:
    by_kind = {
        "text": [f for f in files if f.suffix.lower() in TEXT_SUFFIXES],
        "json": [f for f in files if f.suffix.lower() in JSON_SUFFIXES],
        "parquet": [f for f in files if f.suffix.lower() in PARQUET_SUFFIXES],
    }
    readers = {"text": ray.data.read_text, "json": functools.partial(ray.data.read_json, lines=True), "parquet": ray.data.read_parquet}
    parts = []
    for kind, paths in by_kind.items():
        if paths:
            # absolute: the reading tasks run in other folders, on a cluster on other machines
            ds = readers[kind]([str(p.absolute()) for p in paths])
            parts.append(ds if kind == "text" else ds.map_batches(_text_and_label, batch_format="numpy"))  # read_text gives `text` only
    if not parts:
        raise UserError("no text, JSONL or Parquet files found")
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def read_dataset(source: str) -> ray.data.Dataset:
    """The examples of a data source as a Ray Dataset with a `text` column (and `label` if any)."""
    if source in CORPORA:
        texts = CORPORA[source]()
        # Ray's default of 200 blocks makes every pass over a few thousand paragraphs 200 tasks,
        # about 2 s per pass on 2 cores, against 0.1 s in blocks of this size
        blocks = max(1, min(-(-len(texts) // CORPUS_ROWS_PER_BLOCK), MAX_BLOCKS))
        return ray.data.from_items([{"text": t} for t in texts], override_num_blocks=blocks)
    check_source(source)
    path = Path(source)
    if _is_saved_dataset(path) or is_hub_name(source):
        return ray.data.from_huggingface(load_hf_dataset(source))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES)
        if not files:
            raise UserError(f"{source}: no text, JSONL or Parquet files in this folder")
        return _read_files(files)
    return _read_files([path])


def _keyed(batch: dict, seed: int) -> dict:
    """Strip texts, drop empty ones, and add the seeded sort key (as `data.split_examples`)."""
    texts = [str(t).strip() for t in batch["text"]]
    keep = np.array([bool(t) for t in texts], dtype=bool)
    out = {"text": np.array([t for t in texts if t], dtype=object)}
    out["key"] = np.array([example_key(seed, t) for t in out["text"]], dtype=np.int64)
    if "label" in batch:
        out["label"] = np.asarray(batch["label"])[keep]
    return out


def _below(batch: dict, threshold: int) -> dict:
    keep = batch["key"] <= threshold
    return {k: v[keep] for k, v in batch.items()}


def _smallest_keys(keyed: ray.data.Dataset, n: int) -> list[dict]:
    """The n rows with the smallest keys, in key order. Only the keys travel to the driver (8 bytes
    a row); a Ray Data sort would cost seconds of shuffle overhead to order a few hundred rows."""
    keys = np.concatenate([b["key"] for b in keyed.select_columns(["key"]).iter_batches(batch_format="numpy")])
    threshold = int(np.partition(keys, n - 1)[n - 1])
    rows = keyed.map_batches(_below, fn_kwargs={"threshold": threshold}, batch_format="numpy").take_all()
    return sorted(rows, key=lambda r: (int(r["key"]), str(r["text"])))[:n]


def _task_error(exc: Exception) -> str:
    """What went wrong in a Ray Data task: the first error line of the traceback text Ray wraps it
    in (Ray 2.60's message ends with advice on retries, not with the error)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    return next((line for line in lines if _ERROR_LINE.match(line)), lines[-1] if lines else type(exc).__name__)


def select_examples(ds: ray.data.Dataset, samples: int, eval_samples: int, seed: int, source: str = "data",
                    eval_only: bool = False) -> tuple[list[dict], list[dict]]:
    """(calibration rows, evaluation rows), each row {text, heldout[, label]}, in key order.
    `eval_only` (a corpus that only evaluates): the same evaluation rows, no calibration rows."""
    try:
        keyed = ds.map_batches(_keyed, fn_kwargs={"seed": seed}, batch_format="numpy").materialize()
        total = keyed.count()
    except UserError:
        raise
    except Exception as exc:  # a parse error inside a Ray Data task arrives wrapped: keep one line
        raise UserError(f"{source}: cannot read ({_task_error(exc)[:200]})") from None
    if total == 0:
        raise UserError(f"{source}: no text examples")
    n_calib, n_eval = checked_split_sizes(source, total, samples, eval_samples, eval_only)
    if eval_only:
        n_calib = 0
    elif n_calib < 2:
        raise UserError(f"need at least 2 calibration examples (one is held out), got {n_calib}")
    rows = _smallest_keys(keyed, n_eval + n_calib)
    labelled = all(isinstance(r.get("label"), (int, np.integer)) for r in rows)
    clean = [{"text": r["text"]} | ({"label": int(r["label"])} if labelled else {}) for r in rows]
    held = heldout_flags(n_calib) if n_calib else []
    calibration = [r | {"heldout": h} for r, h in zip(clean[n_eval:], held)]
    return calibration, [r | {"heldout": False} for r in clean[:n_eval]]


@functools.lru_cache(maxsize=4)
def _tokenizer(source: str):
    from ..loading import load_tokenizer

    return load_tokenizer(source)


def _tokenize(batch: dict, source: str, seq_len: int) -> dict:
    """Token ids padded to seq_len (trimmed again per batch by `as_torch`)."""
    enc = _tokenizer(source)(list(batch["text"]), truncation=True, max_length=seq_len, padding="max_length", return_tensors="np")
    out = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64), "heldout": batch["heldout"]}
    if "label" in batch:
        out["label"] = batch["label"]
    return out


def tokenize_rows(rows: list[dict], source: str, seq_len: int, batch_size: int) -> ray.data.MaterializedDataset:
    """Tokenize rows with Ray Data tasks in parallel; the order of rows is kept."""
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, MAX_BLOCKS)))
    return ds.map_batches(_tokenize, fn_kwargs={"source": source, "seq_len": seq_len}, batch_size=batch_size, batch_format="numpy").materialize()


def as_torch(batch: dict) -> dict:
    """A numpy batch from Ray Data as model inputs, padding columns that no row uses removed."""
    import torch

    mask = torch.as_tensor(batch["attention_mask"])
    used = mask.bool().any(0)
    out = {"input_ids": torch.as_tensor(batch["input_ids"])[:, used], "attention_mask": mask[:, used]}
    if "heldout" in batch:
        out["heldout"] = torch.as_tensor(np.asarray(batch["heldout"], dtype=bool))
    return out


def iter_torch_batches(ds: ray.data.Dataset, batch_size: int):
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield as_torch(batch)


def shard(ds: ray.data.MaterializedDataset, n: int) -> list[ray.data.MaterializedDataset]:
    """n contiguous shards of (nearly) equal row counts; none is dropped, none is empty."""
    total = ds.count()
    n = max(1, min(n, total))
    if n == 1:
        return [ds]
    return ds.split_at_indices([total * i // n for i in range(1, n)])


def fingerprint_and_length(ds: ray.data.Dataset, batch_size: int) -> tuple[str, float]:
    """The same token fingerprint and mean sequence length as `data.batches_fingerprint` and
    `data.mean_tokens_per_sequence` give for the single process's batches."""
    digest, tokens, rows = hashlib.sha256(), 0, 0
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        ids, mask = batch["input_ids"], batch["attention_mask"].astype(bool)
        digest.update(ids[mask].astype(np.int64).tobytes())
        tokens += int(mask.sum())
        rows += len(ids)
    return digest.hexdigest()[:16], tokens / max(rows, 1)
