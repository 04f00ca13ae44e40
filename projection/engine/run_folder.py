"""One run per run folder at a time: a second identical run waits for the first, then resumes or reuses it.

A run folder (``runs/align/<name>-<key>/``) is named by the run's inputs and settings, so two
identical runs started together share it, and with it the checkpoint: before this lock, both
trained into ``checkpoint.pt`` and one died minutes later on the other's renamed
``checkpoint.pt.tmp`` ("No such file"). Now the second waits on an exclusive ``flock`` of
``<folder>.lock`` (beside the folder, so deleting a failed run's folder cannot pull the lock from
under a waiter; the kernel drops it when its holder dies, kill -9 included), then runs as a rerun
does: it resumes the checkpoint it finds, which after a finished run means the same final weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger("projection.engine")
DEFAULT_WAIT_S = 3600.0  # an identical run finishing first is worth waiting for; a hung one is not


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder and did not let go within the wait: the message says which."""


@contextmanager
def hold_run_folder(folder: str | Path, wait_s: float = DEFAULT_WAIT_S) -> Iterator[Path]:
    """Hold ``folder`` exclusively for the body; wait up to ``wait_s`` seconds for another holder, saying so once."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_file = folder.with_name(folder.name + ".lock")
    lock = FileLock(lock_file)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for run folder %s: an identical run (%s) is using it", folder, _holder(lock_file))
        try:
            lock.acquire(timeout=wait_s)
        except Timeout:
            raise RunFolderBusy(f"run folder {folder} is in use by an identical run ({_holder(lock_file)}) that did not "
                                f"finish within {wait_s:g} s; wait for it, or change a setting or out_dir") from None
    try:
        lock_file.write_text(f"pid {os.getpid()}")
        yield folder
    finally:
        lock.release()


def _holder(lock_file: Path) -> str:
    try:
        return lock_file.read_text().strip() or "another process"
    except OSError:
        return "another process"
