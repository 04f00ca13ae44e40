"""RGB -> depth on a real stereo scene: aligned RGB / disparity patches with a spatially blocked split.

Source: scikit-image's bundled Middlebury 2014 "motorcycle" scene (``skimage.data.stereo_motorcycle``:
left image 500x741 RGB and its ground-truth disparity, float32 pixels, ``inf`` = unknown, 7.3% of
the frame). Nothing is downloaded.

Patches of ``PATCH`` px every ``STRIDE`` px. Neighbouring patches overlap, so a random split would
put near-copies of every test patch in training. Instead the frame is tiled into ``BLOCK`` px
blocks, the blocks (not the patches) are split train/val/test by a seeded hash, and a patch is kept
only if every block it touches has the same split: no test pixel is in any training or validation
patch (tests/data check it). Patches with under ``MIN_VALID`` known disparity are dropped too.

Output (paths relative to the manifest)::

    stereo/
      manifest.csv     id, rgb, depth, disparity, y, x, split, valid_frac, mean_disparity
      split.csv        id, split   (give it to align: SplitConfig(file=...); stage 2 reuses the run's copy)
      rgb/*.png        PATCH x PATCH RGB crop of the left image
      depth/*.png      the disparity rendered as grey RGB for image encoders: near (large disparity) =
                       bright, grey = 255 * d / DISP_MAX, unknown = 0 (black)
      disparity/*.png  exact disparity as 16-bit PNG, value = round(256 * d), 0 = unknown (KITTI's convention)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from data.common import save_png, write_csv

PATCH = 64
STRIDE = 16
BLOCK = 128
MIN_VALID = 0.5
DISP_MAX = 64.0  # the scene's largest disparity is 59.9 px
SPLIT_FRACS = {"test": 0.15, "val": 0.15}


def block_splits(shape: tuple[int, int], seed: int) -> np.ndarray:
    """(rows, cols) array of split names per BLOCK x BLOCK tile, exact counts from SPLIT_FRACS."""
    rows, cols = -(-shape[0] // BLOCK), -(-shape[1] // BLOCK)
    n = rows * cols
    order = sorted(range(n), key=lambda b: hashlib.blake2b(f"{seed}\x00block-{b}".encode(), digest_size=8).digest())
    names = np.full(n, "train", dtype=object)
    start = 0
    for name, frac in SPLIT_FRACS.items():
        k = max(1, round(frac * n))
        names[order[start:start + k]] = name
        start += k
    return names.reshape(rows, cols)


def patch_split(blocks: np.ndarray, y: int, x: int) -> str | None:
    """The split of the patch at (y, x) when all blocks it touches agree; None when it straddles two."""
    touched = set(blocks[y // BLOCK:(y + PATCH - 1) // BLOCK + 1, x // BLOCK:(x + PATCH - 1) // BLOCK + 1].ravel())
    return touched.pop() if len(touched) == 1 else None


def render_disparity(disp: np.ndarray) -> np.ndarray:
    """Disparity (inf = unknown) -> uint8 grey, near = bright, unknown = 0."""
    known = np.isfinite(disp)
    grey = np.zeros(disp.shape, dtype=np.uint8)
    grey[known] = np.rint(np.clip(disp[known], 0, DISP_MAX) * (255.0 / DISP_MAX)).astype(np.uint8)
    return grey


def disparity_u16(disp: np.ndarray) -> np.ndarray:
    known = np.isfinite(disp)
    out = np.zeros(disp.shape, dtype=np.uint16)
    out[known] = np.rint(np.clip(disp[known], 0, 255) * 256).astype(np.uint16)
    return out


def build_stereo(out: Path, seed: int = 0) -> Path:
    from skimage.data import stereo_motorcycle  # bundled files, no download

    left, _right, disp = stereo_motorcycle()
    blocks = block_splits(disp.shape, seed)
    for sub in ("rgb", "depth", "disparity"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    grey, exact = render_disparity(disp), disparity_u16(disp)
    rows = []
    for y in range(0, disp.shape[0] - PATCH + 1, STRIDE):
        for x in range(0, disp.shape[1] - PATCH + 1, STRIDE):
            split = patch_split(blocks, y, x)
            d = disp[y:y + PATCH, x:x + PATCH]
            known = np.isfinite(d)
            if split is None or known.mean() < MIN_VALID:
                continue
            pid = f"stereo-y{y:03d}-x{x:03d}"
            rel = {sub: f"{sub}/{pid}.png" for sub in ("rgb", "depth", "disparity")}
            save_png(left[y:y + PATCH, x:x + PATCH], out / rel["rgb"])
            save_png(grey[y:y + PATCH, x:x + PATCH], out / rel["depth"])
            Image.fromarray(exact[y:y + PATCH, x:x + PATCH]).save(out / rel["disparity"], format="PNG")
            rows.append({"id": pid, **rel, "y": y, "x": x, "split": split, "valid_frac": float(known.mean()),
                         "mean_disparity": float(d[known].mean())})
    frame = pd.DataFrame(rows)
    manifest = out / "manifest.csv"
    write_csv(frame, manifest)
    write_csv(frame[["id", "split"]], out / "split.csv")
    return manifest


def read_disparity(path: Path) -> np.ndarray:
    """A disparity PNG back to float pixels, NaN where unknown."""
    with Image.open(path) as im:
        raw = np.asarray(im).astype(np.float64)
    return np.where(raw > 0, raw / 256.0, np.nan)
