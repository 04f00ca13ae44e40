"""One of two processes that use a fresh ./mlflow.db at the same moment, in each of several empty folders.

For folder i both workers mark themselves ready, wait until the other is ready too (a file
barrier: they start within a millisecond or so), then do what `xmodal extract` does first: set the
tracking store up in the working folder and record a run. Prints one line per folder.
"""

import os
import sys
import time
from pathlib import Path

from flows.tracking import runs
import mlflow

root, me, other, tries = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
for i in range(tries):
    folder = root / f"try-{i}"
    folder.mkdir(exist_ok=True)
    (folder / f"ready-{me}").touch()
    while not (folder / f"ready-{other}").exists():
        time.sleep(0.0005)
    os.chdir(folder)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri exports it; each folder has its own store
    try:
        runs.tracking_uri(None)
        exp = runs.experiment_id("first-use")
        client = mlflow.MlflowClient()
        run = client.create_run(exp, run_name=me)
        client.log_metric(run.info.run_id, "x", 1.0)
        client.set_terminated(run.info.run_id, "FINISHED")
        print(f"try {i}: ok", flush=True)
    except Exception as exc:  # report and go on: the test counts failures per try
        print(f"try {i}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
