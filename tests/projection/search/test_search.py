"""Exact cosine search over a store, and query -> encoder -> projector -> top-k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.store import EmbeddingStore, StoreWriter
from projection.align.config import ProjectorConfig
from projection.align.projector import make_projector, save_projector
from projection.search.exact import SearchResults, looks_like_image_path, search, top_k
from tests_support import TINY_VIT

TEXT_SPEC = f"open_clip:text:{TINY_VIT}?seed=3"
IMAGE_SPEC = f"open_clip:image:{TINY_VIT}?seed=3"


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _store(path: Path, emb: np.ndarray, ids=None, *, normalized=True, encoder_spec="test:none", block=64,
           modality="text") -> EmbeddingStore:
    ids = [f"r{i:04d}" for i in range(len(emb))] if ids is None else ids
    attrs = {"dataset": "t", "modality": modality, "encoder_spec": encoder_spec, "normalized": normalized}
    with StoreWriter(path, dim=emb.shape[1], attrs=attrs, chunk_rows=16) as w:
        for s in range(0, len(emb), block):
            w.append(ids[s:s + block], emb[s:s + block], rows_done=min(s + block, len(emb)))
        w.finish()
    return EmbeddingStore(path)


def _brute(q: np.ndarray, m: np.ndarray, k: int):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    mn = m / np.linalg.norm(m, axis=1, keepdims=True)
    s = qn @ mn.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, 1)


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    rng = np.random.default_rng(0)
    emb = _unit(rng, 300, 24)
    store = _store(tmp_path_factory.mktemp("known") / "t.h5", emb)
    return store, emb


def test_perturbed_stored_vector_finds_itself_and_order_matches_brute_force(known):
    store, emb = known
    rng = np.random.default_rng(1)
    rows = [0, 123, 299]
    q = emb[rows] + 0.05 * rng.standard_normal((3, emb.shape[1])).astype(np.float32)
    got = top_k(q, store, 5)
    order, scores = _brute(q, emb, 5)
    for i, r in enumerate(rows):
        assert got[i][0][0] == f"r{r:04d}"
        assert [h[0] for h in got[i]] == [f"r{j:04d}" for j in order[i]]
        np.testing.assert_allclose([h[1] for h in got[i]], scores[i], atol=1e-5)
        assert all(a[1] >= b[1] for a, b in zip(got[i], got[i][1:]))
    # one (D,) vector is one query (float32 scores may differ in the last bit with the batch shape)
    one = top_k(q[1], store, 5)
    assert len(one) == 1 and [h[0] for h in one[0]] == [h[0] for h in got[1]]
    np.testing.assert_allclose([h[1] for h in one[0]], [h[1] for h in got[1]], atol=1e-6)


def test_chunked_equals_unchunked_and_full_ranking(known, monkeypatch):
    store, emb = known
    q = _unit(np.random.default_rng(2), 6, emb.shape[1])
    whole = top_k(q, store, 10)
    small = top_k(q, store, 10, chunk_rows=7)
    assert [[h[0] for h in r] for r in small] == [[h[0] for h in r] for r in whole]
    np.testing.assert_allclose([[h[1] for h in r] for r in small], [[h[1] for h in r] for r in whole], atol=1e-6)
    # query groups and the pruning of ids that left every top-k change nothing
    import projection.search.exact as ps

    monkeypatch.setattr(ps, "_MAX_BLOCK_ELEMENTS", 10)
    monkeypatch.setattr(ps, "_WINNERS_SLACK", -10**9)  # prune after every block
    grouped = top_k(q, store, 10, chunk_rows=7)
    assert [[h[0] for h in r] for r in grouped] == [[h[0] for h in r] for r in whole]
    monkeypatch.undo()
    full = top_k(q, store, len(store), chunk_rows=7)  # k = n: the whole ranking
    order, _ = _brute(q, emb, len(store))
    assert [[h[0] for h in r] for r in full] == [[f"r{j:04d}" for j in o] for o in order]


def test_unnormalized_store_is_searched_by_cosine(tmp_path):
    rng = np.random.default_rng(3)
    emb = _unit(rng, 50, 8) * rng.uniform(0.1, 10.0, (50, 1)).astype(np.float32)
    store = _store(tmp_path / "u.h5", emb, normalized=False)
    q = rng.standard_normal((4, 8)).astype(np.float32) * 3
    order, scores = _brute(q, emb, 7)
    got = top_k(q, store, 7, chunk_rows=9)
    assert [[h[0] for h in r] for r in got] == [[f"r{j:04d}" for j in o] for o in order]
    np.testing.assert_allclose([[h[1] for h in r] for r in got], scores, atol=1e-5)


def test_ties_rank_the_lower_row_first_whatever_the_chunking(tmp_path):
    d = 4
    emb = np.zeros((40, d), np.float32)
    emb[:, 1] = 1.0  # most rows: e1
    dup = [3, 10, 17, 18, 33]  # duplicates of e0 across chunk boundaries (chunk_rows=7)
    emb[dup] = 0.0
    emb[dup, 0] = 1.0
    store = _store(tmp_path / "ties.h5", emb)
    q = np.eye(d, dtype=np.float32)[:2]
    for chunk in (1, 3, 7, 40, 1000):
        got = top_k(q, store, 7, chunk_rows=chunk)
        assert [h[0] for h in got[0]] == [f"r{i:04d}" for i in dup] + ["r0000", "r0001"], chunk
        assert [h[1] for h in got[0]] == [1.0] * 5 + [0.0, 0.0]
        # all-equal scores: the first rows in store order, ties at the k boundary included
        assert [h[0] for h in got[1]] == ["r0000", "r0001", "r0002", "r0004", "r0005", "r0006", "r0007"], chunk
        assert [h[0] for h in top_k(q, store, 2, chunk_rows=chunk)[0]] == ["r0003", "r0010"]


def test_many_ties_match_a_lexsort_brute_force_for_any_chunking_and_grouping(tmp_path, monkeypatch):
    """Few distinct scores, so ties sit at every k boundary; one-hot queries make each score exact."""
    import projection.search.exact as ps

    rng = np.random.default_rng(7)
    n, d = 257, 5
    emb = rng.integers(-3, 4, (n, d)).astype(np.float32) / 4  # 7 levels, -0.0 included
    emb[rng.choice(n, 9, replace=False), 2] = np.float32(-0.0)
    store = _store(tmp_path / "many.h5", emb)  # "normalized": rows are used as stored
    q = np.eye(d, dtype=np.float32)
    for k in (1, 5, 40, n):
        expect = [np.lexsort((np.arange(n), -(emb[:, j] + 0.0)))[:k] for j in range(d)]
        for chunk in (1, 16, 50, 256, 10_000):
            for max_block in (ps._MAX_BLOCK_ELEMENTS, 1):
                monkeypatch.setattr(ps, "_MAX_BLOCK_ELEMENTS", max_block)
                got = top_k(q, store, k, chunk_rows=chunk)
                assert [[h[0] for h in r] for r in got] == [[f"r{i:04d}" for i in e] for e in expect], (k, chunk)
                assert [[h[1] for h in r] for r in got] == [emb[e, j].tolist() for j, e in enumerate(expect)]


def test_order_key_ranks_score_descending_then_row_ascending():
    from projection.search.exact import _order_key

    scores = np.array([-np.inf, -1.5, -0.0, 0.0, 1e-30, 2.0, np.inf, np.nan, 2.0], np.float32)
    rows = np.arange(len(scores))
    ranked = rows[np.argsort(_order_key(scores, rows))[::-1]]
    assert ranked.tolist() == [6, 5, 8, 4, 2, 3, 1, 0, 7]  # NaN last; -0.0 ties +0.0 (lower row first)


def test_search_module_and_top_k_do_not_import_torch(known):
    """torch alone costs hundreds of MB of RSS: top_k (and a query by stored id) must not pull it in."""
    import subprocess
    import sys

    store, _ = known
    root = Path(__file__).resolve().parents[3]
    code = ("import sys; import projection.search.exact as ps; assert 'torch' not in sys.modules, 'import'; "
            "import numpy as np; from encoders.store import EmbeddingStore; "
            f"st = EmbeddingStore({str(store.path)!r}); "
            "hits = ps.top_k(st.get(['r0007']), st, 3, chunk_rows=64); assert hits[0][0][0] == 'r0007', hits; "
            "res = ps.search('r0042', target_store=st, source_store=st, k=2); assert res[0][0] == 'r0042', res; "
            "assert 'torch' not in sys.modules, 'top_k/search'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_top_k_errors_name_the_store_and_numbers(known):
    store, emb = known
    q = emb[:2]
    with pytest.raises(ValueError, match="k must be at least 1, got k=0"):
        top_k(q, store, 0)
    with pytest.raises(ValueError, match=rf"k=301 is larger than store .*t\.h5, which holds only 300 rows"):
        top_k(q, store, 301)
    with pytest.raises(ValueError, match=r"query dim 23 does not match the dim 24 of store .*t\.h5"):
        top_k(q[:, :23], store, 3)
    with pytest.raises(ValueError, match="empty query"):
        top_k(np.zeros((0, 24), np.float32), store, 3)
    with pytest.raises(ValueError, match="all-zero"):
        top_k(np.zeros((1, 24), np.float32), store, 3)
    with pytest.raises(ValueError, match="NaN"):
        top_k(np.full((1, 24), np.nan, np.float32), store, 3)


def test_results_print_as_a_table():
    res = SearchResults([("a", 0.91234), ("longer-id", -0.5)])
    assert res == [("a", 0.91234), ("longer-id", -0.5)]
    assert res.records() == [{"rank": 1, "id": "a", "score": 0.91234}, {"rank": 2, "id": "longer-id", "score": -0.5}]
    lines = res.table().splitlines()
    assert lines[0].split() == ["rank", "id", "score"]
    assert lines[2].split() == ["1", "a", "0.9123"] and lines[3].split() == ["2", "longer-id", "-0.5000"]


# ---------------------------------------------------------------------------------------------
# search(): encoder + projector end to end
# ---------------------------------------------------------------------------------------------

TEXTS = ["a photo of a cat", "a photo of a dog", "a handwritten digit seven", "a red car on a road",
         "two birds in the sky", "a bowl of soup", "the number zero", "a mountain at night"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny text encoder -> saved projector (64 -> 32) -> a target store of projected texts."""
    from encoders.factory import load_encoder

    d = tmp_path_factory.mktemp("world")
    enc = load_encoder(TEXT_SPEC)
    src = enc.encode_items(TEXTS).numpy()
    proj = make_projector(ProjectorConfig(kind="mlp", d_in=enc.dim, d_out=32, hidden=48), seed=0).eval()
    save_projector(proj, d / "proj")
    with torch.inference_mode():
        tgt = proj(torch.from_numpy(src)).numpy()
    tgt /= np.linalg.norm(tgt, axis=1, keepdims=True)
    ids = [f"t{i}" for i in range(len(TEXTS))]
    target = _store(d / "target.h5", tgt, ids, modality="image")
    source = _store(d / "source.h5", src, ids, encoder_spec=enc.spec.identity)
    img = d / "query.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
    return {"dir": d, "enc": enc, "proj": d / "proj", "target": target, "source": source, "src": src,
            "tgt": tgt, "img": img}


