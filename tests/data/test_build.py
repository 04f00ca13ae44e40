"""Tests for data/build.py: manifests, determinism, sketches and RGB/depth consistency."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from data.common import load_png
from data.build import (
    NUMBER_WORDS,
    build_all,
    depth_to_gray,
    ground_depth,
    render_scene,
    upscale_digit,
)

N_SCENES = 40
FASHION = 50  # balanced Fashion-MNIST rows: small, the real builder has its own tests
SEED = 0


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("build_a"), n_scenes=N_SCENES, seed=SEED, fashion_size=FASHION)


@pytest.fixture(scope="module")
def digits(built) -> pd.DataFrame:
    return pd.read_csv(built["digits"])


@pytest.fixture(scope="module")
def scenes(built) -> pd.DataFrame:
    return pd.read_csv(built["scenes"])


def _sample(df: pd.DataFrame, k: int = 25) -> pd.DataFrame:
    return df.sample(n=min(k, len(df)), random_state=0)


# ------------------------------------------------------------------ manifests


def test_returns_manifest_paths(built):
    assert set(built) == {"digits", "digit_classes", "scenes", "stereo", "fashion", "fashion_classes"}
    for p in built.values():
        assert p.is_file()
    stamp = json.loads((built["digits"].parents[1] / "build.json").read_text())
    assert stamp["params"]["n_scenes"] == N_SCENES and stamp["params"]["seed"] == SEED


def test_digit_manifest(built, digits):
    assert list(digits.columns) == ["id", "image", "sketch", "caption", "label"]
    assert len(digits) == 1797
    assert digits["id"].is_unique
    assert digits["id"].str.fullmatch(r"digit-\d{4}").all()
    assert set(digits["label"]) == set(range(10))
    for cap, lab in zip(digits["caption"], digits["label"]):
        assert cap == f"a handwritten digit {NUMBER_WORDS[lab]}"
    root = built["digits"].parent
    for col in ("image", "sketch"):
        assert not digits[col].map(lambda s: Path(s).is_absolute()).any()
        assert digits[col].map(lambda s: (root / s).is_file()).all(), col


def test_digit_images_match_sklearn(built, digits):
    from sklearn.datasets import load_digits

    ds = load_digits()
    assert (digits["label"].to_numpy() == ds.target).all()
    root = built["digits"].parent
    for i in (0, 7, 1796):
        img = load_png(root / digits["image"][i])
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert (img[..., 0] == img[..., 1]).all() and (img[..., 0] == img[..., 2]).all()
        assert (img[..., 0] == upscale_digit(ds.images[i])).all()
        # white ink on black: 0 in sklearn -> 0 here, 16 -> 255
        assert (img[..., 0][np.kron(ds.images[i] == 0, np.ones((4, 4), bool))] == 0).all()


def test_classes_csv(built):
    classes = pd.read_csv(built["digit_classes"])
    assert list(classes.columns) == ["id", "caption", "label"]
    assert len(classes) == 10
    assert list(classes["label"]) == list(range(10))
    assert list(classes["id"]) == [f"class-{k}" for k in range(10)]
    assert list(classes["caption"]) == [f"a handwritten digit {w}" for w in NUMBER_WORDS]


def test_scene_manifest(built, scenes):
    for col in ("id", "rgb", "depth", "n_objects", "mean_depth"):
        assert col in scenes.columns
    assert len(scenes) == N_SCENES
    assert scenes["id"].is_unique
    assert scenes["n_objects"].between(1, 4).all()
    assert (scenes["n_objects"] == scenes["n_rects"] + scenes["n_discs"]).all()
    assert scenes["mean_depth"].between(1.0, 10.0).all()
    root = built["scenes"].parent
    for col in ("rgb", "depth"):
        assert scenes[col].map(lambda s: (root / s).is_file()).all(), col
    img = load_png(root / scenes["rgb"][0])
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8


# ------------------------------------------------------------------ determinism / caching


def test_deterministic_bytes(built, digits, scenes, tmp_path):
    other = build_all(tmp_path / "b", n_scenes=N_SCENES, seed=SEED, fashion_size=FASHION)
    for key in built:
        assert built[key].read_bytes() == other[key].read_bytes(), key
    for manifest_key, df, cols in (("digits", digits, ("image", "sketch")), ("scenes", scenes, ("rgb", "depth"))):
        a_root, b_root = built[manifest_key].parent, other[manifest_key].parent
        for _, row in _sample(df).iterrows():
            for c in cols:
                assert (a_root / row[c]).read_bytes() == (b_root / row[c]).read_bytes(), row[c]


def test_scene_render_is_reproducible_and_seeded():
    a = render_scene(SEED, 3)
    assert (a.rgb == render_scene(SEED, 3).rgb).all()
    assert not np.array_equal(a.depth_png, render_scene(SEED + 1, 3).depth_png)


def test_skip_and_rebuild(tmp_path):
    out = tmp_path / "c"
    paths = build_all(out, n_scenes=5, seed=1, fashion_size=FASHION)
    stamp = out / "build.json"
    mtime = stamp.stat().st_mtime_ns
    marker = out / "scenes" / "rgb" / "scene-0000.png"
    marker_mtime = marker.stat().st_mtime_ns
    assert build_all(out, n_scenes=5, seed=1, fashion_size=FASHION) == paths
    assert stamp.stat().st_mtime_ns == mtime and marker.stat().st_mtime_ns == marker_mtime  # skipped
    build_all(out, n_scenes=3, seed=1, fashion_size=FASHION)  # different params -> rebuild, stale files removed
    assert len(pd.read_csv(paths["scenes"])) == 3
    assert len(list((out / "scenes" / "rgb").glob("*.png"))) == 3
    assert json.loads(stamp.read_text())["params"]["n_scenes"] == 3
    # a tampered manifest no longer matches the digest -> rebuild restores it
    good = paths["digits"].read_bytes()
    paths["digits"].write_text("id\n")
    build_all(out, n_scenes=3, seed=1, fashion_size=FASHION)
    assert paths["digits"].read_bytes() == good


# ------------------------------------------------------------------ content checks


def test_sketch_is_edge_map(built, digits):
    root = built["digits"].parent
    for _, row in _sample(digits, 40).iterrows():
        img = load_png(root / row["image"])[..., 0]
        sk = load_png(root / row["sketch"])
        assert (sk[..., 0] == sk[..., 1]).all() and (sk[..., 0] == sk[..., 2]).all()
        sk = sk[..., 0]
        flat = ndimage.maximum_filter(img, 3, mode="reflect") == ndimage.minimum_filter(img, 3, mode="reflect")
        assert flat.any() and (~flat).any()
        assert (sk[flat] == 0).all(), "sketch must be zero where the image is locally constant"
        assert sk.max() == 255, "per-image normalisation puts the strongest edge at 255"
        assert (sk[~flat] > 0).mean() > 0.5, "most non-flat pixels carry an edge response"


def test_depth_background_follows_ground_and_brighter_means_object(built, scenes):
    root = built["scenes"].parent
    ground_gray = depth_to_gray(ground_depth(32))[:, None]  # (32, 1), darker at top (far)
    assert (np.diff(ground_gray[:, 0].astype(int)) >= 0).all()
    for i, row in scenes.iterrows():
        d = load_png(root / row["depth"])
        assert (d[..., 0] == d[..., 1]).all() and (d[..., 0] == d[..., 2]).all()
        d = d[..., 0].astype(int)
        sc = render_scene(SEED, i)
        mask = sc.object_mask
        # background pixels are exactly the ground gradient
        assert (d[~mask] == np.broadcast_to(ground_gray, d.shape)[~mask]).all()
        # a pixel brighter than the ground at its row <=> an object is there
        brighter = d > ground_gray
        assert (brighter == mask).all()
        assert mask.any()
        # the written RGB is exactly the render that produced this depth map
        rgb = load_png(root / row["rgb"]).astype(int)
        assert (sc.rgb == rgb).all()
        assert row["mean_depth"] == pytest.approx(sc.depth.mean(), abs=1e-5)
        assert row["object_coverage"] == pytest.approx(mask.mean(), abs=1e-5)


def test_rgb_farther_is_darker():
    # same colour at two depths: the farther copy must be darker (shade by depth)
    dark, bright = [], []
    for i in range(60):
        sc = render_scene(SEED, i)
        lum = sc.rgb.astype(float).mean(axis=2)
        bg = ~sc.object_mask
        top, bottom = bg[:6], bg[-6:]
        if top.sum() > 20 and bottom.sum() > 20:
            dark.append(lum[:6][top].mean())
            bright.append(lum[-6:][bottom].mean())
    assert len(dark) > 10
    assert np.mean(bright) > np.mean(dark) + 20  # ground: near (bottom) is brighter than far (top)


def test_painter_order_consistent():
    for i in range(30):
        sc = render_scene(SEED, i)
        depths = [o["depth"] for o in sc.objects]
        assert depths == sorted(depths, reverse=True)  # painted far-to-near
        assert (sc.depth[sc.object_mask] < np.repeat(ground_depth(32)[:, None], 32, 1)[sc.object_mask]).all()
