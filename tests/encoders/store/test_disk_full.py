"""A store on a filesystem that fills up mid-extraction: a clear error, the lock released, and a plain
rerun after space is freed resumes and ends identical to a clean run, in the same process; also
when ANOTHER process fills the disk after the free-space check passed (the check is not what
makes it safe: raw appends fail with a plain ENOSPC, encoders/store/disk.py)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest

from encoders.extract import extract
from encoders.factory import load_encoder
from encoders.manifest import Manifest
from encoders.spec import EncoderSpec
from encoders.store import EmbeddingStore, StoreFull, StoreWriter
from tests_support import ROOT

N = 3000  # 3000 x 64 float32 = 750 KiB of embeddings: more than the 700 KiB filesystem below


@pytest.fixture
def small_fs(tmp_path):
    """A 700 KiB tmpfs, grown later with a remount (what freeing space looks like to the writer)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_is_one_clear_error_and_a_rerun_resumes_to_the_clean_store(tmp_path, small_fs, tiny_clip_files):
    m = tmp_path / "manifest.csv"
    pd.DataFrame({"id": [f"t{i:05d}" for i in range(N)],
                  "caption": [f"item number {i} " * 3 for i in range(N)]}).to_csv(m, index=False)
    enc = load_encoder(f"open_clip:text:{tiny_clip_files['json']}?batch_size=256")
    store = small_fs / "s.h5"

    with pytest.raises(StoreFull) as err:
        extract(Manifest.read(m), "caption", enc, store)
    line = str(err.value)
    assert "\n" not in line and str(store) in line and "free space and rerun to resume" in line
    saved = EmbeddingStore(store, allow_incomplete=True).n
    assert 0 < saved < N
    fd = os.open(str(store) + ".lock", os.O_RDWR)  # the lock is free: no "StoreLocked by pid <ourselves>"
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)

    subprocess.run(["mount", "-o", "remount,size=20m", str(small_fs)], check=True)
    s = extract(Manifest.read(m), "caption", enc, store)  # a plain rerun, same process (it segfaulted before)
    assert s.resumed_from > 0 and s.n == N
    clean = extract(Manifest.read(m), "caption", enc, tmp_path / "clean.h5")
    with h5py.File(store, "r") as a, h5py.File(clean.store, "r") as b:
        assert a.attrs["complete"] and np.array_equal(a["ids"].asstr()[()], b["ids"].asstr()[()])
        assert np.array_equal(a["embeddings"][()], b["embeddings"][()])


FILL = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
for size in (65536, 4096, 1):  # until the filesystem says no, to the last byte
    try:
        while True:
            os.write(fd, b"\0" * size)
    except OSError:
        pass
os.close(fd)
"""


def _fill(path) -> None:
    """Another process fills the filesystem holding ``path`` to the last byte."""
    subprocess.run([sys.executable, "-c", FILL, str(path)], check=True, timeout=60)


def _lock_is_free(store) -> bool:
    fd = os.open(str(store) + ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def test_disk_filled_by_another_process_after_the_check_is_one_line_and_the_rerun_is_identical(tmp_path, small_fs):
    """The free-space check passes for batch 3, then another process takes the rest of the disk
    before the batch is committed: StoreFull, batches 1-2 kept, and after freeing space a plain
    rerun ends byte-identical to a clean store."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _store_worker import ATTRS, batch

    store, filler = small_fs / "s.h5", small_fs / "filler.bin"
    calls = {"n": 0}

    def fill_on_third_commit() -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            _fill(filler)

    def run(on_commit=None, path=store):
        with StoreWriter(path, dim=64, attrs=ATTRS, on_commit=on_commit) as w:
            for lo in range(w.rows_done, 500, 50):
                ids, emb, errors = batch(lo, lo + 50, 64)
                w.append(ids, emb, rows_done=lo + 50, errors=errors)
            w.finish()

    with pytest.raises(StoreFull) as err:
        run(fill_on_third_commit)
    line = str(err.value)
    assert "\n" not in line and f"writing store {store}" in line and "MiB" in line
    assert "free space and rerun to resume" in line
    assert EmbeddingStore(store, allow_incomplete=True).attrs["rows_done"] == 100  # batches 1-2 committed
    assert _lock_is_free(store)
    filler.unlink()
    run()
    run(path=tmp_path / "clean.h5")
    a, b = EmbeddingStore(store), EmbeddingStore(tmp_path / "clean.h5")
    assert list(a.ids) == list(b.ids) and a.embeddings().tobytes() == b.embeddings().tobytes()
    assert a.errors().equals(b.errors()) and sorted(p.name for p in small_fs.iterdir()) == ["s.h5", "s.h5.lock"]


@pytest.mark.slow  # 30-110 s: real CLI processes (make test-slow; CI runs it)
def test_cli_extract_on_a_disk_another_process_fills_says_one_line_fails_the_run_and_resumes(
        tmp_path, small_fs, mlflow_uri, tiny_clip_files):
    from mlflow.tracking import MlflowClient

    subprocess.run(["mount", "-o", "remount,size=4m", str(small_fs)], check=True)
    folder = tmp_path / "fullset"
    folder.mkdir()
    pd.DataFrame({"id": [f"t{i:05d}" for i in range(N)],
                  "caption": [f"item number {i} " * 3 for i in range(N)]}).to_csv(folder / "manifest.csv", index=False)
    spec = f"open_clip:text:{tiny_clip_files['json']}?batch_size=128"
    env = dict(os.environ, PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=mlflow_uri)
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "extract", str(folder / "manifest.csv"), "-c", "caption", "-e", spec,
           "--out-dir", str(small_fs / "stores")]
    victim = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    filler = small_fs / "filler.bin"
    deadline = time.time() + 300
    while True:  # once 3 batches are committed, another process takes the disk while the writer runs on
        records = list((small_fs / "stores").rglob("commit.json"))
        try:
            if records and json.loads(records[0].read_text())["rows_done"] >= 384:
                break
        except (OSError, ValueError):
            pass
        assert victim.poll() is None, victim.communicate()
        assert time.time() < deadline
        time.sleep(0.02)
    _fill(filler)
    out, err = victim.communicate(timeout=300)
    assert victim.returncode == 2, (out, err)
    errors = [ln for ln in err.splitlines() if ln.startswith("xmodal: error:")]
    store = small_fs / "stores" / "fullset" / f"caption--{EncoderSpec.parse(spec).slug}.h5"
    assert len(errors) == 1 and "StoreFull" in errors[0] and str(store) in errors[0], err[-2000:]
    assert "MiB" in errors[0] and "free space and rerun to resume" in errors[0]
    kept = EmbeddingStore(store, allow_incomplete=True).attrs["rows_done"]
    assert kept >= 384
    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("xmodal-extract-fullset")
    assert [r.info.status for r in client.search_runs([exp.experiment_id])] == ["FAILED"]

    filler.unlink()
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "FINISHED" and runs[0].data.metrics["resumed_from"] == kept
    clean = extract(Manifest.read(folder / "manifest.csv"), "caption", load_encoder(spec), tmp_path / "clean.h5")
    a, b = EmbeddingStore(store), EmbeddingStore(clean.store)
    assert list(a.ids) == list(b.ids) and a.embeddings().tobytes() == b.embeddings().tobytes()
