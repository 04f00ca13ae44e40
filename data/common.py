"""What every sample-data builder shares: deterministic PNG and CSV writing, the Sobel sketch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage


def save_png(arr: np.ndarray, path: Path) -> None:
    """Write an HxW or HxWx3 uint8 array as an RGB PNG with no metadata (deterministic)."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    Image.fromarray(np.ascontiguousarray(arr), mode="RGB").save(
        path, format="PNG", optimize=False, compress_level=6
    )


def load_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def sobel_sketch(gray: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of a 2-D image, normalised to 0..255 uint8 (0 where flat)."""
    g = np.asarray(gray, dtype=np.float64)
    mag = np.hypot(ndimage.sobel(g, axis=0, mode="reflect"), ndimage.sobel(g, axis=1, mode="reflect"))
    peak = mag.max()
    if peak <= 0:
        return np.zeros(g.shape, dtype=np.uint8)
    return np.rint(mag * (255.0 / peak)).clip(0, 255).astype(np.uint8)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, lineterminator="\n", float_format="%.6f")


def build_image_set(out: str | Path, n: int, prefix: str, render) -> Path:
    """Write ``n`` images ``<out>/images/<prefix>-00000.png`` and ``<out>/manifest.csv``; returns the manifest.

    ``render(i)`` -> (uint8 image, dict of manifest columns). A complete build (a manifest of ``n``
    rows) is kept as it is, so benchmarks can call this every run."""
    out = Path(out)
    manifest = out / "manifest.csv"
    if manifest.exists() and len(pd.read_csv(manifest)) == n:
        return manifest
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr, columns = render(i)
        name = f"images/{prefix}-{i:05d}.png"
        save_png(arr, out / name)
        rows.append({"id": f"{prefix}-{i:05d}", "image": name, **columns})
    write_csv(pd.DataFrame(rows), manifest)
    return manifest
