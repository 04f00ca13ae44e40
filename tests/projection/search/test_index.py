"""The FAISS index beside a store: the choice by size and memory, recall against exact, the sidecar, staleness."""

from __future__ import annotations

import json

import numpy as np
import pytest

from encoders.store import EmbeddingStore, StoreWriter
from projection.search.exact import search, top_k
from projection.search.index import (build_for_store, choose_index, exact_rows, index_paths, load_for_store,
                                     recall_at_k, unit_rows)


def _clustered(seed: int, n: int, centres: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return unit_rows(centres[rng.integers(0, len(centres), n)] + 0.6 * rng.standard_normal((n, centres.shape[1])))


def _write(path, emb, ids=None):
    ids = ids or [f"v{i:05d}" for i in range(len(emb))]
    attrs = {"dataset": "t", "modality": "image", "encoder_spec": "test:none", "normalized": True}
    with StoreWriter(path, dim=emb.shape[1], attrs=attrs, chunk_rows=1024, overwrite=True) as w:
        for s in range(0, len(emb), 5000):
            w.append(ids[s:s + 5000], emb[s:s + 5000], rows_done=min(s + 5000, len(emb)))
        w.finish()
    return EmbeddingStore(path)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    centres = np.random.default_rng(0).standard_normal((60, 32)).astype(np.float32)
    store = _write(tmp_path_factory.mktemp("ann") / "g.h5", _clustered(1, 20_000, centres))
    side = build_for_store(store, flat_below=1000)
    return store, side, centres


def test_the_index_is_chosen_by_size_and_memory():
    assert choose_index(50_000, 384).kind == "flat"  # below the threshold: exact
    p = choose_index(1_000_000, 128)
    assert (p.kind, p.nlist, p.factory) == ("ivf_flat", 4096, "IVF4096,Flat") and p.train_rows == 40 * 4096
    pq = choose_index(10_000_000, 768, memory_bytes=2 * 2**30)  # 29 GiB of rows into 2 GiB
    assert pq.kind == "ivf_pq" and 768 % pq.pq_m == 0 and pq.est_bytes <= 2 * 2**30
    assert choose_index(1_000_000, 128, kind="hnsw").factory == "HNSW32,Flat"


def test_saved_index_reaches_the_recall_target_on_new_queries_and_says_how_it_was_built(indexed):
    store, side, centres = indexed
    path, sidecar = index_paths(store.path)
    assert path.is_file() and json.loads(sidecar.read_text()) == side
    assert side["plan"]["kind"] == "ivf_flat" and side["tuning"]["recall_at_k"] >= 0.95
    assert side["index_bytes"] == path.stat().st_size and side["source"]["n"] == 20_000
    ann = load_for_store(store)
    queries = _clustered(9, 200, centres)  # not stored rows
    exact = top_k(queries, store, 10)
    truth = np.array([[store.index[i] for i, _ in row] for row in exact])
    _, rows = ann.search(queries, 10)
    assert recall_at_k(rows, truth) >= 0.95
    # the in-memory exact path the service uses agrees with the streamed one
    assert recall_at_k(exact_rows(queries, unit_rows(store.embeddings()), 10)[1], truth) == 1.0


def test_search_uses_the_index_above_the_threshold_and_exact_below(indexed):
    store, _, _ = indexed
    via_index = search("v00042", target_store=store, source_store=store, k=5, ann_min_rows=1000)
    exact = search("v00042", target_store=store, source_store=store, k=5, ann_min_rows=None)
    assert via_index.method.startswith("faiss IVF") and exact.method == "exact"
    assert via_index[0][0] == exact[0][0] == "v00042"


def test_an_index_of_an_older_store_is_refused_in_one_line(tmp_path):
    centres = np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32)
    path = tmp_path / "s.h5"
    build_for_store(_write(path, _clustered(1, 2000, centres)), flat_below=100)
    store = _write(path, _clustered(2, 2500, centres))  # the store is rebuilt, the index is not
    with pytest.raises(ValueError, match=r"built from another version of store .* rebuild it: xmodal build-index"):
        load_for_store(store)
