"""StoreWriter: append batches to a store, resume after any crash, finish into a verified HDF5 file.

The writer never modifies an HDF5 file in place. While a store is built it lives in
``<store>.partial/`` (journal.py: raw append-only files + an atomically replaced commit record);
``finish`` assembles the final HDF5 in a child process, reads it all back, and renames it into
place (assemble.py). What that buys, by construction rather than by the timing of a kill:

* kill -9 at any instant loses at most the batch being committed; the next run resumes from the
  last commit on its first try (no retry needed to "heal" anything) and ends byte-identical;
* ``<store>.h5`` exists only complete and verified, so "the file is there" means "the store is
  done"; an unreadable final store is reported as damaged, never recreated;
* a reader never blocks or destroys a writer's work: resuming touches only the partial folder,
  an overwrite waits for readers of the old file (lock.py) and replaces it by rename;
* a full disk is a plain ENOSPC on a raw append: one ``StoreFull`` line, nothing committed lost.

Writers queue on ``<store>.lock`` (waiting ``wait`` seconds); after acquiring, the store is looked
at afresh, so a pipeline that waited for another one to build the same store finds it complete.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from encoders.store import assemble, disk, journal
from encoders.store.format import (REFRESH_HINT, StoreError, StoreFull, identity_mismatch, partial_dir, plain,
                                   tmp_path)
from encoders.store.lock import DEFAULT_WAIT_S, StoreLock, wait_for_readers
from encoders.store.reader import EmbeddingStore


def read_final_attrs(path: Path) -> dict[str, Any]:
    """A finished store's attributes; a one-line StoreError naming it if it cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            return {k: plain(v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as exc:
        raise StoreError(f"store {path} is damaged or not an xmodal store ({str(exc).splitlines()[0]}); "
                         f"{REFRESH_HINT}") from None


