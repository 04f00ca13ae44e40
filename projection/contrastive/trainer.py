"""Contrastive training of open_clip image towers: photo <-> sketch (two towers) or one shared tower.

The frozen-encoder pipeline embeds with towers someone else trained. This module trains the towers
themselves, contrastively, on paired images (a photo and its sketch, two views of one product), and
writes each trained tower as an open_clip ``local-dir`` folder so the rest of xmodal loads it like any
other encoder: ``load_encoder("open_clip:image:local-dir:<dir>")``.

Three properties drive the design:
- Same pixels in training and extraction. Images are preprocessed once, up front, with open_clip's
  own eval transform built from the model's ``preprocess_cfg``; that cfg is written into the saved
  folder, so the loader rebuilds the identical transform and the saved tower reproduces the trained
  tower's embeddings exactly.
- Resumable bit-for-bit through the shared loop (``projection.engine.loop``): shuffling from a generator
  seeded by (seed, epoch), augmentation from the forked global RNG saved in the checkpoint, and towers,
  loss, optimiser and scheduler all in the per-epoch checkpoint.
- Plain torch: no prefect, no mlflow. The flow in ``flows/contrastive.py`` is the recipe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from projection.engine import loop
from projection.engine.checkpoint import tensor_digest
from projection.contrastive.config import ContrastiveConfig, build_tower_loss
from projection.align.metrics import bidirectional_ranks, rank_metrics
from projection.contrastive.towers import DualEncoder, embed

CHECKPOINT_FILE = "checkpoint.pt"

# ----------------------------------------------------------------------------- data


def load_images(paths: Sequence[str | Path], transform) -> torch.Tensor:
    """Decode + preprocess every image once: (N, 3, H, W) float32. Raises encoders' BadInput naming the file."""
    from encoders.images import load_rgb

    if len(paths) == 0:
        return torch.empty(0)
    return torch.stack([transform(load_rgb(p)) for p in paths])


def _as_images(x, transform) -> torch.Tensor:
    if torch.is_tensor(x):
        if x.ndim != 4:
            raise ValueError(f"image tensors must be (N, 3, H, W), got {tuple(x.shape)}")
        return x.float()
    return load_images(list(x), transform)


class _Augment:
    """Per-image random resized crop + small affine; randomness from the (forked, checkpointed) global RNG."""

    def __init__(self, cfg: ContrastiveConfig, size: int):
        from torchvision.transforms import v2

        t = cfg.max_translate
        self.tf = v2.Compose([
            v2.RandomResizedCrop(size, scale=(cfg.crop_scale, 1.0), ratio=(0.85, 1.0 / 0.85), antialias=True),
            v2.RandomAffine(degrees=cfg.max_rotation, translate=(t, t)),
        ])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.tf(img) for img in batch])  # (B, 3, H, W), a fresh draw per image


# ----------------------------------------------------------------------------- training


@dataclass
class ContrastiveResult:
    model: DualEncoder  # final weights (end of the cosine schedule), eval mode
    loss_fn: nn.Module
    epochs_run: int
    steps: int
    resumed_from_epoch: int | None
    train_seconds: float  # this call only (not epochs done before a resume)
    history: list[dict[str, float]] = field(default_factory=list)


@torch.no_grad()
def _validate(model: DualEncoder, loss_fn: nn.Module, xa: torch.Tensor, xb: torch.Tensor,
              cfg: ContrastiveConfig, device: torch.device) -> dict[str, float]:
    model.eval()
    loss_fn.eval()
    za = embed(model, xa, "a", cfg.eval_batch_size, device)  # (N, D)
    zb = embed(model, xb, "b", cfg.eval_batch_size, device)  # (N, D)
    total, count = 0.0, 0
    for idx in loop.batch_indices(len(za), cfg.batch_size, None):
        if len(idx) < loop.MIN_BATCH:
            continue
        total += float(loss_fn(za[idx].to(device), zb[idx].to(device))) * len(idx)
        count += len(idx)
    a2b, _ = bidirectional_ranks(za, zb)
    return {"val_loss": total / count if count else float("nan"), "val_r1": float((a2b == 1).mean())}


