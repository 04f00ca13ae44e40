"""Manifest column -> frozen encoder -> embedding store, streaming, resumable, with per-item errors.

Decoding happens ahead of the model, in DataLoader worker processes or one helper thread
(encoders/loader.py), so file I/O and image transforms hide behind the forward pass; on the CPU the batch itself is encoded as
parallel single-threaded slices (encoders/compute.py). Each batch is committed to the store before
the next starts: kill -9 loses at most the batch in flight, and a rerun resumes there (the commit
protocol and why it holds at any instant: encoders/store/journal.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from encoders.compute import BatchEncoder
from encoders.frozen import FrozenEncoder
from encoders.loader import RowBatches, iter_batches, plan_decode_workers
from encoders.manifest import Manifest
from encoders.store import StoreWriter
from encoders.store.lock import DEFAULT_WAIT_S

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
    decode_workers: int = 0  # decode processes ahead of the model; 0 = one helper thread (encoders/loader.py)
    compute_dtype: str = "fp32"  # what the encoder computed in (encoders/frozen.py)
    errors_csv: str | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)


def store_path(out_dir: str | Path, dataset: str, column: str, encoder_slug: str) -> Path:
    return Path(out_dir) / dataset / f"{column}--{encoder_slug}.h5"


def extract(manifest: Manifest, column: str, encoder: FrozenEncoder, store: str | Path, *,
            on_error: OnError = "skip", store_dtype: str = "float32", batch_size: int | None = None,
            overwrite: bool = False, progress: Progress | None = None,
            cpu_workers: int | None = None, decode_workers: int | None = None,
            wait: float = DEFAULT_WAIT_S) -> ExtractSummary:
    """``cpu_workers``: slices each batch is split into on the CPU (None = one per torch thread;
    see encoders/compute.py). ``decode_workers``: processes decoding batches ahead of the model
    (None = per device, 0 = one helper thread; see encoders/loader.py). Both change speed, not
    results beyond float rounding. ``wait``: seconds to wait for another writer of the same store
    (or, with ``overwrite``, for readers of the store being replaced) before giving up."""
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
    with StoreWriter(store, dim=encoder.dim, attrs=attrs, dtype=store_dtype, overwrite=overwrite,
                     wait=wait) as w:
        start = w.rows_done
        if w.complete:
            return _summary(w, manifest, column, total, start, time.perf_counter() - t0, 0, reused=True)

        encoded = 0
        bounds = [(lo, min(lo + bs, total)) for lo in range(start, total, bs)]
        workers = plan_decode_workers(encoder.device, kind, decode_workers)
        batches = iter_batches(RowBatches(encoder, raw, ids, static, bounds), workers)
        with BatchEncoder(encoder, bs, cpu_workers) as encode:
            for b in batches:
                if b.errors and on_error == "fail":
                    row, i, reason = b.errors[0]
                    batches.close()  # stop the decode workers before raising
                    raise ExtractionError(f"{manifest.path}: row {row}, id {i!r}, column {column!r}: {reason} "
                                          f"({w.n} rows before it are saved in {store}; rerun resumes there)")
                emb = encode(b.inputs)
                w.append(b.ids, emb, rows_done=b.rows_done, errors=[(i, reason) for _, i, reason in b.errors])
                encoded += len(b.ids)
                if progress:
                    progress(b.rows_done, total)
        seconds = time.perf_counter() - t0
        w.finish(seconds=seconds)
        return _summary(w, manifest, column, total, start, seconds, encoded, cpu_workers=encode.workers,
                        decode_workers=workers)


def _summary(w: StoreWriter, manifest: Manifest, column: str, total: int, start: int, seconds: float,
             encoded: int, reused: bool = False, cpu_workers: int = 1, decode_workers: int = 0) -> ExtractSummary:
    errors = w.errors()
    e = len(errors)
    csv = None
    if errors:
        import pandas as pd

        csv = str(w.path.with_suffix(".errors.csv"))
        pd.DataFrame(errors, columns=["id", "reason"]).assign(column=column).to_csv(csv, index=False)
    return ExtractSummary(
        store=str(w.path), dataset=manifest.name, modality=column, column=column, n=w.n, n_errors=e,
        dim=w.dim, dtype=w.dtype.name, rows_total=total, resumed_from=start, seconds=seconds,
        items_per_s=encoded / seconds if seconds > 0 and encoded else 0.0, reused=reused, cpu_workers=cpu_workers,
        decode_workers=decode_workers, compute_dtype=str(w.store_attrs.get("compute_dtype", "fp32")),
        errors_csv=csv, errors=errors,
    )
