"""Who may touch a store: one writer at a time (``<store>.lock``), and no replacing a file a reader holds.

The writer lock is an exclusive ``flock`` on a sidecar file: the kernel releases it when its
holder dies, kill -9 included, so a rerun never finds a stale lock. A second writer WAITS for it
(polling, with a timeout) instead of failing: pipelines that need the same store queue behind the
one building it, then find it complete and use it (writer.py re-checks after acquiring).

Readers are told apart from damage by asking the kernel, not by an HDF5 open failing: HDF5
holds a shared ``flock`` on a file for as long as it has it open (read-only included), so an
exclusive non-blocking ``flock`` on the final ``.h5`` fails exactly while some reader has it open.
That is what an overwrite waits on before it builds the replacement (tests/encoders/store/
test_readers.py checks HDF5 really holds that lock).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from encoders.store.format import StoreError, StoreLocked, lock_path

log = logging.getLogger("encoders.store")
POLL_S = 0.2
DEFAULT_WAIT_S = 600.0  # a store's batch is seconds; ten minutes covers a finishing writer, not a hung one

# File descriptors a forked child (a DataLoader decode worker, encoders/loader.py) must not keep.
# The lock's above all: a child holding a copy would keep the store locked after a kill -9 of the
# writer, so the rerun would wait until the orphaned workers notice their parent is gone.
_PRIVATE_FDS: set[int] = set()


def _drop_private_fds_in_child() -> None:
    """Point the child's copies at /dev/null: its reference to the locked file is gone (flock holds
    until the last one closes), and the numbers stay taken, so nothing else can be opened on them."""
    if not _PRIVATE_FDS:
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in _PRIVATE_FDS:
        os.dup2(null, fd)
    os.close(null)


os.register_at_fork(after_in_child=_drop_private_fds_in_child)


def keep_private(fd: int) -> int:
    _PRIVATE_FDS.add(fd)
    return fd


def close_private(fd: int | None) -> None:
    if fd is not None:
        _PRIVATE_FDS.discard(fd)
        os.close(fd)


def _wait(try_once: Callable[[], bool], timeout: float, announce: Callable[[], str]) -> bool:
    """Call ``try_once`` until it succeeds or ``timeout`` seconds pass; say once why we wait."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        if try_once():
            return True
        if time.monotonic() >= deadline:
            return False
        if not said:
            log.warning(announce())
            said = True
        time.sleep(min(POLL_S, max(deadline - time.monotonic(), 0.0)))


class StoreLock:
    """The exclusive writer lock of one store, acquired waiting (``wait`` seconds at most)."""

    def __init__(self, store: Path):
        self.store = Path(store)
        self.path = lock_path(self.store)
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def acquire(self, wait: float = DEFAULT_WAIT_S) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # out_dir is a file, read-only, not ours: waiting cannot help
            raise StoreError(f"cannot write store {self.store}: {exc.strerror} ({exc.filename}); "
                             "choose another output folder") from None

        def try_once() -> bool:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    return False
                raise

        try:
            got = _wait(try_once, wait, lambda: f"waiting for store {self.store}, being written by {self.holder()}")
        except BaseException:
            os.close(fd)
            raise
        if not got:
            os.close(fd)
            raise StoreLocked(f"store {self.store} is being written by {self.holder()}; gave up after waiting "
                              f"{wait:g} s (two writers would corrupt it): rerun when it has finished")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self.fd = keep_private(fd)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            close_private(self.fd)
            self.fd = None


def open_elsewhere(path: Path) -> bool:
    """Whether some process (this one included, through another handle) has ``path`` open via HDF5."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # closing drops our probe lock at once
    return False


def wait_for_readers(path: Path, wait: float = DEFAULT_WAIT_S) -> None:
    """Before replacing the finished store ``path``: wait until no process has it open."""
    if not _wait(lambda: not open_elsewhere(path), wait,
                 lambda: f"waiting for store {path} to be closed by the process reading it before replacing it"):
        raise StoreLocked(f"store {path} is open in another process (a reader); gave up after waiting {wait:g} s "
                          "to replace it: close it (a notebook, h5dump, a running align) and rerun")
