"""The procedural shapes set (data/shapes.py): offline, byte-for-byte reproducible, every shape drawn."""

from __future__ import annotations

import pandas as pd

from data.shapes import SHAPES, build_shapes
from tests_support import png_digest


def test_the_same_seed_builds_the_same_bytes_and_different_images(tmp_path):
    a, b = build_shapes(tmp_path / "a", 40), build_shapes(tmp_path / "b", 40)
    assert png_digest(a.parent) == png_digest(b.parent)
    frame = pd.read_csv(a)
    assert list(frame.columns) == ["id", "image", "shape", "background"] and len(frame) == 40
    assert set(frame["shape"]) == set(SHAPES)
    images = [(a.parent / p).read_bytes() for p in frame["image"]]
    assert len(set(images)) == 40  # no two alike
