"""Nearest-neighbour indexes over an embedding store: exact in memory below a size, FAISS above it.

Why two: an exact search is a (Q, N) matrix product, cheap to ~100k rows and the reference for
recall; at 1,000,000 x 128 one query costs 256 MFLOP, and an inverted-file index (IVF) that scans
~1% of the rows answers 20-50x more queries a second at recall@10 >= 0.95 (benchmarks/search.py,
benchmarks/results/search.txt). The choice follows autofaiss: the size of the gallery and the
memory it may use pick the index (``choose_index``), and the search parameter (``nprobe``) is
tuned after the build by measuring recall against the exact answer on stored rows
(``tune_nprobe``), not guessed.

Every index searches by inner product over L2-normalised rows, i.e. cosine, like ``exact.top_k``.
An index built from a store is saved beside it: ``<store>.faiss`` (FAISS's own binary format, no
pickle) and ``<store>.faiss.json`` (the plan, the tuned ``nprobe``, the measured recall, the build
time, and the store's identity, so a store rebuilt since is noticed and the index refused).
``faiss`` is imported inside the functions that need it: exact search stays numpy only.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np

from encoders.store import EmbeddingStore

IndexKind = Literal["flat", "ivf_flat", "ivf_pq", "hnsw"]
# Below this many rows search is exact (a 100k x 384 float32 gallery is 147 MiB and a query takes
# ~10 ms on one core): an index would save little and cost a build. The service and `xmodal search`
# use a saved index only at or above it.
ANN_MIN_ROWS = 100_000
DEFAULT_MEMORY = 8 * 2**30  # bytes an index may hold; above it IVF-PQ compresses the rows
TARGET_RECALL = 0.95
_NPROBES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
SUFFIX, SIDECAR = ".faiss", ".faiss.json"


@dataclass
class IndexPlan:
    """What to build and why: the FAISS factory string and the parameters behind it."""

    kind: IndexKind
    factory: str  # faiss.index_factory string, e.g. "IVF4096,Flat"
    n: int
    dim: int
    nlist: int = 0  # IVF cells
    pq_m: int = 0  # IVF-PQ: bytes per row
    hnsw_m: int = 0
    train_rows: int = 0  # rows k-means is trained on (a seeded sample)
    est_bytes: int = 0  # rows + centroids, before FAISS's own overhead
    reason: str = ""


def choose_index(n: int, dim: int, *, memory_bytes: int = DEFAULT_MEMORY, kind: IndexKind | None = None,
                 flat_below: int = ANN_MIN_ROWS) -> IndexPlan:
    """autofaiss's rule of thumb, written out: Flat when small, IVF-Flat when the rows fit the memory
    budget, IVF-PQ when they do not; HNSW only when asked (its graph build on 2 cores is several times
    an IVF build at 1M rows, for a similar speed at the same recall).

    ``nlist`` = the power of two nearest 4 * sqrt(n) (4096 at 1M): ~n / nlist = 244 rows a cell, so a
    query scanning ``nprobe`` cells reads ~nprobe * 244 rows plus the nlist centroids. k-means trains on
    40 rows a centroid (FAISS warns below 39; k-means time grows with the sample), capped at n.
    """
    if n < 1 or dim < 1:
        raise ValueError(f"cannot index {n} rows of dim {dim}")
    flat_bytes = n * dim * 4
    if kind is None:
        kind = "flat" if n < flat_below else ("ivf_flat" if flat_bytes * 1.1 <= memory_bytes else "ivf_pq")
    if kind == "flat":
        return IndexPlan("flat", "Flat", n, dim, est_bytes=flat_bytes,
                         reason=f"{n:,} rows < {flat_below:,}: exact search (FAISS Flat)")
    if kind == "hnsw":
        return IndexPlan("hnsw", "HNSW32,Flat", n, dim, hnsw_m=32, est_bytes=flat_bytes + n * 32 * 2 * 4,
                         reason="asked for HNSW")
    nlist = int(2 ** round(math.log2(max(4.0, 4 * math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39 or 1))
    train = min(n, 40 * nlist)
    if kind == "ivf_flat":
        return IndexPlan("ivf_flat", f"IVF{nlist},Flat", n, dim, nlist=nlist, train_rows=train,
                         est_bytes=flat_bytes + nlist * dim * 4 + n * 8,
                         reason=f"{n:,} rows x {dim} float32 = {flat_bytes / 2**20:,.0f} MiB fit the "
                                f"{memory_bytes / 2**20:,.0f} MiB budget: IVF-Flat (no loss from compression)")
    # ivf_pq: the largest code (bytes a row) that fits and divides dim (PQ splits the vector into m parts)
    per_row = max(1, int(memory_bytes * 0.9 - nlist * dim * 4) // n - 8)
    divisors = [m for m in range(1, dim + 1) if dim % m == 0 and m <= min(per_row, 64)]
    m = max(divisors) if divisors else 1
    return IndexPlan("ivf_pq", f"IVF{nlist},PQ{m}", n, dim, nlist=nlist, pq_m=m, train_rows=train,
                     est_bytes=n * (m + 8) + nlist * dim * 4,
                     reason=f"{flat_bytes / 2**20:,.0f} MiB of rows exceed the {memory_bytes / 2**20:,.0f} MiB "
                            f"budget: IVF-PQ, {m} bytes a row")


def unit_rows(x: np.ndarray) -> np.ndarray:
    """(N, D) float32 rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12)))


