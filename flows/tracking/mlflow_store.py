"""The local MLflow sqlite store, created once even when several processes start at the same moment.

MLflow builds a fresh sqlite store by running ~60 alembic migrations in whichever process touches
it first; two processes doing so at once both migrate. Measured here: two `xmodal` commands
started together in an empty folder failed 3 times in 3 (`duplicate column name: step`,
`Online migration expected to match one row`), and a failure can leave `_alembic_tmp_*` tables
behind after which every command in that folder fails. So the first touch happens under a file
lock beside the database (``mlflow.db.lock``; flock, so the kernel drops it if the holder dies),
and a store whose own creation failed part-way (leftover ``_alembic_tmp_*`` tables or a schema
short of head, and no runs in it) is moved aside and made again. A store that holds runs is never
touched: MLflow's own message (``mlflow db upgrade``) applies to it.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from filelock import FileLock, Timeout


log = logging.getLogger(__name__)
_READY: set[str] = set()  # stores this process has already made sure of (one lock per process, not per call)


class StoreCreationError(RuntimeError):
    """The local MLflow store could not be created or opened: the message names the file and what to do."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for servers, other databases, in-memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def ensure_store(uri: str, timeout: float = 300.0) -> None:
    """Create (or finish creating) the sqlite store behind ``uri`` exactly once, under a file lock."""
    path = sqlite_path(uri)
    if path is None or uri in _READY:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(f"{path}.lock", timeout=timeout):
            _set_aside_if_half_created(path)
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates and migrates if new
    except Timeout:
        raise StoreCreationError(f"MLflow store {path}: another process has held {path}.lock for {timeout:.0f} s; "
                                 "if none is running, delete the .lock file and rerun") from None
    _READY.add(uri)


def _set_aside_if_half_created(path: Path) -> None:
    """A store whose creation died mid-migration holds no runs: rename it and let MLflow start over."""
    if not path.exists() or path.stat().st_size == 0:
        return
    con = sqlite3.connect(path)
    try:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        leftovers = any(t.startswith("_alembic_tmp_") for t in tables)
        version = (con.execute("select version_num from alembic_version").fetchone() or [None])[0] \
            if "alembic_version" in tables else None
        runs = con.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0
    finally:
        con.close()
    from mlflow.store.db.utils import _get_latest_schema_revision

    half = leftovers or (version != _get_latest_schema_revision() and bool(tables))
    if not half or runs:
        return
    aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%dT%H%M%S')}")
    path.rename(aside)
    log.warning("MLflow store %s was left half-created by an interrupted first run (no runs in it); "
                "moved it to %s and creating it again", path, aside)
