"""Maps that learn from the UNPAIRED rows' statistics and their soft matching (issue 23's second method).

Why not only mutual nearest neighbours (``projection.semi.refine``, MUSE): on data the project was
not designed on (shapes under Lite0 -> MobileNetV2, stereo RGB -> depth) the mutual-NN pseudo-pairs
were 8-27 % right and refinement added little. Measured there, two things the unpaired rows give
for free did more:
1. **Their statistics.** Each side is centred on the mean of ALL its rows and scaled by their RMS
   norm before the rotation is fitted on the pairs: with 36 or 135 pairs in 1,280 dimensions the
   pairs' own mean is a poor centre (the 'centred' candidate of method.py).
2. **A soft, global matching** (Wasserstein Procrustes; Grave et al. 2019, Alvarez-Melis & Jaakkola
   2018): an entropic transport plan (Sinkhorn) over CSLS scores between the mapped unpaired
   sources and the unpaired targets, and the rotation refitted on the pairs' cross-covariance plus
   the plan's. Every candidate match contributes by its probability, so a plan that is right for
   a quarter of the rows still moves the rotation the right way, where hard mutual-NN lists mostly
   add wrong pairs. At 5 % pairs, test R@1 in the raw target space: stereo Procrustes 0.247 ->
   0.457, shapes 0.193 -> 0.317, digits halves 0.028 -> 0.106 (benchmarks/results/semi.txt).
Whitening each side on its top principal axes (VecMap) was tried as well: it won the val choice
on the two low-dimensional tables and then lost to plain Procrustes on their test pairs, so it is
not a candidate. Whether refinement helps a set is not known in advance: method.py fits the
refined and the unrefined map and lets the held-out val pairs choose.

Plain numpy; the map is affine (``affine()`` gives y = x @ A + c), saved as a linear projector.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from projection.semi.refine import _topk_mean


@dataclass
class TransportConfig:
    iters: int = 3  # Sinkhorn rounds (0: the rotation on the pairs only, in the all-rows frame)
    tau: float = 0.1  # entropic temperature on CSLS scores (which lie in about [-1, 1])
    sinkhorn_iters: int = 30
    csls_k: int = 10
    weight: float = 1.0  # the plan's cross-covariance against the pairs' (both normalised to one row's worth)
    max_rows: int = 2000  # unpaired rows per side in the plan (an n x n block per round)
    seed: int = 0


class Frame:
    """One side's coordinates from all its rows: z = (a - mean) / scale, scale the rows' RMS distance to the mean."""

    def __init__(self, a: np.ndarray):
        a = np.asarray(a, np.float64)
        self.mean = a.mean(0)
        self.scale = max(float(np.sqrt(((a - self.mean) ** 2).sum(1).mean())), 1e-12)

    def __call__(self, a) -> np.ndarray:
        return (np.asarray(a, np.float64) - self.mean) / self.scale


def sinkhorn(scores: np.ndarray, tau: float, iters: int = 30) -> np.ndarray:
    """Entropic transport plan with uniform marginals for a score matrix (n, m); sums to 1."""
    k = np.exp((scores - scores.max(1, keepdims=True)) / tau)
    u, v = np.ones(len(k)), np.ones(k.shape[1])
    for _ in range(iters):
        v = 1.0 / np.maximum(k.T @ u, 1e-300)
        u = 1.0 / np.maximum(k @ v, 1e-300)
    plan = u[:, None] * k * v[None, :]
    return plan / plan.sum()


def _rotation(cross: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(cross, full_matrices=False)
    return u @ vt  # the (semi-)orthogonal R maximising tr(R^T cross)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def csls(p: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """CSLS scores between unit rows p (n, d) and y (m, d): cosine minus each side's hubness."""
    s = p @ y.T
    return 2 * s - _topk_mean(s, k, 1)[:, None] - _topk_mean(s, k, 0)[None, :] if k > 0 else s


class TransportMap:
    """Rotation between the all-rows frames, fitted on the pairs, refined by Sinkhorn plans over unpaired rows.

    After ``fit``: ``predict``, ``affine()``, ``history`` (one dict per round: the plan's mass on each
    source row's best match, a confidence that needs no labels) and ``pseudo_pairs`` (mutual
    arg-maxima of the last plan, indices into ``x_unpaired`` / ``y_unpaired``)."""

    name = "transport"

    def __init__(self, cfg: TransportConfig | None = None):
        self.cfg = cfg or TransportConfig()

    def fit(self, x_pairs, y_pairs, x_unpaired, y_unpaired) -> "TransportMap":
        cfg, rng = self.cfg, np.random.default_rng(self.cfg.seed)
        xu, yu = (a if len(a) <= cfg.max_rows else a[np.sort(rng.choice(len(a), cfg.max_rows, replace=False))]
                  for a in (np.asarray(x_unpaired, np.float32), np.asarray(y_unpaired, np.float32)))
        self.x_unpaired, self.y_unpaired = xu, yu
        fx, fy = Frame(np.concatenate([x_pairs, x_unpaired])), Frame(np.concatenate([y_pairs, y_unpaired]))
        xp, yp, zx, zy = fx(x_pairs), fy(y_pairs), fx(xu), fy(yu)
        pairs_cross = xp.T @ yp / max(len(xp), 1)
        r = _rotation(pairs_cross)
        self.history, self.pseudo_pairs = [], (np.zeros(0, np.int64), np.zeros(0, np.int64))
        for _ in range(cfg.iters if len(zx) > 1 and len(zy) > 1 else 0):
            plan = sinkhorn(csls(_unit(zx @ r), _unit(zy), cfg.csls_k), cfg.tau, cfg.sinkhorn_iters)
            self.history.append({"plan_max_mass": float(plan.max(1).sum()), "score": float(plan.max(1).sum())})
            r = _rotation(pairs_cross + cfg.weight * (zx.T @ plan @ zy))
            best_j, best_i = plan.argmax(1), plan.argmax(0)
            i = np.flatnonzero(best_i[best_j] == np.arange(len(plan)))
            self.pseudo_pairs = (i, best_j[i])
        if not self.history:
            self.history = [{"plan_max_mass": 0.0, "score": 0.0}]
        self.a = r * (fy.scale / fx.scale)  # (D_src, D_tgt): y = ((x - mx) / sx) R sy + my
        self.c = fy.mean - fx.mean @ self.a
        return self

    def predict(self, x) -> np.ndarray:
        return (np.asarray(x, np.float64) @ self.a + self.c).astype(np.float32)  # (N, D_src) -> (N, D_tgt)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        return self.a, self.c
