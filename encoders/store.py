"""The HDF5 embedding store: one file per (dataset, modality, encoder).

Layout::

    /ids            (N,)   UTF-8 strings, chunked, resizable
    /embeddings     (N, D) float32 | float16, chunked (chunk_rows, D), resizable
    /errors/ids     (E,)   ids of manifest rows that produced no embedding
    /errors/reasons (E,)   why (missing file, corrupt image, empty text, duplicate id, ...)
    attrs: format_version, dataset, modality, encoder_spec, weights_digest, weights_origin, dim,
           dtype, compute_dtype, normalized, manifest_digest, library_versions (JSON), created, rows_done, n,
           complete

Why this shape: rows are appended one batch at a time and the file is flushed after each batch,
with ``n`` and ``rows_done`` written last, so a process killed at any moment leaves a file whose
attributes describe a consistent prefix. A rerun truncates whatever the dead process wrote past
``n`` and carries on from ``rows_done``. ``complete`` is set only after the last batch, and
readers refuse an incomplete store unless asked, so half a store is never mistaken for a whole
one. A sidecar ``.lock`` (flock, released by the kernel even on kill -9) stops two writers.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from encoders import disk

FORMAT_VERSION = 1
STR = h5py.string_dtype("utf-8")
# Attributes that must match for a partial store to be continued rather than rebuilt.
IDENTITY_ATTRS = ("encoder_spec", "weights_digest", "manifest_digest", "dtype", "dim", "normalized", "compute_dtype")
# What an identity attribute meant before it was recorded (stores written before compute_dtype existed ran fp32).
IDENTITY_DEFAULTS = {"compute_dtype": "fp32"}


class StoreError(RuntimeError):
    """A store that cannot be used as asked (incomplete, locked, inconsistent): the message names it."""


class StoreLocked(StoreError):
    pass


class StoreFull(StoreError):
    """No room for the next batch: the store keeps every committed batch and a rerun resumes (encoders/disk.py)."""


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "open_clip_torch", "transformers", "h5py", "numpy", "xmodal"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


# File descriptors a forked child (a DataLoader decode worker, encoders/loader.py) must not keep:
# the lock's and the HDF5 file's. Both are flock-ed, and a child holding a copy would keep the store
# locked after a kill -9 of the writer, so the rerun is refused ("locked", or HDF5's "unable to lock
# file") until the orphaned workers notice their parent is gone.
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


class _Lock:
    """An exclusive, non-blocking flock on ``<store>.lock``."""

    def __init__(self, path: Path):
        self.path = Path(str(path) + ".lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # out_dir is a file, read-only, not ours: retrying cannot help
            raise StoreError(f"cannot write store {self.path.with_suffix('')}: {exc.strerror} ({exc.filename}); "
                             "choose another output folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                holder = self.path.read_text().strip() or "another process"
                raise StoreLocked(f"store {self.path.with_suffix('')} is being written by {holder}; "
                                  "wait for it to finish (two writers would corrupt it)") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self.fd = fd
        _PRIVATE_FDS.add(fd)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            _PRIVATE_FDS.discard(self.fd)
            os.close(self.fd)
            self.fd = None


class StoreWriter:
    """Append-only writer with resume. Use as a context manager; call ``append`` per batch, ``finish`` once."""

    def __init__(self, path: str | Path, *, dim: int, attrs: dict[str, Any], dtype: str = "float32",
                 chunk_rows: int = 256, overwrite: bool = False):
        self.path = Path(path)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float16):
            raise ValueError(f"store dtype must be float32 or float16, not {dtype}")
        self.chunk_rows = chunk_rows
        self.attrs = {**attrs, "dim": self.dim, "dtype": self.dtype.name}
        self.overwrite = overwrite
        self._lock = _Lock(self.path)
        self.f: h5py.File | None = None
        self._fd: int | None = None
        self.resumed_rows = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        self._lock.acquire()
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.f is not None:
                _PRIVATE_FDS.discard(self._fd)
                self.f.close()
        finally:  # a close that fails (a full disk) must not keep the lock: the next run is ours too
            self.f = None
            self._lock.release()

    def _open(self) -> None:
        if self.path.exists() and not self.overwrite:
            try:
                f = h5py.File(self.path, "r+")
            except OSError:
                # A file killed before its first flush is unreadable; it holds nothing to keep.
                f = None
            if f is not None:
                mismatch = [k for k in IDENTITY_ATTRS if _plain(f.attrs.get(k, IDENTITY_DEFAULTS.get(k)))
                            != _plain(self.attrs.get(k, IDENTITY_DEFAULTS.get(k)))]
                if not mismatch:
                    self._adopt(f)
                    self._truncate_to_committed()
                    return
                done = bool(f.attrs.get("complete", False))
                f.close()
                if done:
                    raise StoreError(
                        f"store {self.path} already holds embeddings for other inputs "
                        f"(differs in {', '.join(mismatch)}); use another output folder or overwrite=True"
                    )
        self._create()

    def _create(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Default libver on purpose: "latest" marks the file open-for-write in its superblock, and a
        # writer killed with -9 would leave a file HDF5 refuses to reopen without h5clear.
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=STR, chunks=(max(self.chunk_rows, 1024),))
            f.create_dataset("embeddings", shape=(0, self.dim), maxshape=(None, self.dim), dtype=self.dtype,
                             chunks=(self.chunk_rows, self.dim))
            g = f.create_group("errors")
            for name in ("ids", "reasons"):
                g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=STR, chunks=(256,))
            for k, v in self.attrs.items():
                f.attrs[k] = _attr(v)
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["library_versions"] = json.dumps(library_versions())
            f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            f.attrs["rows_done"] = 0
            f.attrs["n"] = 0
            f.attrs["n_errors"] = 0
            f.attrs["complete"] = False
        os.replace(tmp, self.path)  # a store either exists with its layout or not at all
        self._adopt(h5py.File(self.path, "r+"))

    def _adopt(self, f: h5py.File) -> None:
        self.f = f
        self._fd = int(f.id.get_vfd_handle())  # the sec2 driver's file descriptor
        _PRIVATE_FDS.add(self._fd)

    def _truncate_to_committed(self) -> None:
        """Drop rows a killed writer wrote after its last committed batch."""
        f = self.f
        n, e = int(f.attrs["n"]), int(f.attrs["n_errors"])
        for ds, size in ((f["ids"], n), (f["embeddings"], n), (f["errors/ids"], e), (f["errors/reasons"], e)):
            if ds.shape[0] != size:
                ds.resize(size, axis=0)
        self.resumed_rows = int(f.attrs["rows_done"])

    # -- state -------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.f.attrs["complete"])

    @property
    def rows_done(self) -> int:
        return int(self.f.attrs["rows_done"])

    @property
    def n(self) -> int:
        return int(self.f.attrs["n"])

    def stored_ids(self) -> np.ndarray:
        return self.f["ids"].asstr()[()]

    # -- writing -----------------------------------------------------------------------------
    def append(self, ids: Sequence[str], embeddings: np.ndarray, *, rows_done: int,
               errors: Sequence[tuple[str, str]] = ()) -> None:
        """Write one batch, then commit it by bumping the counters and flushing."""
        f = self.f
        embeddings = np.asarray(embeddings)
        if embeddings.shape != (len(ids), self.dim):
            raise ValueError(f"batch of {len(ids)} ids has embeddings of shape {embeddings.shape}, "
                             f"store {self.path} expects (n, {self.dim})")
        n, e = self.n, int(f.attrs["n_errors"])
        self._check_room(ids, errors)
        try:
            self._write(ids, embeddings, errors, n, e, rows_done)
        except Exception as exc:
            if disk.is_out_of_space(exc):
                raise StoreFull(f"no space left on device writing store {self.path}: {n} rows are saved; free "
                                "space and rerun to resume there") from None
            raise

    def _check_room(self, ids: Sequence[str], errors: Sequence[tuple[str, str]]) -> None:
        chunk = self.chunk_rows * self.dim * self.dtype.itemsize
        strings = sum(len(str(i)) + 16 for i in ids) + sum(len(a) + len(b) + 32 for a, b in errors)
        need = disk.bytes_needed(len(ids) // self.chunk_rows + 2, chunk, strings)
        free = disk.free_bytes(self.path)
        if free < need:
            raise StoreFull(f"no space left on device for store {self.path}: {free / 2**20:.2f} MiB free, the next "
                            f"batch needs {need / 2**20:.2f} MiB; {self.n} rows are saved — free space and rerun "
                            "to resume there")

    def _write(self, ids, embeddings, errors, n: int, e: int, rows_done: int) -> None:
        f = self.f
        if len(ids):
            for ds, rows in ((f["ids"], np.asarray(ids, dtype=object)), (f["embeddings"], embeddings.astype(self.dtype))):
                ds.resize(n + len(ids), axis=0)
                ds[n:] = rows
        if errors:
            for ds, col in ((f["errors/ids"], 0), (f["errors/reasons"], 1)):
                ds.resize(e + len(errors), axis=0)
                ds[e:] = np.asarray([err[col] for err in errors], dtype=object)
        f.flush()  # data first ...
        f.attrs["n"] = n + len(ids)
        f.attrs["n_errors"] = e + len(errors)
        f.attrs["rows_done"] = int(rows_done)
        f.flush()  # ... then the counters that make it count

    def finish(self, **extra_attrs: Any) -> None:
        for k, v in extra_attrs.items():
            self.f.attrs[k] = _attr(v)
        self.f.attrs["complete"] = True
        self.f.flush()


def _attr(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return v


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return "" if v is None else v


# Reading lives in encoders/store_reader.py (one concept per file); its names stay importable from
# here, where every caller has always found them. Resolved on first use (PEP 562): store_reader
# itself imports StoreError from this module, so an eager import here would be circular.
_READER_NAMES = ("EmbeddingStore", "PairedStores", "join_stores")


def __getattr__(name: str):
    if name in _READER_NAMES:
        from encoders import store_reader

        return getattr(store_reader, name)
    raise AttributeError(f"module 'encoders.store' has no attribute {name!r}")
