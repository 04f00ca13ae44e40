"""kill -9 of a CLI run: no process left behind (checked by pid), and the killed MLflow run is marked
KILLED and linked from the run that resumes its work; no run stays RUNNING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from flows.tracking.recovery import RESUMED_FROM, WORK
from tests_support import ROOT, TINY_VIT


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _xmodal(*args, env):
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # 30-110 s: real CLI processes (make test-slow; CI runs it)
def test_kill_9_of_extract_leaves_no_server_and_the_rerun_marks_the_killed_run(mlflow_uri, tmp_path):
    folder = tmp_path / "killset"
    folder.mkdir()
    n = 20_000
    pd.DataFrame({"id": [f"t{i:06d}" for i in range(n)],
                  "caption": [f"item {i} of the set" for i in range(n)]}).to_csv(folder / "manifest.csv", index=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=mlflow_uri)
    env.pop("PREFECT_API_URL", None)  # the CLI's own ephemeral server, as a user gets it
    args = ("extract", folder / "manifest.csv", "-c", "caption", "-e", f"open_clip:text:{TINY_VIT}?batch_size=64",
            "--out-dir", tmp_path / "stores")
    victim = _xmodal(*args, env=env)
    deadline = time.time() + 300
    while not list((tmp_path / "stores").rglob("*.h5.lock")):  # the MLflow run exists, extraction has begun
        assert victim.poll() is None, victim.stdout.read()
        assert time.time() < deadline, "extraction never started"
        time.sleep(0.1)
    servers = [p for p in _children(victim.pid) if b"uvicorn" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(servers) == 1, "expected the ephemeral Prefect server as a child of the CLI"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    deadline = time.time() + 20
    while _alive(servers[0]) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(servers[0]), f"Prefect server pid {servers[0]} outlived its killed parent"

    rerun = _xmodal(*args, env=env)
    out = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, out[-3000:]
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("xmodal-extract-killset")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2 and len({r.data.tags[WORK] for r in runs}) == 1
    by_status = {r.info.status: r for r in runs}
    assert set(by_status) == {"KILLED", "FINISHED"}  # none left RUNNING
    assert by_status["FINISHED"].data.tags[RESUMED_FROM] == by_status["KILLED"].info.run_id


@pytest.mark.slow  # 30-110 s: real CLI processes (make test-slow; CI runs it)
def test_kill_9_of_align_then_rerun_gives_one_run_with_the_whole_metric_history(mlflow_uri, tmp_path):
    import numpy as np

    from tests_support import kill_9_after_first_checkpoint, make_store

    rng = np.random.default_rng(0)
    ids = [f"r{i}" for i in range(3000)]
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    src = make_store(tmp_path / "src.h5", ids, x)
    tgt = make_store(tmp_path / "tgt.h5", ids, np.tanh(x[:, :16] * 2).astype(np.float32))
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=mlflow_uri)
    env.pop("PREFECT_API_URL", None)
    args = ("align", src, tgt, "--set", "train.epochs=30", "--out-dir", tmp_path / "align")
    victim = _xmodal(*args, env=env)
    deadline = time.time() + 300
    while not list((tmp_path / "align").glob("*/ckpt")):
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read() if victim.poll() else ""
        time.sleep(0.1)
    ckpt = next((tmp_path / "align").glob("*/ckpt")) / "checkpoint.pt"
    kill_9_after_first_checkpoint(victim, ckpt)

    rerun = _xmodal(*args, env=env)
    out = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, out[-3000:]
    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("xmodal-align-synthetic").experiment_id],
                              filter_string=f"params.run_dir LIKE '%{tmp_path.name}%'")
    by_status = {r.info.status: r for r in runs}
    assert len(runs) == 2 and set(by_status) == {"KILLED", "FINISHED"}, [r.info.status for r in runs]
    done = by_status["FINISHED"]
    assert done.data.tags[RESUMED_FROM] == by_status["KILLED"].info.run_id
    epochs = int(done.data.metrics["epochs_run"])
    history = client.get_metric_history(done.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == sorted({m.step for m in history}) and len(history) == epochs


def test_two_identical_align_runs_started_together_end_with_the_same_projector(mlflow_uri, tmp_path):
    """They share a run folder (named by inputs and settings): the second waits for the first, then reuses its
    checkpoint; neither dies on the other's files (issue 19: 'No such file ... checkpoint.pt.tmp')."""
    import numpy as np

    from tests_support import make_store

    rng = np.random.default_rng(1)
    ids = [f"r{i}" for i in range(2000)]
    x = rng.normal(size=(2000, 24)).astype(np.float32)
    src = make_store(tmp_path / "src.h5", ids, x)
    tgt = make_store(tmp_path / "tgt.h5", ids, np.tanh(x[:, :12] * 2).astype(np.float32))
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=mlflow_uri)
    env.pop("PREFECT_API_URL", None)
    args = ("align", src, tgt, "--set", "train.epochs=8", "--out-dir", tmp_path / "align")
    first, second = _xmodal(*args, env=env), _xmodal(*args, env=env)
    outs = [p.communicate(timeout=900)[0] for p in (first, second)]
    for p, out in zip((first, second), outs):
        assert p.returncode == 0, out[-3000:]
        assert "No such file" not in out
    assert any("waiting for run folder" in out for out in outs), "the runs did not overlap: nothing was tested"
    (folder,) = [d for d in (tmp_path / "align").iterdir() if d.is_dir() and not d.name.endswith("-latest")]
    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("xmodal-align-synthetic").experiment_id],
                              filter_string=f"params.run_dir LIKE '%{tmp_path.name}%'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    # both report the one projector the folder holds: same test metrics to the last digit
    assert runs[0].data.metrics["test_p2t_r1"] == runs[1].data.metrics["test_p2t_r1"]
    assert (folder / "projector").is_dir()


@pytest.mark.slow  # 30-110 s: real CLI processes (make test-slow; CI runs it)
def test_kill_9_of_contrastive_then_rerun_marks_the_killed_run(mlflow_uri, tmp_path, sample_data):
    from tests_support import kill_9_after_first_checkpoint

    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=mlflow_uri)
    env.pop("PREFECT_API_URL", None)
    args = ("contrastive", sample_data["digits"], "--column-a", "image", "--column-b", "sketch",
            "--set", "config.epochs=6", "--set", "config.threads=1", "--out-dir", tmp_path / "towers")
    victim = _xmodal(*args, env=env)
    deadline = time.time() + 300
    while not list((tmp_path / "towers").glob("*/ckpt")):
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read() if victim.poll() else ""
        time.sleep(0.1)
    kill_9_after_first_checkpoint(victim, next((tmp_path / "towers").glob("*/ckpt")) / "checkpoint.pt", timeout=300)
    rerun = _xmodal(*args, env=env)
    out = rerun.communicate(timeout=900)[0]
    assert rerun.returncode == 0, out[-3000:]
    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("xmodal-contrastive-digits").experiment_id])
            if tmp_path.name in r.data.params.get("run_dir", "")]
    by_status = {r.info.status: r for r in runs}
    assert len(runs) == 2 and set(by_status) == {"KILLED", "FINISHED"}, [r.info.status for r in runs]
    assert by_status["FINISHED"].data.tags[RESUMED_FROM] == by_status["KILLED"].info.run_id
