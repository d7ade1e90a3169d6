"""MLflow records of a campaign: a parent run, a nested run per model, one per unit beneath it.

Only the driver logs (in one `log_batch` per run: logging from Ray workers to one store is slow).
A unit run is created when its results are already in hand and is closed in the same breath, so a
campaign killed at any moment leaves at most a few unit runs unfinished; a rerun deletes those and
redoes their units, and every unit ends up recorded exactly once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag, ViewType
from mlflow.tracking import MlflowClient

from ..errors import UserError, first_line
from ..outputs import check_writable_folder
from .locking import exclusive, lock_path

DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow's own default: a sqlite file in the working directory
KIND, CAMPAIGN, UNIT, MODEL = "gfprune_kind", "gfprune_campaign", "gfprune_unit", "gfprune_model"
CORPORA_TAG = "gfprune_corpora"  # a unit's evaluation corpora, JSON: label -> source
PARENT = "mlflow.parentRunId"
DESCRIPTION = "mlflow.note.content"  # what the UI shows as a run's description
# MLflow 3's UI opens a GenAI overview ("No data") for experiments of unknown kind; this kind opens the runs table
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
FINISHED = RunStatus.to_string(RunStatus.FINISHED)


logging.getLogger("mlflow").setLevel(logging.WARNING)  # no table-creation chatter on the terminal


def package_versions() -> dict[str, str]:
    out = {}
    for package in ("gfprune-ray", "torch", "transformers", "ray", "mlflow"):
        try:
            out[f"version_{package.replace('-', '_')}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[f"version_{package.replace('-', '_')}"] = "absent"
    return out


CONNECT_TIMEOUT_S = 5.0
SQLITE_MAGIC = b"SQLite format 3\x00"
STORE_INIT_WAIT_S = 120.0


def store_uri(tracking_uri: str | None) -> str:
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (sqlite:///relative, sqlite:////absolute); None in memory
    or for another kind of store."""
    if not uri.startswith("sqlite:"):
        return None
    path = uri.removeprefix("sqlite://").removeprefix("/")
    return None if path in ("", ":memory:") else Path(path)


def store_identity(uri: str) -> str:
    """The store as a lock names it: a sqlite file by its absolute path, other URIs as written."""
    path = _sqlite_path(uri)
    return f"sqlite:///{path.absolute()}" if path is not None else uri


