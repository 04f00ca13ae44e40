"""A store on a filesystem that fills up mid-extraction: a clear error, the lock released, and a plain
rerun after space is freed resumes and ends identical to a clean run, in the same process."""

from __future__ import annotations

import fcntl
import os
import subprocess

import h5py
import numpy as np
import pandas as pd
import pytest

from encoders.extract import extract
from encoders.factory import load_encoder
from encoders.manifest import Manifest
from encoders.store import EmbeddingStore, StoreFull

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
