"""The store under construction: ``<store>.partial/``, append-only raw files and one commit record.

Why not append into the HDF5 file, as format 1's writer did: HDF5 is not journaled. A kill -9
inside a flush tears its metadata (B-trees, the global heap holding variable-length ids) and no
later open can tell a torn write from a good one; measured (issue 19), 28 % of kills aimed inside
a flush made the next append fail ("bad heap index"), and a retry that "worked" could leave a row
unreadable in a store then marked complete (1 run in 55 at batch 64). Raw files and a record that
is replaced atomically have no such state: the only question after a crash is "how many bytes
count", and the record answers it.

Files::

    embeddings.bin  rows in the store dtype, C order, appended
    ids.jsonl       one JSON string per line (format.id_lines)
    errors.jsonl    one JSON [id, reason] per line (format.error_lines)
    commit.json     identity + all store attrs, n, n_errors, rows_done, each file's committed byte
                    length and running crc32, and the last batch's (offset, length, crc) per file

Commit protocol for one batch: append to the three files, fsync them, write ``commit.json.tmp``,
fsync it, ``os.replace`` it onto ``commit.json``, fsync the folder. The rename is atomic, so a
kill at any instant leaves the old record or the new one, and either only counts fsynced bytes.
Bytes past a record's lengths are a batch that never committed: resume truncates them, checks the
last committed batch against its crc (so a record never vouches for bytes that are not there), and
appends after it. A record that does not check out is a StoreError telling the user to refresh:
nothing is ever silently restarted. Cost: up to five fsyncs a batch, measured 25-30 ms a commit
on this (shared, virtual) disk at batch 8 or 256 x 512-d, against ~2 s to encode a ViT-B-32 batch
of 32 on its CPU: about 1.5 %. The running crc is an int, so it continues across resumes and
the assembler (assemble.py) can check every byte of the files, and of the HDF5 it builds, at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from encoders.store.format import (FORMAT_VERSION, REFRESH_HINT, Crc, StoreError, error_lines, id_lines,
                                   library_versions, parse_lines, plain)
from encoders.store.lock import close_private, keep_private

EMB, IDS, ERRS = "embeddings.bin", "ids.jsonl", "errors.jsonl"
FILES = (EMB, IDS, ERRS)
RECORD = "commit.json"
KIND = "xmodal-store-journal-1"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _jsonable(v: Any) -> Any:
    v = plain(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def read_record(folder: Path) -> dict[str, Any]:
    """The commit record of a partial store; a StoreError naming it if it cannot be read."""
    try:
        rec = json.loads((folder / RECORD).read_text())
        if rec.get("kind") != KIND:
            raise ValueError(f"not a journal record ({rec.get('kind')!r})")
        return rec
    except (OSError, ValueError) as exc:
        raise StoreError(f"partial store {folder} is damaged ({exc}); {REFRESH_HINT}") from None


def store_attrs(rec: dict[str, Any]) -> dict[str, Any]:
    """The attributes a reader sees for a partial store (those the final one will have, complete=False)."""
    return {**rec["attrs"], "n": rec["n"], "n_errors": rec["n_errors"], "rows_done": rec["rows_done"],
            "complete": False}


def _read(folder: Path, name: str, start: int, stop: int) -> bytes:
    with open(folder / name, "rb") as f:
        f.seek(start)
        data = f.read(stop - start)
    if len(data) != stop - start:
        raise StoreError(f"partial store {folder}: {name} is shorter than its commit record says; {REFRESH_HINT}")
    return data


def read_ids(folder: Path, rec: dict[str, Any]) -> list[str]:
    return parse_lines(_read(folder, IDS, 0, rec["files"][IDS]["length"]))


def read_errors(folder: Path, rec: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(e) for e in parse_lines(_read(folder, ERRS, 0, rec["files"][ERRS]["length"]))]


def read_rows(folder: Path, rec: dict[str, Any], start: int, stop: int) -> np.ndarray:
    """Committed embedding rows ``[start, stop)`` in the store dtype.   # (stop - start, D)"""
    dtype, dim = np.dtype(rec["attrs"]["dtype"]), int(rec["attrs"]["dim"])
    stop = min(stop, rec["n"])
    if stop <= start:
        return np.zeros((0, dim), dtype)
    row = dim * dtype.itemsize
    return np.frombuffer(_read(folder, EMB, start * row, stop * row), dtype).reshape(-1, dim)


def iter_lines(folder: Path, name: str, length: int, block_bytes: int = 8 << 20) -> Iterator[bytes]:
    """The committed bytes of a line file in blocks that end on a line break (memory: one block)."""
    with open(folder / name, "rb") as f:
        left, carry = length, b""
        while left > 0:
            data = f.read(min(block_bytes, left))
            if not data:
                raise StoreError(f"partial store {folder}: {name} is shorter than its commit record says; "
                                 f"{REFRESH_HINT}")
            left -= len(data)
            data = carry + data
            cut = data.rfind(b"\n") + 1 if left > 0 else len(data)
            carry = data[cut:]
            if cut:
                yield data[:cut]


