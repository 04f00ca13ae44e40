"""Exact cosine search over an embedding store, and query -> (encoder -> projector) -> top-k.

``top_k`` streams the store in blocks (``EmbeddingStore.iter_chunks``) and keeps a running top-k
per query, so memory is bounded by the block size (and the number of queries), not the store
size. Ties are broken deterministically: equal scores rank the lower store row first, whatever
the block size. ``search`` is what a CLI calls: an image path, a text, or an id of a source
store goes in; ``(id, score)`` pairs of the target store come out.

No Prefect/MLflow here; the only project dependency is ``encoders`` (projection -> encoders).
``top_k`` and this module's imports are numpy + h5py only: importing torch costs several hundred MB
of RSS on its own (more than a 200k x 256 float32 store), so torch is imported lazily, inside
``search``, only when an encoder or a projector is actually used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from encoders.store import EmbeddingStore
from projection.search.index import ANN_MIN_ROWS

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
# A (queries x rows) score block is capped at this many elements; larger query sets are done in groups.
_MAX_BLOCK_ELEMENTS = 1 << 22
_LOW32 = (1 << 32) - 1
# Ids of rows that fell out of every running top-k are dropped once this many more than needed pile up.
_WINNERS_SLACK = 4096


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


class SearchResults(list):
    """A list of ``(id, score)`` tuples, best first, that also knows how to print itself.

    ``records()`` gives ``[{"rank": 1, "id": ..., "score": ...}, ...]`` for a table or JSON;
    ``table()`` gives the same as aligned text.
    """

    def __init__(self, hits: Sequence[tuple[str, float]] = (), *, query: str | None = None,
                 store: str | None = None, files: Sequence[str] | None = None, method: str = "exact"):
        super().__init__(hits)
        self.query = query
        self.store = store
        self.files = list(files) if files is not None else None  # the gallery file of each hit, when known
        self.method = method

    def records(self) -> list[dict[str, Any]]:
        recs = [{"rank": r, "id": i, "score": s} for r, (i, s) in enumerate(self, start=1)]
        for rec, f in zip(recs, self.files or []):
            rec["file"] = f
        return recs

    def table(self, digits: int = 4) -> str:
        head = ("rank", "id", "score") + (("file",) if self.files else ())
        rows = [(str(r["rank"]), str(r["id"]), f"{r['score']:.{digits}f}") + ((r["file"],) if self.files else ())
                for r in self.records()]
        w = [max([len(head[c])] + [len(row[c]) for row in rows]) for c in range(len(head))]
        fmt = lambda cells: "  ".join(f"{c:>{w[j]}}" if j in (0, 2) else f"{c:<{w[j]}}"  # noqa: E731
                                      for j, c in enumerate(cells)).rstrip()
        lines = [fmt(head), fmt(["-" * x for x in w])]
        lines += [fmt(row) for row in rows]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Exact top-k over a store
# ---------------------------------------------------------------------------------------------


def _open(store: str | Path | EmbeddingStore) -> EmbeddingStore:
    return store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)


def _order_key(scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """int64 keys whose order is (score descending, row ascending): one partition then ranks with no ties.

    The float32 score's bits become an order-preserving int32 (negative floats have their magnitude
    bits flipped), widened and shifted into the high half; the low half holds ``2**32 - 1 - row``.
    ``rows`` broadcasts against ``scores``. NaN ranks last; -0.0 and +0.0 are the same score.
    """
    s = np.asarray(scores, dtype=np.float32) + np.float32(0.0)  # a fresh array; -0.0 -> +0.0
    s[np.isnan(s)] = -np.inf
    bits = s.view(np.int32).astype(np.int64)
    del s
    neg = bits < 0
    bits[neg] ^= 0x7FFFFFFF
    bits <<= 32
    bits |= _LOW32 - np.asarray(rows, dtype=np.int64)
    return bits


def _largest(keys: np.ndarray, k: int) -> np.ndarray:
    """Positions (per row, unordered) of the ``k`` largest keys of each row of a 2-D int64 array."""
    n = keys.shape[1]
    if k >= n:
        return np.broadcast_to(np.arange(n), keys.shape)
    return np.argpartition(keys, n - k, axis=1)[:, n - k:]


def _unit_queries(queries: np.ndarray, store: EmbeddingStore, k: int, chunk_rows: int) -> np.ndarray:
    """Checked, L2-normalised (Q, D) float32 queries; ValueError naming the store for anything unusable."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"empty query: expected a (Q, D) array of query embeddings with Q >= 1, got shape "
                         f"{np.shape(queries)} (searching store {store.path})")
    if k < 1:
        raise ValueError(f"k must be at least 1, got k={k} (searching store {store.path})")
    if k > store.n:
        raise ValueError(f"k={k} is larger than store {store.path}, which holds only {store.n} rows; "
                         f"ask for k <= {store.n}")
    if q.shape[1] != store.dim:
        raise ValueError(f"query dim {q.shape[1]} does not match the dim {store.dim} of store {store.path}; "
                         "was the query embedded (and projected) into this store's space?")
    if not np.isfinite(q).all():
        raise ValueError(f"query embeddings contain NaN or inf (searching store {store.path})")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    if bool((norms == 0).any()):
        bad = np.flatnonzero(norms[:, 0] == 0).tolist()
        raise ValueError(f"query rows {bad[:5]} are all-zero vectors: cosine similarity is undefined for them "
                         f"(searching store {store.path})")
    return np.ascontiguousarray(q / norms, dtype=np.float32)


