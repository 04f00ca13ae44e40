"""ANN benchmark: the FAISS index a store gets (`xmodal build-index`) vs exact search, at 1M vectors.

    .venv/bin/python benchmarks/search.py [--rows 1000000] [--dim 128] [--clusters 2000] [--queries 1000]
                                          [--k 10] [--threads N] [--flat-below 100000]

Data: ``rows`` synthetic float32 vectors of ``dim`` dims drawn around ``clusters`` Gaussian
centres (real embeddings cluster too: a uniform cloud in 128 dims has no near neighbours to find),
L2-normalised, written to a real store with ``StoreWriter``. Queries are NEW draws from the same
clusters, not stored rows. Both in one run, on the same queries:

  exact top_k   ``projection.search.exact.top_k`` (what `xmodal search` runs below the index
                threshold): streams the store from HDF5; its answers are the truth for recall.
  exact memory  the service's exact path (``index.exact_rows``): the rows already in memory.
  faiss         ``index.build_for_store`` (the flow's task: the index chosen by size and memory,
                nprobe tuned on stored rows to recall@10 >= 0.95), saved, reloaded, searched.

Queries/s are measured two ways: a batch (all queries in one call; BLAS-friendly, the exact
search's best case) and one query at a time (what the service does per request). Reported:
recall@k against exact, queries/s of each, the ratios, build time (train + add + tune), index size
on disk and peak RSS. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import LOADS, default_threads, emit_json, peak_rss_mib, phase  # noqa: E402



def clustered(rng, n: int, centres, spread: float):
    """``n`` unit vectors around random centres (rows of ``centres``)."""
    import numpy as np

    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, centres.shape[1])).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build_store(path: Path, rows: int, dim: int, centres, spread: float, seed: int, block: int = 50_000) -> None:
    import numpy as np

    from encoders.store import StoreWriter

    rng = np.random.default_rng(seed)
    attrs = {"dataset": "bench", "modality": "image", "encoder_spec": "bench:clustered", "normalized": True}
    with StoreWriter(path, dim=dim, attrs=attrs, chunk_rows=4096, overwrite=True) as w:
        for s in range(0, rows, block):
            e = min(s + block, rows)
            w.append([f"v{i:07d}" for i in range(s, e)], clustered(rng, e - s, centres, spread), rows_done=e)
        w.finish()


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--spread", type=float, default=0.6, help="per-dim noise around a unit-variance centre")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--flat-below", type=int, default=100_000, help="the index threshold (smoke runs lower it)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import faiss
    import numpy as np

    from encoders.store import EmbeddingStore
    from projection.search.exact import top_k
    from projection.search.index import build_for_store, exact_rows, load_for_store, recall_at_k

    faiss.omp_set_num_threads(args.threads)
    timings: dict[str, float] = {}
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim)).astype(np.float32)
    queries = clustered(np.random.default_rng(args.seed + 7), args.queries, centres, args.spread)
    tmp = Path(tempfile.mkdtemp(prefix="xmodal-ann-bench-"))
    store_path = tmp / f"bench-{args.rows}x{args.dim}.h5"
    try:
        with phase("write store", timings):
            build_store(store_path, args.rows, args.dim, centres, args.spread, args.seed + 1)
        store = EmbeddingStore(store_path)
        store_mib = store_path.stat().st_size / 2**20
        print(f"store: {args.rows:,} x {args.dim} float32 ({args.clusters:,} clusters, spread {args.spread}) = "
              f"{store_mib:.1f} MiB; {args.queries} new queries; k={args.k}; {args.threads} threads", flush=True)

        index_of = store.index
        with phase("exact top_k (streamed from the store)", timings):
            exact_s, exact = timed(lambda: top_k(queries, store, args.k), args.repeats)
        truth = np.array([[index_of[i] for i, _ in row] for row in exact])  # (Q, k) store rows

        with phase("exact in memory", timings):
            matrix = store.embeddings()  # rows are unit already
            mem_s, (_, mem_rows) = timed(lambda: exact_rows(queries, matrix, args.k), args.repeats)
            mem_single_s, _ = timed(lambda: [exact_rows(q[None], matrix, args.k) for q in queries[:args.single]], 1)
            del matrix

        with phase("faiss build (choose, train, add, tune, save)", timings):
            side = build_for_store(store, flat_below=args.flat_below, k=args.k, seed=args.seed)
        ann = load_for_store(store)
        with phase("faiss search", timings):
            ann_s, (_, ann_rows) = timed(lambda: ann.search(queries, args.k), args.repeats)
            ann_single_s, _ = timed(lambda: [ann.search(q[None], args.k) for q in queries[:args.single]], max(args.repeats, 3))
        peak, how = peak_rss_mib()

        recall = recall_at_k(ann_rows, truth)
        recall_mem = recall_at_k(mem_rows, truth)
        qps = {"exact_top_k": args.queries / exact_s, "exact_memory": args.queries / mem_s, "faiss": args.queries / ann_s}
        qps1 = {"exact_memory": args.single / mem_single_s, "faiss": args.single / ann_single_s}
        plan = side["plan"]
        out = {
            "rows": args.rows, "dim": args.dim, "clusters": args.clusters, "spread": args.spread, "queries": args.queries,
            "k": args.k, "threads": args.threads, "store_mib": round(store_mib, 1),
            "index": plan["factory"], "index_reason": plan["reason"], "nprobe": side["nprobe"],
            "tuning": side["tuning"], "build_s": side["build"]["build_s"], "train_s": side["build"]["train_s"],
            "build_tune_save_s": timings["faiss build (choose, train, add, tune, save)"],
            "index_mib": round(side["index_bytes"] / 2**20, 1),
            "recall_at_k": round(recall, 4), "exact_memory_recall_at_k": round(recall_mem, 4),
            "queries_per_s_batch": {n: round(v, 1) for n, v in qps.items()},
            "queries_per_s_single": {n: round(v, 1) for n, v in qps1.items()},
            "speedup_batch_vs_exact_top_k": round(qps["faiss"] / qps["exact_top_k"], 1),
            "speedup_batch_vs_exact_memory": round(qps["faiss"] / qps["exact_memory"], 1),
            "speedup_single_vs_exact_memory": round(qps1["faiss"] / qps1["exact_memory"], 1),
            "peak_rss_mib": round(peak, 1), "peak_how": how, "timings_s": timings,
            "load_avg_1min": {name: list(v) for name, v in LOADS.items()},
        }
        out["meets_goal"] = bool(out["recall_at_k"] >= 0.95 and out["speedup_batch_vs_exact_top_k"] >= 20)
        print()
        print(f"index {plan['factory']} ({plan['reason']}); nprobe {side['nprobe']} (tuned on "
              f"{side['tuning']['queries']} stored rows: {side['tuning']['curve']})")
        print(f"build {out['build_s']:.1f} s (k-means {out['train_s']:.1f} s) + tune/save = "
              f"{out['build_tune_save_s']:.1f} s; index {out['index_mib']:.1f} MiB on disk (store {store_mib:.1f} MiB)")
        print(f"{'':28} {'recall@' + str(args.k):>10} {'q/s batch':>11} {'q/s single':>11}")
        print(f"{'exact top_k (store, numpy)':28} {1.0:>10.4f} {qps['exact_top_k']:>11.1f} {'':>11}")
        print(f"{'exact in memory (numpy)':28} {recall_mem:>10.4f} {qps['exact_memory']:>11.1f} {qps1['exact_memory']:>11.1f}")
        print(f"{'faiss ' + plan['factory']:28} {recall:>10.4f} {qps['faiss']:>11.1f} {qps1['faiss']:>11.1f}")
        print(f"faiss vs exact top_k: {out['speedup_batch_vs_exact_top_k']}x (batch); vs exact in memory: "
              f"{out['speedup_batch_vs_exact_memory']}x (batch), {out['speedup_single_vs_exact_memory']}x (one query at "
              f"a time); peak RSS {peak:.0f} MiB; goal (recall >= 0.95 at >= 20x exact top_k): {out['meets_goal']}",
              flush=True)
        emit_json(out)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
