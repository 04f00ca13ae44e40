"""Extraction into the HDF5 store: layout, fidelity, bad input, resumability, exclusivity."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from encoders.extract import ExtractionError, extract
from encoders.factory import load_encoder
from encoders.manifest import Manifest, ManifestError
from encoders.store import EmbeddingStore, StoreError, StoreLocked, StoreWriter, join_stores

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image_encoder(tiny_clip_files):
    return load_encoder(f"open_clip:image:{tiny_clip_files['json']}@{tiny_clip_files['safetensors']}?batch_size=8")


@pytest.fixture(scope="module")
def text_encoder(tiny_clip_files):
    return load_encoder(f"open_clip:text:{tiny_clip_files['json']}?batch_size=16")


def _image_manifest(tmp_path, write_images, n=20) -> Path:
    paths = write_images(tmp_path / "imgs", n)
    m = tmp_path / "manifest.csv"
    pd.DataFrame({"id": [f"s{i:03d}" for i in range(n)], "image": paths}).to_csv(m, index=False)
    return m


def test_store_layout_attributes_and_read_back_equal_direct_encoding(tmp_path, write_images, image_encoder):
    m = _image_manifest(tmp_path, write_images)
    s = extract(Manifest.read(m), "image", image_encoder, tmp_path / "s.h5")
    assert (s.n, s.n_errors, s.dim) == (20, 0, 64)
    with h5py.File(tmp_path / "s.h5") as f:
        assert f["ids"].dtype.kind == "O" and h5py.check_string_dtype(f["ids"].dtype).encoding == "utf-8"
        assert f["embeddings"].shape == (20, 64) and f["embeddings"].dtype == np.float32
        assert f["embeddings"].chunks is not None and f["embeddings"].maxshape == (None, 64)
        a = f.attrs
        for key in ("encoder_spec", "weights_digest", "dim", "dtype", "normalized", "manifest_digest",
                    "library_versions", "created", "complete"):
            assert key in a, key
        assert a["complete"] and a["dim"] == 64 and a["weights_origin"] == "checkpoint"
        assert a["weights_digest"] == image_encoder.digest
        assert "torch" in json.loads(a["library_versions"])
    store = EmbeddingStore(tmp_path / "s.h5")
    frame = pd.read_csv(m)
    assert list(store.ids) == list(frame["id"])
    direct = image_encoder.encode_items([str(tmp_path / p) for p in frame["image"]]).numpy()
    np.testing.assert_allclose(store.embeddings(), direct, atol=1e-6)
    # chunks, fetch by id, float16 stores
    assert sum(len(i) for i, _ in store.iter_chunks(rows=7)) == 20
    np.testing.assert_allclose(store.get(["s005", "s001"]), direct[[5, 1]], atol=1e-6)
    with pytest.raises(KeyError, match="nope"):
        store.get(["nope"])
    extract(Manifest.read(m), "image", image_encoder, tmp_path / "h.h5", store_dtype="float16")
    half = EmbeddingStore(tmp_path / "h.h5")
    assert half.attrs["dtype"] == "float16"
    np.testing.assert_allclose(half.embeddings(), direct, atol=2e-3)


def test_each_bad_input_kind_is_a_named_error_row_or_a_clear_exception(tmp_path, write_images, image_encoder, text_encoder):
    paths = write_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    frame = pd.DataFrame({
        "id": ["a", "b", "c", "d", "b", "f", "g"],
        "image": [paths[0], "imgs/missing.png", "imgs/corrupt.png", paths[1], paths[2], paths[3], paths[4]],
        "caption": ["a cat", "a dog", "   ", "a bird", "a fish", "", "a cow"],
    })
    m = tmp_path / "manifest.csv"
    frame.to_csv(m, index=False)
    s = extract(Manifest.read(m), "image", image_encoder, tmp_path / "img.h5")
    assert [i for i, _ in s.errors] == ["b", "c", "b"] and s.n == 4  # in manifest row order
    (_, missing), (_, corrupt), (_, dup) = s.errors
    assert "missing file" in missing and "imgs/missing.png" in missing
    assert "corrupt image" in corrupt and "corrupt.png" in corrupt
    assert dup == "duplicate id (first at row 1)"
    assert list(EmbeddingStore(tmp_path / "img.h5").ids) == ["a", "d", "f", "g"]
    table = pd.read_csv(s.errors_csv)
    assert {"id", "reason", "column"} <= set(table.columns) and len(table) == 3  # missing, corrupt, duplicate
    assert table["reason"].str.contains("duplicate id \\(first at row 1\\)").sum() == 1

    t = extract(Manifest.read(m), "caption", text_encoder, tmp_path / "txt.h5")
    reasons = pd.read_csv(t.errors_csv).set_index("id")["reason"]
    assert reasons["c"] == "empty caption" and reasons["f"] == "empty caption"
    assert "duplicate" in reasons["b"] and t.n == 4

    with pytest.raises(ExtractionError, match=r"row 4, id 'b', column 'image': duplicate id"):
        extract(Manifest.read(m), "image", image_encoder, tmp_path / "fail.h5", on_error="fail")
    ok = frame.drop(index=4)
    ok.to_csv(m, index=False)
    with pytest.raises(ExtractionError, match=r"row 1, id 'b', column 'image': missing file"):
        extract(Manifest.read(m), "image", image_encoder, tmp_path / "fail.h5", on_error="fail", batch_size=1)
    # what was done before the bad row is kept, and the store is marked incomplete
    partial = EmbeddingStore(tmp_path / "fail.h5", allow_incomplete=True)
    assert list(partial.ids) == ["a"] and not partial.attrs["complete"]
    with pytest.raises(StoreError, match="incomplete"):
        EmbeddingStore(tmp_path / "fail.h5")
    with pytest.raises(ManifestError, match="no column 'sound'"):
        Manifest.read(m).require("sound")


def test_a_second_writer_waits_then_gives_up_in_one_clear_line(tmp_path):
    attrs = {"encoder_spec": "x", "weights_digest": "d", "manifest_digest": "m", "normalized": True}
    with StoreWriter(tmp_path / "s.h5", dim=4, attrs=attrs):
        with pytest.raises(StoreLocked, match=rf"being written by pid {os.getpid()}; gave up after waiting 0.5 s") as err:
            with StoreWriter(tmp_path / "s.h5", dim=4, attrs=attrs, wait=0.5):
                pass
        assert "\n" not in str(err.value)


def test_complete_store_for_other_inputs_is_not_overwritten(tmp_path, write_images, image_encoder, text_encoder):
    m = _image_manifest(tmp_path, write_images, n=4)
    extract(Manifest.read(m), "image", image_encoder, tmp_path / "s.h5")
    again = extract(Manifest.read(m), "image", image_encoder, tmp_path / "s.h5")
    assert again.reused
    frame = pd.read_csv(m)
    frame.loc[0, "id"] = "changed"
    frame.to_csv(m, index=False)
    with pytest.raises(StoreError, match="other inputs"):
        extract(Manifest.read(m), "image", image_encoder, tmp_path / "s.h5")


def test_join_stores_aligns_by_id_and_names_stores_on_failure(tmp_path, text_encoder):
    a = tmp_path / "a.csv"
    b = tmp_path / "b.csv"
    pd.DataFrame({"id": ["x", "y", "z"], "t": ["one", "two", "three"]}).to_csv(a, index=False)
    pd.DataFrame({"id": ["z", "q", "x"], "t": ["three", "four", "one"]}).to_csv(b, index=False)
    extract(Manifest.read(a), "t", text_encoder, tmp_path / "a.h5")
    extract(Manifest.read(b), "t", text_encoder, tmp_path / "b.h5")
    pair = join_stores(tmp_path / "a.h5", tmp_path / "b.h5")
    assert list(pair.ids) == ["x", "z"] and (pair.dropped_source, pair.dropped_target) == (1, 1)
    x, y = pair.arrays()
    # same texts, same encoder (batches composed differently, so equal up to float rounding)
    np.testing.assert_allclose(x, y, atol=1e-6)
    with pytest.raises(StoreError, match="do not hold the same ids"):
        join_stores(tmp_path / "a.h5", tmp_path / "b.h5", require_same_ids=True)
    c = tmp_path / "c.csv"
    pd.DataFrame({"id": ["k"], "t": ["five"]}).to_csv(c, index=False)
    extract(Manifest.read(c), "t", text_encoder, tmp_path / "c.h5")
    with pytest.raises(StoreError, match=r"a\.h5 and .*c\.h5 share no ids"):
        join_stores(tmp_path / "a.h5", tmp_path / "c.h5")


CHILD = r"""
import sys, time
sys.path.insert(0, {root!r})
from encoders.extract import extract
from encoders.factory import load_encoder
from encoders.manifest import Manifest
enc = load_encoder({spec!r})
def progress(done, total):
    print(done, flush=True)
    time.sleep(0.01)
