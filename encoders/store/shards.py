"""Sharded extraction: contiguous manifest row ranges, one store per shard, one merged store.

A shard is rows ``[lo, hi)`` of the manifest. It is extracted by the ordinary ``extract`` into its
own store (``<store>.shards/shard-<i>-of-<k>.h5``), so each shard streams, resumes after a kill,
and records its own bad rows exactly like a single-process run. ``merge_shards`` then copies the
shards' finished stores, in order, into the one store users read, the way every final store is
written (assemble.py: a ``.tmp`` built in a child process, read back in full, renamed in); its
ids, embeddings, errors and attributes are those a single-process run over the whole manifest
writes (plus ``shards=<k>``).

Why this gives the same store as one process:

* rows: a shard is a contiguous range and shards are merged in range order, so the row order is
  the manifest's;
* batches: ranges start on multiples of the batch size, so every batch a shard encodes holds the
  same rows as the single-process batch (some kernels' rounding depends on the batch shape);
* bad rows: problems visible without decoding (duplicate ids, empty cells) are computed once on
  the FULL manifest and handed to each shard, so a duplicate whose first occurrence lives in
  another shard is still reported, with the same message (global row numbers).

Nothing here imports prefect: the flow (``flows/extract.py``) decides where shards run.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py

from encoders.extract import ExtractionError, ExtractSummary, OnError, Progress, extract
from encoders.frozen import FrozenEncoder
from encoders.manifest import Manifest
from encoders.store import assemble
from encoders.store.format import IDENTITY_ATTRS, StoreError
from encoders.store.lock import DEFAULT_WAIT_S, StoreLock, wait_for_readers
from encoders.store.writer import read_final_attrs

# Attributes every shard of one extraction must agree on (the manifest digest differs per shard).
_SHARED_ATTRS = tuple(k for k in IDENTITY_ATTRS if k != "manifest_digest") + ("encoder_spec", "modality", "dataset")
_COUNTERS = ("n", "n_errors", "rows_done", "complete", "created", "seconds")


def shard_ranges(n_rows: int, shards: int, *, align: int = 1) -> list[tuple[int, int]]:
    """Split ``range(n_rows)`` into at most ``shards`` contiguous, non-empty ``(lo, hi)`` ranges.

    Every ``lo`` is a multiple of ``align`` (pass the batch size, so a shard's batches are the
    single-process run's batches). Fewer ranges come back when there are too few rows or blocks;
    an empty manifest gives one empty range so the merged store still exists.
    """
    if shards < 1:
        raise ValueError(f"shards must be >= 1, not {shards}")
    if align < 1:
        raise ValueError(f"align must be >= 1, not {align}")
    if n_rows <= 0:
        return [(0, 0)]
    blocks = -(-n_rows // align)
    k = min(shards, blocks)
    base, extra = divmod(blocks, k)
    out, b = [], 0
    for i in range(k):
        nb = base + (1 if i < extra else 0)
        out.append((b * align, min((b + nb) * align, n_rows)))
        b += nb
    return out


def shard_dir(store: str | Path) -> Path:
    """Where the shard stores of ``store`` live while an extraction runs."""
    store = Path(store)
    return store.with_name(store.name + ".shards")


def shard_store_path(store: str | Path, index: int, shards: int) -> Path:
    return shard_dir(store) / f"shard-{index:04d}-of-{shards:04d}.h5"


def static_error_check(manifest: Manifest, column: str, static: dict[int, str], on_error: OnError) -> None:
    """With on_error='fail', raise as ``extract`` does on the full manifest (same message, global rows)."""
    if on_error == "fail" and static:
        ids = manifest.frame["id"].tolist()
        row, reason = next(iter(static.items()))
        raise ExtractionError(f"{manifest.path}: row {row}, id {ids[row]!r}, column {column!r}: {reason}"
                              f"{f' (and {len(static) - 1} more)' if len(static) > 1 else ''}")


@dataclass
class ShardManifest(Manifest):
    """Rows ``[lo, hi)`` of a manifest, seen by ``extract`` as a manifest of its own.

    Keeps the full manifest's ``path`` (relative paths resolve the same, the dataset name is the
    same), serves the static errors computed on the full manifest (shifted to shard rows), and
    has a digest of (full digest, lo, hi): editing ANY row of the manifest invalidates every
    shard store, since a duplicate id can tie rows of different shards together.
    """

    lo: int = 0
    hi: int = 0
    full_digest: str = ""
    static: dict[int, str] = field(default_factory=dict)

    def digest(self, column: str) -> str:
        return hashlib.sha256(f"{self.full_digest}|{self.lo}|{self.hi}".encode()).hexdigest()

    def static_errors(self, column: str) -> dict[int, str]:
        return dict(self.static)


def shard_manifest(manifest: Manifest, column: str, lo: int, hi: int,
                   static: dict[int, str] | None = None) -> ShardManifest:
    """``static``: the FULL manifest's ``static_errors(column)`` (computed here when not given)."""
    if not 0 <= lo <= hi <= len(manifest):
        raise ValueError(f"shard rows [{lo}, {hi}) are outside manifest {manifest.path} ({len(manifest)} rows)")
    static = manifest.static_errors(column) if static is None else static
    return ShardManifest(
        path=manifest.path, frame=manifest.frame.iloc[lo:hi].reset_index(drop=True), lo=lo, hi=hi,
        full_digest=manifest.digest(column), static={r - lo: why for r, why in static.items() if lo <= r < hi},
    )


