"""A second procedural image set no method here was tuned on: random crops of scikit-image's bundled photos.

Why (issue 23 asks for "transformations of the skimage photos"): drawn shapes are one kind of
picture; natural photo content (faces, fur, textures, stars, tissue) is another. Each image is a
crop of one of eight bundled RGB photos at a random position and size (40-200 px), flipped at
random, with brightness jittered, resized to SIZE x SIZE. Crops of the same photo overlap, so many
images look alike, which makes instance retrieval between two encoders' spaces non-trivial.

Output: ``<out>/manifest.csv`` (id, image, photo) and ``<out>/images/photo-00000.png``. Same seed
and count -> the same bytes. Offline: these photos ship inside scikit-image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from data.common import build_image_set

SIZE = 64
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "colorwheel")


def _photos() -> dict[str, np.ndarray]:
    import skimage.data

    return {name: np.asarray(getattr(skimage.data, name)())[:, :, :3] for name in PHOTOS}


def render(index: int, photos: dict[str, np.ndarray], seed: int = 0) -> tuple[np.ndarray, str]:
    """One crop (SIZE, SIZE, 3) uint8 and its photo's name, from (seed, index) alone."""
    rng = np.random.default_rng([seed, index])
    name = PHOTOS[rng.integers(len(PHOTOS))]
    img = photos[name]
    side = int(rng.integers(40, min(200, *img.shape[:2]) + 1))
    top, left = (int(rng.integers(0, img.shape[k] - side + 1)) for k in (0, 1))
    crop = img[top:top + side, left:left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    out = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((SIZE, SIZE), Image.BILINEAR), np.float64)
    return (out * rng.uniform(0.7, 1.3)).clip(0, 255).astype(np.uint8), name


def build_photos(out: str | Path, n: int = 2000, seed: int = 0) -> Path:
    """Write ``n`` crops and their manifest under ``out``; returns the manifest path (skips a complete build)."""
    photos = _photos()

    def row(i: int):
        arr, name = render(i, photos, seed)
        return arr, {"photo": name}

    return build_image_set(out, n, "photo", row)
