"""``align``'s unpaired modes, and the choice among pairs-only and refined maps made on validation pairs.

'semi' (issue 23): a refinement that helped on Fashion-MNIST added 0.01 R@1 on a new user's
images, and at 1 % pairs it fell BELOW Procrustes on the pairs alone. So the method no longer
trusts one recipe: it fits the pairs-only maps (ridge, Procrustes), the raw-space refinement and
the refinement in whitened principal coordinates (``projection.semi.whiten``) at a few widths,
scores each by R@1 of the held-out val pairs against a pool of val + unpaired targets, and keeps
the best. The semi-supervised MLP then starts at that map (its affine path) and trains on its
pseudo-pairs; it is kept only if it beats the chosen map on the same val score. Hence: never
below the best pairs-only map on validation. Without val pairs (fewer than 2) nothing can be
chosen honestly: the raw refinement and the MLP are used as before.

'zero_pair': the refined Procrustes map from the moment seed, as a linear projector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from projection.align.baselines import ProcrustesBaseline, RidgeBaseline
from projection.align.config import ProjectorConfig, TrainConfig
from projection.align.projector import Projector
from projection.align.train import TrainResult, predict
from projection.semi.objective import SemiConfig
from projection.semi.refine import RefinedMap, RefineConfig
from projection.semi.trainer import linear_projector, train_semi
from projection.semi.whiten import WhitenedRefinedMap

WHITEN_DIMS = (16, 32, 64, 128)  # principal axes kept per side; chosen on val
POOL = 2000  # unpaired targets added to the val targets as distractors


@dataclass
class SemiFit:
    model: Projector  # what align saves: the MLP, or the chosen closed form as a linear projector
    refined: object  # the chosen unpaired-rows map (reported as the 'refined' baseline)
    chosen: str  # 'mlp' or the name of the closed form the model is
    val_r1: dict[str, float] = field(default_factory=dict)  # every candidate's val score
    train: TrainResult | None = None


def val_r1(pred: np.ndarray, y_val: np.ndarray, pool: np.ndarray) -> float:
    """R@1 of predicted val targets among val targets + ``pool`` (cosine, as the test metric)."""
    t = np.concatenate([y_val, pool]).astype(np.float64)
    t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    p = np.asarray(pred, np.float64)
    p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    return float(((p @ t.T).argmax(1) == np.arange(len(p))).mean())


def candidates(xp, yp, xu, yu, seed: int, x_val=None, y_val=None) -> dict[str, object]:
    """Every map the choice is made among: pairs-only (ridge, Procrustes) and unpaired-rows (refined, whitened)."""
    out: dict[str, object] = {}
    if len(xp) >= 2:
        out["ridge"] = RidgeBaseline((0.1, 1.0, 10.0, 100.0, 1000.0), standardize=True).fit(xp, yp, x_val, y_val)
        out["procrustes"] = ProcrustesBaseline().fit(xp, yp)
    seed_from = "pairs" if len(xp) >= 2 else "auto"
    out["refined_raw"] = RefinedMap(RefineConfig(base="procrustes", seed=seed, seed_from=seed_from)).fit(xp, yp, xu, yu)
    top = min(xp.shape[1], yp.shape[1])
    for k in sorted({min(k, top) for k in WHITEN_DIMS}):
        out[f"refined_white{k}"] = WhitenedRefinedMap(k, RefineConfig(seed=seed, seed_from=seed_from)).fit(xp, yp, xu, yu)
    return out


def fit_semi_mode(mode: str, xp, yp, xu, yu, pcfg: ProjectorConfig, train: TrainConfig, cfg: SemiConfig | None = None,
                  callback=None, val: tuple[np.ndarray, np.ndarray] | None = None,
                  checkpoint_dir: str | Path | None = None) -> SemiFit:
    """Fit mode 'semi' or 'zero_pair' (see the module doc); ``val``: held-out pairs that choose."""
    if mode == "zero_pair":
        refined = RefinedMap(RefineConfig(base="procrustes", seed=train.seed)).fit(xp, yp, xu, yu)
        _log_refine(refined, callback)
        return SemiFit(linear_projector(refined.map, pcfg.d_in, pcfg.d_out), refined, "refined_raw")
    if mode != "semi":
        raise ValueError(f"unknown mode {mode!r}; choose 'pairs', 'semi' or 'zero_pair'")
    has_val = val is not None and len(val[0]) >= 2
    if not has_val:
        refined = RefinedMap(RefineConfig(base="procrustes", seed=train.seed)).fit(xp, yp, xu, yu)
        _log_refine(refined, callback)
        res = _mlp(refined, xp, yp, xu, yu, pcfg, train, cfg, callback, None, checkpoint_dir)
        return SemiFit(res.model, refined, "mlp", {}, res.train)
    xv, yv = val
    pool = yu[np.random.default_rng(train.seed).permutation(len(yu))[:POOL]]
    maps = candidates(xp, yp, xu, yu, train.seed, xv, yv)
    scores = {name: val_r1(m.predict(xv), yv, pool) for name, m in maps.items()}
    unpaired = {k: v for k, v in scores.items() if k.startswith("refined")}
    best_refined = max(unpaired, key=lambda k: (unpaired[k], k == "refined_raw"))
    best = max(scores, key=lambda k: (scores[k], k.startswith("refined")))
    refined = maps[best_refined]
    _log_refine(refined, callback)
    if callback is not None:
        callback("choose", 0, {f"val_r1/{k}": v for k, v in scores.items()})
    chosen_map = maps[best]
    fallback = linear_projector(chosen_map, pcfg.d_in, pcfg.d_out)
    if not best.startswith("refined") or pcfg.kind != "mlp":  # the pairs alone are best: no pseudo-pairs to train on
        return SemiFit(fallback, refined, best, scores)
    res = _mlp(chosen_map, xp, yp, xu, yu, pcfg, train, cfg, callback, val, checkpoint_dir)
    scores["mlp"] = val_r1(predict(res.model, xv), yv, pool)
    if scores["mlp"] > scores[best]:
        return SemiFit(res.model, refined, "mlp", scores, res.train)
    return SemiFit(fallback, refined, best, scores, res.train)


def _mlp(refined, xp, yp, xu, yu, pcfg, train, cfg, callback, val, checkpoint_dir):
    """The semi-supervised MLP started at ``refined`` (forward) and Procrustes on its pseudo-pairs (reverse)."""
    i, j = refined.pseudo_pairs
    xq, yq = refined.x_unpaired[i], refined.y_unpaired[j]
    start = (getattr(refined, "map", refined), ProcrustesBaseline().fit(np.concatenate([yp, yq]), np.concatenate([xp, xq])))
    return train_semi(xp, yp, xu, yu, pcfg, train, cfg, (xq, yq), callback, start, val, checkpoint_dir)


def _log_refine(refined, callback) -> None:
    if callback is not None:
        for k, h in enumerate(refined.history):
            callback("refine", k, {f"refine/{n}": v for n, v in h.items()})
