"""Closed-form alignment that also learns from UNPAIRED rows: seed map, then mutual-NN refinement.

The MUSE recipe (Conneau et al. 2018, "Word translation without parallel data") and its
descendants: fit a map on the few known pairs (the seed dictionary), map every unpaired source
row into target space, keep the pairs that are each other's nearest neighbour (optionally under
CSLS, which discounts "hub" targets that are near everything), refit on known pairs + these
pseudo-pairs, repeat. The unpaired rows need not be the same items on both sides; the more they
overlap, the more pseudo-pairs are true pairs.

Zero pairs (or too few to fix a rotation: Procrustes needs about D of them): ``moment_seed``
matches the two spaces' principal axes by rank, fixes each axis's sign by its skewness, and takes
mutual nearest neighbours in those whitened coordinates as the first pseudo-pairs. It can only
work when the two spaces have the same geometry up to a rotation, i.e. two encoders of the same
inputs; cross-modal spaces (image vs caption) do not, and the benchmark reports that. We first
tried mini-vec2vec's anchors (Dar et al. 2025: k-means per side, centroids matched by scipy's
quadratic_assignment): on a 12-cluster synthetic rotation FAQ found a permutation with 0 of 20
anchors right (objective 22 vs 36 for the true one), where the moment seed put 89 % of its
mutual-NN pairs right and the refined rotation came within 0.005 (Frobenius / sqrt(D)).

Plain numpy/scipy/scikit-learn; the base map is one of the baselines in ``projection.align.baselines``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from projection.align.baselines import ProcrustesBaseline, RidgeBaseline


@dataclass
class RefineConfig:
    base: str = "procrustes"  # map refitted each round: 'procrustes' (isometry + scale) or 'ridge'
    iters: int = 5  # refinement rounds; MUSE uses 5, gains stop after 2-3 on our settings
    csls_k: int = 10  # neighbours for the CSLS hubness correction; 0 = plain cosine
    keep: float = 1.0  # fraction of mutual NN kept each round, most confident first
    ridge_alpha: float = 1.0
    max_rows: int = 20_000  # unpaired rows per side used for matching (an n x m block each round)
    seed_from: str = "auto"  # 'pairs', 'moments' (zero-pair seed, see moment_seed) or 'auto': refine both, keep the stronger
    seed_components: int = 16  # principal axes matched when there are no pairs (moment_seed)
    seed: int = 0


def _unit(a: np.ndarray, mean: np.ndarray) -> np.ndarray:
    a = a - mean
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _topk_mean(sims: np.ndarray, k: int, axis: int) -> np.ndarray:
    k = min(k, sims.shape[axis])
    return -np.partition(-sims, k - 1, axis=axis).take(range(k), axis=axis).mean(axis=axis)


def mutual_nn(p: np.ndarray, y: np.ndarray, csls_k: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows i of ``p`` and j of ``y`` that are each other's best match: (i, j, score), best first.

    p (n, D), y (m, D): unit vectors in one space. CSLS(i, j) = 2 cos(i, j) - r_p(i) - r_y(j),
    r = mean cosine to the k nearest of the other side.
    """
    sims = p @ y.T  # (n, m)
    if csls_k > 0:
        sims = 2 * sims - _topk_mean(sims, csls_k, 1)[:, None] - _topk_mean(sims, csls_k, 0)[None, :]
    best_j, best_i = sims.argmax(1), sims.argmax(0)  # (n,), (m,)
    i = np.flatnonzero(best_i[best_j] == np.arange(len(p)))
    j = best_j[i]
    score = sims[i, j]
    order = np.argsort(-score, kind="stable")
    return i[order], j[order], score[order]


def _base(cfg: RefineConfig):
    if cfg.base == "procrustes":
        return ProcrustesBaseline(scale=True)
    if cfg.base == "ridge":
        return RidgeBaseline(cfg.ridge_alpha, standardize=True)
    raise ValueError(f"unknown refinement base map {cfg.base!r}; choose 'procrustes' or 'ridge'")