class StoreWriter:
    """Append-only writer with resume. Use as a context manager; call ``append`` per batch, ``finish`` once.

    ``wait``: seconds to wait for another writer of the same store (or, with ``overwrite``, for the
    readers of the store being replaced). ``on_commit``: called inside each batch's commit, after its
    bytes are written and before they are made durable (fault-injection tests time kill -9 with it).
    """

    def __init__(self, path: str | Path, *, dim: int, attrs: dict[str, Any], dtype: str = "float32",
                 chunk_rows: int = 256, overwrite: bool = False, wait: float = DEFAULT_WAIT_S,
                 on_commit: Callable[[], None] | None = None):
        self.path = Path(path)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float16):
            raise ValueError(f"store dtype must be float32 or float16, not {dtype}")
        self.chunk_rows = chunk_rows
        self.attrs = {**attrs, "dim": self.dim, "dtype": self.dtype.name}
        self.overwrite = overwrite
        self.wait = wait
        self.on_commit = on_commit
        self._lock = StoreLock(self.path)
        self.journal: journal.Journal | None = None
        self._final: dict[str, Any] | None = None  # the finished store's attrs, once there is one
        self.resumed_rows = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        self._lock.acquire(self.wait)
        try:
            self._open()
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def _close(self) -> None:
        try:
            if self.journal is not None:
                self.journal.close()
                self.journal = None
        finally:  # a close that fails must not keep the lock: the next run is ours too
            self._lock.release()

    def _open(self) -> None:
        final, part = self.path, partial_dir(self.path)
        # Leftovers of a killed run (we hold the lock, so nobody is writing them): an unfinished assembly.
        tmp_path(final).unlink(missing_ok=True)
        for leftover in (".new", ".del"):  # a partial store half created, or half deleted
            shutil.rmtree(part.with_name(part.name + leftover), ignore_errors=True)
        if final.exists() and not self.overwrite:
            have = read_final_attrs(final)
            mismatch = identity_mismatch(have, self.attrs)
            if mismatch:
                raise StoreError(f"store {final} already holds embeddings for other inputs (differs in "
                                 f"{', '.join(mismatch)}); use another output folder or overwrite=True (--refresh)")
            if not have.get("complete"):  # format 1 appended in place; such a file cannot be trusted
                raise StoreError(f"store {final} is an incomplete store written by an earlier xmodal; {REFRESH_HINT}")
            self._final = have
            if part.exists():  # killed after the rename, before the partial folder was removed
                self._drop_leftover_partial(part, have)
            return
        if final.exists():
            wait_for_readers(final, self.wait)  # replaced at the end by rename; no reader is pulled from under
        if part.exists() and not self.overwrite:
            rec = journal.read_record(part)
            mismatch = identity_mismatch(rec["attrs"], self.attrs)
            if mismatch:
                raise StoreError(f"partial store {part} holds {rec['n']} rows for other inputs (differs in "
                                 f"{', '.join(mismatch)}); use another output folder, or overwrite=True "
                                 "(--refresh) to discard them")
            self.journal = journal.Journal.resume(part)
        else:
            journal.remove(part)
            self.journal = journal.Journal.create(part, self.attrs, self.chunk_rows)
        self.resumed_rows = self.journal.rows_done

    def _drop_leftover_partial(self, part: Path, have: dict[str, Any]) -> None:
        try:
            rec = journal.read_record(part)
        except StoreError:
            return
        if not identity_mismatch(rec["attrs"], have):
            journal.remove(part)

    # -- state -------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return self._final is not None

    def _counter(self, key: str) -> int:
        return int(self._final[key]) if self._final is not None else int(self.journal.rec[key])

    @property
    def rows_done(self) -> int:
        return self._counter("rows_done")

    @property
    def n(self) -> int:
        return self._counter("n")

    @property
    def n_errors(self) -> int:
        return self._counter("n_errors")

    @property
    def store_attrs(self) -> dict[str, Any]:
        """The store's attributes as a reader sees them."""
        return dict(self._final) if self._final is not None else journal.store_attrs(self.journal.rec)

    def errors(self) -> list[tuple[str, str]]:
        if self._final is None:
            return journal.read_errors(self.journal.folder, self.journal.rec)
        return list(EmbeddingStore(self.path).errors().itertuples(index=False, name=None))

    # -- writing -----------------------------------------------------------------------------
    def append(self, ids: Sequence[str], embeddings: np.ndarray, *, rows_done: int,
               errors: Sequence[tuple[str, str]] = ()) -> None:
        """Write one batch and commit it (journal.py); StoreFull if the disk is full, nothing committed lost."""
        if self.journal is None:
            raise StoreError(f"store {self.path} is complete; nothing more can be appended")
        embeddings = np.asarray(embeddings)
        if embeddings.shape != (len(ids), self.dim):
            raise ValueError(f"batch of {len(ids)} ids has embeddings of shape {embeddings.shape}, "
                             f"store {self.path} expects (n, {self.dim})")
        rows = embeddings.astype(self.dtype)
        need = rows.nbytes + sum(len(str(i)) + 8 for i in ids) + sum(len(a) + len(b) + 12 for a, b in errors) \
            + disk.RESERVE_BYTES
        free = disk.free_bytes(self.path)
        if free < need:
            raise StoreFull(f"no space left on device for store {self.path}: {free / 2**20:.2f} MiB free, the next "
                            f"batch needs {need / 2**20:.2f} MiB; {self.n} rows are saved — free space and rerun "
                            "to resume there")
        try:
            self.journal.append(ids, rows, errors, rows_done, self.on_commit)
        except OSError as exc:
            if disk.is_out_of_space(exc):
                raise StoreFull(f"no space left on device writing store {self.path} (the batch needs about "
                                f"{need / 2**20:.2f} MiB): {self.n} rows are saved; free space and rerun to "
                                "resume there") from None
            raise

    def finish(self, **extra_attrs: Any) -> None:
        """Assemble, verify and publish the final store (assemble.py), then drop the partial folder."""
        if self.journal is None:
            return
        rec = self.journal.rec
        text = rec["files"][journal.IDS]["length"] + rec["files"][journal.ERRS]["length"]
        need = assemble.bytes_needed(self.n, self.dim, self.dtype.itemsize, text)
        extra = {k: plain(v) for k, v in extra_attrs.items()}
        assemble.run({"kind": "journal", "partial": str(self.journal.folder), "extra": extra}, self.path, need,
                     self._lock.fd)
        self.journal.close()
        journal.remove(self.journal.folder)
        self.journal = None
        self._final = read_final_attrs(self.path)
