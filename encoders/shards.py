"""Sharded extraction: contiguous manifest row ranges, one HDF5 store per shard, one merged store.

A shard is rows ``[lo, hi)`` of the manifest. It is extracted by the ordinary ``extract`` into its
own store (``<store>.shards/shard-<i>-of-<k>.h5``), so each shard streams, resumes after a kill,
and records its own bad rows exactly like a single-process run. ``merge_shards`` then copies the
shards, in order, into the one store users read; its ids, embeddings, errors and attributes are
those a single-process run over the whole manifest writes (plus ``shards=<k>``).

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
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from encoders.extract import ExtractionError, ExtractSummary, OnError, Progress, extract
from encoders.frozen import FrozenEncoder
from encoders.manifest import Manifest
from encoders.store import IDENTITY_ATTRS, STR, StoreError, _attr, _Lock, _plain

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


def _read_attrs(f: h5py.File) -> dict[str, Any]:
    return {k: _plain(v) for k, v in f.attrs.items()}


def _read_shards(shard_paths: list[str | Path]) -> list[tuple[Path, dict[str, Any], dict]]:
    """(path, attrs, chunk shapes) of each shard; StoreError unless all are complete and alike."""
    if not shard_paths:
        raise ValueError("merge_shards needs at least one shard")
    infos = []
    for p in shard_paths:
        try:
            with h5py.File(p, "r") as f:
                a = _read_attrs(f)
                chunks = {k: f[k].chunks for k in ("ids", "embeddings", "errors/ids", "errors/reasons")}
        except (OSError, KeyError) as exc:
            raise StoreError(f"shard {p} is not a readable xmodal store: {exc}") from None
        if not a.get("complete"):
            raise StoreError(f"shard {p} is incomplete ({a.get('n')} rows); rerun the extraction to finish it")
        infos.append((Path(p), a, chunks))
    first = infos[0][1]
    for p, a, _ in infos[1:]:
        diff = [k for k in _SHARED_ATTRS if a.get(k) != first.get(k)]
        if diff:
            raise StoreError(f"shard {p} differs from shard {infos[0][0]} in {', '.join(diff)}: "
                             "shards of one store must come from one encoder and dtype")
    return infos


def _copy_rows(infos, targets, block_rows: int) -> None:
    """Shard rows (ids, embeddings, error ids and reasons), in order, into the merged datasets, a block at a time."""
    ids, emb, err_ids, err_why = targets
    at, et = 0, 0
    for p, a, _ in infos:
        sn, se = int(a["n"]), int(a["n_errors"])
        with h5py.File(p, "r") as f:
            for lo in range(0, sn, block_rows):
                hi = min(lo + block_rows, sn)
                ids[at + lo:at + hi] = f["ids"].asstr()[lo:hi].astype(object)
                emb[at + lo:at + hi] = f["embeddings"][lo:hi]
            for lo in range(0, se, block_rows):
                hi = min(lo + block_rows, se)
                err_ids[et + lo:et + hi] = f["errors/ids"].asstr()[lo:hi].astype(object)
                err_why[et + lo:et + hi] = f["errors/reasons"].asstr()[lo:hi].astype(object)
        at += sn
        et += se


def merge_shards(shard_paths: list[str | Path], out_path: str | Path, attrs: dict[str, Any], *,
                 block_rows: int | None = None) -> dict[str, Any]:
    """Copy complete shard stores, in the order given, into one store at ``out_path``; returns its attrs.

    A consolidated copy rather than an HDF5 virtual dataset: a VDS keeps pointing at the shard
    files by path, so moving or copying the store (or deleting the shard folder) would silently
    break it, and readers would pay the VDS mapping on every read. A copy costs one extra pass
    over the embeddings, once, and yields a plain store indistinguishable from a single-process
    one (same layout, chunking and resumable/maxshape datasets).

    ``attrs``: attributes for the merged store, laid over the shards' common ones; pass at least
    ``manifest_digest`` of the FULL manifest (the shards carry per-shard digests). The counters
    (``n``, ``n_errors``, ``rows_done``) are summed from the shards, ``complete`` is True and
    ``shards`` is the number of shards. Memory stays at one block of rows (``block_rows``; by
    default about 32 MiB of embeddings). The file appears atomically (tmp + ``os.replace``) under
    the store's writer lock, so a reader never sees half a merge and no writer races it.
    """
    out_path = Path(out_path)
    infos = _read_shards(shard_paths)
    first = infos[0][1]
    dim, dtype = int(first["dim"]), np.dtype(first["dtype"])
    chunks = infos[0][2]
    n = sum(int(a["n"]) for _, a, _ in infos)
    e = sum(int(a["n_errors"]) for _, a, _ in infos)
    rows_done = sum(int(a["rows_done"]) for _, a, _ in infos)
    if block_rows is None:
        per = chunks["embeddings"][0] if chunks["embeddings"] else 256
        block_rows = max(per, (32 << 20) // max(dim * dtype.itemsize, 1) // per * per)
    merged = {k: v for k, v in first.items() if k not in _COUNTERS}
    merged |= {k: v for k, v in attrs.items()}
    merged |= {"n": n, "n_errors": e, "rows_done": rows_done, "shards": len(infos), "complete": True,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    merged.setdefault("library_versions", json.dumps({}))

    lock = _Lock(out_path)
    lock.acquire()
    tmp = out_path.with_name(out_path.name + ".merge.tmp")
    try:
        with h5py.File(tmp, "w") as g:
            ids = g.create_dataset("ids", shape=(n,), maxshape=(None,), dtype=STR, chunks=chunks["ids"] or (1024,))
            emb = g.create_dataset("embeddings", shape=(n, dim), maxshape=(None, dim), dtype=dtype,
                                   chunks=chunks["embeddings"] or (256, dim))
            grp = g.create_group("errors")
            err_ids = grp.create_dataset("ids", shape=(e,), maxshape=(None,), dtype=STR, chunks=chunks["errors/ids"] or (256,))
            err_why = grp.create_dataset("reasons", shape=(e,), maxshape=(None,), dtype=STR,
                                         chunks=chunks["errors/reasons"] or (256,))
            _copy_rows(infos, (ids, emb, err_ids, err_why), block_rows)
            for k, v in merged.items():
                g.attrs[k] = _attr(v)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        lock.release()
    return merged


def remove_shards(store: str | Path) -> None:
    """Drop a store's shard folder once the merged store is in place (it would double the disk used)."""
    shutil.rmtree(shard_dir(store), ignore_errors=True)
