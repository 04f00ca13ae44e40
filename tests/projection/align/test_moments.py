"""Block-wise float64 statistics: the same numbers as the whole-array float64 reference, without its copies.

numpy reports its allocations to tracemalloc, so the peak extra memory of a fit is measured, not guessed.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from projection.align.baselines import ProcrustesBaseline, RidgeBaseline
from projection.align.data import ArrayReader, gather_pairs
from projection.align.moments import BLOCK_ROWS, centred_products, column_moments


def _data(n=3 * BLOCK_ROWS + 17, d_in=40, d_out=12, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d_in)) * rng.uniform(0.5, 3, d_in) + rng.uniform(-2, 2, d_in)).astype(np.float32)
    y = (np.tanh(x @ rng.standard_normal((d_in, d_out))) + 0.1 * rng.standard_normal((n, d_out))).astype(np.float32)
    return x, y


def test_moments_and_products_equal_the_float64_reference():
    x, y = _data()
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    mean, std = column_moments(x, ddof=1)
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std, x64.std(0, ddof=1), rtol=1e-12)
    gram, cross, sq = centred_products(x, y, mean, y64.mean(0), std)
    xs = (x64 - mean) / std
    np.testing.assert_allclose(gram, xs.T @ xs, rtol=1e-10)
    np.testing.assert_allclose(cross, xs.T @ (y64 - y64.mean(0)), rtol=1e-10, atol=1e-8)
    assert sq == pytest.approx(float((xs**2).sum()), rel=1e-12)


def test_ridge_matches_sklearn_and_procrustes_matches_scipy_on_padded_data():
    from scipy.linalg import orthogonal_procrustes

    x, y = _data()
    mine = RidgeBaseline(3.0, standardize=False).fit(x, y)
    ref = Ridge(alpha=3.0).fit(x.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose(mine.predict(x[:50]), ref.predict(x[:50].astype(np.float64)), rtol=1e-6, atol=1e-6)
    p = ProcrustesBaseline().fit(x, y)
    xc, yc = x.astype(np.float64) - x.mean(0, dtype=np.float64), y.astype(np.float64) - y.mean(0, dtype=np.float64)
    r, _ = orthogonal_procrustes(xc, np.pad(yc, ((0, 0), (0, x.shape[1] - y.shape[1]))))  # the old way: pad the data
    np.testing.assert_allclose(p.r, r[:, : y.shape[1]], atol=1e-4)


def test_ridge_fit_holds_no_float64_copy_of_the_train_split():
    x, y = _data(n=12 * BLOCK_ROWS, d_in=256, d_out=64)
    tracemalloc.start()
    RidgeBaseline((0.1, 1.0, 10.0), standardize=True).fit(x, y, x[:2000], y[:2000])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # one float64 copy of x is 2 x x.nbytes; the old path held three (astype, centred, scaled): 576 MiB here
    assert peak < 0.5 * x.nbytes, f"peak {peak / 2**20:.1f} MiB for {x.nbytes / 2**20:.1f} MiB of float32 input"


def test_gather_pairs_reads_each_split_once_in_ascending_order():
    x, y = _data(n=1000, d_in=8, d_out=3)
    rng = np.random.default_rng(1)
    order = rng.permutation(1000)
    sets = [order[:700], order[700:850], order[850:]]
    parts = gather_pairs(ArrayReader(x, y), sets, chunk_rows=128)
    for rows, (px, py) in zip(sets, parts):
        rows = np.sort(rows)
        np.testing.assert_array_equal(px, x[rows])
        np.testing.assert_array_equal(py, y[rows])