def _merge_block(qn: np.ndarray, emb: np.ndarray, start: int, k: int, q_group: int,
                 best: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Running top-k (order keys, scores, rows) after one block of store rows ``start .. start + len(emb)``."""
    rows = np.arange(start, start + len(emb), dtype=np.int64)
    new_key, new_score, new_row = [], [], []
    for g in range(0, qn.shape[0], q_group):
        sl = slice(g, g + q_group)
        scores = qn[sl] @ emb.T  # (q, c) float32
        keys = _order_key(scores, rows)
        pos = _largest(keys, k)  # this block's own top-k first: the merge below stays (q, <= 2k)
        cand_key = np.concatenate([best[0][sl], np.take_along_axis(keys, pos, 1)], axis=1)
        cand_score = np.concatenate([best[1][sl], np.take_along_axis(scores, pos, 1)], axis=1)
        cand_row = np.concatenate([best[2][sl], start + pos], axis=1)
        del scores, keys, pos
        keep = _largest(cand_key, k)
        new_key.append(np.take_along_axis(cand_key, keep, 1))
        new_score.append(np.take_along_axis(cand_score, keep, 1))
        new_row.append(np.take_along_axis(cand_row, keep, 1))
    return np.concatenate(new_key), np.concatenate(new_score), np.concatenate(new_row)


def top_k(queries: np.ndarray, store: str | Path | EmbeddingStore, k: int,
          chunk_rows: int = 65536) -> list[list[tuple[str, float]]]:
    """Exact cosine top-k of each query against every row of ``store``.

    ``queries``: (Q, D) (or one (D,) vector). Returns, per query, ``k`` ``(id, score)`` pairs,
    best first; equal scores rank the lower store row first. Queries are L2-normalised here;
    store rows are normalised per block unless the store's ``normalized`` attribute says they
    already are. numpy only (no torch). Peak memory: one block of ``chunk_rows`` rows plus a
    (Q, chunk_rows) score block and its int64 order keys (queries are taken in groups so that
    block stays at most ~4M scores), plus the store's id list, which ``iter_chunks`` loads.
    Scores are float32 matrix products: the same query may score differently in the last bit when
    batched with other queries (BLAS picks kernels by shape).
    """
    store = _open(store)
    k = int(k)
    qn = _unit_queries(queries, store, k, chunk_rows)  # (Q, D), unit rows
    rows_normalized = bool(store.attrs.get("normalized", False))
    n_q = qn.shape[0]
    q_group = max(1, _MAX_BLOCK_ELEMENTS // max(1, min(chunk_rows, store.n)))

    # Running best per query, unordered: order keys, scores, store rows (width grows to k, then stays).
    best = (np.empty((n_q, 0), dtype=np.int64), np.empty((n_q, 0), dtype=np.float32), np.empty((n_q, 0), dtype=np.int64))
    winners: dict[int, str] = {}  # row -> id, for rows that ever made a running top-k
    start = 0
    for ids, block in store.iter_chunks(rows=chunk_rows):
        emb = np.asarray(block, dtype=np.float32)
        if not rows_normalized:
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), np.float32(1e-12))
        best = _merge_block(qn, emb, start, k, q_group, best)
        best_row = best[2]
        for r in np.unique(best_row[best_row >= start]).tolist():
            winners[r] = str(ids[r - start])
        start += len(ids)
        del block, emb  # one block alive while the next is read
        if len(winners) > 4 * k * n_q + _WINNERS_SLACK:  # drop ids that fell out of every running top-k
            keep_rows = set(best_row.ravel().tolist())
            winners = {r: i for r, i in winners.items() if r in keep_rows}
    best_key, best_score, best_row = best
    if start != store.n:
        raise RuntimeError(f"store {store.path} yielded {start} rows, expected {store.n}")
    order = np.argsort(best_key, axis=1)[:, ::-1]  # keys are distinct: no tie for the sort to break
    scores_np = np.take_along_axis(best_score, order, 1)
    rows_np = np.take_along_axis(best_row, order, 1)
    return [[(winners[int(r)], float(s)) for r, s in zip(rows_np[i], scores_np[i])] for i in range(n_q)]


# ---------------------------------------------------------------------------------------------
# Query -> embedding -> projector -> top-k
# ---------------------------------------------------------------------------------------------


def looks_like_image_path(query: str) -> bool:
    """An existing file, or a one-line string ending in an image suffix (e.g. 'photos/cat.jpg')."""
    if "\n" in query or len(query) > 4096:
        return False
    path = Path(query)
    try:
        if path.is_file():
            return True
    except OSError:
        return False
    return path.suffix.lower() in IMAGE_SUFFIXES


def _embed_query(query: str, encoder: Any, where: str) -> np.ndarray:
    """Encode one raw query with a spec or a loaded FrozenEncoder, after checking the modality fits."""
    from encoders.factory import load_encoder
    from encoders.frozen import BadInput, FrozenEncoder
    from encoders.spec import EncoderSpec

    spec = encoder.spec if isinstance(encoder, FrozenEncoder) else EncoderSpec.parse(encoder)
    is_image = looks_like_image_path(query)
    if spec.tower == "text" and is_image:
        raise ValueError(f"query {query!r} looks like an image path but {where} ({spec}) embeds text; "
                         "pass a text query, or use an image-tower encoder and its projector")
    if spec.tower == "image":
        if not is_image:
            raise ValueError(f"query {query!r} looks like text but {where} ({spec}) embeds images; "
                             f"pass the path of an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
        path = Path(query)
        if not path.is_file():
            raise ValueError(f"image query {query!r} does not exist (the source encoder {spec} embeds images)")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"query {query!r} is a file without an image suffix "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))}); the source encoder {spec} embeds images")
    enc = encoder if isinstance(encoder, FrozenEncoder) else load_encoder(spec)
    try:
        return enc.encode_items([query]).numpy().astype(np.float32)
    except BadInput as exc:
        raise ValueError(f"cannot embed query {query!r} with {spec}: {exc}") from None


def _into_target_space(emb: np.ndarray, projector_dir, origin: str, target: EmbeddingStore) -> np.ndarray:
    """(1, D_src) -> (1, D_tgt) through the projector when one is given; dims checked either way."""
    if projector_dir is not None:
        import torch  # only here: searching a store (and querying by stored id) needs no torch

        from projection.align.projector import Projector, load_projector

        proj = projector_dir if isinstance(projector_dir, Projector) else load_projector(projector_dir)
        name = "the given projector" if isinstance(projector_dir, Projector) else f"projector {projector_dir}"
        if proj.cfg.d_in != emb.shape[1]:
            raise ValueError(f"{name} expects {proj.cfg.d_in}-dim source embeddings, but {origin} has "
                             f"{emb.shape[1]} dims; was it trained on this source encoder?")
        if proj.cfg.d_out != target.dim:
            raise ValueError(f"{name} outputs {proj.cfg.d_out}-dim vectors, but target store {target.path} "
                             f"holds {target.dim}-dim embeddings; was it trained for this target encoder?")
        proj.eval()
        with torch.inference_mode():
            emb = proj(torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))).float().numpy()
    elif emb.shape[1] != target.dim:
        raise ValueError(f"{origin} has {emb.shape[1]} dims but target store {target.path} holds "
                         f"{target.dim}-dim embeddings, and no projector_dir was given to map between them")
    return emb


def search(query: str | Path, *, target_store: str | Path | EmbeddingStore,
           projector_dir: str | Path | None = None, source_encoder: Any = None,
           source_store: str | Path | EmbeddingStore | None = None, k: int = 10,
           chunk_rows: int = 16384, ann_min_rows: int | None = ANN_MIN_ROWS) -> SearchResults:
    """Nearest ``k`` rows of ``target_store`` to one query, as ``[(id, score), ...]`` best first.

    The query is, in this order: an id held by ``source_store`` (its stored embedding is used);
    else an image path or a text, embedded by ``source_encoder`` (a spec string, an
    ``EncoderSpec`` or a loaded ``FrozenEncoder``; by default the ``encoder_spec`` recorded in
    ``source_store``). The embedding goes through the projector saved in ``projector_dir`` when one
    is given (source space -> target space), is L2-normalised, and is searched exactly, unless the
    target holds at least ``ann_min_rows`` rows and a FAISS index was built beside it
    (`xmodal build-index`; projection/search/index.py): then the index answers (None: always exact).
    ``chunk_rows`` defaults to 16384 (16 MiB blocks at 256 dims): on a 200k x 256 store that keeps
    peak RSS near 0.6x the store's size, where 65536-row blocks reach about 0.85x. torch is imported
    only when an encoder or a projector is used; a query by stored id without a projector needs none.
    """
    if query is None or not str(query).strip():
        raise ValueError("empty query: pass an image path, a text, or an id of the source store")
    query = str(query)
    target = _open(target_store)
    source = _open(source_store) if source_store is not None else None

    if source is not None and query in source.index:
        emb = source.get([query])
        origin = f"id {query!r} of source store {source.path}"
    else:
        if source_encoder is not None:
            encoder, where = source_encoder, "the source encoder"
        elif source is not None and source.attrs.get("encoder_spec"):
            encoder, where = source.attrs["encoder_spec"], f"the encoder of source store {source.path}"
        elif source is not None:
            raise ValueError(f"query {query!r} is not an id of source store {source.path}, and that store records "
                             "no encoder_spec to embed it with; pass source_encoder")
        else:
            raise ValueError(f"cannot embed query {query!r}: pass source_encoder (an encoder spec) or a "
                             "source_store (whose ids can be queried and whose encoder_spec is used)")
        if projector_dir is not None:
            where = where.replace("the source encoder", "the projector's source encoder")
        emb = _embed_query(query, encoder, where)
        origin = f"the query embedding from {where}"
    emb = emb.reshape(1, -1)

    emb = _into_target_space(emb, projector_dir, origin, target)

    norm = float(np.linalg.norm(emb))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError(f"the query {query!r} embeds to a zero or non-finite vector; cannot search by cosine")
    emb = emb / norm
    ann = None
    if ann_min_rows is not None and target.n >= ann_min_rows:
        from projection.search.index import load_for_store

        ann = load_for_store(target)  # None when no index was built: exact, as below the threshold
    if ann is not None:
        scores, rows = ann.search(emb, k)
        ids = target.ids
        hits = [(str(ids[r]), float(s)) for s, r in zip(scores[0], rows[0]) if r >= 0]
    else:
        hits = top_k(emb, target, k, chunk_rows=chunk_rows)[0]
    return SearchResults(hits, query=query, store=str(target.path), files=_files_of(target, [i for i, _ in hits]),
                         method="exact" if ann is None else f"faiss {ann.plan.factory}")


def _files_of(store: EmbeddingStore, ids: list[str]) -> list[str] | None:
    """The manifest file of each hit (the store's ``manifest_path`` / ``modality``), or None when unknown."""
    manifest, column = store.attrs.get("manifest_path"), store.attrs.get("modality")
    if not manifest or not column or not Path(manifest).is_file():
        return None
    import pandas as pd

    frame = pd.read_csv(manifest, usecols=["id", column], dtype=str) if str(manifest).endswith(".csv") else None
    if frame is None or not looks_like_image_path(str(frame[column].iloc[0])):
        return None  # a text column: the id already says it, and texts make a poor table column
    by_id = dict(zip(frame["id"], frame[column]))
    root = Path(manifest).parent
    return [str(root / by_id[i]) if i in by_id else "" for i in ids]
