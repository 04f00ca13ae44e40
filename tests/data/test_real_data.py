"""The real sample sets: Fashion-MNIST from the Debian package, RGB/disparity patches of a real stereo scene."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data import fashion_mnist as fm
from data import stereo
from data.common import load_png, sobel_sketch

IDX = fm.locate_idx(fetch=False)  # installed, or unpacked by an earlier build: no network in tests
needs_fashion = pytest.mark.skipif(IDX is None, reason="Debian dataset-fashion-mnist not on this machine (run `python -m data.build` once)")


# ------------------------------------------------------------------ Fashion-MNIST


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    out = tmp_path_factory.mktemp("fashion")
    manifest, classes = fm.build_fashion(out, IDX, 100) if IDX else (None, None)
    return out, manifest, classes


@needs_fashion
def test_idx_files_are_the_real_fashion_mnist():
    train_x, train_y = fm.read_idx(IDX, "train")
    test_x, test_y = fm.read_idx(IDX, "test")
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert (np.bincount(train_y) == 6000).all() and (np.bincount(test_y) == 1000).all()
    with gzip.open(IDX / "train-images-idx3-ubyte.gz") as f:
        assert int.from_bytes(f.read(4), "big") == 2051  # IDX magic of a uint8 3-D array


@needs_fashion
def test_manifest_is_balanced_with_captions_labels_and_class_prompts(fashion):
    out, manifest, classes = fashion
    df = pd.read_csv(manifest)
    assert list(df.columns) == ["id", "image", "sketch", "caption", "label", "class_name", "source_split"]
    assert len(df) == 100 and df["id"].is_unique and (df["label"].value_counts() == 10).all()
    assert (df["caption"] == df["label"].map(fm.caption_for)).all()
    assert (df["class_name"] == df["label"].map(lambda k: fm.CLASS_NAMES[k])).all()
    assert df.loc[df["label"] == 9, "caption"].iloc[0] == "a photo of an ankle boot"
    cls = pd.read_csv(classes)
    assert list(cls["label"]) == list(range(10)) and list(cls["caption"]) == [fm.caption_for(k) for k in range(10)]
    assert set(cls["caption"]) == set(df["caption"])  # every caption is one class prompt: zero-shot is well posed


@needs_fashion
def test_pixels_match_the_idx_file_and_sketch_is_its_sobel_edges(fashion):
    out, manifest, _ = fashion
    df = pd.read_csv(manifest)
    images, labels = fm.read_idx(IDX, "train")
    for _, row in df.sample(8, random_state=0).iterrows():
        part, index = row["id"].split("-")[1], int(row["id"].split("-")[2])
        assert part == "train" and labels[index] == row["label"]
        img = load_png(out / row["image"])
        assert img.shape == (28, 28, 3) and (img[..., 0] == images[index]).all() and (img[..., 2] == images[index]).all()
        assert (load_png(out / row["sketch"])[..., 0] == sobel_sketch(images[index])).all()


@needs_fashion
def test_smaller_build_is_a_per_class_prefix_of_a_larger_one(fashion, tmp_path):
    small, _ = fm.build_fashion(tmp_path, IDX, 50)
    big = pd.read_csv(fashion[1])
    small = pd.read_csv(small)
    assert set(small["id"]) < set(big["id"])
    for k in range(10):
        assert list(small.loc[small["label"] == k, "id"]) == list(big.loc[big["label"] == k, "id"])[:5]


def test_without_apt_it_says_so_in_one_line_and_the_digits_stand_in(monkeypatch, tmp_path):
    monkeypatch.setattr(fm, "INSTALLED", tmp_path / "none")
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fm.shutil, "which", lambda name: None)
    said = []
    assert fm.locate_idx(fetch=True, say=said.append) is None
    assert len(said) == 1 and "no apt-get" in said[0] and "digits" in said[0]
    from data.build import _manifest_paths, _with_fallback

    paths = _with_fallback(_manifest_paths(tmp_path, fashion=False))
    assert paths["fashion"] == paths["digits"] and paths["fashion_classes"] == paths["digit_classes"]


# ------------------------------------------------------------------ stereo


@pytest.fixture(scope="module")
def stereo_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("stereo")
    manifest = stereo.build_stereo(out, seed=0)
    return out, pd.read_csv(manifest)


def test_no_test_patch_overlaps_a_train_or_val_patch(stereo_set):
    _, df = stereo_set
    assert set(df["split"]) == {"train", "val", "test"}
    test = df[df["split"] == "test"]
    for other in ("train", "val"):
        o = df[df["split"] == other]
        dy = np.abs(test["y"].to_numpy()[:, None] - o["y"].to_numpy()[None, :])
        dx = np.abs(test["x"].to_numpy()[:, None] - o["x"].to_numpy()[None, :])
        assert not ((dy < stereo.PATCH) & (dx < stereo.PATCH)).any(), f"a test patch shares pixels with a {other} patch"
    assert 0.08 < len(test) / len(df) < 0.25  # the blocked split still leaves a usable test set


def test_patches_are_aligned_crops_with_their_disparity_statistics(stereo_set):
    from skimage.data import stereo_motorcycle

    out, df = stereo_set
    left, _, disp = stereo_motorcycle()
    assert (df["valid_frac"] >= stereo.MIN_VALID).all()
    for _, row in df.sample(10, random_state=1).iterrows():
        y, x, p = row["y"], row["x"], stereo.PATCH
        assert (load_png(out / row["rgb"]) == left[y:y + p, x:x + p]).all()
        d = stereo.read_disparity(out / row["disparity"])
        truth = disp[y:y + p, x:x + p]
        assert (np.isnan(d) == ~np.isfinite(truth)).all()
        assert np.nanmax(np.abs(d - np.where(np.isfinite(truth), truth, np.nan))) <= 1 / 512 + 1e-9  # 16-bit, 1/256 px
        assert row["valid_frac"] == pytest.approx(np.isfinite(truth).mean(), abs=1e-6)
        assert row["mean_disparity"] == pytest.approx(truth[np.isfinite(truth)].mean(), abs=1e-4)
        grey = load_png(out / row["depth"])[..., 0]
        assert (grey == stereo.render_disparity(truth)).all() and (grey[~np.isfinite(truth)] == 0).all()


def test_split_file_matches_the_manifest_and_loads_as_an_align_split(stereo_set):
    from projection.align.data import load_split

    out, df = stereo_set
    table = pd.read_csv(out / "split.csv")
    assert list(table["id"]) == list(df["id"]) and list(table["split"]) == list(df["split"])
    split = load_split(out / "split.csv", list(df["id"])[::-1])  # order-free, as align reads stores
    assert sum(len(v) for v in split.values()) == len(df)
    assert (stereo.block_splits((500, 741), 0) == stereo.block_splits((500, 741), 0)).all()
    assert not (stereo.block_splits((500, 741), 0) == stereo.block_splits((500, 741), 1)).all()
