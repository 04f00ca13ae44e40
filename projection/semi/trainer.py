"""The semi-supervised projector on the shared loop (``projection.engine.loop``): checkpointed, resumable.

What is semi's own: two parts (forward f: src -> tgt, returned; reverse g: tgt -> src, for the
cycle and reverse terms), batches drawn per step from four sets (pairs, pseudo-pairs, unpaired
source rows, unpaired target rows; ``projection.semi.objective`` has the terms), and a validation
loss on held-out pairs when there are any. Everything else (AdamW and its one weight-decay rule,
warmup + cosine, clipping, early stopping on ``val_loss``, a checkpoint every
``SemiConfig.epoch_steps`` steps, bit-identical resume after kill -9) is the loop's.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from projection.align.baselines import ProcrustesBaseline
from projection.align.config import ProjectorConfig, TrainConfig
from projection.align.projector import Projector, make_projector
from projection.align.train import TrainResult
from projection.engine import loop
from projection.engine.checkpoint import tensor_digest
from projection.semi.objective import SemiConfig, SemiObjective

CHECKPOINT_FILE = "semi_checkpoint.pt"


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _draw(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k row indices of n (all of them, in order, when k >= n): small pair sets are used whole every step."""
    return torch.arange(n) if k >= n else torch.randint(n, (k,), generator=gen)


class SemiTrainer(loop.Trainer):
    def __init__(self, obj: SemiObjective, data: dict[str, torch.Tensor], pcfg: ProjectorConfig, train: TrainConfig,
                 cfg: SemiConfig):
        self.obj, self.data, self.pcfg, self.train, self.cfg = obj, data, pcfg, train, cfg
        f = obj.f
        with torch.no_grad():  # standardised unpaired rows: the MMD's real side, fixed for the run
            self.zxu = (data["xu"] - f.in_mean) / f.in_std
            self.zyu = (data["yu"] - f.out_mean) / f.out_std

    def parts(self) -> dict[str, Any]:
        return {"f": self.obj.f, "g": self.obj.g}

    def param_sets(self) -> list[loop.ParamSet]:
        return [loop.ParamSet("semi", [self.obj.f, self.obj.g], self.train.lr)]

    def settings(self) -> dict[str, Any]:
        return {"train": self.train, "projector": self.pcfg, "semi": dataclasses.asdict(self.cfg)}

    def data_digest(self) -> str:
        return tensor_digest(*(self.data[k] for k in sorted(self.data)))

    def num_batches(self) -> int:
        return min(self.cfg.epoch_steps, self.cfg.steps)

    def batches(self, generator: torch.Generator):
        d, b, ub = self.data, self.train.batch_size, self.cfg.unpaired_batch
        for _ in range(self.num_batches()):
            ip, ix, iy = _draw(len(d["xp"]), b, generator), _draw(len(d["xu"]), ub, generator), _draw(len(d["yu"]), ub, generator)
            batch = {"xp": d["xp"][ip], "yp": d["yp"][ip], "xu": d["xu"][ix], "yu": d["yu"][iy],
                     "zxu": self.zxu[ix], "zyu": self.zyu[iy]}
            if "xq" in d and self.cfg.pseudo:
                iq = _draw(len(d["xq"]), b, generator)
                batch |= {"xq": d["xq"][iq], "yq": d["yq"][iq]}
            yield batch

    def loss(self, batch) -> torch.Tensor:
        return self.obj(batch)[0]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if "xv" not in self.data:
            return {}
        p = self.obj.f(self.data["xv"])
        return {"val_loss": float((p - self.data["yv"]).pow(2).sum(1).mean() / self.obj.var_tgt)}

    def end_metrics(self, state: loop.LoopState) -> dict[str, float]:
        return {"best_val_loss": state.best_value} if "xv" in self.data else {}


@dataclasses.dataclass
class SemiResult:
    model: Projector  # f, in eval mode, holding the best epoch's weights
    reverse: Projector
    train: TrainResult


