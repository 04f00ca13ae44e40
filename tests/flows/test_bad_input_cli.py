"""Bad input through the `xmodal` CLI and the flows: one clear line, no traceback, no useless retries,
and nothing already published replaced by a failed run."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pandas as pd
import pytest

from flows.align import AlignParams, align
from flows.cli import app
from flows.errors import is_transient
from projection.align.data import SplitTooSmall
from tests_support import TINY_VIT, make_store

ENCODER = f"open_clip:text:{TINY_VIT}?batch_size=16"


def _cli(capfd, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        app(list(map(str, args)))
    out = capfd.readouterr()
    return done.value.code, out.out + out.err


def _manifest(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    m = folder / "manifest.csv"
    pd.DataFrame({"id": [f"t{i}" for i in range(n)], "caption": [f"text {i}" for i in range(n)]}).to_csv(m, index=False)
    return m


def _assert_one_clear_line(code: int, out: str, *fragments: str) -> None:
    last = out.strip().splitlines()[-1]
    assert code == 2 and last.startswith("xmodal: error: "), out[-2000:]
    for fragment in fragments:
        assert fragment in last, last
    assert "Traceback" not in out and "Retry 1/" not in out, out[-4000:]  # reported once, not retried
    assert len(out.splitlines()) < 25, out


def test_an_out_dir_that_is_a_file_is_one_line_and_not_retried(prefect_server, mlflow_uri, tmp_path, capfd):
    m = _manifest(tmp_path / "texts")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the stores should go")
    code, out = _cli(capfd, "extract", m, "-c", "caption", "-e", ENCODER, "--out-dir", blocker)
    _assert_one_clear_line(code, out, "StoreError: cannot write store", str(blocker), "choose another output folder")


def test_a_read_only_out_dir_is_one_line_and_not_retried(prefect_server, mlflow_uri, tmp_path, capfd):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]).returncode:
        pytest.skip("a read-only folder for root needs a read-only mount (root and mount(8))")
    try:
        code, out = _cli(capfd, "extract", _manifest(tmp_path / "texts"), "-c", "caption", "-e", ENCODER,
                         "--out-dir", ro)
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    _assert_one_clear_line(code, out, "Read-only file system", str(ro))


def test_a_header_only_manifest_is_one_line(prefect_server, mlflow_uri, tmp_path, capfd):
    m = tmp_path / "empty" / "manifest.csv"
    m.parent.mkdir()
    m.write_text("id,caption\n")
    code, out = _cli(capfd, "extract", m, "-c", "caption", "-e", ENCODER, "--out-dir", tmp_path / "stores")
    _assert_one_clear_line(code, out, f"ManifestError: manifest {m} has no rows (only a header)")
    assert not (tmp_path / "stores").exists()  # no empty "complete" store


def test_errors_that_a_retry_could_fix_are_still_retried():
    assert is_transient(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_transient(ConnectionResetError(104, "Connection reset by peer"))
    assert not is_transient(OSError(28, "No space left on device"))
    assert not is_transient(NotADirectoryError(20, "Not a directory"))


@pytest.mark.parametrize("rows", [1, 5])
def test_tiny_stores_are_refused_before_training_and_latest_is_kept(prefect_server, mlflow_uri, tmp_path, rows):
    rng = np.random.default_rng(0)
    out_dir = tmp_path / "align"

    def stores(folder, n):
        folder.mkdir()
        ids = [f"r{i}" for i in range(n)]
        return (make_store(folder / "src.h5", ids, rng.normal(size=(n, 8)).astype(np.float32)),
                make_store(folder / "tgt.h5", ids, rng.normal(size=(n, 6)).astype(np.float32)))

    src, tgt = stores(tmp_path / "good", 60)
    first = align(AlignParams(source_store=src, target_store=tgt, train={"epochs": 2}, out_dir=str(out_dir)))
    latest = next(out_dir.glob("*-latest"))
    before = (latest / "source_run.txt").read_text()
    assert before.strip() == first["run_dir"]

    src, tgt = stores(tmp_path / "tiny", rows)
    with pytest.raises(SplitTooSmall) as err:
        align(AlignParams(source_store=src, target_store=tgt, train={"epochs": 2}, out_dir=str(out_dir)))
    assert f"{rows} pairs are too few to split" in str(err.value) and "split would be empty" in str(err.value)
    assert "test" in str(err.value).split("the ")[-1]
    assert (latest / "source_run.txt").read_text() == before
