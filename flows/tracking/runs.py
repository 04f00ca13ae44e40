"""MLflow wiring: where runs go, and small helpers that log with an explicit run id.

MLflow's active run is thread-local, and Prefect runs tasks on worker threads, so everything here
takes a ``run_id`` instead of relying on ``mlflow.active_run()``. ``stage_run`` is the one way a flow
opens its MLflow run: experiment, tags, parent, params and end state in one place, not a prologue per flow.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


import mlflow
from mlflow.data.dataset_source import DatasetSource
from mlflow.tracking import MlflowClient

from flows.tracking import mlflow_store
from flows.tracking import recovery


def tracking_uri(uri: str | None = None) -> str:
    """Explicit argument, else $MLFLOW_TRACKING_URI, else a sqlite store in the working folder."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    check_reachable(uri)  # before any compute: a run that cannot be recorded should not start
    mlflow_store.ensure_store(uri)  # a new ./mlflow.db is created once, even by concurrent first runs
    mlflow.set_tracking_uri(uri)
    return uri


# MLflow 3.17's UI opens an experiment on its GenAI overview (traces) unless this tag marks it as model
# training (the UI's ExperimentKind enum: "custom_model_development" opens the training-runs view).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(name: str) -> str:
    """The experiment's id, created on first use and tagged so MLflow's UI opens it on its runs table."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        return mlflow.create_experiment(name, tags=EXPERIMENT_KIND)
    if "mlflow.experimentKind" not in exp.tags:
        MlflowClient().set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return exp.experiment_id


def source_tags(flow_name: str) -> dict[str, str]:
    """Tags that make a run's Source column name the xmodal flow that made it (not Prefect's engine.py)."""
    return {"mlflow.source.name": f"xmodal {flow_name} flow (flows/{flow_name}.py)", "mlflow.source.type": "JOB"}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys (``align.train.epochs``); loss ``terms`` stay one JSON value."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "terms":
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, dict) else v
    return out


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """All params in batches of 100 (MLflow's per-request limit); None is logged as an empty string."""
    from mlflow.entities import Param

    items = [Param(k, "" if v is None else str(v)[:6000]) for k, v in params.items()]
    client = MlflowClient()
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    client = MlflowClient()
    for k, v in metrics.items():
        if v is not None:
            client.log_metric(run_id, k, float(v), step=step or 0)


def log_json(run_id: str, obj: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_text(json.dumps(obj, indent=2, default=str))
        MlflowClient().log_artifact(run_id, str(path))


def log_file(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, str(path), artifact_path)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached: said before any compute starts."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """For an http(s) tracking URI, one quick health probe; a database URI needs none."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise TrackingUnavailable(
        f"MLflow tracking server {uri} is not reachable ({problem}); start it (e.g. `mlflow server --host "
        "127.0.0.1 --port 5000`) or unset MLFLOW_TRACKING_URI to use the local ./mlflow.db"
    )


def link_artifact(run_id: str, key: str) -> None:
    """A Prefect link artifact to the MLflow run, when the tracking URI is a server a browser can open."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    from prefect.artifacts import create_link_artifact

    run = MlflowClient().get_run(run_id)
    create_link_artifact(run_url(uri, run.info.experiment_id, run_id),
                         link_text=f"MLflow run {run.info.run_name or run_id}", key=key)


class StoreSource(DatasetSource):
    """An xmodal HDF5 embedding store as an MLflow dataset source, by type rather than by guessing: a plain path
    string made MLflow warn "The specified dataset source can be interpreted in multiple ways" on every run
    (two artifact-repository sources claim local paths)."""

    def __init__(self, path: str):
        self.path = path

    @staticmethod
    def _get_source_type() -> str:
        return "xmodal_store"

    def load(self) -> str:
        return self.path

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # never guessed from a raw string: named explicitly where a store is logged

    @classmethod
    def _resolve(cls, raw_source: Any) -> "StoreSource":
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> "StoreSource":
        return cls(source_dict["path"])


def log_store_input(store, context: str) -> None:
    """The store as an input of the active run: its name, digest, dim and path (no rows are read)."""
    import numpy as np

    ds = mlflow.data.from_numpy(np.zeros((0, store.dim), np.float32), source=StoreSource(str(store.path)),
                                name=Path(store.path).stem[:60], digest=store.digest)
    mlflow.log_input(ds, context=context)


def experiment_url(uri: str, experiment_id: str) -> str:
    """An experiment's runs table in the MLflow UI (see run_url)."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI, in its machine-learning view: MLflow 3.17's UI picks GenAI or ML from the
    URL's workflowType, else from the browser's stored choice (GenAI in a fresh browser), not from the
    experiment's tags (tests/test_mlflow_ui_browser.py)."""
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


@dataclass(frozen=True)
class StageRun:
    """An open MLflow run of one stage; every log call names it by id (safe from task threads)."""

    run_id: str
    experiment_id: str

    def log_params(self, params: dict[str, Any]) -> None:
        log_params(self.run_id, params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, prefix: str = "") -> None:
        log_metrics(self.run_id, {f"{prefix}{k}": v for k, v in metrics.items()}, step)

    def log_json(self, obj: Any, name: str) -> None:
        log_json(self.run_id, obj, name)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        log_file(self.run_id, path, artifact_path)

    def log_dir(self, path: str | Path, artifact_path: str | None = None) -> None:
        MlflowClient().log_artifacts(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        client = MlflowClient()
        for k, v in tags.items():
            client.set_tag(self.run_id, k, str(v))


@contextmanager
def stage_run(stage: str, dataset: str, run_name: str, *, experiment: str | None = None,
              parent_run_id: str | None = None, tags: dict[str, str] | None = None,
              params: dict[str, Any] | None = None, work: str | Path | None = None,
              flow: str | None = None) -> Iterator[StageRun]:
    """The MLflow run of one stage: FINISHED when the block ends, FAILED when it raises (KILLED if killed,
    found by the next run of the same ``work``, see run_recovery).

    Experiment ``xmodal-<stage>-<dataset>`` unless named; tags name the stage, dataset, the flow as the
    run's source and the parent run. The run is also the thread's active run (nested under any active
    parent), so MLflow's fluent-only calls (``pyfunc.log_model``) land in it too.
    """
    exp = experiment_id(experiment or f"xmodal-{stage}-{dataset}")
    all_tags = {"xmodal.stage": stage, "xmodal.dataset": dataset, **source_tags(flow or stage), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if work is not None:
        all_tags |= recovery.claim(exp, work)  # a killed run of the same work: KILLED, linked
    run = StageRun(MlflowClient().create_run(exp, run_name=run_name, tags=all_tags).info.run_id, exp)
    with mlflow.start_run(run_id=run.run_id, nested=True):  # exit ends it: FAILED on an exception
        if params:
            run.log_params(params)
        yield run


def log_report(experiment: str, run_name: str, params: dict[str, Any], series: dict[str, list[tuple[int, float]]],
               files: list[str | Path], uri: str | None = None) -> str:
    """One MLflow run for a benchmark report: params, metric series (name -> [(step, value)]) and files such
    as a plot (``benchmarks/semi.py --mlflow`` logs its R@1-vs-pairs curve this way). Returns the run id."""
    tracking_uri(uri)
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name) as run:
        mlflow.log_params(params)
        for name, points in series.items():
            for step, value in points:
                mlflow.log_metric(name, value, step=step)
        for f in files:
            mlflow.log_artifact(str(f))
    return run.info.run_id