class ContrastiveTrainer(loop.Trainer):
    """Towers + loss on preprocessed image pairs; augmentation draws from the loop's seeded RNG."""

    def __init__(self, model: DualEncoder, loss_fn: nn.Module, xa, xb, val, augment, cfg: ContrastiveConfig):
        self.model, self.loss_fn, self.xa, self.xb, self.val, self.augment, self.cfg = model, loss_fn, xa, xb, val, augment, cfg
        self.device = torch.device(cfg.device)
        self.start = time.perf_counter()

    def parts(self) -> dict[str, Any]:
        return {"model": self.model, "loss": self.loss_fn}

    def param_sets(self) -> list[loop.ParamSet]:
        return [loop.ParamSet("towers", [self.model, self.loss_fn], self.cfg.lr)]

    def settings(self) -> dict[str, Any]:
        return {"contrastive": self.cfg, "model_cfg": self.cfg.model_cfg()}

    def data_digest(self) -> str:
        return tensor_digest(self.xa, self.xb, *(self.val or ()))

    def num_batches(self) -> int:
        return loop.num_batches(len(self.xa), self.cfg.batch_size)

    def batches(self, generator: torch.Generator):
        return loop.batch_indices(len(self.xa), self.cfg.batch_size, generator)

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        ba, bb = self.xa[idx], self.xb[idx]  # (B, 3, H, W) each
        if self.augment is not None:
            ba, bb = self.augment(ba), self.augment(bb)
        za, zb = self.model(ba.to(self.device), bb.to(self.device))  # (B, D) each, unit norm
        return self.loss_fn(za, zb)

    def validate(self) -> dict[str, float]:
        return _validate(self.model, self.loss_fn, *self.val, self.cfg, self.device) if self.val else {}

    def epoch_metrics(self) -> dict[str, float]:
        return loop.scalar_metrics("loss_param", self.loss_fn)

    def finish(self) -> None:
        if self.cfg.recalibrate_bn:
            recalibrate_bn(self.model, self.xa, self.xb, self.cfg.eval_batch_size, self.device)
        self.model.eval()
        self.loss_fn.eval()

    def end_metrics(self, state: loop.LoopState) -> dict[str, float]:
        return {"train_seconds": time.perf_counter() - self.start}


def loop_config(cfg: ContrastiveConfig) -> loop.LoopConfig:
    # No early stopping: the towers keep the end of the cosine schedule (monitor=None).
    return loop.LoopConfig(epochs=cfg.epochs, seed=cfg.seed, device=cfg.device, weight_decay=cfg.weight_decay,
                           warmup_frac=cfg.warmup_frac, min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip,
                           monitor=None)


def _pairs(train_a, train_b, val_a, val_b, transform) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    xa = _as_images(train_a, transform)
    xb = xa if train_b is None else _as_images(train_b, transform)
    if len(xa) != len(xb):
        raise ValueError(f"train_a has {len(xa)} images, train_b {len(xb)}: pairs must align row by row")
    if len(xa) < 2:
        raise ValueError(f"contrastive training needs at least 2 training pairs, got {len(xa)}")
    if val_a is None or val_b is None or len(val_a) == 0:
        return xa, xb, None
    va, vb = _as_images(val_a, transform), _as_images(val_b, transform)
    if len(va) != len(vb):
        raise ValueError(f"val_a has {len(va)} images, val_b {len(vb)}")
    return xa, xb, (va, vb)