def test_end_to_end_text_query_through_projector(world):
    hits = search(TEXTS[3], target_store=world["target"].path, projector_dir=world["proj"],
                  source_encoder=TEXT_SPEC, k=3)
    assert isinstance(hits, SearchResults) and len(hits) == 3
    assert hits[0][0] == "t3" and hits[0][1] == pytest.approx(1.0, abs=1e-4)
    _, expect = _brute(world["tgt"][3:4], world["tgt"], 3)
    np.testing.assert_allclose([s for _, s in hits], expect[0], atol=1e-4)
    # a loaded encoder works too, and the same ranking comes back
    again = search(TEXTS[3], target_store=world["target"], projector_dir=world["proj"],
                   source_encoder=world["enc"], k=3)
    assert [i for i, _ in again] == [i for i, _ in hits]


def test_query_by_source_id_and_default_encoder_from_source_store(world):
    by_id = search("t5", target_store=world["target"], projector_dir=world["proj"], source_store=world["source"], k=2)
    assert by_id[0][0] == "t5" and by_id[0][1] == pytest.approx(1.0, abs=1e-5)
    # not an id: embedded with the encoder recorded in the source store
    by_text = search(TEXTS[6], target_store=world["target"], projector_dir=world["proj"],
                     source_store=world["source"], k=1)
    assert by_text[0][0] == "t6"
    with pytest.raises(ValueError, match="pass source_encoder"):
        search("t5", target_store=world["target"], projector_dir=world["proj"])


