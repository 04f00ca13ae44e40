"""Closed-form maps fitted on the train split: the bar a trained projector must clear.

Procrustes with different dims: we ZERO-PAD the smaller side to max(D_src, D_tgt) rather
than PCA-reduce. Padding loses no information and solves exactly the "best semi-orthogonal
map" problem: for D_src < D_tgt it gives an isometric embedding R (D_src, D_tgt) with
orthonormal rows; for D_src > D_tgt it gives an orthogonal map followed by keeping the
first D_tgt coordinates. Data are centred first (means stored and re-added), and an
optional single global scale absorbs the norm difference between encoders.
"""

from __future__ import annotations

import numpy as np

from projection.config import BaselineConfig


def _as_2d_float(x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array (N, D), got shape {x.shape}")
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


class RidgeBaseline:
    name = "ridge"

    def __init__(self, alpha: float = 1.0, fit_intercept: bool = True, standardize: bool = False):
        self.alpha, self.fit_intercept, self.standardize = alpha, fit_intercept, standardize

    def fit(self, x, y) -> "RidgeBaseline":
        from sklearn.linear_model import Ridge  # lazy: sklearn import is slow
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        # cholesky on the (D_src, D_src) normal equations: one pass over N, fast at N=50k.
        ridge = Ridge(alpha=self.alpha, fit_intercept=self.fit_intercept, solver="cholesky")
        self.model = make_pipeline(StandardScaler(), ridge) if self.standardize else ridge
        self.model.fit(_as_2d_float(x), _as_2d_float(y))
        return self

    def predict(self, x) -> np.ndarray:
        return np.asarray(self.model.predict(_as_2d_float(x)))  # (N, D_src) -> (N, D_tgt)


class ProcrustesBaseline:
    name = "procrustes"

    def __init__(self, scale: bool = True):
        self.scale = scale

    def fit(self, x, y) -> "ProcrustesBaseline":
        from scipy.linalg import orthogonal_procrustes

        # Stay in the input dtype: float32 X^T Y at N=50k is 4x faster than float64 and the
        # result is only a baseline; float64 inputs get a float64 (exact) fit.
        x, y = _as_2d_float(x), _as_2d_float(y)
        self.d_in, self.d_out = x.shape[1], y.shape[1]
        self.mu_x = x.mean(0, dtype=np.float64).astype(x.dtype)
        self.mu_y = y.mean(0, dtype=np.float64).astype(y.dtype)
        d = max(self.d_in, self.d_out)
        xc, yc = self._pad(x - self.mu_x, d), self._pad(y - self.mu_y, d)  # (N, D), (N, D)
        r, sv_sum = orthogonal_procrustes(xc, yc)  # (D, D) orthogonal
        # Optimal s for min ||s X R - Y||: trace(R^T X^T Y) / ||X||^2 = sum of singular values / ||X||^2.
        self.s = float(sv_sum / max(float(np.vdot(xc, xc)), 1e-30)) if self.scale else 1.0
        self.r = r[: self.d_in, : self.d_out]  # (D_src, D_tgt): padded rows/cols never touch data
        return self

    @staticmethod
    def _pad(a: np.ndarray, d: int) -> np.ndarray:
        return a if a.shape[1] == d else np.pad(a, ((0, 0), (0, d - a.shape[1])))

    def predict(self, x) -> np.ndarray:
        x = _as_2d_float(x)
        return (self.s * (x - self.mu_x) @ self.r + self.mu_y).astype(x.dtype)  # (N, D_src) -> (N, D_tgt)


class IdentityBaseline:
    """Only meaningful when both encoders share a space (e.g. two CLIP towers)."""

    name = "identity"

    def fit(self, x, y) -> "IdentityBaseline":
        dx, dy = _as_2d_float(x).shape[1], _as_2d_float(y).shape[1]
        if dx != dy:
            raise ValueError(f"identity baseline needs equal dims, got D_src={dx}, D_tgt={dy}")
        return self

    def predict(self, x) -> np.ndarray:
        return _as_2d_float(x)


def fit_baselines(x, y, cfg: BaselineConfig | None = None) -> dict[str, object]:
    """All applicable baselines, name -> fitted object with `.predict(X)`."""
    cfg = cfg or BaselineConfig()
    fitted: dict[str, object] = {
        "ridge": RidgeBaseline(cfg.ridge_alpha, cfg.fit_intercept, cfg.standardize).fit(x, y),
        "procrustes": ProcrustesBaseline(cfg.procrustes_scale).fit(x, y),
    }
    if np.shape(x)[1] == np.shape(y)[1]:
        fitted["identity"] = IdentityBaseline().fit(x, y)
    return fitted
