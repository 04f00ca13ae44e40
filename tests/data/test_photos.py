"""The photo-crops set (data/photos.py): offline (scikit-image's bundled photos), byte-for-byte reproducible."""

from __future__ import annotations

import pandas as pd

from data.common import load_png
from data.photos import PHOTOS, SIZE, build_photos
from tests_support import png_digest


def test_the_same_seed_builds_the_same_bytes_and_crops_of_every_photo(tmp_path):
    a, b = build_photos(tmp_path / "a", 60), build_photos(tmp_path / "b", 60)
    assert png_digest(a.parent) == png_digest(b.parent)
    frame = pd.read_csv(a)
    assert list(frame.columns) == ["id", "image", "photo"] and len(frame) == 60
    assert set(frame["photo"]) == set(PHOTOS)
    assert len({(a.parent / p).read_bytes() for p in frame["image"]}) == 60  # no two alike
    assert load_png(a.parent / frame["image"][0]).shape[:2] == (SIZE, SIZE)
