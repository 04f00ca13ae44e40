"""Against real servers on loopback: `prefect server` + a process worker running the deployments,
and an `mlflow server` receiving a whole pipeline over HTTP. Each server is started and stopped here,
on a free port, within a bounded time."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from flows.pipeline import PipelineParams, pipeline
from flows.tracking.runs import TrackingUnavailable
from tests_support import ROOT, TINY_RN, deployment_flows, form_values, python_values

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _small_config(sample_data, out: Path, **kw) -> dict:
    """The digits pipeline on its first 400 rows (same folder, so relative paths hold), 3 epochs: servers are
    what these tests exercise, not the model."""
    import pandas as pd

    small = sample_data["digits"].parent / "manifest_400.csv"
    if not small.exists():
        pd.read_csv(sample_data["digits"]).head(400).to_csv(small, index=False)
    return PipelineParams(manifest=str(small), class_manifest=str(sample_data["digit_classes"]),
                          source_encoder=f"open_clip:image:{TINY_RN}?batch_size=256", out_dir=str(out),
                          align={"train": {"epochs": 3, "batch_size": 128}}, **kw).model_dump(mode="json")


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real `prefect server start` on a free loopback port, with its own PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    # the scheduler service looks for due schedules every 2 s instead of 60 s, so a schedule fires within a test
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PWD": str(ROOT), "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"{api}/health", proc, 120)
        yield api, env, home
    finally:
        _stop(proc)
        log.close()


@pytest.mark.server
def test_deployments_run_on_a_real_prefect_server_and_worker(prefect_api, sample_data, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, env, home = prefect_api
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    run = lambda *args: subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, check=True,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    run("work-pool", "create", "xmodal-process", "--type", "process")
    deployed = run("--no-prompt", "deploy", "--all")
    assert "pipeline/pipeline" in deployed.stdout + deployed.stderr
    log = open(home / "worker.log", "w")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "xmodal-process", "--limit", "1"],
                              env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: api}):
            with get_client(sync_client=True) as client:
                names = {d.name for d in client.read_deployments()}
                assert {"pipeline", "extract-embeddings", "align", "finetune"} <= names
                dep = client.read_deployment_by_name("pipeline/pipeline")
                assert dep.schedules and not dep.schedules[0].active  # the example schedule ships inactive
                for entry, flow in deployment_flows():  # the schema the server stores runs the Python defaults
                    stored = client.read_deployment_by_name(f"{flow.name}/{entry['name']}")
                    given = stored.parameters
                    assert form_values(stored.parameter_openapi_schema, given) == python_values(flow, given), entry["name"]
                schema_defaults = form_values(dep.parameter_openapi_schema)["params"]
            # a parameter of the wrong type is refused before any run starts, naming the field
            with pytest.raises(Exception, match="epochs"):
                run_deployment("pipeline/pipeline", timeout=0,
                               parameters={"params": {"align": {"train": {"epochs": "many"}}}})
            # exactly the schema's defaults, with only data size, epochs and where things go made small and equal
            small = _small_overrides(sample_data, tmp_path)
            params = {"params": _deep_merge(schema_defaults, small)}
            flow_run = run_deployment("pipeline/pipeline", parameters=params, timeout=540)
            assert flow_run.state.is_completed(), (flow_run.state, (home / "worker.log").read_text()[-3000:])
            with get_client(sync_client=True) as client:  # this server saw only this pipeline run
                runs = client.read_flow_runs()
                keys = {a.key for a in client.read_artifacts()}
        assert {r.state.name for r in runs} == {"Completed"}
        assert {"extract_embeddings", "align", "evaluate"} <= {client_flow for client_flow in _flow_names(api, runs)}
        assert "pipeline-summary" in keys and any(k and k.startswith("align-") for k in keys)
        assert (tmp_path / "runs" / "align").is_dir()
    finally:
        _stop(worker)
        log.close()
    # the same config from Python, pipeline(PipelineParams(...)), logs the same parameters on its parent run
    local = pipeline(PipelineParams.model_validate(_deep_merge(PipelineParams().model_dump(mode="json"), small)))
    client = MlflowClient(tracking_uri=small["tracking_uri"])
    parents = client.search_runs([client.get_experiment_by_name(small["experiment"]).experiment_id],
                                 "tags.`xmodal.stage` = 'pipeline'")
    by_id = {r.info.run_id: r.data.params for r in parents}
    assert len(by_id) == 2 and local["parent_run_id"] in by_id
    python = by_id.pop(local["parent_run_id"])
    (served,) = by_id.values()
    assert served == python and served["align.train.epochs"] == "3" and "finetune.config.unfreeze" in served


def _small_overrides(sample_data, tmp_path) -> dict:
    """The run-size fields only: a 400-row manifest, 3 epochs, this test's folders and MLflow store."""
    small = _small_config(sample_data, tmp_path / "runs")
    return {"manifest": small["manifest"], "class_manifest": small["class_manifest"], "out_dir": small["out_dir"],
            "align": {"train": {"epochs": 3, "batch_size": 128}}, "experiment": "xmodal-form-defaults",
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def _deep_merge(base: dict, over: dict) -> dict:
    return {**base, **{k: _deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}


def _flow_names(api, runs) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        return {client.read_flow(r.flow_id).name for r in runs}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
                             "--artifacts-destination", str(d / "artifacts"), "--workers", "1"],
                            stdout=open(d / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 240)  # its sqlite migration is slow on a busy machine
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)
        # A flow given this server as tracking_uri calls mlflow.set_tracking_uri, which also sets the environment
        # variable: later tests would inherit a stopped server. Put back what the session had.
        import mlflow

        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
        mlflow.set_tracking_uri(before)


