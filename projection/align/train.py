"""Stage-1 training: the projector (and any learnable loss temperature) on source -> target pairs.

The loop itself (AdamW, warmup + cosine, clipping, early stopping on val_loss, checkpoint/resume,
the parameter-group and last-batch rules) is ``projection.engine.loop``; this module says only what is
stage 1's own: the parts (projector, loss), the batches (pairs from ``projection.align.data``), the
loss, the validation loss and the loss's learnable scalars as metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from projection.engine import loop
from projection.align.config import TrainConfig, resolve_epochs

CHECKPOINT_FILE = "checkpoint.pt"
Callback = loop.Callback  # (event, step, metrics); fit.py and the flows pass one


@dataclass
class TrainResult:
    best_val_loss: float | None  # None when there was no validation split
    best_epoch: int  # 0-based epoch whose weights the model now holds
    epochs_run: int  # epochs completed, including ones done before a resume
    steps: int
    stopped_early: bool
    resumed_from_epoch: int | None  # epochs already done in the checkpoint we resumed from
    history: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: nn.Module, pairs, batch_size: int, device: str | torch.device) -> float:
    """Size-weighted mean of the batch losses over `pairs`, in order."""
    model.eval()
    loss_fn.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for xb, yb in pairs.batches(batch_size, None, device):
        total += loss_fn(model(xb), yb).double() * xb.shape[0]
    return float(total) / len(pairs)


@torch.no_grad()
def predict(model: nn.Module, x, batch_size: int = 4096, device: str | torch.device = "cpu") -> np.ndarray:
    """Project source vectors (array, tensor, or pair source) into target space on CPU."""
    model.eval().to(device)
    if hasattr(x, "batches"):
        chunks = (xb for xb, _ in x.batches(batch_size, None, device))
    else:
        t = x.detach().cpu() if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))
        t = t.float()  # a float64 projector (kept ridge start) casts inside forward
        chunks = (t[s : s + batch_size].to(device) for s in range(0, t.shape[0], batch_size))
    return torch.cat([model(xb).cpu() for xb in chunks]).numpy()  # (N, D_src) -> (N, D_tgt)


class Stage1(loop.Trainer):
    """Projector + loss on pair sources (``InMemoryPairs`` / ``ChunkedPairs``)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, train_pairs, val_pairs, cfg: TrainConfig):
        self.model, self.loss_fn, self.train_pairs, self.val_pairs, self.cfg = model, loss_fn, train_pairs, val_pairs, cfg
        self.device = torch.device(cfg.device)

    def parts(self) -> dict[str, Any]:
        return {"model": self.model, "loss": self.loss_fn}

    def param_sets(self) -> list[loop.ParamSet]:
        return [loop.ParamSet("projector", [self.model, self.loss_fn], self.cfg.lr)]

    def settings(self) -> dict[str, Any]:
        cfg = getattr(self.model, "cfg", None)
        return {"train": self.cfg, "projector": cfg if cfg is not None else {}}

    def data_digest(self) -> str:
        return self.train_pairs.digest() + (self.val_pairs.digest() if self.val_pairs is not None else "")

    def num_batches(self) -> int:
        return self.train_pairs.num_batches(self.cfg.batch_size)

    def batches(self, generator: torch.Generator):
        return self.train_pairs.batches(self.cfg.batch_size, generator, self.device)

    def loss(self, batch) -> torch.Tensor:
        xb, yb = batch
        return self.loss_fn(self.model(xb), yb)  # (B, D_src) -> (B, D_tgt) -> ()

    def validate(self) -> dict[str, float]:
        if self.val_pairs is None:
            return {}
        return {"val_loss": evaluate_loss(self.model, self.loss_fn, self.val_pairs, self.cfg.eval_batch_size, self.device)}

    def epoch_metrics(self) -> dict[str, float]:
        return loop.scalar_metrics("loss_param", self.loss_fn)

    def end_metrics(self, state: loop.LoopState) -> dict[str, float]:
        return {} if self.val_pairs is None else {"best_val_loss": state.best_value}


def loop_config(cfg: TrainConfig) -> loop.LoopConfig:
    return loop.LoopConfig(epochs=cfg.epochs, seed=cfg.seed, device=cfg.device, weight_decay=cfg.weight_decay,
                           warmup_frac=cfg.warmup_frac, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio,
                           grad_clip=cfg.grad_clip, fused_adamw=cfg.fused_adamw, patience=cfg.patience,
                           min_delta=cfg.min_delta, monitor="val_loss")


def train_projector(
    model: nn.Module,
    loss_fn: nn.Module,
    train_pairs,
    val_pairs,
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    callback: Callback | None = None,
) -> TrainResult:
    """Train in place; on return `model` (and `loss_fn`) hold the best-val-loss weights.

    Resumes from `checkpoint_dir/checkpoint.pt` when it was made with the same settings and data
    (else starts fresh, keeping it as `.stale`). The caller's global torch RNG is left untouched.
    """
    cfg = resolve_epochs(cfg, len(train_pairs))  # a step budget becomes epochs here
    if hasattr(model, "cfg"):
        train_pairs.check_dims(model.cfg.d_in, model.cfg.d_out)
        if val_pairs is not None:
            val_pairs.check_dims(model.cfg.d_in, model.cfg.d_out)
    if len(train_pairs) == 0:
        raise ValueError("training split is empty")
    if val_pairs is not None and len(val_pairs) == 0:
        val_pairs = None
    model.to(cfg.device)
    loss_fn.to(cfg.device)
    trainer = Stage1(model, loss_fn, train_pairs, val_pairs, cfg)
    res = loop.run(lambda: trainer, loop_config(cfg), checkpoint_dir, CHECKPOINT_FILE, callback)
    s = res.state
    return TrainResult(best_val_loss=None if val_pairs is None else s.best_value, best_epoch=s.best_epoch,
                       epochs_run=s.epoch, steps=s.step, stopped_early=s.stopped,
                       resumed_from_epoch=res.resumed_from_epoch, history=s.history)
