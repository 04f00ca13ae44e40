"""Search benchmark: streaming exact top-k over a store vs a bare load-everything numpy search.

    .venv/bin/python benchmarks/search_memory.py [--rows 200000] [--dims 256,1024] [--queries 16] [--k 10]
                                          [--chunk-rows 16384] [--threads N] [--keep]

For each dim in ``--dims`` (default 256 and 1024): builds a float32 store of ``rows x dim`` random
unit vectors (200,000 x 256 is ~196 MiB, 200,000 x 1024 ~782 MiB), written in blocks with
``StoreWriter``, in a temp dir. Queries are stored rows plus noise, so each query's top-1 is known.
Then, each in a FRESH interpreter (its own address space; peak RSS read from /proc/self/status
VmHWM in that child, since ru_maxrss of a child is polluted by its parent):

  top_k   ``projection.search.exact.top_k(queries, store, k, chunk_rows=16384)``: streams the store.
          numpy + h5py only; the child checks torch was never imported.
  numpy   the bare peer: read the whole embeddings matrix with h5py, ``q @ M.T``, argpartition, sort.

Each child reports its ABSOLUTE peak RSS (what "peak memory well below the store's size" is about:
interpreter, imports, the store's id list and the working set, everything), the RSS it had after
its imports, the best of ``--repeats`` timed passes (every pass reads the store again; the file was
just written, so it is usually in the page cache), and its answers; the parent checks both agree
and that each query's top-1 is the row it was made from, and prints peak RSS / store size on disk.
The last stdout line is one JSON object (``runs``: one entry per dim).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import LOADS, default_threads, ROOT, emit_json, last_json_line, peak_rss_mib, phase, rss_mib  # noqa: E402



def make_queries(store_path: str, n_queries: int, seed: int = 1):
    """Stored rows plus noise: the row each was made from must come back first."""
    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    with h5py.File(store_path, "r") as f:
        n = int(f.attrs["n"])
        rows = np.sort(rng.choice(n, n_queries, replace=False))
        base = f["embeddings"][rows]
    q = base + 0.05 * rng.standard_normal(base.shape).astype(np.float32)
    return rows, q.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------------


def child(mode: str, store_path: str, n_queries: int, k: int, chunk_rows: int, repeats: int, threads: int) -> None:
    import numpy as np

    if mode == "cli":  # what a user runs: `xmodal search <id> -t STORE --source-store STORE -k K`
        import contextlib
        import io

        from flows.cli import app

        rows, _ = make_queries(store_path, 1)
        qid = f"row{int(rows[0]):07d}"
        buf = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            app(["search", qid, "-t", store_path, "--source-store", store_path, "-k", str(k)], standalone_mode=False)
        took = time.perf_counter() - t0
        peak, how = peak_rss_mib()
        top = [line.split()[1] for line in buf.getvalue().splitlines() if line.strip()[:1].isdigit()]
        emit_json({"mode": mode, "peak_rss_mib": round(peak, 1), "peak_how": how, "best_s": round(took, 3),
                   "torch_imported": "torch" in sys.modules, "prefect_imported": "prefect" in sys.modules,
                   "query": qid, "top1": top[0] if top else None})
        return
    if mode == "top_k":
        from projection.search.exact import top_k  # numpy + h5py; threads via OPENBLAS/OMP_NUM_THREADS
    else:
        import h5py  # noqa: F401
    _, q = make_queries(store_path, n_queries)
    import_rss = rss_mib()
    import_peak, _ = peak_rss_mib()
    times, answers = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        if mode == "top_k":
            res = top_k(q, store_path, k, chunk_rows=chunk_rows)
            answers = [[i for i, _ in r] for r in res]
            scores = [[s for _, s in r] for r in res]
        else:
            import h5py

            with h5py.File(store_path, "r") as f:
                n = int(f.attrs["n"])
                m = f["embeddings"][:n]  # the whole matrix in memory
                ids = f["ids"].asstr()[:n]
            qn = q / np.linalg.norm(q, axis=1, keepdims=True)
            s = qn @ m.T  # store rows are unit vectors
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            ps = np.take_along_axis(s, part, 1)
            order = np.take_along_axis(part, np.argsort(-ps, axis=1, kind="stable"), 1)
            answers = [[str(ids[j]) for j in row] for row in order]
            scores = np.take_along_axis(s, order, 1).tolist()
            del m, s
        times.append(time.perf_counter() - t0)
    peak, how = peak_rss_mib()
    emit_json({"mode": mode, "peak_rss_mib": round(peak, 1), "peak_how": how, "torch_imported": "torch" in sys.modules,
               "rss_after_imports_mib": round(import_rss, 1), "peak_before_search_mib": round(import_peak, 1),
               "times_s": [round(t, 3) for t in times], "best_s": round(min(times), 3),
               "answers": answers, "scores": scores})


def run_child(mode: str, args, store_path: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--store", store_path,
           "--queries", str(args.queries),
           "--k", str(args.k), "--chunk-rows", str(args.chunk_rows), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return last_json_line(proc.stdout)


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------


def build_store(path: Path, rows: int, dim: int, block: int = 20000, seed: int = 0) -> None:
    import numpy as np

    from encoders.store import StoreWriter

    rng = np.random.default_rng(seed)
    attrs = {"dataset": "bench", "modality": "image", "encoder_spec": "bench:random", "normalized": True}
    with StoreWriter(path, dim=dim, attrs=attrs, chunk_rows=1024, overwrite=True) as w:
        for s in range(0, rows, block):
            e = min(s + block, rows)
            x = rng.standard_normal((e - s, dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            w.append([f"row{i:07d}" for i in range(s, e)], x, rows_done=e)
        w.finish()


def bench_one(args, dim: int, tmp: Path, timings: dict[str, float]) -> dict:
    """Build one rows x dim store, run both children on it, compare; the summary dict for ``runs``."""
    import numpy as np

    store_path = tmp / f"bench-{args.rows}x{dim}.h5"
    with phase(f"build store {dim}", timings):
        build_store(store_path, args.rows, dim)
    size_mib = store_path.stat().st_size / 2**20
    print(f"store: {args.rows:,} rows x {dim} float32 = {size_mib:.1f} MiB on disk ({store_path})", flush=True)
    rows, _ = make_queries(str(store_path), args.queries)
    expect_top1 = [f"row{r:07d}" for r in rows]
    with phase(f"top_k child {dim}", timings):
        tk = run_child("top_k", args, str(store_path))
    with phase(f"numpy child {dim}", timings):
        npy = run_child("numpy", args, str(store_path))
    with phase(f"xmodal search CLI child {dim}", timings):
        cli = run_child("cli", args, str(store_path))
    store_path.unlink()  # the 1024-dim store is ~800 MB: do not keep two around

    same_ids = tk["answers"] == npy["answers"]
    max_score_diff = float(np.max(np.abs(np.asarray(tk["scores"]) - np.asarray(npy["scores"]))))
    top1_ok = [a[0] for a in tk["answers"]] == expect_top1 and [a[0] for a in npy["answers"]] == expect_top1
    out = {"rows": args.rows, "dim": dim, "store_mib": round(size_mib, 1), "same_answers": same_ids,
           "max_score_diff": max_score_diff, "top1_correct": top1_ok,
           "top_k_imported_torch": tk["torch_imported"],
           "cli": {"peak_rss_mib": cli["peak_rss_mib"], "peak_vs_store": round(cli["peak_rss_mib"] / size_mib, 3),
                   "seconds_one_query": cli["best_s"], "top1_correct": cli["top1"] == cli["query"],
                   "imported_torch": cli["torch_imported"], "imported_prefect": cli["prefect_imported"]}}
    for name, r in (("top_k", tk), ("numpy", npy)):
        out[name] = {
            "peak_rss_mib": r["peak_rss_mib"],
            "peak_vs_store": round(r["peak_rss_mib"] / size_mib, 3),
            "rss_after_imports_mib": r["rss_after_imports_mib"],
            "peak_over_imports_mib": round(r["peak_rss_mib"] - r["rss_after_imports_mib"], 1),
            "peak_over_imports_vs_store": round((r["peak_rss_mib"] - r["rss_after_imports_mib"]) / size_mib, 3),
            "best_s": r["best_s"], "times_s": r["times_s"],
            "queries_per_s": round(args.queries / r["best_s"], 1),
            "peak_how": r["peak_how"],
        }
    print(f"{'':8} {'peak RSS':>10} {'peak/store':>10} {'after imports':>14} {'peak-imports':>13} "
          f"{'/store':>7} {'best s':>8} {'queries/s':>10}")
    for name in ("top_k", "numpy"):
        o = out[name]
        print(f"{name:8} {o['peak_rss_mib']:>8.1f}MB {o['peak_vs_store']:>10.3f} {o['rss_after_imports_mib']:>12.1f}MB "
              f"{o['peak_over_imports_mib']:>11.1f}MB {o['peak_over_imports_vs_store']:>7.3f} "
              f"{o['best_s']:>8.3f} {o['queries_per_s']:>10.1f}")
    print(f"store on disk {size_mib:.1f} MiB; same answers: {same_ids} (max |score diff| {max_score_diff:.2e}); "
          f"top-1 = source row for every query: {top1_ok}; torch imported by top_k child: {tk['torch_imported']}")
    c = out["cli"]
    print(f"xmodal search (CLI, one query by id, k={args.k}): peak RSS {c['peak_rss_mib']:.1f} MiB = "
          f"{c['peak_vs_store']:.3f} x store, {c['seconds_one_query']:.2f} s, top-1 correct: {c['top1_correct']}, "
          f"torch imported: {c['imported_torch']}")
    print(f"peak RSS measured by {tk['peak_how']} in each child", flush=True)
    print()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dims", default="256,1024", help="comma-separated store dims, one run each")
    ap.add_argument("--dim", type=int, help="one dim only (overrides --dims)")
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk-rows", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (the stores themselves are removed)")
    ap.add_argument("--child", choices=["top_k", "numpy", "cli"], help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.store, args.queries, args.k, args.chunk_rows, args.repeats, args.threads)
        return
    dims = [args.dim] if args.dim else [int(d) for d in args.dims.split(",") if d.strip()]

    timings: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="xmodal-search-bench-"))
    try:
        runs = [bench_one(args, dim, tmp, timings) for dim in dims]
        print(f"{'rows x dim':>14} {'store MiB':>10} {'top_k peak':>11} {'/store':>7} {'q/s':>8} "
              f"{'numpy peak':>11} {'/store':>7} {'q/s':>8}")
        for r in runs:
            t, n = r["top_k"], r["numpy"]
            print(f"{r['rows']:>8,} x {r['dim']:<4} {r['store_mib']:>10.1f} {t['peak_rss_mib']:>9.1f}MB "
                  f"{t['peak_vs_store']:>7.3f} {t['queries_per_s']:>8.1f} {n['peak_rss_mib']:>9.1f}MB "
                  f"{n['peak_vs_store']:>7.3f} {n['queries_per_s']:>8.1f}")
        print(f"timings: {json.dumps(timings)}")
        out = {"rows": args.rows, "dims": dims, "queries": args.queries, "k": args.k, "chunk_rows": args.chunk_rows,
               "threads": args.threads, "repeats": args.repeats, "runs": runs, "timings_s": timings,
               # other work on the machine skews times
               "load_avg_1min": {name: list(v) for name, v in LOADS.items()}}
        emit_json(out)
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
