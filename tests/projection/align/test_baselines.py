import time

import numpy as np
import pytest
from scipy.stats import ortho_group

from projection.align.baselines import IdentityBaseline, ProcrustesBaseline, RidgeBaseline, fit_baselines
from projection.align.config import BaselineConfig


def test_procrustes_recovers_rotation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16))
    r = ortho_group.rvs(16, random_state=1)
    y = x @ r + 3.0  # shifted: centring must handle the offset
    b = ProcrustesBaseline().fit(x, y)
    np.testing.assert_allclose(b.r, r, atol=1e-10)
    assert b.s == pytest.approx(1.0)
    np.testing.assert_allclose(b.predict(x), y, atol=1e-10)


def test_procrustes_scale():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    r = ortho_group.rvs(8, random_state=2)
    b = ProcrustesBaseline(scale=True).fit(x, 2.5 * x @ r)
    assert b.s == pytest.approx(2.5)


@pytest.mark.parametrize("d_in,d_out", [(6, 10), (10, 6)])
def test_procrustes_dims_differ(d_in, d_out):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, d_in))
    q = ortho_group.rvs(max(d_in, d_out), random_state=3)[:d_in, :d_out]  # semi-orthogonal
    y = x @ q
    b = ProcrustesBaseline().fit(x, y)
    pred = b.predict(x)
    assert pred.shape == (400, d_out)
    if d_in < d_out:  # an isometric embedding is exactly recoverable
        np.testing.assert_allclose(pred, y, atol=1e-8)
        np.testing.assert_allclose(b.r @ b.r.T, np.eye(d_in), atol=1e-10)
    else:  # y is a projection of x; the fit is the best semi-orthogonal map
        assert np.mean((pred - y) ** 2) < np.mean(y**2)


def test_ridge_recovers_linear_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 12)).astype(np.float32)
    w = rng.normal(size=(12, 5))
    y = x @ w + 0.5
    b = RidgeBaseline(alpha=1e-6).fit(x, y)
    np.testing.assert_allclose(b.predict(x), y, atol=1e-3)


def test_identity_and_fit_baselines():
    x = np.ones((10, 3), np.float32)
    assert set(fit_baselines(x, x, BaselineConfig())) == {"ridge", "procrustes", "identity"}
    assert set(fit_baselines(x, np.ones((10, 4)))) == {"ridge", "procrustes"}
    with pytest.raises(ValueError, match="equal dims"):
        IdentityBaseline().fit(x, np.ones((10, 4)))


def test_fast_at_scale():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(size=(20_000, 256), dtype=np.float32)
    y = rng.standard_normal(size=(20_000, 256), dtype=np.float32)
    t = time.perf_counter()
    fit_baselines(x[:18_000], y[:18_000], x_val=x[18_000:], y_val=y[18_000:])  # as align calls it: alpha on val
    assert time.perf_counter() - t < 20  # well under a second on 2 idle cores; generous for shared CI (benchmarks/align.py times N=50k)


def test_ridge_alpha_is_chosen_on_validation_and_beats_a_fixed_small_alpha():
    # 120 noisy pairs in 60 dims: a small alpha fits the noise, validation must pick a larger one.
    rng = np.random.default_rng(0)
    w = rng.normal(size=(60, 8))
    x = rng.normal(size=(400, 60)).astype(np.float32)
    y = (x @ w + 8.0 * rng.normal(size=(400, 8))).astype(np.float32)
    tr, va, te = slice(0, 120), slice(120, 200), slice(200, 400)
    tuned = RidgeBaseline((1e-3, 1e-1, 10.0, 1e3), standardize=True).fit(x[tr], y[tr], x[va], y[va])
    fixed = RidgeBaseline(1e-3, standardize=True).fit(x[tr], y[tr])
    assert tuned.alpha > 1e-3 and tuned.alpha == min(tuned.val_mse, key=tuned.val_mse.get)
    mse = {name: float(np.mean((b.predict(x[te]) - y[te]) ** 2)) for name, b in (("tuned", tuned), ("fixed", fixed))}
    assert mse["tuned"] < mse["fixed"], mse
    cv = RidgeBaseline((1e-3, 1e-1, 10.0, 1e3), standardize=True).fit(x[tr], y[tr])  # no val: RidgeCV's LOO
    assert cv.alpha > 1e-3
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ref = make_pipeline(StandardScaler(), Ridge(alpha=tuned.alpha)).fit(x[tr], y[tr])  # the same estimator
    np.testing.assert_allclose(tuned.predict(x[te]), ref.predict(x[te]), rtol=1e-3, atol=1e-3)