def exact_rows(queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of unit queries (Q, D) against unit rows (N, D) in memory: (scores, row ids),
    each (Q, k), best first; equal scores rank the lower row first (as ``exact.top_k``).

    Queries go in groups so the (group, N) score block stays near 16M scores (64 MiB, plus its
    argpartition): 1,000 queries against 1M rows at once would be a 4 GB block and 8 GB of indices.
    """
    n = rows.shape[0]
    k = min(k, n)
    group = max(1, (1 << 24) // max(n, 1))
    out_s, out_i = [], []
    for g in range(0, len(queries), group):
        scores = queries[g:g + group] @ rows.T  # (q, N)
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(scores), 1))
        ps = np.take_along_axis(scores, part, 1)
        order = np.lexsort((part, -ps), axis=1)
        idx = np.take_along_axis(part, order, 1)
        out_s.append(np.take_along_axis(scores, idx, 1))
        out_i.append(idx)
        del scores, part
    return np.concatenate(out_s), np.concatenate(out_i)


@dataclass
class AnnIndex:
    """A built FAISS index with the parameters it is searched with."""

    index: object  # faiss.Index
    plan: IndexPlan
    nprobe: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (Q, k), best first, for unit queries (Q, D). Rows are store rows."""
        import faiss

        q = unit_rows(np.atleast_2d(queries))
        params = faiss.SearchParametersIVF(nprobe=self.nprobe) if self.nprobe else None
        scores, rows = self.index.search(q, min(k, self.n), params=params)
        return scores, rows


def build(vectors, n: int, dim: int, plan: IndexPlan | None = None, *, seed: int = 0,
          block: int = 65536) -> AnnIndex:
    """Train (IVF: k-means on a seeded sample) and fill an index from ``vectors(start, stop) -> (rows, D)``.

    Rows are added in blocks, so a store is never held twice: IVF-Flat ends holding the rows once
    (inside FAISS), IVF-PQ holds only their codes.
    """
    import faiss

    plan = plan or choose_index(n, dim)
    t0 = time.perf_counter()
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, plan.train_rows, replace=False)) if plan.train_rows < n else np.arange(n)
        train = unit_rows(_gather(vectors, sample, block))
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter, ivf.cp.seed = 10, seed  # 10 iterations: the centroids settle; 25 (FAISS's default) cost 2.5x
        index.train(train)
        del train
    train_s = time.perf_counter() - t0
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = 80
    for start in range(0, n, block):
        index.add(unit_rows(vectors(start, min(start + block, n))))
    meta = {"train_s": round(train_s, 2), "build_s": round(time.perf_counter() - t0, 2), "seed": seed}
    return AnnIndex(index, plan, nprobe=min(16, plan.nlist) if plan.nlist else 0, meta=meta)


