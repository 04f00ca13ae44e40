"""``align``'s unpaired modes, and the choice among pairs-only and refined maps made on validation pairs.

'semi' (issue 23): a refinement that helped on Fashion-MNIST added 0.01 R@1 on a new user's
images, and at 1 % pairs it fell BELOW Procrustes on the pairs alone. So the method no longer
trusts one recipe: it fits the pairs-only maps (ridge, Procrustes), the raw-space refinement and
the refinement at two self-training confidence thresholds (``KEEP``), optionally in whitened
principal coordinates (``projection.semi.whiten``; below raw on the shapes set, off by default),
scores each by the rank of the held-out val pairs against a pool of val + unpaired targets, and keeps
the best. The semi-supervised MLP then starts at that map (its affine path) and trains on its
pseudo-pairs; it is kept only if it beats the chosen map on the same val score (MRR, see ``val_mrr``). Hence: never
below the best pairs-only map on validation. Without val pairs (fewer than 2) nothing can be
chosen honestly: the raw refinement and the MLP are used as before.

'zero_pair': the refined Procrustes map from the moment seed, as a linear projector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path

import numpy as np

from projection.align.baselines import ProcrustesBaseline, RidgeBaseline
from projection.align.config import LossConfig, ProjectorConfig, TrainConfig
from projection.align.data import InMemoryPairs
from projection.align.fit import fit_projector
from projection.align.projector import Projector
from projection.align.train import TrainResult, predict
from projection.semi.objective import SemiConfig
from projection.semi.refine import RefinedMap, RefineConfig
from projection.semi.trainer import linear_projector, train_semi
from projection.semi.whiten import WhitenedRefinedMap

WHITEN_DIMS: tuple[int, ...] = ()  # whitened candidates (e.g. (32, 64)); measured below raw refinement, so off by default
KEEP = (1.0, 0.5)  # self-training confidence thresholds: fraction of mutual NN kept per round, chosen on val
POOL = 2000  # unpaired targets added to the val targets as distractors


@dataclass
class SemiFit:
    model: Projector  # what align saves: the MLP, or the chosen closed form as a linear projector
    refined: object  # the best unpaired-rows map on val (reported as the 'refined' baseline)
    chosen: str  # 'mlp' or the name of the closed form the model is
    val_score: dict[str, float] = field(default_factory=dict)  # every candidate's val MRR
    train: TrainResult | None = None


def val_mrr(pred: np.ndarray, y_val: np.ndarray, pool: np.ndarray) -> float:
    """Mean reciprocal rank of each val pair's true target among val targets + ``pool`` (cosine, as the test metric).

    MRR rather than R@1: with ~30 val pairs against 2,000 distractors R@1 moves in steps of 0.03 and
    is 0 for most candidates at 1 % pairs; the rank still orders them."""
    t = np.concatenate([y_val, pool]).astype(np.float64)
    t /= np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    p = np.asarray(pred, np.float64)
    p /= np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    sims = p @ t.T  # (V, V + pool)
    rank = (sims > sims[np.arange(len(p)), np.arange(len(p))][:, None]).sum(1)
    return float((1.0 / (1 + rank)).mean())


def candidate_fits(n_pairs: int, dims: tuple[int, int], seed: int) -> dict[str, Callable]:
    """name -> fit(xp, yp, xu, yu, x_val, y_val): pairs-only maps and unpaired-rows maps, the set chosen among."""
    out: dict[str, Callable] = {}
    if n_pairs >= 2:
        out["ridge"] = lambda xp, yp, xu, yu, xv, yv: RidgeBaseline((0.1, 1.0, 10.0, 100.0, 1000.0), standardize=True).fit(
            xp, yp, xv, yv)
        out["procrustes"] = lambda xp, yp, xu, yu, xv, yv: ProcrustesBaseline().fit(xp, yp)
    seed_from = "pairs" if n_pairs >= 2 else "auto"
    for keep in KEEP:
        cfg = RefineConfig(base="procrustes", seed=seed, seed_from=seed_from, keep=keep)
        out[f"refined_keep{keep:g}"] = lambda xp, yp, xu, yu, xv, yv, cfg=cfg: RefinedMap(cfg).fit(xp, yp, xu, yu)
    for k in sorted({min(k, *dims) for k in WHITEN_DIMS}):
        cfg = RefineConfig(seed=seed, seed_from=seed_from)
        out[f"refined_white{k}"] = lambda xp, yp, xu, yu, xv, yv, k=k, cfg=cfg: WhitenedRefinedMap(k, cfg).fit(xp, yp, xu, yu)
    return out


def fit_semi_mode(mode: str, xp, yp, xu, yu, pcfg: ProjectorConfig, train: TrainConfig, cfg: SemiConfig | None = None,
                  callback=None, val: tuple[np.ndarray, np.ndarray] | None = None,
                  checkpoint_dir: str | Path | None = None, refit_with_val: bool = False) -> SemiFit:
    """Fit mode 'semi' or 'zero_pair' (see the module doc); ``val``: held-out pairs that choose.

    ``refit_with_val``: the val pairs came out of the pair budget (the benchmark), so a chosen closed
    form is refitted on pairs + val; the flow's val split is held out like stage 1's, so it is not."""
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
    fits = candidate_fits(len(xp), (xp.shape[1], yp.shape[1]), train.seed)
    maps = {name: fit(xp, yp, xu, yu, xv, yv) for name, fit in fits.items()}
    scores = {name: val_mrr(m.predict(xv), yv, pool) for name, m in maps.items()}
    unpaired = {k: v for k, v in scores.items() if k.startswith("refined")}
    best_refined = max(unpaired, key=unpaired.get)
    refined = maps[best_refined]
    _log_refine(refined, callback)
    pairs_mlp = None
    if pcfg.kind == "mlp" and len(xp) >= 2:  # stage 1's MLP on the pairs alone is a pairs-only map too
        pairs_mlp = _pairs_mlp(xp, yp, val, pcfg, train, cfg or SemiConfig(), maps["ridge"])
        scores["mlp_pairs"] = val_mrr(predict(pairs_mlp, xv), yv, pool)
    best = max(scores, key=lambda k: (scores[k], k.startswith("refined")))  # a tie goes to the unpaired rows
    if callback is not None:
        callback("choose", 0, {f"val_mrr/{k}": v for k, v in scores.items()})
    if best == "mlp_pairs":
        return SemiFit(pairs_mlp, refined, best, scores)
    if best.startswith("refined") and pcfg.kind == "mlp":
        res = _mlp(maps[best], xp, yp, xu, yu, pcfg, train, cfg, callback, val, checkpoint_dir)
        scores["mlp"] = val_mrr(predict(res.model, xv), yv, pool)
        if scores["mlp"] > scores[best]:
            return SemiFit(res.model, refined, "mlp", scores, res.train)
    chosen = maps[best]
    if refit_with_val:  # val pairs are part of the budget: the chosen closed form is refitted on all of them
        xa, ya = np.concatenate([xp, xv]), np.concatenate([yp, yv])
        chosen = fits[best](xa, ya, xu, yu, None, None)
    return SemiFit(linear_projector(chosen, pcfg.d_in, pcfg.d_out), refined, best, scores)


def _pairs_mlp(xp, yp, val, pcfg, train, cfg, ridge):
    """Stage 1's recipe (ridge start, MLP residual, early stop on val) on the pairs alone, ``cfg.steps`` steps."""
    tcfg = train.model_copy(update={"steps": cfg.steps, "epochs": None, "batch_size": min(train.batch_size, len(xp))})
    return fit_projector(pcfg, LossConfig(), tcfg, InMemoryPairs(xp, yp), InMemoryPairs(*val), xp, yp, ridge=ridge).model


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
