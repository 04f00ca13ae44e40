"""The final HDF5 store: built once, from committed data, verified by reading it back, then renamed in.

Users read HDF5, and HDF5 is only ever written here, into ``<store>.tmp``, never into a store in
use. Steps (``build``): stream the source (a partial store's raw files, or the finished shard
stores of a sharded run) into ``<store>.tmp`` in blocks of about 32 MiB (memory does not grow
with N), checking the source's crc32s against its commit record on the way; close; reopen
read-only and recompute the crc32s of ids, embeddings and errors from the HDF5 content (the FULL
read-back: every byte users will read is compared); only then set ``complete=True``, flush,
close, fsync, ``os.replace`` onto the final path and fsync the folder. So a final store exists
only complete and verified, and a kill anywhere leaves the old state plus a ``.tmp`` that the
next run discards.

Why in a child process (``python -m encoders.store.assemble``): HDF5 meeting ENOSPC leaves its
library state broken and segfaults on cleanup (disk.py). The child turns every outcome into a
last stdout line of JSON and an exit code; the parent (``run``) turns those into one-line
``StoreFull`` / ``StoreError``. The child inherits the writer lock's fd, so if the parent is
killed mid-assembly the lock stays held until the child is done too: no rerun races it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from encoders.store import disk, journal
from encoders.store.format import (REFRESH_HINT, STR, Crc, StoreError, StoreFull, error_lines, id_lines,
                                   parse_lines, plain, tmp_path, to_attr)

BLOCK_BYTES = 32 << 20
ENTRY = "encoders.store.assemble"
EXIT_FULL, EXIT_BAD = 3, 4


@dataclass
class Source:
    """What to assemble: counts, attrs, and readers of ids, rows and errors in store order."""

    attrs: dict[str, Any]  # every attribute of the final store but ``complete``
    dim: int
    dtype: np.dtype
    chunk_rows: int
    n: int
    n_errors: int
    expected: dict[str, tuple[int, int]] = field(default_factory=dict)  # stream -> (crc, length) it must have

    def id_blocks(self, rows: int) -> Iterator[list[str]]:
        raise NotImplementedError

    def row_blocks(self, rows: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def error_blocks(self, rows: int) -> Iterator[list[tuple[str, str]]]:
        raise NotImplementedError


class JournalSource(Source):
    """A partial store (journal.py) whose commit record vouches for every byte."""

    def __init__(self, folder: Path, extra: dict[str, Any]):
        self.folder = folder
        self.rec = rec = journal.read_record(folder)
        a = rec["attrs"]
        counts = {"n": rec["n"], "n_errors": rec["n_errors"], "rows_done": rec["rows_done"]}
        super().__init__(attrs={**a, **extra, **counts},
                         dim=int(a["dim"]), dtype=np.dtype(a["dtype"]), chunk_rows=int(rec["chunk_rows"]),
                         n=int(rec["n"]), n_errors=int(rec["n_errors"]),
                         expected={k: (v["crc"], v["length"]) for k, v in rec["files"].items()})

    def _lines(self, name: str, rows: int) -> Iterator[list]:
        length = self.rec["files"][name]["length"]
        block = max(rows * 64, 1 << 20)
        buf: list = []
        for data in journal.iter_lines(self.folder, name, length, block):
            buf.extend(parse_lines(data))
            while len(buf) >= rows:
                yield buf[:rows]
                buf = buf[rows:]
        if buf:
            yield buf

    def id_blocks(self, rows):
        return self._lines(journal.IDS, rows)

    def error_blocks(self, rows):
        return ([tuple(e) for e in b] for b in self._lines(journal.ERRS, rows))

    def row_blocks(self, rows):
        for lo in range(0, self.n, rows):
            yield journal.read_rows(self.folder, self.rec, lo, lo + rows)


class ShardsSource(Source):
    """Finished shard stores (shards.py), concatenated in order; their own HDF5 is the truth."""

    def __init__(self, shards: list[Path], attrs: dict[str, Any], chunk_rows: int):
        self.shards = shards
        self.counts = []
        for p in shards:
            with h5py.File(p, "r") as f:
                self.counts.append((int(f.attrs["n"]), int(f.attrs["n_errors"])))
                dim, dtype = int(f.attrs["dim"]), np.dtype(plain(f.attrs["dtype"]))
        super().__init__(attrs=attrs, dim=dim, dtype=dtype, chunk_rows=chunk_rows,
                         n=sum(c[0] for c in self.counts), n_errors=sum(c[1] for c in self.counts))

    def _blocks(self, names: tuple[str, ...], which: int, rows: int) -> Iterator:
        for p, counts in zip(self.shards, self.counts):
            with h5py.File(p, "r") as f:
                for lo in range(0, counts[which], rows):
                    hi = min(lo + rows, counts[which])
                    cols = [f[k].asstr()[lo:hi] if f[k].dtype.kind == "O" else f[k][lo:hi] for k in names]
                    yield cols

    def id_blocks(self, rows):
        return (list(c[0]) for c in self._blocks(("ids",), 0, rows))

    def row_blocks(self, rows):
        return (c[0] for c in self._blocks(("embeddings",), 0, rows))

    def error_blocks(self, rows):
        return (list(zip(c[0], c[1])) for c in self._blocks(("errors/ids", "errors/reasons"), 1, rows))


def _block_rows(src: Source) -> int:
    per = max(src.dim * src.dtype.itemsize, 1)
    return max(src.chunk_rows, BLOCK_BYTES // per // src.chunk_rows * src.chunk_rows)


def _fill(f: h5py.File, src: Source) -> dict[str, Crc]:
    """Create the layout and stream the source in; returns the crc32 of what was read."""
    rows = _block_rows(src)
    ids = f.create_dataset("ids", shape=(src.n,), maxshape=(None,), dtype=STR, chunks=(max(src.chunk_rows, 1024),))
    emb = f.create_dataset("embeddings", shape=(src.n, src.dim), maxshape=(None, src.dim), dtype=src.dtype,
                           chunks=(src.chunk_rows, src.dim))  # (N, D)
    g = f.create_group("errors")
    err_ids = g.create_dataset("ids", shape=(src.n_errors,), maxshape=(None,), dtype=STR, chunks=(256,))
    err_why = g.create_dataset("reasons", shape=(src.n_errors,), maxshape=(None,), dtype=STR, chunks=(256,))
    crc = {journal.IDS: Crc(), journal.EMB: Crc(), journal.ERRS: Crc()}
    at = 0
    for block in src.id_blocks(rows):
        crc[journal.IDS].update(id_lines(block))
        ids[at:at + len(block)] = np.asarray(block, dtype=object)
        at += len(block)
    at = 0
    for block in src.row_blocks(rows):
        block = np.ascontiguousarray(block, dtype=src.dtype)
        crc[journal.EMB].update(block.tobytes())
        emb[at:at + len(block)] = block
        at += len(block)
    at = 0
    for block in src.error_blocks(rows):
        crc[journal.ERRS].update(error_lines(block))
        err_ids[at:at + len(block)] = np.asarray([a for a, _ in block], dtype=object)
        err_why[at:at + len(block)] = np.asarray([b for _, b in block], dtype=object)
        at += len(block)
    for k, v in src.attrs.items():
        if k != "complete":
            f.attrs[k] = to_attr(v)
    f.attrs["complete"] = False
    return crc


def _read_back(path: Path, src: Source) -> dict[str, Crc]:
    """The crc32 of every id, row and error the HDF5 file at ``path`` holds, read as a user would."""
    rows = _block_rows(src)
    crc = {journal.IDS: Crc(), journal.EMB: Crc(), journal.ERRS: Crc()}
    with h5py.File(path, "r") as f:
        n, e = int(f.attrs["n"]), int(f.attrs["n_errors"])
        if (n, e) != (src.n, src.n_errors) or f["ids"].shape[0] != n or f["embeddings"].shape != (n, src.dim):
            raise ValueError(f"counts differ: n={n}, n_errors={e}, ids {f['ids'].shape}, "
                             f"embeddings {f['embeddings'].shape}")
        for lo in range(0, n, rows):
            crc[journal.IDS].update(id_lines(f["ids"].asstr()[lo:lo + rows]))
            crc[journal.EMB].update(np.ascontiguousarray(f["embeddings"][lo:lo + rows]).tobytes())
        for lo in range(0, e, rows):
            crc[journal.ERRS].update(error_lines(zip(f["errors/ids"].asstr()[lo:lo + rows],
                                                     f["errors/reasons"].asstr()[lo:lo + rows])))
    return crc


def build(src: Source, final: Path) -> None:
    """Assemble, verify, mark complete, rename into place (runs in the child process)."""
    tmp = tmp_path(final)
    tmp.unlink(missing_ok=True)
    with h5py.File(tmp, "w") as f:  # default libver: nothing marks the file open-for-write
        read = _fill(f, src)
    for name, (crc, length) in src.expected.items():
        if read[name].pair() != (crc, length):
            raise ValueError(f"{name} of the partial store does not match its commit record "
                             f"(crc {read[name].crc} over {read[name].length} bytes, recorded {crc} over {length})")
    back = _read_back(tmp, src)
    for name in read:
        if back[name].pair() != read[name].pair():
            raise ValueError(f"read-back of {name} differs from what was written")
    with h5py.File(tmp, "r+") as f:
        f.attrs["complete"] = True
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    journal.fsync_dir(final.parent)


def bytes_needed(src_n: int, dim: int, itemsize: int, text_bytes: int) -> int:
    """Room the assembly needs: every row, every string twice (heap + reference), plus HDF5's own bookkeeping."""
    return src_n * dim * itemsize + 2 * text_bytes + 32 * src_n + disk.RESERVE_BYTES