@pytest.mark.server
def test_pipeline_logs_to_a_real_mlflow_server_over_http(prefect_server, mlflow_server, sample_data, tmp_path):
    cfg = PipelineParams.model_validate(_small_config(sample_data, tmp_path / "runs", tracking_uri=mlflow_server,
                                                      experiment="xmodal-over-http"))
    result = pipeline(cfg)
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("xmodal-over-http")
    runs = client.search_runs([exp.experiment_id])
    pid = result["parent_run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid]
    assert {r.data.tags["xmodal.stage"] for r in children} == {"extract", "align", "evaluate"}
    align_run = next(r for r in children if r.data.tags["xmodal.stage"] == "align")
    assert align_run.data.metrics["test_p2t_r1"] == pytest.approx(result["align"]["metrics"]["projector"]["p2t_r1"])
    import pandas as pd

    mlflow.set_tracking_uri(mlflow_server)  # the mlflow_server fixture puts the session's URI back
    model = mlflow.pyfunc.load_model(f"runs:/{align_run.info.run_id}/projector")  # safetensors + JSON, no pickle
    rows = pd.DataFrame({"embedding": list(np.zeros((2, 64), np.float32))})  # source embeddings: the projector alone
    assert np.asarray(model.predict(rows)).shape == (2, 384)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as pc:
        links = [x for x in pc.read_artifacts() if x.key == "pipeline-mlflow"]  # links render as markdown
    assert any(pid in str(x.data) and mlflow_server in str(x.data) for x in links)


def test_unreachable_tracking_server_fails_before_any_compute(prefect_server, sample_data, tmp_path):
    dead = f"http://127.0.0.1:{_free_port()}"
    cfg = PipelineParams.model_validate(_small_config(sample_data, tmp_path / "runs", tracking_uri=dead))
    t0 = time.perf_counter()
    with pytest.raises(TrackingUnavailable, match=r"not reachable"):
        pipeline(cfg)
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "runs").exists()  # nothing was extracted or trained


TICK_FLOW = '''
from pathlib import Path
from prefect import flow

@flow(name="tick")
def tick():
    Path("ticks.txt").open("a").write("tick\\n")
'''

TICK_YAML = '''
name: tick
prefect-version: 3.8.8
pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{{ $PWD }}"
deployments:
  - name: every-5s
    entrypoint: tick.py:tick
    work_pool: {name: xmodal-tick, work_queue_name: default}
    schedules:
      - interval: 5
        active: true
'''


@pytest.mark.server
def test_an_active_schedule_creates_runs_that_a_worker_completes(prefect_api, tmp_path):
    """What the nightly schedule in prefect.yaml does once switched on, at a 5 s interval: the server's
    scheduler inserts scheduled runs (SQLAlchemy 2.1 broke exactly this insert) and a process worker runs one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api, env, home = prefect_api
    (tmp_path / "tick.py").write_text(TICK_FLOW)
    (tmp_path / "prefect.yaml").write_text(TICK_YAML)
    env = {**env, "PWD": str(tmp_path)}
    run = lambda *args: subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=tmp_path, check=True,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    run("work-pool", "create", "xmodal-tick", "--type", "process")
    run("--no-prompt", "deploy", "--all")
    log = open(home / "tick-worker.log", "w")
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "xmodal-tick", "--limit", "1"],
                              env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("tick/every-5s")
            assert dep.schedules and dep.schedules[0].active
            only_tick = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
            deadline, runs = time.monotonic() + 240, []
            while time.monotonic() < deadline:
                runs = client.read_flow_runs(deployment_filter=only_tick)
                if any(r.state.is_completed() for r in runs):
                    break
                time.sleep(2)
            states = sorted(r.state.name for r in runs)
            assert runs and all(r.auto_scheduled for r in runs), states  # made by the scheduler, not by hand
            assert "Completed" in states, (states, (home / "tick-worker.log").read_text()[-3000:],
                                           (home / "server.log").read_text()[-3000:])
            client.delete_deployment(dep.id)  # its future runs go with it: other tests on this server see none
        assert (tmp_path / "ticks.txt").read_text().startswith("tick")
    finally:
        _stop(worker)
        log.close()


def test_the_lock_pins_sqlalchemy_below_2_1_for_prefects_scheduler():
    """Prefect 3.8.8's scheduler fails on SQLAlchemy 2.1 (`Can't evaluate bulk DML statement`); the lock and
    the installed environment must both hold 2.0.x."""
    import importlib.metadata
    import tomllib

    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = [p["version"] for p in lock["package"] if p["name"] == "sqlalchemy"]
    installed = importlib.metadata.version("sqlalchemy")
    major_minor = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    assert locked and all(major_minor(v) < (2, 1) for v in locked), locked
    assert major_minor(installed) < (2, 1), installed
