"""The MLflow UI as a user meets it: `make ui` on a store with an xmodal experiment, opened in headless
Chromium with a fresh profile (no remembered choice) at the URL xmodal hands out, lands on the training runs
table, not MLflow 3.17's GenAI overview. A screenshot is kept in runs/test-artifacts/.

The mechanism, read from MLflow 3.17's UI bundle: the GenAI / machine-learning view comes from the URL's
`workflowType`, else from the browser's stored choice, GenAI by default; the experiment's
`mlflow.experimentKind` tag is no longer consulted. The control below (the same page without the parameter)
shows the GenAI overview, so the test would fail if the parameter stopped working."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from tests_support import ROOT

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "runs" / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store_with_runs(db) -> str:
    """An xmodal experiment (created as the flows create it) holding two finished training runs."""
    import mlflow

    from flows.tracking import runs

    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    try:
        exp = runs.experiment_id("xmodal-align-digits")
        client = mlflow.MlflowClient()
        for name, cos in (("image→caption mlp", 0.91), ("image→caption linear", 0.88)):
            run = client.create_run(exp, run_name=name, tags={"xmodal.stage": "align"})
            client.log_metric(run.info.run_id, "test_cosine", cos)
            client.set_terminated(run.info.run_id)
    finally:
        mlflow.set_tracking_uri(old)
    return exp


def _chromium(profile, url: str, *action: str) -> subprocess.Popen:
    """A fresh profile; no background traffic; virtual time lets the single-page app fetch and render."""
    return subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             f"--user-data-dir={profile}", "--virtual-time-budget=30000", "--window-size=1400,900",
                             *action, url], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(600)
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it: apt-get install chromium)")
def test_a_fresh_browser_opens_an_xmodal_experiment_on_its_runs_table(tmp_path):
    from flows.tracking.runs import experiment_url

    exp = _store_with_runs(tmp_path / "mlflow.db")
    port = _free_port()
    env = dict(os.environ, MLFLOW_PORT=str(port), MLFLOW_DB=f"sqlite:///{tmp_path / 'mlflow.db'}")
    server = subprocess.Popen(["make", "ui"], cwd=ROOT, env=env, stdout=open(tmp_path / "ui.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "make ui did not answer"
                time.sleep(1)
        base = f"http://127.0.0.1:{port}"
        url = experiment_url(base, exp)
        assert f"{base}/#/experiments?workflowType=machine_learning" in (tmp_path / "ui.log").read_text()  # printed
        shot = tmp_path / "mlflow-ui-runs.png"
        runs_dom = _chromium(tmp_path / "profile-a", url, "--dump-dom")
        control = _chromium(tmp_path / "profile-b", f"{base}/#/experiments/{exp}", "--dump-dom")
        picture = _chromium(tmp_path / "profile-c", url, f"--screenshot={shot}")
        dom, plain = runs_dom.communicate(timeout=240)[0], control.communicate(timeout=240)[0]
        picture.wait(240)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, ARTIFACTS / shot.name)
    # the runs table: its column header, both runs by name, the count; nothing of the GenAI overview
    assert "Run Name" in dom and "image→caption mlp" in dom and "image→caption linear" in dom
    assert "<strong>2</strong> matching runs" in dom
    assert "Detect Issues" not in dom and "workflowType=genai" not in dom
    # the control: a fresh browser at the bare experiment URL gets the GenAI overview (why the URL says so)
    assert "workflowType=genai" in plain and "Run Name" not in plain