def _gather(vectors, rows: np.ndarray, block: int) -> np.ndarray:
    """Sorted ``rows`` read block by block through ``vectors(start, stop)``."""
    parts = []
    for start in range(int(rows[0]) // block * block, int(rows[-1]) + 1, block):
        sel = rows[(rows >= start) & (rows < start + block)]
        if len(sel):
            parts.append(vectors(start, start + block)[sel - start])
    return np.concatenate(parts)


def tune_nprobe(ann: AnnIndex, queries: np.ndarray, truth: np.ndarray, k: int = 10,
                target: float = TARGET_RECALL) -> dict:
    """Smallest ``nprobe`` whose recall@k against ``truth`` (exact top-k rows, (Q, k)) reaches ``target``;
    sets it on ``ann`` and returns the curve. Non-IVF indexes keep their settings (recall still measured)."""
    curve = {}
    probes = [p for p in _NPROBES if p <= ann.plan.nlist] or [0]
    for p in probes:
        ann.nprobe = p
        curve[p] = recall_at_k(ann.search(queries, k)[1], truth)
        if curve[p] >= target:
            break
    return {"nprobe": ann.nprobe, "recall_at_k": curve[ann.nprobe], "k": k, "target": target,
            "curve": {str(p): round(r, 4) for p, r in curve.items()}, "queries": int(len(queries))}


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found_i ∩ truth_i| / k over queries: the fraction of the exact top-k the index returned."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


# ---------------------------------------------------------------------------------------------
# An index beside its store
# ---------------------------------------------------------------------------------------------


def index_paths(store: str | Path) -> tuple[Path, Path]:
    p = Path(store)
    return p.with_name(p.name + SUFFIX), p.with_name(p.name + SIDECAR)


def _identity(store: EmbeddingStore) -> dict:
    return {"store": str(store.path.name), "n": store.n, "dim": store.dim, "digest": store.digest,
            "created": store.attrs.get("created", "")}


def build_for_store(store: str | Path | EmbeddingStore, *, kind: IndexKind | None = None,
                    memory_bytes: int = DEFAULT_MEMORY, flat_below: int = ANN_MIN_ROWS, tune_queries: int = 500,
                    k: int = 10, target: float = TARGET_RECALL, seed: int = 0) -> dict:
    """Build, tune and save the index of one store (``<store>.faiss`` + ``<store>.faiss.json``); the sidecar.

    Tuning queries are stored rows (a seeded sample): their exact top-k against the whole store is the
    truth the recall is measured on (the first hit is the row itself, as for a product already listed).
    """
    import faiss

    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    plan = choose_index(store.n, store.dim, memory_bytes=memory_bytes, kind=kind, flat_below=flat_below)
    ann = build(store.read_rows, store.n, store.dim, plan, seed=seed)
    rng = np.random.default_rng(seed + 1)
    q_rows = np.sort(rng.choice(store.n, min(tune_queries, store.n), replace=False))
    queries = unit_rows(store.take(q_rows))
    truth = _exact_truth(store, queries, k)
    tuned = tune_nprobe(ann, queries, truth, k=k, target=target)
    path, side = index_paths(store.path)
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(ann.index, str(tmp))
    tmp.replace(path)  # a reader never sees half an index
    sidecar = {"plan": asdict(plan), "nprobe": ann.nprobe, "tuning": tuned, "build": ann.meta,
               "index_bytes": path.stat().st_size, "faiss_version": faiss.__version__,
               "built": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": _identity(store)}
    side.write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def _exact_truth(store: EmbeddingStore, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows of unit queries over the whole store, streamed in blocks."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_r = np.zeros((len(queries), 0), np.int64)
    for start in range(0, store.n, 65536):
        block = unit_rows(store.read_rows(start, start + 65536))
        s, r = exact_rows(queries, block, k)
        cs, cr = np.concatenate([best_s, s], 1), np.concatenate([best_r, r + start], 1)
        order = np.lexsort((cr, -cs), axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(cs, order, 1), np.take_along_axis(cr, order, 1)
    return best_r


def load_for_store(store: str | Path | EmbeddingStore) -> AnnIndex | None:
    """The saved index of ``store``, or None when there is none; ValueError naming both when it is stale."""
    store = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    path, side = index_paths(store.path)
    if not (path.is_file() and side.is_file()):
        return None
    import faiss  # only when there is an index to read: exact search never loads faiss

    meta = json.loads(side.read_text())
    if meta.get("source") != _identity(store):
        raise ValueError(f"index {path} was built from another version of store {store.path} "
                         f"(sidecar {meta.get('source')} vs store {_identity(store)}); rebuild it: "
                         f"xmodal build-index {store.path}")
    plan = IndexPlan(**meta["plan"])
    return AnnIndex(faiss.read_index(str(path)), plan, nprobe=int(meta["nprobe"]), meta=meta)