class Journal:
    """An open partial store that appends committed batches; ``create`` or ``resume`` it under the writer lock."""

    def __init__(self, folder: Path, rec: dict[str, Any]):
        self.folder = folder
        self.rec = rec
        self._crc = {name: Crc(rec["files"][name]["crc"], rec["files"][name]["length"]) for name in FILES}
        self._fds: dict[str, int] = {}
        self.broken = False  # an append failed half way: its bytes are past the record; nothing more here
        for name in FILES:
            self._fds[name] = keep_private(os.open(folder / name, os.O_WRONLY | os.O_APPEND))

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, attrs: dict[str, Any], chunk_rows: int) -> Journal:
        """A new, empty partial store; it appears whole (renamed into place) or not at all."""
        new = folder.with_name(folder.name + ".new")
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(parents=True)
        attrs = {k: _jsonable(v) for k, v in attrs.items()}
        attrs |= {"format_version": FORMAT_VERSION, "library_versions": json.dumps(library_versions()),
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        rec = {"kind": KIND, "attrs": attrs, "chunk_rows": int(chunk_rows), "n": 0, "n_errors": 0, "rows_done": 0,
               "files": {name: {"length": 0, "crc": 0} for name in FILES},
               "last": {name: [0, 0, 0] for name in FILES}}
        for name in FILES:
            fd = os.open(new / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.fsync(fd)
            os.close(fd)
        _write_record(new, rec)
        fsync_dir(new)
        os.replace(new, folder)
        fsync_dir(folder.parent)
        return cls(folder, rec)

    @classmethod
    def resume(cls, folder: Path) -> Journal:
        """Reopen a partial store at its last commit: drop uncommitted bytes, check the last batch."""
        rec = read_record(folder)
        (folder / (RECORD + ".tmp")).unlink(missing_ok=True)
        for name in FILES:
            length = rec["files"][name]["length"]
            off, size, crc = rec["last"][name]
            try:
                have = (folder / name).stat().st_size
            except OSError as exc:
                raise StoreError(f"partial store {folder} is damaged ({name}: {exc.strerror}); "
                                 f"{REFRESH_HINT}") from None
            if have < length:
                raise StoreError(f"partial store {folder} is damaged: {name} holds {have} bytes, its commit record "
                                 f"{length}; {REFRESH_HINT}")
            if have > length:
                os.truncate(folder / name, length)  # a batch that never committed
            if off + size != length or zlib.crc32(_read(folder, name, off, off + size)) != crc:
                raise StoreError(f"partial store {folder} is damaged: the last committed batch of {name} does not "
                                 f"match its checksum; {REFRESH_HINT}")
        return cls(folder, rec)

    def close(self) -> None:
        for fd in self._fds.values():
            close_private(fd)
        self._fds = {}

    # -- state -----------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.rec["n"])

    @property
    def n_errors(self) -> int:
        return int(self.rec["n_errors"])

    @property
    def rows_done(self) -> int:
        return int(self.rec["rows_done"])

    # -- appending -------------------------------------------------------------------------------
    def append(self, ids, embeddings: np.ndarray, errors, rows_done: int,
               on_commit: Callable[[], None] | None = None) -> None:
        """Append one batch and commit it. OSError (ENOSPC included) leaves the last commit in force."""
        if self.broken:
            raise StoreError(f"partial store {self.folder}: an earlier append failed; rerun to resume")
        data = {EMB: np.ascontiguousarray(embeddings).tobytes(), IDS: id_lines(ids), ERRS: error_lines(errors)}
        self.broken = True
        for name in FILES:
            if data[name]:
                _write_all(self._fds[name], data[name])
        if on_commit is not None:
            on_commit()  # fault injection: the torture benchmark kills here, inside the commit
        for name in FILES:
            if data[name]:
                os.fsync(self._fds[name])
        rec = json.loads(json.dumps(self.rec))
        for name in FILES:
            crc = self._crc[name]
            off = crc.length
            crc.update(data[name])
            rec["files"][name] = {"length": crc.length, "crc": crc.crc}
            if data[name]:
                rec["last"][name] = [off, len(data[name]), zlib.crc32(data[name])]
        rec["n"] += len(ids)
        rec["n_errors"] += len(errors)
        rec["rows_done"] = int(rows_done)
        _write_record(self.folder, rec)  # on failure the in-memory CRCs ran ahead: this object stays broken
        self.rec = rec
        self.broken = False


def _write_record(folder: Path, rec: dict[str, Any]) -> None:
    tmp = folder / (RECORD + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, json.dumps(rec, sort_keys=True).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, folder / RECORD)
    fsync_dir(folder)


def remove(folder: Path) -> None:
    """Drop a partial store (after its final store is in place, or on refresh).

    Renamed aside first, in one step, then deleted: a kill during the deletion leaves a
    ``.partial.del`` folder (removed by the next writer), never a partial store missing its record.
    """
    trash = folder.with_name(folder.name + ".del")
    shutil.rmtree(trash, ignore_errors=True)
    if folder.exists():
        os.replace(folder, trash)
        fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)
