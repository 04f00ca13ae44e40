import numpy as np
import pytest
import torch

from projection.align.data import ArrayReader, ChunkedPairs, InMemoryPairs, load_split, make_split, save_split


def test_split_sizes_disjoint_and_deterministic():
    ids = [f"img_{i}" for i in range(1000)]
    s = make_split(ids, val_frac=0.1, test_frac=0.2, seed=3)
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (700, 100, 200)
    assert sorted(np.concatenate(list(s.values())).tolist()) == list(range(1000))
    again = make_split(ids, 0.1, 0.2, 3)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    other = make_split(ids, 0.1, 0.2, 4)
    assert not np.array_equal(s["test"], other["test"])


def test_split_stable_under_row_order():
    ids = np.arange(500) * 7
    s = make_split(ids, 0.1, 0.1, 0)
    perm = np.random.default_rng(0).permutation(500)
    shuffled = ids[perm]
    s2 = make_split(shuffled, 0.1, 0.1, 0)
    for k in s:
        assert set(ids[s[k]].tolist()) == set(shuffled[s2[k]].tolist())


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_split_roundtrip(tmp_path, suffix):
    ids = [f"x{i}" for i in range(50)]
    s = make_split(ids, 0.2, 0.2, 1)
    path = save_split(ids, s, tmp_path / f"split{suffix}")
    back = load_split(path, ids)
    assert all(np.array_equal(s[k], back[k]) for k in s)
    rev = ids[::-1]
    back_rev = load_split(path, rev)
    assert set(rev[i] for i in back_rev["test"]) == set(ids[i] for i in s["test"])
    with pytest.raises(ValueError, match="'nope'"):
        load_split(path, ids + ["nope"])


def test_split_rejects_duplicates():
    with pytest.raises(ValueError, match="unique"):
        make_split(["a", "b", "a"])


def test_nan_row_named():
    x = np.zeros((5, 3), np.float32)
    y = np.zeros((5, 2), np.float32)
    y[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"target 'text_store'.*row 3 \(id 'd'\)"):
        InMemoryPairs(x, y, ids=list("abcde"), source_name="img_store", target_name="text_store")
    x[1, 0] = np.inf
    with pytest.raises(ValueError, match=r"source 'img_store'.*row 1"):
        InMemoryPairs(x, y, source_name="img_store", target_name="text_store")


def test_nan_row_named_chunked():
    x = np.zeros((20, 3), np.float32)
    y = np.zeros((20, 2), np.float32)
    x[13, 2] = np.nan
    pairs = ChunkedPairs(ArrayReader(x, y), chunk_rows=5, source_name="src.h5")
    with pytest.raises(ValueError, match=r"source 'src.h5'.*row 13"):
        list(pairs.batches(4))


def test_mismatched_counts():
    with pytest.raises(ValueError, match=r"'a' has 4 rows, 'b' has 5"):
        InMemoryPairs(np.zeros((4, 2)), np.zeros((5, 2)), source_name="a", target_name="b")

    class BadReader:
        def __len__(self):
            return 4

        def read_rows(self, start, stop):
            return np.zeros((stop - start, 2)), np.zeros((stop - start + 1, 2))

    with pytest.raises(ValueError, match="row count mismatch"):
        ChunkedPairs(BadReader(), 2)


def test_dim_mismatch_named():
    pairs = InMemoryPairs(np.zeros((4, 3)), np.zeros((4, 2)), source_name="clip_img", target_name="e5_text")
    pairs.check_dims(3, 2)
    with pytest.raises(ValueError, match=r"source 'clip_img' has dim 3 but the projector expects d_in=512"):
        pairs.check_dims(512, 2)
    with pytest.raises(ValueError, match=r"target 'e5_text' has dim 2 but the projector expects d_out=768"):
        pairs.check_dims(3, 768)


def test_in_memory_batches_cover_each_row_once():
    x = np.arange(11, dtype=np.float32)[:, None]
    pairs = InMemoryPairs(x, x * 2)
    got = torch.cat([xb for xb, _ in pairs.batches(3, torch.Generator().manual_seed(0))]).squeeze(1)
    assert sorted(got.tolist()) == list(range(11))  # 3+3+3+2: a partial last batch of 2 is kept
    seq = torch.cat([xb for xb, _ in pairs.batches(3)]).squeeze(1)
    assert seq.tolist() == list(range(11))
    # the loop's one last-batch rule (projection/engine/loop.py): a last batch of a single row is dropped
    ten = InMemoryPairs(x[:10], x[:10] * 2)
    sizes = [len(xb) for xb, _ in ten.batches(3, torch.Generator().manual_seed(0))]
    assert sizes == [3, 3, 3]
    sub = pairs.subset([1, 4])
    assert sub.x.squeeze(1).tolist() == [1, 4] and sub.y.squeeze(1).tolist() == [2, 8]


@pytest.mark.parametrize("chunk_rows, batch, keep", [(5, 4, None), (3, 8, None), (7, 3, [0, 1, 4, 5, 6, 9, 12, 13, 20, 21, 22])])
def test_chunked_batches_are_the_shuffled_chunks_end_to_end(chunk_rows, batch, keep):
    """The batches cut the stream of shuffled chunks (chunk order, then rows within each, from the one
    generator) into consecutive pieces, across chunk edges, whether a chunk is longer or shorter than a
    batch: what concatenating the carry with each whole chunk gave, without copying the chunk."""
    n = 23
    x = np.arange(n, dtype=np.float32)[:, None]
    pairs = ChunkedPairs(ArrayReader(x, -x), chunk_rows=chunk_rows, indices=keep)
    got = [xb.squeeze(1).tolist() for xb, _ in pairs.batches(batch, torch.Generator().manual_seed(3))]
    gen = torch.Generator().manual_seed(3)
    stream = []
    for c in torch.randperm(len(pairs.chunks), generator=gen).tolist():
        start, stop = pairs.chunks[c]
        rows = [r for r in range(start, stop) if keep is None or r in keep]
        stream += [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]
    want = [stream[s : s + batch] for s in range(0, len(stream), batch)]
    assert got == (want if len(want[-1]) > 1 else want[:-1])  # the last-batch rule drops a 1-row batch


def test_chunked_batches_deterministic_full_and_filtered():
    n = 23
    x = np.arange(n, dtype=np.float32)[:, None]
    pairs = ChunkedPairs(ArrayReader(x, -x), chunk_rows=5)
    assert (pairs.d_in, pairs.d_out, len(pairs), pairs.num_batches(4)) == (1, 1, 23, 6)

    def epoch(seed, p=pairs):
        bs = list(p.batches(4, torch.Generator().manual_seed(seed)))
        for xb, yb in bs:
            assert torch.equal(yb, -xb)  # pairs stay aligned
        return bs

    a, b = epoch(0), epoch(0)
    assert [len(xb) for xb, _ in a] == [4, 4, 4, 4, 4, 3]  # leftovers carried across chunks
    assert all(torch.equal(u[0], v[0]) for u, v in zip(a, b))
    rows = torch.cat([xb for xb, _ in a]).squeeze(1).tolist()
    assert sorted(rows) == list(range(n)) and rows != list(range(n))
    assert rows != torch.cat([xb for xb, _ in epoch(1)]).squeeze(1).tolist()
    keep = [0, 3, 7, 8, 21, 22]
    filt = ChunkedPairs(ArrayReader(x, -x), chunk_rows=5, indices=keep)
    assert len(filt) == 6
    assert sorted(torch.cat([xb for xb, _ in epoch(2, filt)]).squeeze(1).tolist()) == keep
