"""The servers as the README's Operations section starts them (`make prefect-server`, `make deploy`,
`make worker`, `make ui`), on free ports: every Python process they start carries an audit hook
(tests/flows/netaudit) that logs each name lookup or connection to a host other than this machine.
None may happen: the Prefect server's analytics and MLflow's telemetry are off in the servers' own
environment, not only in xmodal's processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from readme_walk import blocks
from tests_support import ROOT

NETAUDIT = ROOT / "tests" / "flows" / "netaudit"
# What a CI runner or pytest sets (and a user's shell does not): the make targets must turn telemetry off alone.
CI_HINTS = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK",
            "HF_HUB_DISABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_API_URL", "DISABLE_TELEMETRY",
            "MLFLOW_TRACKING_URI", "PREFECT_HOME")
LONG_RUNNING = {"make prefect-server", "make worker", "make ui"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, proc: subprocess.Popen, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, f"the server behind {url} exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _stop(procs) -> None:
    """Each server's process group: SIGTERM, wait, then SIGKILL (a process worker ignores SIGTERM a while)."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def operations_commands() -> list[str]:
    """The make targets of the README's Operations block, as written (comments dropped)."""
    (ops,) = [b for b in blocks(ROOT / "README.md") if b.mark == "server" and "make prefect-server" in b.code]
    return [c for c in ops.commands if c.startswith("make ")]


def test_readme_starts_the_servers_with_the_make_targets():
    assert operations_commands() == ["make prefect-server", "make deploy", "make worker", "make ui"]


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(900)
def test_documented_servers_look_up_no_outside_name(tmp_path):
    log = tmp_path / "net.log"
    pport, mport = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in CI_HINTS}
    env |= {"PYTHONPATH": str(NETAUDIT), "XMODAL_NET_AUDIT_LOG": str(log), "XMODAL_NET_AUDIT_CANARY": "1",
            "PREFECT_HOME": str(tmp_path / "prefect-home"), "PWD": str(ROOT),
            "PREFECT_PORT": str(pport), "MLFLOW_PORT": str(mport), "MLFLOW_DB": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for cmd in operations_commands():
            if cmd in LONG_RUNNING:
                out = open(tmp_path / f"{cmd.split()[1]}.log", "w")
                procs[cmd] = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=env, stdout=out,
                                              stderr=subprocess.STDOUT, start_new_session=True)
                if cmd == "make prefect-server":  # deploy and the worker need its API
                    _get(f"http://127.0.0.1:{pport}/api/health", procs[cmd], 180)
            else:
                subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
        ui = procs["make ui"]
        _get(f"http://127.0.0.1:{mport}/health", ui, 240)
        assert b"<html" in _get(f"http://127.0.0.1:{mport}/", ui, 30).lower()  # the UI a browser gets
        assert b"<html" in _get(f"http://127.0.0.1:{pport}/", procs["make prefect-server"], 30).lower()
        deadline = time.monotonic() + 120  # the worker is up when the server lists it in its pool
        while b'"name"' not in _post(f"http://127.0.0.1:{pport}/api/work_pools/xmodal-process/workers/filter"):
            assert time.monotonic() < deadline and procs["make worker"].poll() is None, \
                (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(2)
        time.sleep(15)  # telemetry threads start with the servers; give them time to try
    finally:
        _stop(list(procs.values()))
    lines = log.read_text().splitlines() if log.exists() else []
    canaries = {line.split()[0] for line in lines if line.endswith("canary.invalid")}
    assert len(canaries) >= 4, lines  # the hook ran in the servers, the worker and deploy: it would have seen lookups
    outside = [line for line in lines if not line.endswith("canary.invalid")]
    assert outside == [], outside


def _post(url: str) -> bytes:
    req = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.read()
    except OSError:
        return b""
