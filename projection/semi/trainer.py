"""Semi-supervised projector: MSE on the few pairs plus terms that need no pairs.

Terms (each a mean squared error divided by the total variance of the space it is measured in,
so weights mean the same for any encoder):
- ``pairs``: forward f: src -> tgt and reverse g: tgt -> src on the known pairs;
- ``cycle``: g(f(x)) ~ x and f(g(y)) ~ y on unpaired rows (CycleGAN's / vec2vec's cycle);
- ``mmd``: the distribution of f(x_unpaired) matches that of y_unpaired (Gaussian-kernel MMD,
  several bandwidths), and likewise g(y) against x;
- ``pseudo``: MSE on pseudo-pairs, the mutual nearest neighbours left by the refined closed
  form (``projection.semi.refine.RefinedMap``), which carry most of the signal when pairs are few.

Cycle and MMD alone cannot pin down which source row goes with which target row (any
distribution-preserving bijection satisfies them); they regularise the map the pairs and
pseudo-pairs determine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from projection.align.config import ProjectorConfig, TrainConfig
from projection.align.baselines import ProcrustesBaseline
from projection.align.projector import Projector, make_projector
from projection.semi.refine import RefinedMap, RefineConfig
from projection.engine.loop import ParamSet, optimizer_step, param_groups, warmup_cosine


@dataclass
class SemiConfig:
    pairs: float = 1.0
    cycle: float = 0.5
    mmd: float = 0.5
    pseudo: float = 1.0  # 0 = do not use the refined closed form's pseudo-pairs
    bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0)  # multiples of sqrt(2 D) (standardised data)
    steps: int = 1500  # optimizer steps; one step = one batch of each kind
    history: list = field(default_factory=list)


def mmd(a: torch.Tensor, b: torch.Tensor, bandwidths) -> torch.Tensor:
    """Biased multi-kernel Gaussian MMD^2 between samples a (n, D) and b (m, D)."""
    x = torch.cat([a, b])
    d2 = torch.cdist(x, x).pow(2)  # (n+m, n+m)
    scale = 2.0 * a.shape[1]
    k = sum(torch.exp(-d2 / (scale * w * w)) for w in bandwidths)
    n = a.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


class SemiObjective(nn.Module):
    """forward f and reverse g, and the weighted sum of the terms above for one step's batches."""

    def __init__(self, f: Projector, g: Projector, var_src: float, var_tgt: float, cfg: SemiConfig):
        super().__init__()
        self.f, self.g, self.cfg = f, g, cfg
        self.var_src, self.var_tgt = var_src, var_tgt

    def _z(self, model: Projector, v: torch.Tensor, out: bool) -> torch.Tensor:
        """Standardised coordinates of a space (MMD compares shapes, not units)."""
        return (v - model.out_mean) / model.out_std if out else (v - model.in_mean) / model.in_std

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c, f, g = self.cfg, self.f, self.g
        se_t = lambda p, y: (p - y).pow(2).sum(1).mean() / self.var_tgt  # noqa: E731
        se_s = lambda p, x: (p - x).pow(2).sum(1).mean() / self.var_src  # noqa: E731
        xp, yp, xu, yu = batch["xp"], batch["yp"], batch["xu"], batch["yu"]
        parts = {"pairs": se_t(f(xp), yp) + se_s(g(yp), xp)}
        fx, gy = f(xu), g(yu)
        if c.cycle:
            parts["cycle"] = se_s(g(fx), xu) + se_t(f(gy), yu)
        if c.mmd:
            parts["mmd"] = (mmd(self._z(f, fx, True), self._z(f, yu, True), c.bandwidths)
                            + mmd(self._z(f, gy, False), self._z(f, xu, False), c.bandwidths))
        if c.pseudo and "xq" in batch:
            parts["pseudo"] = se_t(f(batch["xq"]), batch["yq"]) + se_s(g(batch["yq"]), batch["xq"])
        total = sum(getattr(c, k) * v for k, v in parts.items())
        return total, parts


