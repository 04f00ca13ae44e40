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

from projection.align.config import BaselineConfig
from projection.align.moments import affine_mse, centred_products, column_moments


def _as_2d_float(x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array (N, D), got shape {x.shape}")
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


class RidgeBaseline:
    """Ridge least squares; alpha chosen on the validation split when several are given.

    A fixed alpha=1 was no fair bar: on 640 digit pairs the val-best alpha is ~100x larger, and
    the baseline an MLP is compared with must be the best ridge one can honestly pick. With
    validation pairs, each alpha is fitted on train and scored by val MSE (the test split never
    chooses); without them, scikit-learn's RidgeCV picks by efficient leave-one-out on train.
    """

    name = "ridge"

    def __init__(self, alpha: float | tuple[float, ...] = 1.0, fit_intercept: bool = True, standardize: bool = False):
        self.alphas = tuple(alpha) if isinstance(alpha, (tuple, list)) else (float(alpha),)
        self.fit_intercept, self.standardize = fit_intercept, standardize

    def _pipeline(self, estimator):  # only for RidgeCV (no validation split)
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), estimator) if self.standardize else estimator

    def fit(self, x, y, x_val=None, y_val=None) -> "RidgeBaseline":
        x, y = _as_2d_float(x), _as_2d_float(y)
        if len(self.alphas) > 1 and (x_val is None or len(x_val) == 0):
            from sklearn.linear_model import RidgeCV  # lazy: sklearn import is slow

            self.model = self._pipeline(RidgeCV(alphas=self.alphas, fit_intercept=self.fit_intercept)).fit(x, y)
            self.alpha, self.val_mse = float(self._ridge().alpha_), {}
            self._a, self._c = self._affine_of_model()
            return self
        self.alpha, self._a, self._c, self.val_mse = _ridge_path(x, y, self.alphas, x_val, y_val, self.fit_intercept,
                                                                 self.standardize)
        return self

    def _ridge(self):
        return self.model[-1] if self.standardize else self.model

    def _affine_of_model(self) -> tuple[np.ndarray, np.ndarray]:
        ridge = self._ridge()
        coef = np.atleast_2d(ridge.coef_).astype(np.float64)  # (D_tgt, D_src)
        c = np.broadcast_to(np.asarray(ridge.intercept_, np.float64), (coef.shape[0],)).copy()
        if self.standardize:
            scaler = self.model[0]
            coef = coef / scaler.scale_[None, :]
            c -= coef @ scaler.mean_
        return coef.T, c

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(A (D_src, D_tgt), c (D_tgt,)) float64 with predict(x) = x @ A + c: the map a projector can start from."""
        return self._a, self._c

    def predict(self, x) -> np.ndarray:
        """float64 always: in collapsed spaces float32 rounding (~1e-7) reorders the top candidates."""
        x = _as_2d_float(x).astype(np.float64, copy=False)
        return x @ self._a + self._c  # (N, D_src) -> (N, D_tgt)


def _ridge_path(x, y, alphas, x_val, y_val, fit_intercept: bool, standardize: bool):
    """Ridge for every alpha from ONE eigendecomposition of the train Gram matrix; keep the val-best.

    Same estimator as scikit-learn's Ridge (intercept unpenalised, optional z-scoring with ddof=0),
    but a path of 9 alphas costs one Gram (N D^2) and one eigh (D^3) instead of 9 fits: at
    N=20k, D=256 one sklearn fit alone took 2.2 s on the shared 2-core machine.
    Returns (alpha, A (D_src, D_tgt), c (D_tgt,), {alpha: val MSE}) in the raw input space.
    """
    # Block-wise float64 sums (projection.align.moments): no float64 copy of the train split, which
    # at 56k x 1280 rows held 1.7 GB beside 0.29 GB of data.
    if standardize or fit_intercept:
        mu_x, sd = column_moments(x)
    if not fit_intercept:
        mu_x = np.zeros(x.shape[1])
    mu_y = column_moments(y)[0] if fit_intercept else np.zeros(y.shape[1])
    sd = sd if standardize else np.ones(x.shape[1])
    sd = np.where(sd > 0, sd, 1.0)  # a constant column carries nothing (as StandardScaler)
    gram, cross, _ = centred_products(x, y, mu_x, mu_y, sd)  # Xs^T Xs (D_src, D_src), Xs^T Yc (D_src, D_tgt)
    evals, evecs = np.linalg.eigh(gram)  # (D_src,), (D_src, D_src)
    proj = evecs.T @ cross  # (D_src, D_tgt)
    val_mse, best = {}, None
    for alpha in alphas:
        w = evecs @ (proj / np.maximum(evals + alpha, 1e-12)[:, None]) / sd[:, None]  # (D_src, D_tgt), raw-space
        c = mu_y - mu_x @ w
        if len(alphas) > 1:
            val_mse[alpha] = affine_mse(_as_2d_float(x_val), y_val, w, c)
        if best is None or val_mse.get(alpha, 0.0) < val_mse.get(best[0], 0.0):
            best = (float(alpha), w, c)
    return (*best, val_mse)


class ProcrustesBaseline:
    name = "procrustes"

    def __init__(self, scale: bool = True):
        self.scale = scale

    def fit(self, x, y) -> "ProcrustesBaseline":
        # Stay in the input dtype: float32 X^T Y at N=50k is 4x faster than float64 and the
        # result is only a baseline; float64 inputs get a float64 (exact) fit.
        x, y = _as_2d_float(x), _as_2d_float(y)
        self.d_in, self.d_out = x.shape[1], y.shape[1]
        mu_x, mu_y = x.mean(0, dtype=np.float64), y.mean(0, dtype=np.float64)
        self.mu_x, self.mu_y = mu_x.astype(x.dtype), mu_y.astype(y.dtype)
        # Xc^T Yc block by block (no centred or zero-padded copy of the data), then padded to square:
        # the padded problem's SVD is what orthogonal_procrustes solves on padded data.
        _, cross, sq = centred_products(x, y, mu_x, mu_y, dtype=x.dtype, with_gram=False)  # (D_src, D_tgt)
        d = max(self.d_in, self.d_out)
        m = np.zeros((d, d)); m[: self.d_in, : self.d_out] = cross
        u, w, vt = np.linalg.svd(m)
        r, sv_sum = u @ vt, float(w.sum())  # (D, D) orthogonal
        # Optimal s for min ||s X R - Y||: trace(R^T X^T Y) / ||X||^2 = sum of singular values / ||X||^2.
        self.s = float(sv_sum / max(sq, 1e-30)) if self.scale else 1.0
        self.r = r[: self.d_in, : self.d_out]  # (D_src, D_tgt): padded rows/cols never touch data
        return self

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


def fit_baselines(x, y, cfg: BaselineConfig | None = None, x_val=None, y_val=None) -> dict[str, object]:
    """All applicable baselines, name -> fitted object with `.predict(X)`; ridge's alpha picked on (x_val, y_val)."""
    cfg = cfg or BaselineConfig()
    fitted: dict[str, object] = {
        "ridge": RidgeBaseline(tuple(cfg.ridge_alphas), cfg.fit_intercept, cfg.standardize).fit(x, y, x_val, y_val),
        "procrustes": ProcrustesBaseline(cfg.procrustes_scale).fit(x, y),
    }
    if np.shape(x)[1] == np.shape(y)[1]:
        fitted["identity"] = IdentityBaseline().fit(x, y)
    return fitted
