"""A small align run, as a user's shell runs it (no CI or pytest variables, no telemetry switches set)."""

import socket
import sys
from pathlib import Path

import numpy as np

out = Path(sys.argv[1])
try:  # proves the audit hook sees lookups: this one must be in the log
    socket.getaddrinfo("canary.invalid", 80)
except OSError:
    pass

from flows.align import AlignParams, align  # noqa: E402
from tests_support import make_store  # noqa: E402

import mlflow.telemetry.utils as telemetry  # noqa: E402

rng = np.random.default_rng(0)
ids = [f"r{i}" for i in range(60)]
src = make_store(out / "src.h5", ids, rng.normal(size=(60, 8)).astype(np.float32))
tgt = make_store(out / "tgt.h5", ids, rng.normal(size=(60, 6)).astype(np.float32))
align(AlignParams(source_store=src, target_store=tgt, train={"epochs": 2}, out_dir=str(out / "align")))
print("telemetry disabled:", telemetry.is_telemetry_disabled())
