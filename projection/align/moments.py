"""Column statistics and cross products of large (N, D) float32 arrays, in float64, a block of rows at a time.

Why blocks: the closed forms and the projector's standardisation need float64 sums, and the plain
way (``x.astype(np.float64)``, then ``(x64 - mu) / sd``) holds three float64 copies of the train
split at once. For 56,000 x 1280 source rows that was 1.7 GB on top of the 0.29 GB of data, the
largest part of a linear align's 3.4 GB peak at 70k Fashion-MNIST pairs. A block of
``BLOCK_ROWS`` rows in float64 is 80 MB at D = 1280; the sums are the same up to float64
rounding (the blocks are added in order).
"""

from __future__ import annotations

import numpy as np

# Rows converted to float64 at once: 8192 x 1280 x 8 B = 84 MB, large enough that BLAS runs at full speed.
BLOCK_ROWS = 8192


def _blocks(n: int, rows: int = BLOCK_ROWS):
    for s in range(0, n, rows):
        yield s, min(s + rows, n)


def column_moments(x, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), std (D,)) in float64 of a (N, D) array or tensor, two passes, one block in float64 at a time."""
    x = np.asarray(x)
    n = x.shape[0]
    total = np.zeros(x.shape[1], np.float64)
    for s, e in _blocks(n):
        total += x[s:e].sum(0, dtype=np.float64)
    mean = total / max(n, 1)
    sq = np.zeros(x.shape[1], np.float64)
    for s, e in _blocks(n):  # centred second pass: no cancellation of sum(x^2) - n mean^2
        d = x[s:e].astype(np.float64)
        d -= mean
        sq += np.einsum("ij,ij->j", d, d)
    return mean, np.sqrt(sq / max(n - ddof, 1))


def centred_products(x, y, mu_x: np.ndarray, mu_y: np.ndarray, sd_x: np.ndarray | None = None,
                     dtype=np.float64, with_gram: bool = True) -> tuple[np.ndarray | None, np.ndarray, float]:
    """(Xs^T Xs (D_x, D_x), Xs^T Yc (D_x, D_y), ||Xs||^2) with Xs = (X - mu_x) / sd_x and Yc = Y - mu_y.

    Without ``with_gram`` the first item is None (Procrustes needs only the cross product).
    ``dtype`` is the blocks' arithmetic (float32 is ~4x faster for a baseline that tolerates it); the
    sums over blocks are float64 either way.
    """
    x, y = np.asarray(x), np.asarray(y)
    sd_x = np.ones(x.shape[1]) if sd_x is None else sd_x
    gram = np.zeros((x.shape[1], x.shape[1]), np.float64) if with_gram else None
    cross = np.zeros((x.shape[1], y.shape[1]), np.float64)
    sq = 0.0
    mx, my, sx = mu_x.astype(dtype), mu_y.astype(dtype), sd_x.astype(dtype)
    for s, e in _blocks(x.shape[0]):
        xb = x[s:e].astype(dtype)  # (B, D_x), a copy: centred and scaled in place
        xb -= mx
        xb /= sx
        yb = y[s:e].astype(dtype)  # (B, D_y)
        yb -= my
        if with_gram:
            gram += xb.T @ xb
        cross += xb.T @ yb
        sq += float(np.einsum("ij,ij->", xb, xb, dtype=np.float64))
    return gram, cross, sq


def affine_mse(x, y, w: np.ndarray, c: np.ndarray) -> float:
    """Mean squared error of x @ w + c against y, in float64, a block at a time."""
    x, y = np.asarray(x), np.asarray(y)
    total = 0.0
    for s, e in _blocks(x.shape[0]):
        r = x[s:e].astype(np.float64) @ w + c - y[s:e]
        total += float(np.einsum("ij,ij->", r, r))
    return total / max(x.shape[0] * y.shape[1], 1)