def _cycler(n: int, batch: int, gen: torch.Generator):
    """Endless shuffled index batches over n rows (small sets, e.g. 80 pairs, repeat)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch + 1 if n >= batch else 1, batch):
            yield perm[s : s + batch]


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def train_semi(x_pairs, y_pairs, x_unpaired, y_unpaired, pcfg: ProjectorConfig, train: TrainConfig,
               cfg: SemiConfig | None = None, pseudo: tuple[np.ndarray, np.ndarray] | None = None,
               callback=None, start: tuple[ProcrustesBaseline, ProcrustesBaseline] | None = None) -> Projector:
    """Train f (returned, a normal ``Projector``) and its reverse; pairs may be few, unpaired rows many.

    ``pseudo``: (x rows, y rows) pseudo-pairs, e.g. ``(xu[i], yu[j])`` from ``RefinedMap.pseudo_pairs``.
    ``start``: closed-form maps src -> tgt and tgt -> src for f's and g's affine paths (projectors with
    a linear path, the default) to start from, as stage 1 starts at ridge.
    """
    cfg = cfg or SemiConfig()
    xp, yp, xu, yu = map(_t, (x_pairs, y_pairs, x_unpaired, y_unpaired))
    if len(xp) < 1:
        raise ValueError("the semi-supervised MLP needs at least 1 pair in the training split (use the refined "
                         "closed form, RefinedMap, for zero pairs)")
    if len(xu) < 2 or len(yu) < 2:
        raise ValueError(f"semi-supervised training needs unpaired rows on both sides; got {len(xu)} source, {len(yu)} target")
    f = make_projector(pcfg, seed=train.seed)
    g = make_projector(pcfg.model_copy(update={"d_in": pcfg.d_out, "d_out": pcfg.d_in, "residual": pcfg.residual}), seed=train.seed + 1)
    x_all, y_all = torch.cat([xp, xu]), torch.cat([yp, yu])
    f.fit_stats(x_all, y_all)
    g.fit_stats(y_all, x_all)
    if start is not None and f.skip is not None:  # the MLP branches learn what the closed forms leave
        f.start_at(*procrustes_affine(start[0]))
        g.start_at(*procrustes_affine(start[1]))
    var_s, var_t = float(x_all.var(0).sum()), float(y_all.var(0).sum())
    obj = SemiObjective(f, g, var_s, var_t, cfg)
    params = [p for p in obj.parameters() if p.requires_grad]
    # the loop's one weight-decay rule (matrices decay; biases, norms and scalars do not)
    opt = torch.optim.AdamW(param_groups([ParamSet("semi", [obj], train.lr)], train.weight_decay), lr=train.lr)
    warmup = train.warmup_steps if train.warmup_steps is not None else int(train.warmup_frac * cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, cfg.steps, train.min_lr_ratio))
    gen = torch.Generator().manual_seed(train.seed)
    b = train.batch_size
    src = {"p": _cycler(len(xp), min(b, len(xp)), gen), "xu": _cycler(len(xu), min(b, len(xu)), gen),
           "yu": _cycler(len(yu), min(b, len(yu)), gen)}
    if pseudo is not None and len(pseudo[0]):
        xq, yq = _t(pseudo[0]), _t(pseudo[1])
        src["q"] = _cycler(len(xq), min(b, len(xq)), gen)
    obj.train()
    for step in range(cfg.steps):
        ip, ix, iy = next(src["p"]), next(src["xu"]), next(src["yu"])
        batch = {"xp": xp[ip], "yp": yp[ip], "xu": xu[ix], "yu": yu[iy]}
        if "q" in src:
            iq = next(src["q"])
            batch |= {"xq": xq[iq], "yq": yq[iq]}
        loss, parts = obj(batch)
        optimizer_step(loss, opt, sched, params, train.grad_clip)
        if callback is not None and (step + 1) % 100 == 0:
            callback("step", step + 1, {"train_loss": float(loss.detach())} | {f"loss/{k}": float(v.detach()) for k, v in parts.items()})
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"semi-supervised training diverged (loss {float(loss.detach())}); lower train.lr")
    return f.eval()


def procrustes_affine(fitted: ProcrustesBaseline) -> tuple[np.ndarray, np.ndarray]:
    """(A, c) with y = x @ A + c for a Procrustes map y = s (x - mu_x) R + mu_y."""
    a = fitted.s * np.asarray(fitted.r, np.float64)  # (D_src, D_tgt)
    return a, np.asarray(fitted.mu_y, np.float64) - np.asarray(fitted.mu_x, np.float64) @ a


def linear_projector(fitted: ProcrustesBaseline, d_in: int, d_out: int) -> Projector:
    """A Procrustes map as a linear ``Projector``, saved and served like any other."""
    model = Projector(ProjectorConfig(kind="linear", d_in=d_in, d_out=d_out, standardize=False))
    model.start_at(*procrustes_affine(fitted))
    return model.eval()


def fit_semi_mode(mode: str, xp, yp, xu, yu, pcfg: ProjectorConfig, train: TrainConfig, cfg: SemiConfig | None = None,
                  callback=None, refined: RefinedMap | None = None) -> tuple[Projector, RefinedMap]:
    """``align``'s two unpaired modes: 'semi' (refined closed form, then the semi-supervised MLP on its
    pseudo-pairs) and 'zero_pair' (the refined Procrustes map from the moment seed, as a linear projector)."""
    refined = refined or RefinedMap(RefineConfig(base="procrustes", seed=train.seed)).fit(xp, yp, xu, yu)
    if callback is not None:
        for k, h in enumerate(refined.history):
            callback("refine", k, {f"refine/{n}": v for n, v in h.items()})
    if mode == "zero_pair":
        return linear_projector(refined.map, pcfg.d_in, pcfg.d_out), refined
    if mode != "semi":
        raise ValueError(f"unknown mode {mode!r}; choose 'pairs', 'semi' or 'zero_pair'")
    i, j = refined.pseudo_pairs
    xq, yq = refined.x_unpaired[i], refined.y_unpaired[j]
    start = (refined.map, ProcrustesBaseline().fit(np.concatenate([yp, yq]), np.concatenate([xp, xq])))
    model = train_semi(xp, yp, xu, yu, pcfg, train, cfg, (xq, yq), callback, start)
    return model, refined
