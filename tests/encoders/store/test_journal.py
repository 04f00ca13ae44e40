"""The partial store's commit protocol: what a resume keeps, truncates and refuses; the assembled
final store is checked byte for byte against the commit record before it counts as complete."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from encoders.store import EmbeddingStore, StoreError, StoreWriter
from encoders.store.format import partial_dir

ATTRS = {"encoder_spec": "x", "weights_digest": "w", "manifest_digest": "m", "normalized": False}


def _rows(lo: int, hi: int) -> tuple[list[str], np.ndarray]:
    return [f"id{i}-ü" for i in range(lo, hi)], np.arange(lo * 4, hi * 4, dtype=np.float32).reshape(-1, 4)


def _write(path, batches, finish=False):
    with StoreWriter(path, dim=4, attrs=ATTRS) as w:
        for lo, hi in batches:
            w.append(*_rows(lo, hi), rows_done=hi, errors=[(f"bad{hi}", "why ü")])
        if finish:
            w.finish()
        return w.resumed_rows


def test_bytes_past_the_commit_record_are_dropped_and_the_resume_ends_identical(tmp_path):
    store, ref = tmp_path / "s.h5", tmp_path / "ref.h5"
    _write(ref, [(0, 3), (3, 6), (6, 9)], finish=True)
    _write(store, [(0, 3), (3, 6)])
    part = partial_dir(store)
    for name in ("embeddings.bin", "ids.jsonl", "errors.jsonl"):  # a batch that was written, never committed
        with open(part / name, "ab") as f:
            f.write(b"torn half batch")
    (part / "commit.json.tmp").write_text("{half a record")  # killed while writing the next record
    assert EmbeddingStore(store, allow_incomplete=True).n == 6  # readers see only committed rows
    assert _write(store, [(6, 9)], finish=True) == 6
    a, b = EmbeddingStore(ref), EmbeddingStore(store)
    assert list(a.ids) == list(b.ids) and a.embeddings().tobytes() == b.embeddings().tobytes()
    assert a.errors().equals(b.errors()) and not part.exists()


@pytest.mark.parametrize("damage", ["flip a committed byte", "cut a committed byte", "record unreadable"])
def test_a_partial_store_that_does_not_check_out_is_refused_in_one_line_and_kept(tmp_path, damage):
    store = tmp_path / "s.h5"
    _write(store, [(0, 3), (3, 6)])
    part = partial_dir(store)
    emb = part / "embeddings.bin"
    if damage == "flip a committed byte":
        data = bytearray(emb.read_bytes())
        data[-5] ^= 0xFF
        emb.write_bytes(bytes(data))
    elif damage == "cut a committed byte":
        os.truncate(emb, emb.stat().st_size - 1)
    else:
        (part / "commit.json").write_text("{")
    before = {p.name: p.read_bytes() for p in part.iterdir()}
    with pytest.raises(StoreError, match=r"partial store .*s\.h5\.partial is damaged.*refresh") as err:
        _write(store, [(6, 9)])
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in part.iterdir()} == before  # never silently restarted
    with StoreWriter(store, dim=4, attrs=ATTRS, overwrite=True) as w:  # what the message says to do
        assert w.rows_done == 0


def test_assembly_refuses_raw_files_that_differ_from_their_record(tmp_path):
    """The final store is checked against every committed byte, not only the last batch."""
    store = tmp_path / "s.h5"
    with StoreWriter(store, dim=4, attrs=ATTRS) as w:
        w.append(*_rows(0, 3), rows_done=3)
        w.append(*_rows(3, 6), rows_done=6)
        emb = partial_dir(store) / "embeddings.bin"
        data = bytearray(emb.read_bytes())
        data[0] ^= 0xFF  # the FIRST batch, which a resume does not re-check
        emb.write_bytes(bytes(data))
        with pytest.raises(StoreError, match=r"failed its verification .*embeddings\.bin.*refresh"):
            w.finish()
    assert not store.exists() and not store.with_name("s.h5.tmp").exists()
    assert partial_dir(store).exists()


def test_final_store_layout_and_the_commit_record(tmp_path):
    store = tmp_path / "s.h5"
    _write(store, [(0, 3)])
    rec = json.loads((partial_dir(store) / "commit.json").read_text())
    assert (rec["n"], rec["n_errors"], rec["rows_done"]) == (3, 1, 3)
    assert rec["files"]["embeddings.bin"]["length"] == 3 * 4 * 4 and rec["attrs"]["encoder_spec"] == "x"
    _write(store, [(3, 5)], finish=True)
    with h5py.File(store, "r") as f:
        assert list(f["ids"].asstr()[()]) == [f"id{i}-ü" for i in range(5)]
        assert f["embeddings"].maxshape == (None, 4) and f["embeddings"].chunks == (256, 4)
        assert list(f["errors/ids"].asstr()[()]) == ["bad3", "bad5"]
        assert f.attrs["complete"] and (f.attrs["n"], f.attrs["n_errors"], f.attrs["rows_done"]) == (5, 2, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5", "s.h5.lock"]