def train_contrastive(
    train_a,
    train_b,
    cfg: ContrastiveConfig,
    val_a=None,
    val_b=None,
    checkpoint_dir: str | Path | None = None,
    callback: loop.Callback | None = None,
) -> ContrastiveResult:
    """Train a DualEncoder on pairs (train_a[i], train_b[i]); returns it with its final weights.

    train_a / train_b: image paths (decoded and preprocessed once with the towers' eval transform) or
    already-preprocessed (N, 3, H, W) tensors. train_b=None with towers='shared' and augment=True trains
    on two augmented views of train_a (SimCLR-style). Validation (val_a, val_b) reports val_loss and
    val_r1 (a -> b recall@1). Resumes from `checkpoint_dir/checkpoint.pt` when it was made with the
    same settings and data. The caller's global torch RNG is left untouched.
    """
    if train_b is None and not (cfg.towers == "shared" and cfg.augment):
        raise ValueError("train_b=None (two views of one modality) needs towers='shared' and augment=True")
    model = DualEncoder.from_config(cfg)
    xa, xb, val = _pairs(train_a, train_b, val_a, val_b, model.transform())
    size = model.preprocess_cfg["size"]
    augment = _Augment(cfg, int(size if isinstance(size, int) else size[0])) if cfg.augment else None
    model.to(cfg.device)
    loss_fn = build_tower_loss(cfg, model.embed_dim).to(cfg.device)
    trainer = ContrastiveTrainer(model, loss_fn, xa, xb, val, augment, cfg)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        res = loop.run(lambda: trainer, loop_config(cfg), checkpoint_dir, CHECKPOINT_FILE, callback)
    finally:
        torch.set_num_threads(threads_before)
    return ContrastiveResult(model=model, loss_fn=loss_fn, epochs_run=res.state.epoch, steps=res.state.step,
                             resumed_from_epoch=res.resumed_from_epoch, train_seconds=time.perf_counter() - trainer.start,
                             history=res.state.history)


@torch.no_grad()
def recalibrate_bn(model: DualEncoder, xa: torch.Tensor, xb: torch.Tensor, batch_size: int = 512,
                   device: str | torch.device = "cpu") -> None:
    """Reset every BatchNorm's running mean/var and recompute them as exact averages over (xa, xb) with the
    current weights ("precise BN"); pairs go through model.forward as in training. Deterministic."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    for idx in loop.batch_indices(len(xa), batch_size, None):
        model(xa[idx].to(device), xb[idx].to(device))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.eval()


# ----------------------------------------------------------------------------- evaluation


def label_r1(queries: torch.Tensor, candidates: torch.Tensor, labels: np.ndarray) -> float:
    """Fraction of queries whose top-1 candidate (cosine) has the query's label: class-level retrieval."""
    labels = np.asarray(labels)
    top1 = (F.normalize(queries.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T).argmax(1).numpy()
    return float((labels[top1] == labels).mean())


def retrieval_metrics(za: torch.Tensor, zb: torch.Tensor, labels=None) -> dict[str, float]:
    """a2b_* (A queries, B pool) and b2a_* (B queries, A pool): r1/r5/r10/mrr/median_rank, and
    a2b_label_r1 / b2a_label_r1 when labels (N,) are given. Row i of za and zb is a true pair."""
    a2b, b2a = bidirectional_ranks(za, zb)
    out = rank_metrics(a2b, "a2b") | rank_metrics(b2a, "b2a")
    if labels is not None:
        out["a2b_label_r1"] = label_r1(za, zb, labels)
        out["b2a_label_r1"] = label_r1(zb, za, labels)
    return out


def evaluate_pairs(model: DualEncoder, xa: torch.Tensor, xb: torch.Tensor, labels=None,
                   batch_size: int = 512, device: str | torch.device = "cpu") -> dict[str, float]:
    """Held-out retrieval metrics of a DualEncoder on preprocessed image pairs."""
    za, zb = embed(model, xa, "a", batch_size, device), embed(model, xb, "b", batch_size, device)
    out = retrieval_metrics(za, zb, labels)
    out["chance_r1"] = 1.0 / max(len(xa), 1)
    return out
