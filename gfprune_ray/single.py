"""One model, one budget, on this machine: what `gfprune-ray prune` and `eval` run.

This is the I/O shell around the pure pipeline: load the model and data, reuse or collect the
statistics, plan, cut, measure, save. The output folder is written under a temporary name and
renamed at the end, so a failed run never leaves a half-written model behind.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from safetensors import SafetensorError

from . import __version__
from .choices import SURGEON, TRAINED_METHODS
from .curvature import collect_curvature
from .data import Examples, batches_fingerprint, evaluation_sources, mean_tokens_per_sequence, read_examples, split_examples, tokenize, with_labels
from .errors import UserError, first_line
from .evaluate import CorpusReferences, dense_counts, efficiency
from .loading import load_model, portable_source
from .memory import release_memory
from .methods.surgeon import shot_targets
from .models import adapter_for
from .options import PruneOptions, saved_options
from .outputs import RECORD_FILE, check_writable_folder, read_record, scratch_folder, staged_output
from .packaged import cache_root
from .pipeline import Calibration, calibrate, mark_heldout, plan, plan_llm_surgeon
from .progress import bar
from .self_text import SELF_TEXT_TOKENS, self_texts
from .stats import GRADS_PART, STATS_MEMORY_SHARE, model_sites, physical_memory, plan_groups, stats_fingerprint, weights_fingerprint
from .stats_store import finish, load_stats, save_stats, write_site
from .storage import Location, files_into, local_copy, location, remove, shown, staged_folder
from .surgery import apply_pruning, load_pruned, save_pruned


def prepare_batches(tokenizer, examples: Examples, opts: PruneOptions, source: str | None = None):
    """Calibration and evaluation batches from disjoint, seeded examples, and the eval labels
    (naming the `source` warns when it has fewer examples than asked)."""
    calib, evaluation = split_examples(examples, opts.samples, opts.eval_samples, opts.seed, source)
    if len(calib) < 2:
        raise UserError(f"need at least 2 calibration examples (one is held out), got {len(calib)}")
    calib_batches = tokenize(tokenizer, calib.texts, opts.seq_len, opts.batch_size)
    eval_batches = tokenize(tokenizer, evaluation.texts, opts.seq_len, opts.batch_size)
    return calib_batches, eval_batches, evaluation.labels


def with_self_texts(adapter, tokenizer, batches: list[dict], opts: PruneOptions) -> tuple[list[dict], int]:
    """The calibration batches followed by those of the texts a causal LM writes itself
    (`self_text.py`; none for other models or with --self-texts 0), and how many it wrote."""
    n = opts.self_text_count()
    if n == 0 or not adapter.is_lm:
        return batches, 0
    with bar("self-texts", -(-n // opts.batch_size)) as step:
        texts = self_texts(adapter.model, tokenizer, n, min(SELF_TEXT_TOKENS, opts.seq_len), opts.seed, opts.batch_size, on_batch=step)
    return batches + tokenize(tokenizer, texts, opts.seq_len, opts.batch_size), len(texts)


def read_other_corpora(data: str, eval_data: list[str] | None) -> tuple[dict[str, str], dict[str, Examples]]:
    """(label -> source of every evaluation corpus, the calibration data's first; label -> examples
    of the others). Read here, before any model is loaded, so that a bad source fails first."""
    sources = evaluation_sources(data, eval_data)
    return sources, {label: read_examples(source) for label, source in list(sources.items())[1:]}


def references(dense, sources: dict[str, str], eval_batches: list[dict], labels, others: dict[str, Examples], tokenizer, opts: PruneOptions) -> CorpusReferences:
    """The dense model's scores on every evaluation corpus: the calibration data's held-back
    examples, and from each other corpus the `eval_samples` examples its seeded split evaluates
    (the ones it would evaluate were it the calibration data)."""
    calibration = next(iter(sources))
    corpora = {calibration: (eval_batches, labels)}
    for label, examples in others.items():
        evaluation = split_examples(examples, opts.samples, opts.eval_samples, opts.seed, label, eval_only=True)[1]
        corpora[label] = (tokenize(tokenizer, evaluation.texts, opts.seq_len, opts.batch_size), evaluation.labels)
    with bar("reference", sum(len(batches) for batches, _ in corpora.values())) as step:
        return CorpusReferences.build(dense.model, dense, corpora, calibration, on_batch=step)


def corpus_record(sources: dict[str, str]) -> dict:
    """What a report says about its evaluation corpora (label -> source, the calibration data's first)."""
    return {"eval_data": list(sources.values())[1:], "calibration_corpus": next(iter(sources)), "corpora": sources}


def obtain_statistics(adapter, batches: list[dict], opts: PruneOptions, stats_path: Path | None, scratch: ExitStack) -> tuple[Calibration, str, bool]:
    """Load statistics from `stats_path` when it exists (refusing a foreign folder), else collect
    them (and save them there). Returns (calibration, fingerprint, reused).

    When the whole model's statistics exceed `opts.stats_memory`, they are collected a group of
    sites per pass and each site is written to disk as its pass ends (to `stats_path`, or to a
    scratch folder that `scratch` removes); the calibration then reads one site at a time."""
    fingerprint = stats_fingerprint(weights_fingerprint(adapter.model), batches_fingerprint(batches), opts.seq_len, opts.samples, opts.seed)
    seq_len = mean_tokens_per_sequence(batches)
    if stats_path is not None and Path(stats_path).exists():
        parts = load_stats(stats_path, fingerprint, adapter)
        return Calibration(parts["fit"], parts["heldout"], seq_len, parts[GRADS_PART]), fingerprint, True
    geoms = adapter.geometries()
    groups = plan_groups(model_sites(geoms), geoms, opts.stats_memory or physical_memory() // STATS_MEMORY_SHARE)
    if len(groups) == 1:
        with bar("collect", len(batches)) as step:
            calibration = calibrate(adapter, batches, seq_len, on_batch=step, seed=opts.seed)
        calibration.fit.fingerprint = calibration.heldout.fingerprint = calibration.grads.fingerprint = fingerprint
        if stats_path is not None:
            with staged_output(Path(stats_path)) as staging:
                save_stats({"fit": calibration.fit, "heldout": calibration.heldout, GRADS_PART: calibration.grads}, staging)
        return calibration, fingerprint, False
    if stats_path is None:
        folder = scratch.enter_context(scratch_folder(cache_root() / "scratch", "stats"))
        collect_in_passes(adapter, batches, groups, folder, fingerprint, opts.seed)
    else:
        folder = Path(stats_path)
        with staged_output(folder) as staging:
            collect_in_passes(adapter, batches, groups, staging, fingerprint, opts.seed)
    parts = load_stats(folder, fingerprint)
    return Calibration(parts["fit"], parts["heldout"], seq_len, parts[GRADS_PART]), fingerprint, False


def collect_in_passes(adapter, batches: list[dict], groups: list[list], folder: Path, fingerprint: str, seed: int) -> None:
    """One forward and backward pass over `batches` per group of sites; each group's sites go to
    `folder` before the next pass, so only one group's statistics are ever in memory."""
    marked = mark_heldout(batches)
    tokens: dict[str, int] = {}
    with bar(f"collect ({len(groups)} passes)", len(batches) * len(groups)) as step:
        for group in groups:
            curvature = collect_curvature(adapter, marked, seed, step, sites=group)
            for site in group:
                write_site(folder, site, {"fit": curvature.fit[site], "heldout": curvature.heldout[site], GRADS_PART: curvature.grads[site]}, fingerprint)
            tokens = {"fit": curvature.fit.tokens, "heldout": curvature.heldout.tokens, GRADS_PART: curvature.grads.tokens}
            del curvature
            release_memory()
    finish(folder, fingerprint, [s for g in groups for s in g], tokens)


def supported_adapter(model, source: str):
    """The model's adapter, or a one-line user error naming the unsupported architecture."""
    try:
        return adapter_for(model)
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None


def check_seq_len(adapter, seq_len: int) -> None:
    limit = adapter.max_positions()
    if limit is not None and seq_len > limit:
        raise UserError(f"--seq-len {seq_len} exceeds the {limit} positions this model supports")


def measure(dense_adapter, pruned_adapter, reference: CorpusReferences, opts: PruneOptions, counts: dict | None = None) -> dict:
    """Quality against `reference`, and efficiency (`dense_adapter` may be None given the dense
    model's `counts` and no latency to measure)."""
    with bar("evaluate", len(reference)) as step:
        quality = reference.measure(pruned_adapter.model, on_batch=step)
    return quality | efficiency(dense_adapter, pruned_adapter, opts.latency(pruned_adapter.max_positions()), counts)


def _uncached_record(batches: list[dict], seq_len: float) -> dict:
    """The calibration record of a method that shares no statistics (llm-surgeon, cofi, flop)."""
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {"stats_fingerprint": None, "stats_reused": False, "calibration_tokens": tokens, "mean_seq_len": seq_len}


def _plan(adapter, batches: list[dict], opts: PruneOptions, stats_path: Path | None, timings: dict):
    """The pruning plan of `opts.method` and what to record about its calibration."""
    if opts.method == SURGEON:
        seq_len = mean_tokens_per_sequence(batches)
        if stats_path is not None:
            raise UserError("--stats does not apply to llm-surgeon: it collects curvature on the partly pruned model in every shot")
        shots = len(shot_targets(opts.budget, opts.shot_step))
        with bar("curvature", len(batches) * shots) as step:
            result = plan_llm_surgeon(adapter, batches, opts.budget, seq_len, opts.shot_step, opts.seed, on_batch=step)
        timings.update(result.timings)
        return result, _uncached_record(batches, seq_len)
    with ExitStack() as scratch:  # a scratch statistics folder lives until the plan is made
        start = time.perf_counter()
        calibration, fingerprint, reused = obtain_statistics(adapter, batches, opts, stats_path, scratch)
        timings["collect_s"] = time.perf_counter() - start
        release_memory()
        result = plan(adapter, calibration, opts.budget, opts.method, opts.reconstruction, opts.allocation, opts.seed)
    timings.update(result.timings)
    record = {"stats_fingerprint": fingerprint, "stats_reused": reused, "calibration_tokens": calibration.total.tokens, "mean_seq_len": calibration.seq_len}
    return result, record


def _train(source: str, batches: list[dict], labels: list[int] | None, opts: PruneOptions, out: Location, timings: dict):
    """CoFi or FLOP under Ray Train (embedded local Ray unless RAY_ADDRESS names a cluster).
    Checkpoints go beside `out`, so a killed run resumes when the same command runs again; the
    caller removes them once the model is saved. Returns (cut model, summary metrics, calibration
    record, outcome with masks and loss curve, checkpoint folder)."""
    import ray

    from .farm import stages
    from .train_ray import TrainJob, read_outcome
    from .training import Schedule

    seq_len = mean_tokens_per_sequence(batches)
    # the run's name: everything that changes its result, so a changed command starts afresh
    options = {k: v for k, v in asdict(opts).items() if k not in ("checkpoint_every", "eval_samples") and not k.startswith("latency_")}
    settings = {"source": source, "options": options, "batches": batches_fingerprint(batches), "labels": labels}
    name = f"{opts.method}-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]}"
    storage = out.parent / f".{out.name}.train"  # beside it: a rerun finds the checkpoints, and OUT stays empty
    schedule = Schedule(steps=opts.steps, budget=opts.budget, seed=opts.seed, checkpoint_every=opts.checkpoint_every)
    job = TrainJob(portable_source(source), opts.method, schedule, with_labels(batches, labels), seq_len, name, str(storage), threads=os.cpu_count() or 1)
    started = not ray.is_initialized()
    stages.connect()
    try:
        start = time.perf_counter()
        checkpoint = _fit_with_progress(job, schedule.total_steps)
        timings["train_s"] = time.perf_counter() - start
        model, outcome = read_outcome(checkpoint)
    finally:
        if started:
            ray.shutdown()
    record = _uncached_record(batches, seq_len)
    last = outcome["curve"][-1]
    summary = {"kept_prunable_macs": outcome["kept_prunable_macs"], "trimmed": outcome["trimmed"], "train_steps": len(outcome["curve"]),
               "final_loss": last["task_loss"], "final_expected_kept": last["expected_kept"]}
    return model, summary, record, outcome, storage


def _fit_with_progress(job, steps: int):
    """`train_ray.fit` in a thread while this one draws a bar of the steps the worker reports."""
    import ray

    from .farm import stages
    from .train_ray import fit

    job.counter = stages.Counter.remote()
    with ThreadPoolExecutor(1) as pool, bar("train", steps) as step:
        running = pool.submit(fit, job, cpus_per_worker=ray.cluster_resources().get("CPU", 1))
        shown = 0
        while not running.done():
            done = ray.get(job.counter.value.remote())
            for _ in range(done - shown):
                step()
            shown = max(shown, done)
            time.sleep(0.5)
        return running.result()


def prune_model(source: str, data: str, opts: PruneOptions, out: str | Path, stats_path: Path | None = None, force: bool = False,
                eval_data: list[str] | None = None) -> dict:
    """Prune one model to one budget and save it to `out` (a folder, or object storage: storage.py);
    returns the report (also in gfprune.json). Quality is measured on the held-back examples of
    `data` and on each source of `eval_data`."""
    opts.validate()
    out = location(out)
    if stats_path is not None and not Path(stats_path).exists():  # written after the collection: check before it
        check_writable_folder(Path(stats_path).absolute().parent, "--stats")
    timings = {}
    with staged_folder(out, force) as staging:
        examples = read_examples(data)  # bad data fails here, before a model is loaded
        sources, others = read_other_corpora(data, eval_data)
        model, tokenizer = load_model(source, dtype=opts.dtype)
        adapter = supported_adapter(model, source)
        check_seq_len(adapter, opts.seq_len)
        calib_batches, eval_batches, labels = prepare_batches(tokenizer, examples, opts, data)
        examples_used, written = _examples(calib_batches), 0
        if opts.method in TRAINED_METHODS:
            if stats_path is not None:
                raise UserError(f"--stats does not apply to {opts.method}: it trains gates instead of collecting statistics")
            dense = adapter
            calib_labels = split_examples(examples, opts.samples, opts.eval_samples, opts.seed)[0].labels
            model, summary, calibration_record, outcome, storage = _train(source, calib_batches, calib_labels, opts, out, timings)
            adapter = adapter_for(model)
            masks_json, curve = outcome["masks"], outcome["curve"]
        else:
            start = time.perf_counter()
            calib_batches, written = with_self_texts(adapter, tokenizer, calib_batches, opts)
            timings["self_texts_s"] = time.perf_counter() - start
            result, calibration_record = _plan(adapter, calib_batches, opts, stats_path, timings)
            # the dense model's outputs and counts first: then it is cut in place, and a second
            # copy is kept only where latency times the two side by side
            reference = references(adapter, sources, eval_batches, labels, others, tokenizer, opts)
            counts = dense_counts(adapter, opts.latency(adapter.max_positions()).seq_len)
            dense = adapter_for(copy.deepcopy(model)) if opts.latency_repeats > 0 else None
            start = time.perf_counter()
            apply_pruning(adapter, result.masks, result.weights)
            timings["surgery_s"] = time.perf_counter() - start
            summary, masks_json, curve, storage = result.summary(), result.masks.to_json(), None, None
        if opts.method in TRAINED_METHODS:
            reference, counts = references(dense, sources, eval_batches, labels, others, tokenizer, opts), None
        start = time.perf_counter()
        metrics = measure(dense, adapter, reference, opts, counts)
        timings["evaluate_s"] = time.perf_counter() - start
        report = {
            "gfprune_ray": __version__,
            "source": source,
            "data": data,
            **corpus_record(sources),
            "options": asdict(opts),
            **calibration_record,
            "metrics": metrics | summary | {"calibration_examples": examples_used, "self_texts": written, "evaluation_examples": _examples(eval_batches)},
            "timings": timings,
            "sizes": adapter.sizes(),
            "masks": masks_json,
        }
        if curve is not None:
            report["curve"] = curve
        save_pruned(model, staging, tokenizer, report)
    if storage is not None:
        remove(storage)  # the model is saved: the checkpoints are done with
    return report


def _examples(batches: list[dict]) -> int:
    return sum(len(b["input_ids"]) for b in batches)


def evaluate_saved(path: str | Path, overrides: dict, dense_source: str | None = None) -> dict:
    """Measure a saved pruned model (a folder, or object storage) against its dense source; writes
    eval.json beside it.

    Data, seed and sample counts default to those recorded at pruning time, so the evaluation
    examples are the held-back ones, disjoint from calibration; `overrides` replaces any of them."""
    where = location(path)
    with local_copy(where) as folder:
        report = _evaluate_folder(folder, shown(where), overrides, dense_source)
    with files_into(where) as folder:  # a local folder itself; object storage gets the one file
        tmp = folder / "eval.json.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(folder / "eval.json")
    return report


def _evaluate_folder(path: Path, name: str, overrides: dict, dense_source: str | None) -> dict:
    record = read_record(path)
    opts, data, eval_data = saved_options(record, overrides)
    dense_source = dense_source or record.get("source")
    if not dense_source:
        raise UserError(f"{name}/{RECORD_FILE} names no dense model: pass --dense")
    examples = read_examples(data)
    sources, others = read_other_corpora(data, eval_data)
    dense_model, tokenizer = load_model(dense_source, dtype=opts.dtype)
    dense = supported_adapter(dense_model, dense_source)
    try:
        pruned = load_pruned(path)
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"cannot load pruned model {name}: {first_line(exc)}") from None
    _, eval_batches, labels = prepare_batches(tokenizer, examples, opts, data)
    reference = references(dense, sources, eval_batches, labels, others, tokenizer, opts)
    metrics = measure(dense, adapter_for(pruned), reference, opts)
    return {"model": name, "dense": dense_source, "data": data, **corpus_record(sources), "options": asdict(opts), "metrics": metrics}
