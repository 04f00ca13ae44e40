"""A procedural image set no method here was tuned on: drawn shapes over textured backgrounds.

Why it exists (issue 23): the few-pairs benchmark was designed on Fashion-MNIST, and a new user's
3,000 procedurally drawn images showed the semi-supervised gain did not carry over. This builder
makes such a set reproducibly, offline, from a seed: each image is one of six shapes (circle,
square, triangle, star, ring, cross) of a random colour, size, position and rotation, over one of
four backgrounds (flat, stripes at a random angle, checker, smooth noise) of another colour, plus
pixel noise. No two images are alike, many look similar (same shape and colours), which is what
makes instance retrieval between two encoders' spaces non-trivial.

Output: ``<out>/manifest.csv`` (id, image, shape, background) and ``<out>/images/shape-00000.png``
(SIZE x SIZE RGB). Same seed and count -> the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data.common import build_image_set

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
BACKGROUNDS = ("flat", "stripes", "checker", "noise")


def _background(kind: str, rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    base = np.full((SIZE, SIZE), 1.0)
    if kind == "stripes":
        a, period = rng.uniform(0, np.pi), rng.uniform(6, 16)
        base = 0.6 + 0.4 * np.sin(2 * np.pi * (xx * np.cos(a) + yy * np.sin(a)) / period)
    elif kind == "checker":
        c = int(rng.integers(6, 16))
        base = np.where(((xx // c) + (yy // c)) % 2 == 0, 1.0, 0.55)
    elif kind == "noise":
        n = rng.normal(size=(8, 8))
        base = np.asarray(Image.fromarray(((n - n.min()) / np.ptp(n) * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC),
                          np.float64) / 255 * 0.6 + 0.4
    return base[:, :, None] * colour[None, None, :]  # (SIZE, SIZE, 3)


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        k, radii = 4, [r]
    elif shape == "triangle":
        k, radii = 3, [r]
    elif shape == "star":
        k, radii = 10, [r, 0.45 * r]
    else:  # cross: 12-gon outline of a plus sign
        w = 0.35 * r
        pts = [(w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w)]
        c, s = np.cos(angle), np.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    return [(cx + radii[i % len(radii)] * np.cos(angle + 2 * np.pi * i / k), cy + radii[i % len(radii)] * np.sin(angle + 2 * np.pi * i / k))
            for i in range(k)]


def render(index: int, seed: int = 0) -> tuple[np.ndarray, str, str]:
    """One image (SIZE, SIZE, 3) uint8 and its shape and background names, from (seed, index) alone."""
    rng = np.random.default_rng([seed, index])
    shape, background = SHAPES[rng.integers(len(SHAPES))], BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    bg = _background(background, rng, rng.uniform(0.1, 1.0, 3))
    img = Image.fromarray((bg * 255).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r, angle = rng.uniform(10, 24), rng.uniform(0, 2 * np.pi)
    cx, cy = rng.uniform(r, SIZE - r, 2)
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    if shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        if shape == "ring":
            inner = r * rng.uniform(0.4, 0.7)
            hole = tuple(int(v) for v in (bg[int(cy), int(cx)] * 255))
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=hole)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))
    arr = np.asarray(img, np.float64) + rng.normal(0, rng.uniform(0, 12), (SIZE, SIZE, 3))
    return arr.clip(0, 255).astype(np.uint8), shape, background


def build_shapes(out: str | Path, n: int = 3000, seed: int = 0) -> Path:
    """Write ``n`` images and their manifest under ``out``; returns the manifest path (skips a complete build)."""
    def row(i: int):
        arr, shape, background = render(i, seed)
        return arr, {"shape": shape, "background": background}

    return build_image_set(out, n, "shape", row)