def extract_rows(manifest: Manifest, column: str, encoder: FrozenEncoder, store: str | Path, lo: int, hi: int, *,
                 static: dict[int, str] | None = None, on_error: OnError = "skip", store_dtype: str = "float32",
                 batch_size: int | None = None, overwrite: bool = False,
                 progress: Progress | None = None) -> ExtractSummary:
    """``extract`` on manifest rows ``[lo, hi)`` into a shard store; error messages name global rows."""
    static = manifest.static_errors(column) if static is None else static
    static_error_check(manifest, column, static, on_error)
    part = shard_manifest(manifest, column, lo, hi, static)
    try:
        return extract(part, column, encoder, store, on_error=on_error, store_dtype=store_dtype,
                       batch_size=batch_size, overwrite=overwrite, progress=progress)
    except ExtractionError as exc:  # shard-local row numbers -> the manifest's
        msg = re.sub(r": row (\d+), id", lambda m: f": row {int(m.group(1)) + lo}, id", str(exc), count=1)
        raise ExtractionError(msg) from exc


def _read_shards(shard_paths: list[str | Path]) -> list[tuple[Path, dict[str, Any], int]]:
    """(path, attrs, chunk rows) of each shard; StoreError unless all are complete and alike."""
    if not shard_paths:
        raise ValueError("merge_shards needs at least one shard")
    infos = []
    for p in shard_paths:
        if not Path(p).is_file():
            raise StoreError(f"shard {p} is incomplete (no finished store); rerun the extraction to finish it")
        a = read_final_attrs(Path(p))
        if not a.get("complete"):
            raise StoreError(f"shard {p} is incomplete ({a.get('n')} rows); rerun the extraction to finish it")
        try:
            with h5py.File(p, "r") as f:
                chunk = (f["embeddings"].chunks or (256,))[0]
        except (OSError, KeyError) as exc:
            raise StoreError(f"shard {p} is not a readable xmodal store: {exc}") from None
        infos.append((Path(p), a, chunk))
    first = infos[0][1]
    for p, a, _ in infos[1:]:
        diff = [k for k in _SHARED_ATTRS if a.get(k) != first.get(k)]
        if diff:
            raise StoreError(f"shard {p} differs from shard {infos[0][0]} in {', '.join(diff)}: "
                             "shards of one store must come from one encoder and dtype")
    return infos


def merge_shards(shard_paths: list[str | Path], out_path: str | Path, attrs: dict[str, Any], *,
                 wait: float = DEFAULT_WAIT_S) -> dict[str, Any]:
    """Copy complete shard stores, in the order given, into one store at ``out_path``; returns its attrs.

    A consolidated copy rather than an HDF5 virtual dataset: a VDS keeps pointing at the shard
    files by path, so moving or copying the store (or deleting the shard folder) would silently
    break it, and readers would pay the VDS mapping on every read. A copy costs one extra pass
    over the embeddings, once, and yields a plain store indistinguishable from a single-process
    one (same layout, chunking and resumable/maxshape datasets).

    ``attrs``: attributes for the merged store, laid over the shards' common ones; pass at least
    ``manifest_digest`` of the FULL manifest (the shards carry per-shard digests). The counters
    (``n``, ``n_errors``, ``rows_done``) are summed from the shards, ``complete`` is True and
    ``shards`` is the number of shards. The copy streams in blocks (memory does not grow with N),
    is verified by a full read-back and appears by rename, under the store's writer lock
    (assemble.py), so a reader never sees half a merge and no writer races it.
    """
    out_path = Path(out_path)
    infos = _read_shards(shard_paths)
    first = infos[0][1]
    n = sum(int(a["n"]) for _, a, _ in infos)
    e = sum(int(a["n_errors"]) for _, a, _ in infos)
    rows_done = sum(int(a["rows_done"]) for _, a, _ in infos)
    merged = {k: v for k, v in first.items() if k not in _COUNTERS}
    merged |= {k: v for k, v in attrs.items()}
    merged |= {"n": n, "n_errors": e, "rows_done": rows_done, "shards": len(infos),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    merged.setdefault("library_versions", json.dumps({}))
    text = sum(p.stat().st_size for p, _, _ in infos)  # an upper bound on the strings they hold
    need = assemble.bytes_needed(n, int(first["dim"]), 4, text)

    lock = StoreLock(out_path)
    lock.acquire(wait)
    try:
        if out_path.exists():
            wait_for_readers(out_path, wait)
        assemble.run({"kind": "shards", "shards": [str(p) for p, _, _ in infos], "attrs": merged,
                      "chunk_rows": infos[0][2]}, out_path, need, lock.fd)
    finally:
        lock.release()
    return merged | {"complete": True}


def remove_shards(store: str | Path) -> None:
    """Drop a store's shard folder once the merged store is in place (it would double the disk used)."""
    shutil.rmtree(shard_dir(store), ignore_errors=True)