def _sample(a: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return a if len(a) <= n else a[np.sort(rng.choice(len(a), n, replace=False))]


class RefinedMap:
    """Seed map on pairs (or anchors), refined by mutual nearest neighbours among unpaired rows.

    After ``fit``: ``predict(x)`` maps (N, D_src) -> (N, D_tgt); ``pseudo_pairs`` holds the last
    round's (source row, target row) indices into the unpaired arrays; ``history`` one dict per
    round (pseudo-pair count and mean score).
    """

    name = "refined"

    def __init__(self, cfg: RefineConfig | None = None):
        self.cfg = cfg or RefineConfig()

    def fit(self, x_pairs, y_pairs, x_unpaired, y_unpaired) -> "RefinedMap":
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        xp, yp = np.asarray(x_pairs, np.float32), np.asarray(y_pairs, np.float32)
        xu = _sample(np.asarray(x_unpaired, np.float32), cfg.max_rows, rng)
        yu = _sample(np.asarray(y_unpaired, np.float32), cfg.max_rows, rng)
        self.x_unpaired, self.y_unpaired = xu, yu
        has_unpaired = len(xu) > 1 and len(yu) > 1
        seeds = []
        if len(xp) >= 2:
            seeds.append(("pairs", xp, yp))
        if has_unpaired and (cfg.seed_from in ("moments", "auto") or not seeds):
            i, j, _ = moment_seed(xu, yu, cfg.seed_components)  # pairs found without any labels
            seeds.append(("moments", np.concatenate([xp, xu[i]]), np.concatenate([yp, yu[j]])))
        if not seeds or (cfg.seed_from == "moments" and seeds[-1][0] != "moments"):
            raise ValueError(f"refinement needs at least 2 pairs or unpaired rows on both sides; got {len(xp)} pairs, "
                             f"{len(xu)} unpaired source and {len(yu)} unpaired target rows")
        # Several seeds: refine each, keep the one whose final mutual-NN matching is strongest
        # (MUSE's unsupervised model selection, here the summed CSLS score of the matches).
        runs = [self._refine(_base(cfg).fit(sx, sy), xp, yp, xu, yu) | {"seed": name} for name, sx, sy in seeds]
        best = max(runs, key=lambda r: r["strength"])
        self.map, self.pseudo_pairs, self.history, self.seed_used = best["map"], best["pairs"], best["history"], best["seed"]
        return self

    def _refine(self, seed_map, xp, yp, xu, yu) -> dict:
        cfg, fitted = self.cfg, seed_map
        out = {"map": fitted, "pairs": (np.zeros(0, np.int64), np.zeros(0, np.int64)), "history": [], "strength": 0.0}
        if len(xu) < 2 or len(yu) < 2:
            return out
        y_mean = np.concatenate([yp, yu]).mean(0)
        yu_unit = _unit(yu, y_mean)  # (m, D_tgt)
        for it in range(cfg.iters + 1):  # the last round only scores the final map
            i, j, score = mutual_nn(_unit(fitted.predict(xu), y_mean), yu_unit, cfg.csls_k)
            n_keep = int(round(cfg.keep * len(i)))
            i, j, score = i[:n_keep], j[:n_keep], score[:n_keep]
            out |= {"map": fitted, "pairs": (i, j), "strength": float(score.sum())}
            out["history"].append({"pseudo_pairs": float(len(i)), "score": float(score.mean()) if len(i) else 0.0})
            if it == cfg.iters or len(xp) + len(i) < 2:
                break
            fitted = _base(cfg).fit(np.concatenate([xp, xu[i]]), np.concatenate([yp, yu[j]]))
        return out

    def predict(self, x) -> np.ndarray:
        return self.map.predict(x)  # (N, D_src) -> (N, D_tgt)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, c) with predict(x) = x @ A + c (both base maps are affine)."""
        m = self.map
        if hasattr(m, "affine"):
            return m.affine()
        a = m.s * np.asarray(m.r, np.float64)  # (D_src, D_tgt)
        return a, np.asarray(m.mu_y, np.float64) - np.asarray(m.mu_x, np.float64) @ a


def _principal_coords(a: np.ndarray, r: int) -> np.ndarray:
    """Top-r whitened principal coordinates, each axis's sign fixed so its skewness is positive.

    Two encoders whose spaces differ by a rotation (plus noise) have the same spectrum, so their
    i-th principal axes correspond; whitening removes the scale and the third moment removes the
    sign ambiguity the SVD leaves. (N, D) -> (N, r).
    """
    a = a - a.mean(0)
    evals, evecs = np.linalg.eigh(a.T @ a / len(a))  # (D,), (D, D) ascending; D x D, not N x N
    top = np.argsort(evals)[::-1][:r]
    z = a @ evecs[:, top] / np.sqrt(np.maximum(evals[top], 1e-12))  # (N, r), unit variance per axis
    return z * np.where((z**3).mean(0) < 0, -1.0, 1.0)


def moment_seed(x, y, components: int = 16, csls_k: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pseudo-pairs from two UNPAIRED sets (no pairs at all): (i into x, j into y, score), best first.

    Matches principal axis to principal axis by rank (sign by skewness), then takes mutual nearest
    neighbours in those coordinates. Only meaningful when both sets are embeddings of similar
    inputs by encoders with the same geometry up to a rotation.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    r = min(components, x.shape[1], y.shape[1], len(x) - 1, len(y) - 1)
    zx, zy = _principal_coords(x, r), _principal_coords(y, r)
    return mutual_nn(_unit(zx, 0), _unit(zy, 0), csls_k)