extract(Manifest.read({manifest!r}), "text", enc, {store!r}, progress=progress)
print("done", flush=True)
"""


def _run_child(code: str, kill_after_rows: int | None, delay: float) -> int:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if kill_after_rows is not None and line.strip().isdigit() and int(line) >= kill_after_rows:
            import time

            time.sleep(delay)  # land the kill at a random point of the next batch
            os.kill(proc.pid, signal.SIGKILL)
            break
    return proc.wait()


def test_kill_9_then_rerun_gives_identical_store(tmp_path, tiny_clip_files):
    n = 1200
    m = tmp_path / "manifest.csv"
    pd.DataFrame({"id": [f"t{i:05d}" for i in range(n)], "text": [f"item {i} of {n}" for i in range(n)]}).to_csv(m, index=False)
    spec = f"open_clip:text:{tiny_clip_files['json']}?batch_size=16"
    ref = tmp_path / "ref.h5"
    extract(Manifest.read(m), "text", load_encoder(spec), ref)
    store = tmp_path / "killed.h5"
    code = CHILD.format(root=str(ROOT), spec=spec, manifest=str(m), store=str(store))
    rng = random.Random(0)
    seen = []
    for target in (100, 400, 800):
        assert _run_child(code, target, rng.uniform(0.0, 0.02)) == -signal.SIGKILL
        rows = EmbeddingStore(store, allow_incomplete=True)
        assert not rows.attrs["complete"]
        seen.append(rows.attrs["rows_done"])
        assert rows.attrs["rows_done"] >= target  # nothing committed was lost
    assert seen == sorted(seen)
    assert _run_child(code, None, 0) == 0
    a, b = EmbeddingStore(ref), EmbeddingStore(store)
    assert len(set(b.ids)) == len(b.ids) == n
    assert list(a.ids) == list(b.ids)
    np.testing.assert_array_equal(a.embeddings(), b.embeddings())