def run(job: dict[str, Any], final: Path, need: int, lock_fd: int | None) -> None:
    """Assemble ``final`` in a child process; its failure becomes one line (StoreFull / StoreError)."""
    free = disk.free_bytes(final)
    if free < need:
        raise StoreFull(f"no space left on device to finish store {final}: {free / 2**20:.2f} MiB free, it needs "
                        f"{need / 2**20:.2f} MiB; every row is saved — free space and rerun to resume")
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-m", ENTRY, json.dumps({**job, "final": str(final)})],
                          capture_output=True, text=True, env=env, pass_fds=(lock_fd,) if lock_fd is not None else ())
    lines = proc.stdout.strip().splitlines()
    try:
        said = json.loads(lines[-1]) if lines else {}
    except ValueError:
        said = {}
    if proc.returncode == 0:
        return
    tmp_path(final).unlink(missing_ok=True)
    if proc.returncode == EXIT_FULL:
        raise StoreFull(f"no space left on device finishing store {final}: {free / 2**20:.2f} MiB was free, it needs "
                        f"about {need / 2**20:.2f} MiB; every row is saved — free space and rerun to resume")
    if proc.returncode == EXIT_BAD:
        raise StoreError(f"store {final} failed its verification ({said.get('message', '?')}); {REFRESH_HINT}")
    why = f"signal {-proc.returncode}" if proc.returncode < 0 else said.get("message") or \
        (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
    raise StoreError(f"assembling store {final} failed ({why}); its rows are kept: rerun to retry")


def _main(job: dict[str, Any]) -> int:
    final = Path(job["final"])
    try:
        if job["kind"] == "journal":
            src: Source = JournalSource(Path(job["partial"]), job.get("extra", {}))
        else:
            src = ShardsSource([Path(p) for p in job["shards"]], job["attrs"], int(job["chunk_rows"]))
        build(src, final)
    except Exception as exc:
        full = disk.is_out_of_space(exc)
        tmp_path(final).unlink(missing_ok=True)
        print(json.dumps({"ok": False, "message": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}),
              flush=True)
        # HDF5 after ENOSPC segfaults while freeing its objects: leave without cleanup
        os._exit(EXIT_FULL if full else EXIT_BAD if isinstance(exc, (ValueError, KeyError, StoreError)) else 1)
    print(json.dumps({"ok": True}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(json.loads(sys.argv[1])))
