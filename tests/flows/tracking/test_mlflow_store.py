"""The local MLflow store under concurrent first use: two processes at once, in an empty folder, both finish."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
from mlflow.store.db.utils import _get_latest_schema_revision

from flows.tracking import mlflow_store
from tests_support import ROOT

TRIES = 10


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the folder's own ./mlflow.db
    return env | {"PYTHONPATH": str(ROOT)}


def test_two_processes_starting_together_in_an_empty_folder_both_finish_ten_times(tmp_path):
    worker = Path(__file__).parents[1] / "first_use_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path), me, other, str(TRIES)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for me, other in (("a", "b"), ("b", "a"))]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for out in outs:
        lines = [ln for ln in out.splitlines() if ln.startswith("try ")]
        assert lines == [f"try {i}: ok" for i in range(TRIES)], out[-3000:]
    for i in range(TRIES):  # each folder's store holds both runs, finished, at the current schema
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / f'try-{i}' / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("first-use").experiment_id])
        assert sorted(r.info.run_name for r in runs) == ["a", "b"]
        assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_store_left_half_created_is_made_again_and_one_with_runs_is_left_alone(tmp_path):
    """The state a failed concurrent first run left behind: initial tables, an `_alembic_tmp_*` table,
    a schema short of head. Before this module, every later command in that folder failed."""
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase
    from sqlalchemy import create_engine

    db = tmp_path / "mlflow.db"
    InitialBase.metadata.create_all(create_engine(f"sqlite:///{db}"))
    con = sqlite3.connect(db)
    con.execute("create table _alembic_tmp_latest_metrics (key varchar(250))")
    con.commit()
    con.close()

    mlflow_store.ensure_store(f"sqlite:///{db}")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.create_run(client.create_experiment("after-repair"))
    client.set_terminated(run.info.run_id, "FINISHED")
    tables = {r[0] for r in sqlite3.connect(db).execute("select name from sqlite_master where type='table'")}
    assert not any(t.startswith("_alembic_tmp_") for t in tables)
    assert len(list(tmp_path.glob("mlflow.db.broken-*"))) == 1  # set aside, not deleted

    con = sqlite3.connect(db)  # a store with runs in it is the user's data: never moved
    con.execute("create table _alembic_tmp_runs (x int)")
    con.commit()
    con.close()
    mlflow_store._READY.clear()
    mlflow_store.ensure_store(f"sqlite:///{db}")
    assert db.exists() and len(list(tmp_path.glob("mlflow.db.broken-*"))) == 1
    assert sqlite3.connect(db).execute("select version_num from alembic_version").fetchone()[0] == \
        _get_latest_schema_revision()
