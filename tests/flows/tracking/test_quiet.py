"""Stage 1 and promote, run as a user runs them (a fresh process, every warning shown), print none of the noise
the issue counted: MLflow's type-hint and input-example warnings, the ambiguous dataset source, the pip-version
and uv lines per logged model, the "no artifacts at artifact path" line at promote."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests_support import ROOT

SCRIPT = r'''
import sys
import numpy as np
from tests_support import make_store
from flows.align import AlignParams, align
from flows.tracking.promote import promote

from pathlib import Path
d = Path(sys.argv[1])
rng = np.random.default_rng(0)
x = rng.normal(size=(120, 8)).astype(np.float32)
ids = [f"q{i}" for i in range(120)]
src, tgt = make_store(d / "src.h5", ids, x), make_store(d / "tgt.h5", ids, np.tanh(x[:, :6]))
out = align(AlignParams(source_store=src, target_store=tgt, train={"epochs": 1}, out_dir=f"{d}/align",
                        experiment="xmodal-quiet-test"))
print("PROMOTED", promote(out["run_id"], "quiet-test")["uri"])
'''

NOISE = ("Add type hints", "interpreted in multiple ways", "Failed to resolve installed pip version", "uv_utils",
         "Detected uv project", "no artifacts at artifact path", "An input example was not provided", "not writable",
         "Operation with range is deprecated")


@pytest.mark.slow  # 30-110 s: real CLI processes (make test-slow; CI runs it)
def test_align_and_promote_print_none_of_the_counted_warnings(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db",
               PYTHONWARNINGS="default", PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("PREFECT_API_URL", None)  # its own ephemeral server, as a plain `python` run gets
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "PROMOTED models:/quiet-test@champion" in output, output[-4000:]
    heard = [n for n in NOISE if n in output]
    assert not heard, [line for line in output.splitlines() if any(n in line for n in heard)]
