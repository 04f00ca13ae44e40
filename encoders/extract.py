"""Manifest column -> frozen encoder -> HDF5 store, streaming, resumable, with per-item errors.

Decoding the next batch happens on a helper thread while the current batch is encoded, so file
I/O and image transforms hide behind the forward pass; on the CPU the batch itself is encoded as
parallel single-threaded slices (encoders/compute.py). Each batch is committed to the store before
the next starts: kill -9 loses at most the batch in flight, and a rerun resumes there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from encoders.compute import BatchEncoder
from encoders.frozen import BadInput, FrozenEncoder
from encoders.manifest import Manifest
from encoders.store import StoreWriter

OnError = Literal["skip", "fail"]
Progress = Callable[[int, int], None]  # (rows_done, rows_total)


class ExtractionError(ValueError):
    """Bad input with on_error='fail'. Names the row, id, column and reason; earlier batches are kept."""


@dataclass
class ExtractSummary:
    store: str
    dataset: str
    modality: str
    column: str
    n: int
    n_errors: int
    dim: int
    dtype: str
    rows_total: int
    resumed_from: int
    seconds: float
    items_per_s: float
    reused: bool = False
    cpu_workers: int = 1  # slices each batch was encoded in (encoders/compute.py)
    errors_csv: str | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)


def store_path(out_dir: str | Path, dataset: str, column: str, encoder_slug: str) -> Path:
    return Path(out_dir) / dataset / f"{column}--{encoder_slug}.h5"


def _load_rows(encoder: FrozenEncoder, raw, ids: list, static: dict, lo: int, hi: int):
    """Decode rows [lo, hi): (kept ids, loaded items, errors as (row, id, reason))."""
    keep_ids, items, errs = [], [], []
    for row in range(lo, hi):
        if row in static:
            errs.append((row, ids[row], static[row]))
            continue
        try:
            items.append(encoder.load_item(raw[row]))
            keep_ids.append(ids[row])
        except BadInput as exc:
            errs.append((row, ids[row], str(exc)))
    return keep_ids, items, errs


def extract(manifest: Manifest, column: str, encoder: FrozenEncoder, store: str | Path, *,
            on_error: OnError = "skip", store_dtype: str = "float32", batch_size: int | None = None,
            overwrite: bool = False, progress: Progress | None = None,
            cpu_workers: int | None = None) -> ExtractSummary:
    """``cpu_workers``: slices each batch is split into on the CPU (None = one per torch thread;
    see encoders/compute.py). It changes speed, not results beyond float rounding."""
    kind = encoder.modality
    raw = manifest.values(column, kind)
    ids = manifest.frame["id"].tolist()
    static = manifest.static_errors(column)
    if on_error == "fail" and static:
        row, reason = next(iter(static.items()))
        raise ExtractionError(f"{manifest.path}: row {row}, id {ids[row]!r}, column {column!r}: {reason}"
                              f"{f' (and {len(static) - 1} more)' if len(static) > 1 else ''}")
    bs = batch_size or encoder.spec.batch_size
    attrs = {
        "dataset": manifest.name,
        "modality": column,
        "normalized": bool(encoder.spec.normalize),
        "manifest_digest": manifest.digest(column),
        "manifest_path": str(manifest.path),
        **{k: v for k, v in encoder.describe().items() if k != "device"},
    }
    total = len(ids)
    t0 = time.perf_counter()
    with StoreWriter(store, dim=encoder.dim, attrs=attrs, dtype=store_dtype, overwrite=overwrite) as w:
        start = w.rows_done
        if w.complete:
            return _summary(w, manifest, column, total, start, time.perf_counter() - t0, 0, reused=True)

        load = partial(_load_rows, encoder, raw, ids, static)
        encoded = 0
        bounds = [(lo, min(lo + bs, total)) for lo in range(start, total, bs)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="xmodal-decode") as pool, \
                BatchEncoder(encoder, bs, cpu_workers) as encode:
            pending = pool.submit(load, *bounds[0]) if bounds else None
            for k, (lo, hi) in enumerate(bounds):
                keep_ids, items, errs = pending.result()
                if k + 1 < len(bounds):
                    pending = pool.submit(load, *bounds[k + 1])
                if errs and on_error == "fail":
                    row, i, reason = errs[0]
                    raise ExtractionError(f"{manifest.path}: row {row}, id {i!r}, column {column!r}: {reason} "
                                          f"({w.n} rows before it are saved in {store}; rerun resumes there)")
                emb = encode(items)
                w.append(keep_ids, emb, rows_done=hi, errors=[(i, reason) for _, i, reason in errs])
                encoded += len(keep_ids)
                if progress:
                    progress(hi, total)
        seconds = time.perf_counter() - t0
        w.finish(seconds=seconds)
        return _summary(w, manifest, column, total, start, seconds, encoded, cpu_workers=encode.workers)


def _summary(w: StoreWriter, manifest: Manifest, column: str, total: int, start: int, seconds: float,
             encoded: int, reused: bool = False, cpu_workers: int = 1) -> ExtractSummary:
    f = w.f
    e = int(f.attrs["n_errors"])
    errors = list(zip(f["errors/ids"].asstr()[:e], f["errors/reasons"].asstr()[:e]))
    csv = None
    if errors:
        import pandas as pd

        csv = str(w.path.with_suffix(".errors.csv"))
        pd.DataFrame(errors, columns=["id", "reason"]).assign(column=column).to_csv(csv, index=False)
    return ExtractSummary(
        store=str(w.path), dataset=manifest.name, modality=column, column=column, n=w.n, n_errors=e,
        dim=w.dim, dtype=w.dtype.name, rows_total=total, resumed_from=start, seconds=seconds,
        items_per_s=encoded / seconds if seconds > 0 and encoded else 0.0, reused=reused, cpu_workers=cpu_workers,
        errors_csv=csv, errors=errors,
    )
