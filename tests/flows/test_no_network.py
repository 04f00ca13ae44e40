"""No library phones home by default: no lookup of, or connection to, an outside host during a run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests_support import ROOT

HERE = Path(__file__).parent
# What a CI runner or pytest sets, which MLflow takes as "do not send": a user's shell has none of these.
CI_HINTS = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK",
            "HF_HUB_DISABLE_TELEMETRY", "PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_API_URL", "DISABLE_TELEMETRY")


def test_an_align_run_looks_up_no_outside_host(tmp_path):
    log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items() if k not in CI_HINTS}
    env |= {"PYTHONPATH": os.pathsep.join([str(HERE / "netaudit"), str(ROOT), str(ROOT / "tests")]),
            "XMODAL_NET_AUDIT_LOG": str(log), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    res = subprocess.run([sys.executable, str(HERE / "no_network_worker.py"), str(tmp_path)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "telemetry disabled: True" in res.stdout
    lines = log.read_text().splitlines()
    assert any(line.endswith("canary.invalid") for line in lines)  # the hook does see lookups
    outside = [line for line in lines if not line.endswith("canary.invalid")]
    assert outside == [], outside
