"""`gfprune-ray sweep`: a campaign run on Ray and recorded in MLflow (the driver's side).

For each model with unfinished units the driver prepares the model synchronously (describe it,
tokenize the text, reuse or start the collection), then submits the whole graph of its remaining
units as Ray tasks and moves on; a single loop then waits for results, logs each finished unit to
MLflow and writes its pruned model. Statistics are collected once per model, whatever the number
of methods and budgets, and are cached on disk for later campaigns.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray

from .. import __version__
from ..choices import SURGEON, TRAINED_METHODS
from ..data import CORPORA, check_sources, evaluation_sources, heldout_flags, mean_tokens_per_sequence, with_labels
from ..errors import UserError, first_line
from ..outputs import check_writable_folder
from ..progress import StageProgress, warn
from ..options import self_text_count
from ..self_text import SELF_TEXT_TOKENS
from ..stats import plan_groups, stats_fingerprint
from ..stats_store import finish, is_complete, move_aside, stored_tokens
from ..storage import Location, check_writable, files_into, is_written, local_copy, location, remove, shown, staged_folder
from ..train_ray import TrainJob
from ..training import Schedule
from . import stages, surgeon_shots, train_units
from .campaign import Campaign, ModelEntry, Unit
from .locking import campaign_locks
from .ray_data import fingerprint_and_length, iter_torch_batches, read_dataset, select_examples, shard, tokenize_rows
from .report import campaign_description, print_table, write_summary
from .tracking import CORPORA_TAG, Tracker, dataset_input, package_versions, store_identity, store_uri

POLL_S = 0.25


@dataclass
class ModelWork:
    """What the driver keeps per model while its units are in flight."""

    entry: ModelEntry
    name: str
    run_id: str
    units: list[Unit]
    info: stages.ModelInfo | None = None
    stats_fp: str = ""
    stats_path: Path | None = None
    stats_reused: bool = False
    mean_seq_len: float = 0.0
    tokens: int = 0
    self_texts: int = 0  # texts the model wrote for its calibration
    collect_start: float = 0.0
    collect_s: float | None = None
    sites: dict = field(default_factory=dict)  # site -> ref of (fit, heldout, grads) statistics
    saves: list = field(default_factory=list)  # refs of the tasks writing each site to the cache
    scores: dict = field(default_factory=dict)  # method -> [refs per site]
    actors: list = field(default_factory=list)  # collectors kept for LLM Surgeon's shots
    train_batches: list = field(default_factory=list)  # calibration batches for cofi and flop
    train_seq_len: float = 0.0
    failed: str | None = None
    failed_details: str | None = None  # the whole error, for the model run's description
    started_ms: int = 0  # when the model's first stage started: its unit runs start there

    def units_of(self, kind: str) -> list[Unit]:
        """The units of one kind of method: scored (statistics, scores, search), surgeon, trained."""
        return [u for u in self.units if method_kind(u.method) == kind]


def method_kind(method: str) -> str:
    if method == SURGEON:
        return "surgeon"
    return "trained" if method in TRAINED_METHODS else "scored"


@dataclass
class SweepResult:
    records: list[dict]
    failures: list[str]
    summary: dict[str, Location]
    campaign_run: str
    runs_url: str


def _where(source: str) -> str:
    """A source as unit runs record it: a file or folder by its resolved path, names as they are."""
    path = Path(source)
    return str(path.resolve()) if source not in CORPORA and path.exists() else source


def _error_text(exc: BaseException) -> str:
    """One line for a failure: a user error's message, else the cause's type and last line (Ray
    wraps a task's exception with its traceback; the summary wants only what went wrong)."""
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, UserError):
        return first_line(cause)[:500]
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


