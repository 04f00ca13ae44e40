"""MLflow runs killed with their process: marked KILLED when their work is resumed, and linked.

A run records which piece of work it does (``xmodal.work``: a hash of the store path or the align
run folder) and which process does it (``xmodal.process``: host, pid and the pid's start time, so
a recycled pid is not mistaken for the dead one). kill -9 leaves its run RUNNING; the next run of
the same work finds it, sees that process gone, marks it ``KILLED`` and tags itself
``xmodal.resumed_from=<killed run id>``. Stage 1 also copies the killed run's per-epoch points the
resumed run did not log itself (``fill_history``), so the resumed run holds the whole curve.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path


from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

WORK, PROCESS, RESUMED_FROM = "xmodal.work", "xmodal.process", "xmodal.resumed_from"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _is_dead(process: str) -> bool:
    """Only a process on this host can be judged; one elsewhere is assumed alive (its run is left alone)."""
    host, pid, started = (process.split(":") + ["", "", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return _start_time(int(pid)) != started


def claim(experiment_id: str, work: str | Path) -> dict[str, str]:
    """Tags for a new run of ``work``; marks runs of the same work left RUNNING by a dead process KILLED."""
    name = str(work.resolve()) if isinstance(work, Path) else work  # a path, or any string naming the work
    key = hashlib.sha256(name.encode()).hexdigest()[:16]
    client = MlflowClient()
    stale = client.search_runs([experiment_id], filter_string=f"tags.`{WORK}` = '{key}' and attributes.status = 'RUNNING'")
    killed = [r.info.run_id for r in stale if _is_dead(r.data.tags.get(PROCESS, ""))]
    for run_id in killed:
        client.set_terminated(run_id, "KILLED")
    tags = {WORK: key, PROCESS: this_process()}
    if killed:
        tags[RESUMED_FROM] = ",".join(killed)
    return tags


def fill_history(run_id: str, history: list[dict] | None = None, steps: int = 0) -> int:
    """Copy into ``run_id`` the metric points of the runs it resumed that it did not log itself; returns how many.

    ``history`` (the training result's per-epoch records, restored from the checkpoint on resume) and
    ``steps`` (its total optimizer steps) fill what no run logged: a kill between an epoch's checkpoint
    and its report (projection/engine/checkpoint.py reports last) leaves that epoch only in the checkpoint.
    Every epoch has the same number of steps, so epoch i was reported at step (i + 1) * steps / epochs.
    """
    client = MlflowClient()
    run = client.get_run(run_id)
    copied = 0
    if history:
        keys = {k for h in history for k in h if k != "epoch"}
        have = {k: {m.step for m in client.get_metric_history(run_id, k)} for k in keys}
        points = [Metric(k, float(v), 0, (i + 1) * steps // len(history)) for i, h in enumerate(history)
                  for k, v in h.items() if k in keys and v is not None and (i + 1) * steps // len(history) not in have[k]]
        for i in range(0, len(points), 1000):
            client.log_batch(run_id, metrics=points[i:i + 1000])
        copied += len(points)
    for old in filter(None, run.data.tags.get(RESUMED_FROM, "").split(",")):
        for key in client.get_run(old).data.metrics:
            have = {m.step for m in client.get_metric_history(run_id, key)}
            points = [Metric(key, m.value, m.timestamp, m.step) for m in client.get_metric_history(old, key)
                      if m.step not in have]
            for i in range(0, len(points), 1000):  # log_batch's limit
                client.log_batch(run_id, metrics=points[i:i + 1000])
            copied += len(points)
    return copied