def test_image_query_with_image_encoder(world, tmp_path):
    from encoders.factory import load_encoder

    enc = load_encoder(IMAGE_SPEC)
    paths = []
    for i in range(5):
        p = tmp_path / f"im{i}.jpg"
        Image.fromarray(np.random.default_rng(10 + i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p, quality=95)
        paths.append(str(p))
    store = _store(tmp_path / "img.h5", enc.encode_items(paths).numpy(), [f"i{i}" for i in range(5)],
                   encoder_spec=enc.spec.identity, modality="image")
    hits = search(paths[2], target_store=store, source_encoder=enc, k=5)
    assert hits[0] == ("i2", pytest.approx(1.0, abs=1e-5))
    with pytest.raises(ValueError, match="looks like text but the source encoder .* embeds images"):
        search("a photo of a cat", target_store=store, source_encoder=enc)
    with pytest.raises(ValueError, match="does not exist"):
        search(str(tmp_path / "nope.png"), target_store=store, source_encoder=enc)


def test_search_errors(world):
    t, p = world["target"], world["proj"]
    for q in ("", "   \n\t", None):
        with pytest.raises(ValueError, match="empty query"):
            search(q, target_store=t, projector_dir=p, source_encoder=TEXT_SPEC)
    with pytest.raises(ValueError, match="looks like an image path but the projector's source encoder .* embeds text"):
        search(str(world["img"]), target_store=t, projector_dir=p, source_encoder=world["enc"])
    with pytest.raises(ValueError, match="looks like an image path"):
        search("holiday/beach.JPG", target_store=t, projector_dir=p, source_encoder=world["enc"])
    with pytest.raises(ValueError, match=r"k=9 is larger than store .*target\.h5, which holds only 8 rows"):
        search(TEXTS[0], target_store=t, projector_dir=p, source_encoder=world["enc"], k=9)
    # projector / store dimension mismatches name the projector dir and the store
    wrong_in = save_projector(make_projector(ProjectorConfig(kind="linear", d_in=16, d_out=32), 0), world["dir"] / "p16")
    with pytest.raises(ValueError, match=r"projector .*p16 expects 16-dim source embeddings, but .* has 64 dims"):
        search(TEXTS[0], target_store=t, projector_dir=wrong_in, source_encoder=world["enc"])
    wrong_out = save_projector(make_projector(ProjectorConfig(kind="linear", d_in=64, d_out=20), 0), world["dir"] / "p20")
    with pytest.raises(ValueError, match=r"projector .*p20 outputs 20-dim vectors, but target store .*target\.h5 holds 32"):
        search(TEXTS[0], target_store=t, projector_dir=wrong_out, source_encoder=world["enc"])
    with pytest.raises(ValueError, match=r"has 64 dims but target store .*target\.h5 holds 32-dim .* no projector_dir"):
        search(TEXTS[0], target_store=t, source_encoder=world["enc"])


def test_looks_like_image_path(tmp_path):
    assert looks_like_image_path("x/y.PNG") and looks_like_image_path("cat.jpeg")
    assert not looks_like_image_path("a photo of a cat") and not looks_like_image_path("line one\nline two.png")
    f = tmp_path / "noext"
    f.write_text("x")
    assert looks_like_image_path(str(f))  # an existing file is never taken for text


def test_results_name_the_gallery_files_from_the_stores_manifest(tmp_path):
    rng = np.random.default_rng(5)
    emb = _unit(rng, 30, 8)
    ids = [f"p{i:02d}" for i in range(30)]
    import pandas as pd

    pd.DataFrame({"id": ids, "image": [f"images/{i}.png" for i in ids]}).to_csv(tmp_path / "manifest.csv", index=False)
    attrs = {"dataset": "t", "modality": "image", "encoder_spec": "test:none", "normalized": True,
             "manifest_path": str(tmp_path / "manifest.csv")}
    with StoreWriter(tmp_path / "g.h5", dim=8, attrs=attrs) as w:
        w.append(ids, emb, rows_done=30)
        w.finish()
    res = search("p07", target_store=tmp_path / "g.h5", source_store=tmp_path / "g.h5", k=3)
    assert res[0][0] == "p07" and res.files[0] == str(tmp_path / "images" / "p07.png")
    assert res.records()[0]["file"] == res.files[0] and str(tmp_path / "images" / "p07.png") in res.table().splitlines()[2]
