"""Kill -9 target for the store's crash tests: StoreWriter driven with numpy rows (no torch, starts fast).

    python benchmarks/_store_worker.py STORE ROWS BATCH DIM [SLEEP]

Rows, ids and errors depend only on the row number, so any mix of killed and resumed runs must
end byte-identical to one uninterrupted run. Every 53rd row is an error row (the errors file is
exercised too), and some ids are non-ASCII. On stdout, one line each, flushed:
``start <rows_done>``, ``committing`` (inside a batch's commit: bytes written, not yet fsynced
or recorded), ``batch <rows_done>`` (committed), ``assembling`` (finish started), ``done``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from encoders.store import StoreWriter  # noqa: E402

ATTRS = {"encoder_spec": "synthetic:torture", "weights_digest": "w0", "manifest_digest": "m0", "normalized": False,
         "dataset": "torture", "modality": "rows"}


def batch(lo: int, hi: int, dim: int) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """Rows [lo, hi): (ids, embeddings (n, dim) float32, errors) — a pure function of the row numbers."""
    ids, rows, errors = [], [], []
    for r in range(lo, hi):
        name = f"r{r:06d}" + ("-é" if r % 7 == 0 else "")
        if r % 53 == 17:
            errors.append((name, f"row {r} is unreadable"))
            continue
        ids.append(name)
        rows.append(np.random.default_rng(r).standard_normal(dim, dtype=np.float32))
    emb = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
    return ids, emb, errors


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(store: str, n: int, bs: int, dim: int, sleep: float = 0.0) -> None:
    with StoreWriter(store, dim=dim, attrs=ATTRS, chunk_rows=64, on_commit=lambda: say("committing")) as w:
        start = w.rows_done
        say(f"start {start}")
        if w.complete:
            say("done")
            return
        for lo in range(start, n, bs):
            hi = min(lo + bs, n)
            ids, emb, errors = batch(lo, hi, dim)
            w.append(ids, emb, rows_done=hi, errors=errors)
            say(f"batch {hi}")
            if sleep:
                time.sleep(sleep)
        say("assembling")
        w.finish()
    say("done")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], int(a[1]), int(a[2]), int(a[3]), float(a[4]) if len(a) > 4 else 0.0)
