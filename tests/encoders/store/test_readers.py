"""A store open elsewhere is never recreated, truncated or replaced under its reader; writers queue.

Readers are separate processes, as a notebook, h5dump or a running align would be."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from encoders.extract import extract
from encoders.factory import load_encoder
from encoders.manifest import Manifest
from encoders.store import EmbeddingStore, StoreError, StoreLocked, StoreWriter
from encoders.store.format import partial_dir
from encoders.store.lock import open_elsewhere
from tests_support import ROOT

READER = r"""
import sys, time
from pathlib import Path
import h5py, numpy as np
from encoders.store import EmbeddingStore
mode, path, ready, hold = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
held = []
if mode == "h5":
    held.append(h5py.File(path, "r"))
    rows = held[0]["embeddings"][()]
else:  # a partial store, read as a user may (allow_incomplete), its files kept open
    s = EmbeddingStore(path, allow_incomplete=True)
    rows = s.embeddings()
    held += [open(p, "rb") for p in sorted(path.with_name(path.name + ".partial").iterdir())]
np.save(str(ready) + ".npy", rows)
ready.write_text("ready")
time.sleep(hold)
"""


class Reader:
    def __init__(self, tmp_path: Path, mode: str, store: Path, hold: float = 120.0):
        self.ready = tmp_path / f"reader-{mode}-{time.monotonic_ns()}"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-c", READER, mode, str(store), str(self.ready), str(hold)],
                                     env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not self.ready.exists():
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.time() < deadline
            time.sleep(0.05)
        self.rows = np.load(str(self.ready) + ".npy")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def text_encoder(tiny_clip_files):
    return load_encoder(f"open_clip:text:{tiny_clip_files['json']}?batch_size=16")


def _manifest(path: Path, n: int = 160, change: bool = False) -> Manifest:
    texts = [f"caption {i} of the reader test" for i in range(n)]
    if change:
        texts[3] = "an edited caption"
    pd.DataFrame({"id": [f"t{i:04d}" for i in range(n)], "caption": texts}).to_csv(path, index=False)
    return Manifest.read(path)


def _partial(m: Manifest, enc, store: Path, stop_at: int) -> int:
    def progress(done, total):
        if done >= stop_at:
            raise Stop
    with pytest.raises(Stop):
        extract(m, "caption", enc, store, progress=progress)
    return EmbeddingStore(store, allow_incomplete=True).n


def _digest(folder_or_file: Path) -> str:
    files = sorted(folder_or_file.iterdir()) if folder_or_file.is_dir() else [folder_or_file]
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def test_hdf5_readers_hold_a_shared_flock_that_an_overwrite_can_see(tmp_path):
    store = tmp_path / "s.h5"
    with StoreWriter(store, dim=2, attrs={"encoder_spec": "x"}) as w:
        w.append(["a"], np.ones((1, 2)), rows_done=1)
        w.finish()
    assert not open_elsewhere(store)
    r = Reader(tmp_path, "h5", store)
    assert open_elsewhere(store)
    r.close()
    assert not open_elsewhere(store)
    with h5py.File(store, "r"):  # this process, another handle: the same
        assert open_elsewhere(store)


def test_resume_beside_a_reader_of_the_partial_store_continues_where_it_stopped(tmp_path, text_encoder):
    m = _manifest(tmp_path / "m.csv")
    ref = extract(m, "caption", text_encoder, tmp_path / "ref.h5")
    store = tmp_path / "s.h5"
    kept = _partial(m, text_encoder, store, 64)
    assert kept == 64
    reader = Reader(tmp_path, "partial", store)
    try:
        s = extract(m, "caption", text_encoder, store)
        assert s.resumed_from == 64 and s.n == 160 and not s.reused  # resumed, never restarted from row 0
        a, b = EmbeddingStore(ref.store), EmbeddingStore(store)
        assert list(a.ids) == list(b.ids) and a.embeddings().tobytes() == b.embeddings().tobytes()
        assert reader.rows.tobytes() == b.embeddings()[:64].tobytes()  # what the reader saw is what was kept
    finally:
        reader.close()
    h5reader = Reader(tmp_path, "h5", store)  # and a finished store open elsewhere is simply reused
    try:
        again = extract(m, "caption", text_encoder, store)
        assert again.reused and again.n == 160
    finally:
        h5reader.close()


def test_a_changed_manifest_is_refused_in_one_line_whatever_holds_the_store(tmp_path, text_encoder):
    m = _manifest(tmp_path / "m.csv")
    changed = _manifest(tmp_path / "m2.csv", change=True)
    store = tmp_path / "s.h5"
    _partial(m, text_encoder, store, 48)
    reader = Reader(tmp_path, "partial", store)
    try:
        before = _digest(partial_dir(store))
        with pytest.raises(StoreError, match=r"partial store .*s\.h5\.partial holds 48 rows for other inputs "
                                             r"\(differs in manifest_digest\)") as err:
            extract(changed, "caption", text_encoder, store)
        assert "\n" not in str(err.value) and _digest(partial_dir(store)) == before
    finally:
        reader.close()
    extract(m, "caption", text_encoder, store)
    reader = Reader(tmp_path, "h5", store)
    try:
        before = _digest(store)
        with pytest.raises(StoreError, match=r"already holds embeddings for other inputs") as err:
            extract(changed, "caption", text_encoder, store)
        assert "\n" not in str(err.value) and _digest(store) == before
        assert EmbeddingStore(store).n == 160 and reader.rows.shape == (160, text_encoder.dim)
    finally:
        reader.close()


def test_overwrite_waits_for_the_reader_of_the_old_store_then_replaces_it_whole(tmp_path, text_encoder, caplog):
    m = _manifest(tmp_path / "m.csv", n=40)
    changed = _manifest(tmp_path / "m2.csv", n=40, change=True)
    store = tmp_path / "s.h5"
    extract(m, "caption", text_encoder, store)
    before = _digest(store)
    reader = Reader(tmp_path, "h5", store)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreLocked, match=r"s\.h5 is open in another process \(a reader\); gave up after "
                                              r"waiting 1 s to replace it") as err:
            extract(changed, "caption", text_encoder, store, overwrite=True, wait=1.0)
        assert 1.0 <= time.monotonic() - t0 < 30 and "\n" not in str(err.value)
        assert _digest(store) == before and not partial_dir(store).exists()
    finally:
        reader.close()
    reader = Reader(tmp_path, "h5", store, hold=2.0)  # closes on its own while the overwrite waits
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="encoders.store"):
        s = extract(changed, "caption", text_encoder, store, overwrite=True, wait=60)
    reader.proc.wait()
    waits = [r.message for r in caplog.records if "waiting for store" in r.message]
    assert len(waits) == 1 and "to be closed by the process reading it" in waits[0]
    assert s.n == 40 and EmbeddingStore(store).attrs["manifest_digest"] == changed.digest("caption")


def test_a_second_writer_waits_for_the_first_then_finds_the_store_complete(tmp_path):
    store = tmp_path / "s.h5"
    worker = ROOT / "benchmarks" / "_store_worker.py"
    first = subprocess.Popen([sys.executable, str(worker), str(store), "200", "20", "8", "0.2"],
                             stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().startswith("start 0")
    second = subprocess.run([sys.executable, str(worker), str(store), "200", "20", "8"], capture_output=True,
                            text=True, timeout=120)
    assert first.wait(timeout=60) == 0 and second.returncode == 0, second.stderr
    assert f"waiting for store {store}, being written by pid {first.pid}" in second.stderr
    assert second.stdout.splitlines() == ["start 200", "done"]  # served the finished store: nothing redone


def test_a_damaged_final_store_is_one_line_naming_it_and_never_recreated(tmp_path):
    store = tmp_path / "s.h5"
    attrs = {"encoder_spec": "x", "weights_digest": "w", "manifest_digest": "m"}
    with StoreWriter(store, dim=4, attrs=attrs) as w:
        w.append([f"i{k}" for k in range(500)], np.ones((500, 4)), rows_done=500)
        w.finish()
    os.truncate(store, store.stat().st_size // 2)  # a half-copied file
    before = _digest(store)
    for attempt in (lambda: EmbeddingStore(store).embeddings(),
                    lambda: StoreWriter(store, dim=4, attrs=attrs).__enter__()):
        with pytest.raises(StoreError, match=r"store .*s\.h5 is damaged or not .*xmodal store .*rerun extract with "
                                             r"refresh") as err:
            attempt()
        assert "\n" not in str(err.value)
    assert _digest(store) == before
    with StoreWriter(store, dim=4, attrs=attrs, overwrite=True) as w:  # what the line says to do
        w.append(["a"], np.ones((1, 4)), rows_done=1)
        w.finish()
    assert EmbeddingStore(store).n == 1