def check_store(uri: str, write: bool = True) -> None:
    """Fail in one line, before any work, on a tracking store MLflow would retry for minutes or
    refuse with a traceback: an unwritable or foreign sqlite file, an unreachable server, a folder."""
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is None:
            return
        if write:
            check_writable_folder(path.absolute().parent, "--tracking-uri")
        if path.exists():
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
            if head and head != SQLITE_MAGIC:
                raise UserError(f"--tracking-uri {uri}: {path} is not a sqlite database")
            if write and not os.access(path, os.W_OK):
                raise UserError(f"--tracking-uri {uri}: {path} cannot be written")
        if write:  # sqlite creates the file, not its folder
            path.absolute().parent.mkdir(parents=True, exist_ok=True)
    elif scheme in ("http", "https"):
        where = urlparse(uri)
        port = where.port or (443 if scheme == "https" else 80)
        try:
            socket.create_connection((where.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise UserError(f"--tracking-uri {uri}: cannot reach the MLflow server ({exc.strerror or exc})") from None
    elif scheme in ("", "file") or len(scheme) == 1:  # a folder (or a Windows drive letter)
        raise UserError(f"--tracking-uri {uri}: MLflow 3 no longer takes folder stores; use a database, e.g. sqlite:///mlflow.db")


def _first_sentence(exc: Exception) -> str:
    return first_line(exc).split(". ")[0][:300]


TAG_LIMIT = 8000  # MLflow's limit on a tag value (a description is one)


def campaign_name(key: str) -> str:
    return f"campaign {key}"


def dataset_input(label: str, source: str, texts: list[str], context: str) -> DatasetInput:
    """The examples a run used, as an MLflow dataset input: the UI's Dataset column and filter."""
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    kind = "local" if Path(source).exists() else "named"
    dataset = Dataset(name=label, digest=digest, source_type=kind, source=json.dumps({"uri": source}),
                      profile=json.dumps({"num_rows": len(texts)}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


def _now() -> int:
    return int(time.time() * 1000)


class Tracker:
    def __init__(self, tracking_uri: str | None, experiment: str, create: bool = True):
        self.uri = store_uri(tracking_uri)
        check_store(self.uri, write=create)
        database = _sqlite_path(self.uri)
        if not create and database is not None and not database.exists():  # reading must not create a store
            raise UserError(f"no MLflow experiment named {experiment!r} at {self.uri} (no database there)")
        # processes opening a new store at once race in its schema migration: one at a time
        with exclusive(lock_path("store", store_identity(self.uri)), f"tracking store {self.uri}", wait_s=STORE_INIT_WAIT_S):
            try:
                self.client = MlflowClient(self.uri)
                found = self.client.get_experiment_by_name(experiment)
                if found is None and create:
                    created = self.client.create_experiment(experiment, self._artifact_location(experiment), tags=EXPERIMENT_KIND)
                    found = self.client.get_experiment(created)
            except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and HTTP errors alike end here in one line
                raise UserError(f"MLflow tracking store {self.uri}: {_first_sentence(exc)}") from None
        if found is None:
            raise UserError(f"no MLflow experiment named {experiment!r} at {self.uri}")
        self.experiment_id = found.experiment_id

    def _artifact_location(self, experiment: str) -> str | None:
        """A sqlite store keeps its artifacts beside it (MLflow's default is ./mlruns of whatever
        folder the command runs in, which scatters one store's artifacts over folders)."""
        database = _sqlite_path(self.uri)
        if database is None:
            return None
        return (database.absolute().parent / "mlruns" / hashlib.sha256(experiment.encode()).hexdigest()[:12]).as_uri()

    # ---- runs ------------------------------------------------------------------------------

    def _search(self, filter_string: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string, ViewType.ACTIVE_ONLY, max_results=50000)

    def _create(self, name: str, tags: dict, parent: str | None = None) -> str:
        tags = tags | ({PARENT: parent} if parent else {})
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def _resume(self, filter_string: str) -> str | None:
        """The run an earlier attempt left for this filter, marked running again; None if none."""
        runs = self._search(filter_string)
        if not runs:
            return None
        self.client.update_run(runs[0].info.run_id, RunStatus.to_string(RunStatus.RUNNING))
        return runs[0].info.run_id

    def campaign_run(self, key: str, params: dict, tags: dict) -> str:
        """The campaign's parent run: the existing one for this key (a resume), or a new one,
        named as `report` names the campaign."""
        run_id = self._resume(f"tags.{KIND} = 'campaign' and tags.{CAMPAIGN} = '{key}'")
        if run_id is None:
            run_id = self._create(campaign_name(key), {KIND: "campaign", CAMPAIGN: key})
            self.log(run_id, params=params, tags=tags)
        return run_id

    def model_run(self, campaign_key: str, campaign_run: str, name: str, source: str) -> str:
        run_id = self._resume(f"tags.{KIND} = 'model' and tags.{CAMPAIGN} = '{campaign_key}' and tags.{MODEL} = '{name}'")
        return run_id or self._create(name, {KIND: "model", CAMPAIGN: campaign_key, MODEL: name, "source": source}, campaign_run)

    def finished_units(self, campaign_key: str) -> dict[str, str]:
        """unit key -> run id of the finished units; unfinished unit runs are deleted (redone)."""
        done = {}
        for run in self._search(f"tags.{KIND} = 'unit' and tags.{CAMPAIGN} = '{campaign_key}'"):
            key = run.data.tags.get(UNIT)
            if run.info.status == FINISHED and key not in done:
                done[key] = run.info.run_id
            else:
                self.client.delete_run(run.info.run_id)
        return done

    def finished_unit_corpora(self, campaign_key: str) -> dict[str, tuple[set[str], dict[str, str]]]:
        """unit key -> (names of the metrics its finished run holds, its evaluation corpora)."""
        runs = self._search(f"tags.{KIND} = 'unit' and tags.{CAMPAIGN} = '{campaign_key}' and attributes.status = '{FINISHED}'")
        return {run.data.tags.get(UNIT): (set(run.data.metrics), json.loads(run.data.tags.get(CORPORA_TAG, "{}"))) for run in runs}

    def unit_run(self, campaign_key: str, model_run: str, unit, params: dict, metrics: dict, tags: dict, start_ms: int) -> str:
        """A unit's run, named for the row it is under its model's (`gfp@0.6`), starting when its
        work started (the run is created only when its results are in hand)."""
        tags = {KIND: "unit", CAMPAIGN: campaign_key, UNIT: unit.key, MODEL: unit.name, PARENT: model_run} | tags
        run_id = self.client.create_run(self.experiment_id, start_time=start_ms, tags=tags, run_name=f"{unit.method}@{unit.budget:g}").info.run_id
        self.log(run_id, params=params, metrics=metrics)
        return run_id

    def log_datasets(self, run_id: str, datasets: list[DatasetInput]) -> None:
        if datasets:
            self.client.log_inputs(run_id, datasets=datasets)

    def log(self, run_id: str, params: dict | None = None, metrics: dict | None = None, tags: dict | None = None) -> None:
        now = _now()
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)],
            params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()],
            tags=[RunTag(k, str(v)[:TAG_LIMIT]) for k, v in (tags or {}).items()],
        )

    def log_curve(self, run_id: str, rows: list[dict], prefix: str = "train/") -> None:
        """A training curve: every numeric field of every row as a metric at the row's step."""
        now = _now()
        metrics = [
            Metric(f"{prefix}{k}", float(v), now, int(row["step"]))
            for row in rows for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])

    def log_json(self, run_id: str, value, path: str) -> None:
        self.client.log_text(run_id, json.dumps(value, indent=2, default=str) + "\n", path)

    def log_folder(self, run_id: str, folder, path: str) -> None:
        self.client.log_artifacts(run_id, str(folder), path)

    def log_pruned_model(self, run_id: str, folder: Path, register: str | None = None) -> str:
        """The saved folder as an MLflow model of this run (see mlflow_model.py), registered as a
        new version of `register` when given; returns its model URI."""
        import mlflow

        from . import mlflow_model

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the CLI draws its own bars
        mlflow.set_tracking_uri(self.uri)
        requirements = [f"{name}=={metadata.version(name)}" for name in ("gfprune-ray", "torch", "transformers", "mlflow")]
        # start_run(run_id) ends the run when the block ends: the caller logs this last, then ends it
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="pruned_model", python_model=mlflow_model.__file__, artifacts={mlflow_model.ARTIFACT: str(folder)},
                                           pip_requirements=requirements, registered_model_name=register)
        return info.model_uri

    def log_file(self, run_id: str, file) -> None:
        self.client.log_artifact(run_id, str(file))

    def end(self, run_id: str, ok: bool = True, error: str | None = None, details: str | None = None) -> None:
        """Close a run; a failure's one line goes to the `error` tag, and its whole text (`details`,
        e.g. the traceback) to the run's description."""
        if error:
            self.log(run_id, tags={"error": error, DESCRIPTION: details or error})
        self.client.set_terminated(run_id, FINISHED if ok else RunStatus.to_string(RunStatus.FAILED))

    def describe(self, run_id: str, markdown: str) -> None:
        self.log(run_id, tags={DESCRIPTION: markdown})

    def runs_url(self) -> str:
        """Where the runs table of this experiment opens in the MLflow UI."""
        page = f"#/experiments/{self.experiment_id}/runs"
        if urlparse(self.uri).scheme in ("http", "https"):
            return f"{self.uri.rstrip('/')}/{page}"
        return f"http://127.0.0.1:5000/{page} (after: mlflow ui --backend-store-uri {self.uri})"

    def delete_run(self, run_id: str) -> None:
        self.client.delete_run(run_id)

    def close_left_running(self, campaign_key: str, keep: set[str]) -> None:
        """Close the model runs of this campaign that a killed sweep left RUNNING (all but `keep`,
        this sweep's own): FINISHED when every unit run beneath them is. Callers hold the
        campaign's lock, so no other process is running them."""
        running = RunStatus.to_string(RunStatus.RUNNING)
        for run in self._search(f"tags.{KIND} = 'model' and tags.{CAMPAIGN} = '{campaign_key}' and attributes.status = '{running}'"):
            if run.info.run_id in keep:
                continue
            units = self._search(f"tags.{KIND} = 'unit' and tags.`{PARENT}` = '{run.info.run_id}'")
            self.end(run.info.run_id, ok=all(u.info.status == FINISHED for u in units))

    # ---- reading back ----------------------------------------------------------------------

    def download_folder(self, run_id: str, artifact_path: str, into: Path) -> None:
        """A run's artifact folder, its contents put directly into `into`."""
        download = Path(tempfile.mkdtemp(prefix=".download-", dir=into))
        try:
            local = Path(self.client.download_artifacts(run_id, artifact_path, str(download)))
            if not local.is_dir() or not any(local.iterdir()):
                raise UserError(f"run {run_id} has no {artifact_path}/ artifact")
            for child in list(local.iterdir()):
                child.rename(into / child.name)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own errors for a missing artifact
            raise UserError(_first_sentence(exc)) from None
        finally:
            shutil.rmtree(download, ignore_errors=True)

    def latest_campaign(self) -> str | None:
        runs = self.client.search_runs([self.experiment_id], f"tags.{KIND} = 'campaign'", ViewType.ACTIVE_ONLY, 1, ["attributes.start_time DESC"])
        return runs[0].data.tags[CAMPAIGN] if runs else None

    def unit_records(self, campaign_key: str) -> list[dict]:
        """Finished unit runs of a campaign as flat dicts: params, metrics and the run's status."""
        out = []
        for run in self._search(f"tags.{KIND} = 'unit' and tags.{CAMPAIGN} = '{campaign_key}'"):
            record = dict(run.data.params) | dict(run.data.metrics)
            record |= {"run_id": run.info.run_id, "status": run.info.status, "error": run.data.tags.get("error", ""), "unit_key": run.data.tags.get(UNIT)}
            out.append(record)
        return out