def train_semi(x_pairs, y_pairs, x_unpaired, y_unpaired, pcfg: ProjectorConfig, train: TrainConfig,
               cfg: SemiConfig | None = None, pseudo: tuple[np.ndarray, np.ndarray] | None = None,
               callback=None, start: tuple[ProcrustesBaseline, ProcrustesBaseline] | None = None,
               val: tuple[np.ndarray, np.ndarray] | None = None, checkpoint_dir: str | Path | None = None) -> SemiResult:
    """Train f (a normal ``Projector``) and its reverse; pairs may be few, unpaired rows many.

    ``pseudo``: (x rows, y rows) pseudo-pairs, e.g. ``(xu[i], yu[j])`` from ``RefinedMap.pseudo_pairs``.
    ``start``: closed-form maps src -> tgt and tgt -> src for f's and g's affine paths (projectors with
    a linear path, the default) to start from, as stage 1 starts at ridge. ``val``: held-out pairs
    whose loss picks the best checkpoint and stops early (``train.patience`` epochs of
    ``cfg.epoch_steps`` steps). ``checkpoint_dir``: resume from / write ``semi_checkpoint.pt`` there.
    """
    cfg = cfg or SemiConfig()
    data = dict(zip(("xp", "yp", "xu", "yu"), map(_t, (x_pairs, y_pairs, x_unpaired, y_unpaired))))
    if len(data["xp"]) < 1:
        raise ValueError("the semi-supervised MLP needs at least 1 pair in the training split (use the refined "
                         "closed form, RefinedMap, for zero pairs)")
    if len(data["xu"]) < 2 or len(data["yu"]) < 2:
        raise ValueError(f"semi-supervised training needs unpaired rows on both sides; got {len(data['xu'])} source, "
                         f"{len(data['yu'])} target")
    if pseudo is not None and len(pseudo[0]):
        data |= {"xq": _t(pseudo[0]), "yq": _t(pseudo[1])}
    if val is not None and len(val[0]):
        data |= {"xv": _t(val[0]), "yv": _t(val[1])}
    f = make_projector(pcfg, seed=train.seed)
    g = make_projector(pcfg.model_copy(update={"d_in": pcfg.d_out, "d_out": pcfg.d_in}), seed=train.seed + 1)
    x_all, y_all = torch.cat([data["xp"], data["xu"]]), torch.cat([data["yp"], data["yu"]])
    f.fit_stats(x_all, y_all)
    g.fit_stats(y_all, x_all)
    if start is not None and f.skip is not None:  # the MLP branches learn what the closed forms leave
        f.start_at(*procrustes_affine(start[0]))
        g.start_at(*procrustes_affine(start[1]))
    obj = SemiObjective(f, g, float(x_all.var(0).sum()), float(y_all.var(0).sum()), cfg)
    trainer = SemiTrainer(obj, data, pcfg, train, cfg)
    epochs = max(1, math.ceil(cfg.steps / trainer.num_batches()))
    lcfg = loop.LoopConfig(epochs=epochs, seed=train.seed, device="cpu", weight_decay=train.weight_decay,
                           warmup_frac=train.warmup_frac, warmup_steps=train.warmup_steps, min_lr_ratio=train.min_lr_ratio,
                           grad_clip=train.grad_clip, fused_adamw=train.fused_adamw,
                           patience=train.patience if "xv" in data else None, min_delta=train.min_delta, monitor="val_loss")
    res = loop.run(lambda: trainer, lcfg, checkpoint_dir, CHECKPOINT_FILE, callback)
    s = res.state
    if not all(math.isfinite(h["train_loss"]) for h in s.history):
        raise FloatingPointError(f"semi-supervised training diverged (loss {s.history[-1]['train_loss']}); lower train.lr")
    result = TrainResult(best_val_loss=s.best_value if "xv" in data else None, best_epoch=s.best_epoch, epochs_run=s.epoch,
                         steps=s.step, stopped_early=s.stopped, resumed_from_epoch=res.resumed_from_epoch, history=s.history)
    return SemiResult(f.eval(), g.eval(), result)


def procrustes_affine(fitted) -> tuple[np.ndarray, np.ndarray]:
    """(A, c) with y = x @ A + c for a Procrustes map y = s (x - mu_x) R + mu_y, or any map with ``affine()``."""
    if hasattr(fitted, "affine"):
        return fitted.affine()
    a = fitted.s * np.asarray(fitted.r, np.float64)  # (D_src, D_tgt)
    return a, np.asarray(fitted.mu_y, np.float64) - np.asarray(fitted.mu_x, np.float64) @ a


def linear_projector(fitted, d_in: int, d_out: int) -> Projector:
    """A linear map (Procrustes, or any with ``affine()``) as a linear ``Projector``, saved and served like any other."""
    model = Projector(ProjectorConfig(kind="linear", d_in=d_in, d_out=d_out, standardize=False))
    model.start_at(*procrustes_affine(fitted))
    return model.eval()