class Sweep:
    def __init__(self, campaign: Campaign, tracker: Tracker, progress: StageProgress):
        self.c, self.tracker, self.progress = campaign, tracker, progress
        self.in_flight: dict[ray.ObjectRef, tuple[Unit, ModelWork]] = {}
        self.stage_refs: dict[str, list] = {s: [] for s in ("score", "search", "reconstruct", "evaluate")}
        self.collecting: list[ModelWork] = []
        self.counter = None
        self.train_counter = None
        self.failures: list[str] = []
        self.sources = evaluation_sources(campaign.data, campaign.eval_data)  # label -> source, calibration first
        self.calibration = next(iter(self.sources))
        # where each corpus is (a resolved path for files), as the unit runs' CORPORA_TAG records it
        self.where = {label: _where(source) for label, source in self.sources.items()}
        # unit key -> (run id, labels to add, corpora recorded) of a finished unit measured again on new corpora
        self.remeasure: dict[str, tuple[str, set[str], dict[str, str]]] = {}
        self.example_counts: dict[str, int] = {}  # the examples actually used, which a small corpus makes fewer than asked
        self.datasets: list = []  # MLflow dataset inputs of every unit run: the calibration and evaluation examples

    # ---- preparing a model -----------------------------------------------------------------

    def prepare(self, work: ModelWork, calib_rows: list[dict], eval_rows: dict[str, list[dict]]) -> None:
        """Everything up to submitting the model's units; raises on a model that cannot be used.
        `eval_rows`: label -> evaluation rows of each corpus, the calibration data's first."""
        source, seq_len, dtype = work.entry.source, self.c.seq_len_of(work.entry), self.c.dtype_of(work.entry)
        work.started_ms = int(time.time() * 1000)
        work.info = ray.get(stages.describe.remote(source, dtype))
        if work.info.max_positions is not None and seq_len > work.info.max_positions:
            raise UserError(f"seq-len {seq_len} exceeds the {work.info.max_positions} positions this model supports")
        calib = tokenize_rows(calib_rows, source, seq_len, self.c.batch_size)
        evaluation = {label: tokenize_rows(rows, source, seq_len, self.c.batch_size) for label, rows in eval_rows.items()}
        if work.units_of("trained"):
            batches = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in iter_torch_batches(calib, self.c.batch_size)]
            labels = [int(r["label"]) for r in calib.select_columns(["label"]).iter_rows()] if "label" in calib.columns() else None
            work.train_batches = with_labels(batches, labels)
            work.train_seq_len = mean_tokens_per_sequence(batches)  # of the user's text alone, as `prune` trains
        calib = self._with_self_texts(work, calib, calib_rows)  # what statistics and llm-surgeon's shots see
        data_fp, work.mean_seq_len = fingerprint_and_length(calib, self.c.batch_size)
        work.stats_fp = stats_fingerprint(work.info.fingerprint, data_fp, seq_len, self.c.samples, self.c.seed)
        work.stats_path = self.c.stats_dir() / work.stats_fp  # a folder, one file per site (stats_store)
        work.tokens = round(work.mean_seq_len * calib.count())
        shards = None
        if work.units_of("surgeon"):  # its actors serve every shot, so they outlive one collection
            shards = shard(calib, self.c.workers)  # Ray Data tasks: before any actor takes a CPU
            work.actors = stages.start_collectors(source, len(shards), long_lived=True, dtype=dtype)
        if work.units_of("scored"):
            self._statistics(work, calib)
        self.submit_units(work, evaluation, shards)

    def _with_self_texts(self, work: ModelWork, calib, calib_rows: list[dict]):
        """The calibration dataset followed by the texts a causal LM writes itself, as `prune`
        adds them (held-out flags by position over both, as `pipeline.mark_heldout` sets them)."""
        n = self_text_count(self.c.samples, self.c.self_texts)
        if not (work.info.writes_text and n and (work.units_of("scored") or work.units_of("surgeon"))):
            work.self_texts = 0
            return calib
        source, seq_len = work.entry.source, self.c.seq_len_of(work.entry)
        # a process holding the model, as one collection actor (a GPU where the cluster has them)
        task = stages.write_self_texts.options(**stages.collector_resources(1)[0])
        texts = ray.get(task.remote(source, n, min(SELF_TEXT_TOKENS, seq_len), self.c.seed, self.c.batch_size, self.c.dtype_of(work.entry)))
        rows = [{"text": r["text"]} for r in calib_rows] + [{"text": t} for t in texts]
        work.self_texts = len(texts)
        return tokenize_rows([r | {"heldout": h} for r, h in zip(rows, heldout_flags(len(rows)))], source, seq_len, self.c.batch_size)

    def _statistics(self, work: ModelWork, calib) -> None:
        """Input statistics for the scoring methods: from the cache, or collected on the actors.
        Either way each site is its own object, read or written by its own task on this node, so
        no process (the driver least) holds a whole model's statistics."""
        sites, path = work.info.sites, work.stats_path
        if is_complete(path):
            loaded = {s: stages.load_site.options(**stages.on_driver_node()).remote(str(path), s) for s in sites}
            damaged = next((e for e in ray.get([e for _, e in loaded.values()]) if e), None)
            if damaged is None:
                work.sites = {s: ref for s, (ref, _) in loaded.items()}
                work.stats_reused, work.collect_s = True, 0.0
                tokens = stored_tokens(path)
                work.tokens = tokens["fit"] + tokens["heldout"]
                return
            move_aside(path, damaged, warn)
        work.collect_start = time.perf_counter()
        work.sites, batches = stages.submit_collection(work.entry.source, calib, self._groups(work), self.c.workers, self.c.batch_size,
                                                       self.c.seed, self.counter, work.actors or None, self.c.dtype_of(work.entry))
        work.saves = [stages.save_site.options(**stages.on_driver_node()).remote(str(path), work.stats_fp, s, ref) for s, ref in work.sites.items()]
        self.progress.add("collect", batches)
        self.collecting.append(work)

    def _groups(self, work: ModelWork) -> list[list]:
        """The model's sites in groups whose statistics fit one actor's --stats-memory."""
        memory = self.c.stats_memory or stages.default_stats_memory(self.c.workers)
        return plan_groups(work.info.sites, work.info.geometries, memory)

    def submit_units(self, work: ModelWork, evaluation: dict, shards: list | None = None) -> None:
        info, c = work.info, self.c
        dtype = c.dtype_of(work.entry)
        weights = stages.submit_site_weights(work.entry.source, info.sites, dtype)
        ref = stages.reference.remote(work.entry.source, evaluation, self.calibration, c.batch_size, work.entry.task, dtype)
        scored = work.units_of("scored")
        for method in dict.fromkeys(u.method for u in scored):
            work.scores[method] = [stages.score_site.remote(method, weights[s], work.sites[s], c.seed, s) for s in info.sites]
            self._track("score", work.scores[method])
        for unit in scored:
            masks = stages.search.remote(c.allocation, unit.budget, work.mean_seq_len, info.geometries, info.sites, *work.scores[unit.method])
            recs = [stages.reconstruct_site.remote(c.reconstruction, masks, s, weights[s], work.sites[s]) for s in info.sites]
            self._track("search", [masks])
            self._track("reconstruct", recs)
            self._submit_evaluation(unit, work, ref, masks, recs)
        for unit in work.units_of("trained"):
            self._submit_training(unit, work, ref)
        surgeons = work.units_of("surgeon")
        if surgeons:
            plan = surgeon_shots.ShotPlan(work.actors, shards, info.sites, info.geometries, weights,
                                         work.mean_seq_len, c.batch_size, c.seed, self._groups(work), self.counter)
            chains, batches = surgeon_shots.submit_chains(plan, [u.budget for u in surgeons], c.shot_step, self._track)
            self.progress.add("collect", batches)
            for unit, chain in zip(surgeons, chains):
                masks, timings, recs = chain.outputs
                self._submit_evaluation(unit, work, ref, masks, recs, timings)

    def _submit_evaluation(self, unit: Unit, work: ModelWork, ref, masks, recs: list, timings=None) -> None:
        spec = self._eval_spec(unit, work)
        result = stages.evaluate_unit.options(num_cpus=spec.latency.threads).remote(spec, ref, masks, *recs, timings=timings)
        self._track("evaluate", [result])
        self.in_flight[result] = (unit, work)

    def _submit_training(self, unit: Unit, work: ModelWork, ref) -> None:
        c = self.c
        schedule = Schedule(steps=c.steps, budget=unit.budget, seed=c.seed, checkpoint_every=c.checkpoint_every)
        if self.train_counter is None:
            self.train_counter = stages.Counter.remote()
        job = TrainJob(unit.entry.source, unit.method, schedule, work.train_batches, work.train_seq_len, unit.key,
                       str(self._train_storage()), counter=self.train_counter)
        trained = train_units.train_unit.remote(job, stages.gpus_available())
        self.progress.add("train", schedule.total_steps)  # the bar counts training steps, reported by the workers
        spec = self._eval_spec(unit, work)
        result = train_units.evaluate_trained.options(num_cpus=spec.latency.threads).remote(spec, ref, trained)
        self._track("evaluate", [result])
        self.in_flight[result] = (unit, work)

    def _eval_spec(self, unit: Unit, work: ModelWork) -> stages.EvalSpec:
        c = self.c
        again = unit.key in self.remeasure  # measured again for new corpora: its model is saved and its latency known
        folder = str(self._model_folder(unit)) if c.save_models and not again else None  # absolute or a URI (Campaign.out): workers run elsewhere
        latency = c.latency().within(work.info.max_positions)
        latency = replace(latency, repeats=0) if again else latency
        # a task that times reserves a CPU per latency thread (at most a node's), so its timing
        # shares them with no other task; one that does not time needs one
        latency = replace(latency, threads=stages.evaluation_cpus(latency.threads) if latency.repeats > 0 else 1)
        return stages.EvalSpec(work.entry.source, work.info.sites, latency, folder, self._record(unit, work), c.dtype_of(work.entry))

    def _train_storage(self) -> Location:
        return self.c.out / ".train"

    def _track(self, stage: str, refs: list) -> None:
        self.stage_refs[stage].extend(refs)
        self.progress.add(stage, len(refs))

    def _options(self, unit: Unit) -> dict:
        c = self.c
        return {
            "budget": unit.budget, "method": unit.method, "reconstruction": c.reconstruction_of(unit.method), "allocation": c.allocation,
            "samples": c.samples, "eval_samples": c.eval_samples, "seq_len": c.seq_len_of(unit.entry),
            "batch_size": c.batch_size, "seed": c.seed, "latency_repeats": c.latency_repeats,
            "latency_batch_sizes": c.latency_batch_sizes, "latency_seq_len": c.latency_seq_len, "latency_threads": c.latency_threads,
        } | c.method_options(unit.method) | c.model_options(unit.entry)

    def _record(self, unit: Unit, work: ModelWork) -> dict:
        """gfprune.json of a saved model: what `gfprune-ray eval` needs to re-measure it."""
        return {
            "gfprune_ray": __version__, "source": unit.entry.source, "data": self.c.data, "eval_data": list(self.sources.values())[1:],
            "calibration_corpus": self.calibration, "corpora": self.sources, "options": self._options(unit),
            "stats_fingerprint": work.stats_fp, "mean_seq_len": work.mean_seq_len, "unit_key": unit.key,
        }

    # ---- collecting results ----------------------------------------------------------------

    def poll(self) -> None:
        """Advance the bars, cache finished statistics, record finished units."""
        if self.counter is not None:
            self.progress.set_done("collect", ray.get(self.counter.value.remote()))
        if self.train_counter is not None:
            self.progress.set_done("train", ray.get(self.train_counter.value.remote()))
        for stage, refs in self.stage_refs.items():
            if refs:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
                self.progress.set_done(stage, len(ready))
        for work in list(self.collecting):
            ready, _ = ray.wait(work.saves, num_returns=len(work.saves), timeout=0, fetch_local=False)
            if len(ready) == len(work.saves):
                self.collecting.remove(work)
                self._cache_statistics(work)
        if not self.in_flight:
            return
        done, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=POLL_S)
        for ref in done:
            unit, work = self.in_flight.pop(ref)
            self._finish_unit(unit, work, ref)
            if work.actors and not any(w is work for _, w in self.in_flight.values()):
                work.actors = []  # the model is done: let Ray end its actors

    def _cache_statistics(self, work: ModelWork) -> None:
        """Every site is written: mark the cache entry complete."""
        work.collect_s = time.perf_counter() - work.collect_start
        try:
            tokens = ray.get(work.saves)[0]
        except ray.exceptions.RayError as exc:  # the units that needed these statistics say why, if they fail
            warn(f"statistics of {work.entry.source} not cached: {_error_text(exc)}")
            return
        work.tokens = tokens["fit"] + tokens["heldout"]
        finish(work.stats_path, work.stats_fp, work.info.sites, tokens)

    def _finish_unit(self, unit: Unit, work: ModelWork, ref) -> None:
        c = self.c
        if work in self.collecting:  # the unit finished within the poll that saw its statistics done
            self.collecting.remove(work)
            self._cache_statistics(work)
        if unit.key in self.remeasure:
            self._finish_remeasure(unit, ref)
            return
        # params are what a user filters and compares on; facts about the environment are tags
        params = {"model": unit.name, "source": unit.entry.source, "data": c.data, "calibration_corpus": self.calibration, "task": unit.entry.task}
        params |= {k: ",".join(map(str, v)) if isinstance(v, list) else v for k, v in self._options(unit).items()}
        params["architecture"] = work.info.architecture
        tags = package_versions() | {"model_fingerprint": work.info.fingerprint, "stats_fingerprint": work.stats_fp, CORPORA_TAG: json.dumps(self.where)}
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self._record_failure(unit, work, params, tags, _error_text(exc), str(exc))
            return
        folder = location(result["folder"]) if result["folder"] else None  # written there by the unit's task
        if folder is not None and not is_written(folder):
            error = (f"its pruned model was saved to {shown(folder)} on {result['host']}, which this driver does not see: "
                     "on a cluster, --out must be storage every node shares (or object storage)")
            self._record_failure(unit, work, params, tags, error, error)
            return
        params["quality_metric"] = result["metrics"].get("quality_metric", "")
        metrics = result["metrics"] | self._model_metrics(work, unit.method) | result["timings"]
        run_id = self.tracker.unit_run(c.key, work.run_id, unit, params, metrics, tags, work.started_ms)
        self.tracker.log_datasets(run_id, self.datasets)
        self.tracker.log_json(run_id, result["masks"], "masks.json")
        self.tracker.log_json(run_id, {"params": params, "tags": tags, "metrics": metrics, "sizes": result["sizes"]}, "report.json")
        if "curve" in result:
            self.tracker.log_curve(run_id, result["curve"])
        if folder is not None:
            with local_copy(folder) as files:  # MLflow logs from local files: a model in object storage is fetched once
                self.tracker.log_folder(run_id, files, "model")
                self.tracker.log_pruned_model(run_id, files, c.register_model)
        self.tracker.end(run_id)
        if unit.method in TRAINED_METHODS:  # recorded: its training checkpoints are done with
            remove(self._train_storage() / unit.key)

    def _record_failure(self, unit: Unit, work: ModelWork, params: dict, tags: dict, error: str, details: str) -> None:
        run_id = self.tracker.unit_run(self.c.key, work.run_id, unit, params, {}, tags, work.started_ms)
        self.tracker.end(run_id, ok=False, error=error, details=details)
        self.failures.append(f"{unit.label}: {error}")

    def _finish_remeasure(self, unit: Unit, ref) -> None:
        """A finished unit run again for corpora its run lacks: their metrics join its run (the
        pruned model is the same; its other metrics, artifacts and saved model stay as they were)."""
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.failures.append(f"{unit.label}: {_error_text(exc)}")
            return
        run_id, labels, recorded = self.remeasure[unit.key]
        new = {k: v for k, v in result["metrics"].items() if "/" in k and k.rpartition("/")[2] in labels}
        self.tracker.log(run_id, metrics=new, tags={CORPORA_TAG: json.dumps(recorded | {k: self.where[k] for k in labels})})
        if unit.method in TRAINED_METHODS:
            remove(self._train_storage() / unit.key)

    def _statistics_metrics(self, work: ModelWork) -> dict:
        out = {"stats_reused": float(work.stats_reused), "calibration_tokens": work.tokens, "mean_seq_len": work.mean_seq_len,
               "self_texts": work.self_texts} | self.example_counts
        return out | ({"collect_s": work.collect_s} if work.collect_s is not None else {})

    def _model_metrics(self, work: ModelWork, method: str) -> dict:
        """Statistics metrics plus the summed seconds of this method's scoring tasks."""
        out = self._statistics_metrics(work)
        if method in TRAINED_METHODS:  # trained on the user's text alone
            tokens = sum(int(b["attention_mask"].sum()) for b in work.train_batches)
            return {"calibration_tokens": tokens, "mean_seq_len": work.train_seq_len, "self_texts": 0} | self.example_counts
        if method_kind(method) != "scored":  # no shared statistics: its own timings come with the unit
            return {k: out[k] for k in ("calibration_tokens", "mean_seq_len", "self_texts", *self.example_counts)}
        try:
            out["score_s"] = sum(t.seconds for t in ray.get(work.scores[method]))
        except ray.exceptions.RayError:
            pass
        return out

    def _model_folder(self, unit: Unit) -> Location:
        return self.c.out / unit.name / f"{unit.method}-{unit.budget:g}"

    # ---- the whole campaign ----------------------------------------------------------------

    def run(self) -> SweepResult:
        c = self.c
        finished = self.tracker.finished_units(c.key)
        self._restore_missing_models(finished)
        self._find_remeasures(finished)
        todo = [u for u in c.units() if u.key not in finished or u.key in self.remeasure]
        if todo:  # bad data fails here, before any run is recorded
            stages.connect(c.address)
            calib_rows, eval_rows = select_examples(read_dataset(c.data), c.samples, c.eval_samples, c.seed, c.data)
            self.example_counts = {"calibration_examples": len(calib_rows), "evaluation_examples": len(eval_rows)}
            eval_rows = {self.calibration: eval_rows}
            for label, source in list(self.sources.items())[1:]:  # the rows that source would evaluate were it the calibration data
                eval_rows[label] = select_examples(read_dataset(source), c.samples, c.eval_samples, c.seed, source, eval_only=True)[1]
            self.datasets = [dataset_input(self.calibration, self.where[self.calibration], [r["text"] for r in calib_rows], "calibration")]
            self.datasets += [dataset_input(label, self.where[label], [r["text"] for r in rows], "evaluation") for label, rows in eval_rows.items()]
        campaign_run = self.tracker.campaign_run(c.key, self._campaign_params(), package_versions())
        works = self._model_works(todo, campaign_run)
        if works:
            self.counter = stages.Counter.remote()
            for work in works:
                try:
                    self.prepare(work, calib_rows, eval_rows)
                except (UserError, ray.exceptions.RayError, ValueError, OSError) as exc:
                    work.failed, work.failed_details = _error_text(exc), str(exc)
                    self.failures.append(f"{work.name}: {work.failed}")
                self.poll()
            while self.in_flight or self.collecting:
                self.poll()
            self.poll()  # the last results' bars
        for work in works:
            self.tracker.log(work.run_id, metrics=self._statistics_metrics(work) if work.info else {})
            failed_units = [f for f in self.failures if f.startswith(f"{work.name}/")]
            self.tracker.end(work.run_id, ok=work.failed is None and not failed_units, error=work.failed, details=work.failed_details)
        self.tracker.close_left_running(c.key, {w.run_id for w in works})
        return self._summarize(campaign_run, works)

    def _restore_missing_models(self, finished: dict[str, str]) -> None:
        """A finished unit's pruned model missing from OUT (deleted since) is copied back from the
        model its MLflow run holds; where the run holds none (it ran with --no-save-models), the
        run is deleted and the unit pruned again."""
        if not self.c.save_models:
            return
        for unit in self.c.units():
            folder = self._model_folder(unit)
            if unit.key not in finished or is_written(folder):
                continue
            try:
                with staged_folder(folder, force=True) as staging:
                    self.tracker.download_folder(finished[unit.key], "model", staging)
                warn(f"{unit.label}: its pruned model was missing from {shown(folder)}; restored from MLflow run {finished[unit.key]}")
            except (OSError, UserError) as exc:
                warn(f"{unit.label}: its pruned model is missing from {shown(folder)} and its run has no copy ({_error_text(exc)}); pruning it again")
                self.tracker.delete_run(finished.pop(unit.key))

    def _find_remeasures(self, finished: dict[str, str]) -> None:
        """Finished units whose runs lack an evaluation corpus of this campaign (added since they
        ran, or a label that named another source then) are run again to measure it: the same
        pruned model, so its metrics join the unit's run. The calibration data's numbers are the
        plain metrics, which every finished unit has (its labelled copies are added with others)."""
        others = list(self.sources)[1:]
        if not others or not finished:
            return
        runs = self.tracker.finished_unit_corpora(self.c.key)
        for unit in self.c.units():
            if unit.key not in finished:
                continue
            names, recorded = runs.get(unit.key, (set(), {}))
            stale = {label for label in others if f"relative_quality/{label}" not in names or recorded.get(label) != self.where[label]}
            if stale:
                labels = stale | {label for label in self.sources if f"relative_quality/{label}" not in names}
                self.remeasure[unit.key] = (finished[unit.key], labels, recorded)

    def _model_works(self, todo: list[Unit], campaign_run: str) -> list[ModelWork]:
        works: dict[str, ModelWork] = {}
        for unit in todo:
            if unit.name not in works:
                run_id = self.tracker.model_run(self.c.key, campaign_run, unit.name, unit.entry.source)
                works[unit.name] = ModelWork(unit.entry, unit.name, run_id, [])
            works[unit.name].units.append(unit)
        return list(works.values())

    def _campaign_params(self) -> dict:
        c = self.c
        params = {k: getattr(c, k) for k in ("data", "samples", "eval_samples", "seq_len", "batch_size", "seed", "reconstruction", "allocation", "workers")}
        params |= {"eval_data": ",".join(c.eval_data), "models": ", ".join(e.source for e in c.models), "budgets": ",".join(f"{b:g}" for b in c.budgets), "methods": ",".join(c.methods)}
        return params

    def _summarize(self, campaign_run: str, works: list[ModelWork]) -> SweepResult:
        wanted = {u.key for u in self.c.units()}  # units of an earlier shape of the campaign stay in MLflow, not here
        records = [r for r in self.tracker.unit_records(self.c.key) if r["unit_key"] in wanted]
        for work in works:  # models that never got as far as their units still show in the table
            if work.failed:
                records += [{"model": u.name, "method": u.method, "budget": u.budget, "status": "FAILED", "error": work.failed}
                            for u in work.units if u.key not in self.remeasure]
        with files_into(self.c.out) as folder:
            paths = write_summary(records, folder)
            for path in paths.values():
                self.tracker.log_file(campaign_run, path)
        paths = {kind: self.c.out / path.name for kind, path in paths.items()}
        self.tracker.describe(campaign_run, campaign_description(self.c.experiment, self.c.key, records))
        self.tracker.log(campaign_run, metrics={"units_finished": sum(r.get("status") == "FINISHED" for r in records), "units_failed": len(self.failures)})
        self.tracker.end(campaign_run, ok=not self.failures)
        return SweepResult(records, self.failures, paths, campaign_run, self.tracker.runs_url())


def run_sweep(campaign: Campaign) -> SweepResult:
    """Run (or resume) a campaign; prints the summary table. Failures are returned, not raised."""
    check_sources(campaign.data, campaign.eval_data)
    # every external resource is checked before any work and before any MLflow write (the
    # tracking store by the Tracker, first thing once the campaign is held)
    check_writable(campaign.out, "--out")
    check_writable_folder(campaign.stats_dir(), "--cache-dir")
    stages.check_address(campaign.address)
    uri = store_uri(campaign.tracking_uri)
    with campaign_locks(store_identity(uri), campaign.key, campaign.experiment, campaign.out):
        tracker = Tracker(uri, campaign.experiment)
        with StageProgress() as progress:
            result = Sweep(campaign, tracker, progress).run()
    print_table(result.records, f"campaign {campaign.experiment} ({len(result.records)} units)")
    return result


