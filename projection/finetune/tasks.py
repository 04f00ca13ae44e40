"""Stage-2 tasks: one small class each, all with the same shape.

A task is its head (an ``nn.Module`` on the projected embedding), its loss, the check of its
targets, and its metrics. ``finetune`` looks a task up in ``TASKS`` and never switches on its
name, so a new task is one class here.

  classification  Linear(D, K) + cross-entropy; metric accuracy
  regression      Linear(D, 1) + MSE on the standardised target (train mean/std kept as buffers,
                  so predictions and metrics come back in original units); metric RMSE (lower is better)
  retrieval       no layer: symmetric InfoNCE between projected source and fixed target embeddings
                  with a learnable temperature; metric mean R@1 of both directions
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from projection.finetune.config import FinetuneConfig
from projection.losses.core import InfoNCELoss
from projection.align.metrics import bidirectional_ranks


class Task(nn.Module):
    name: ClassVar[str]
    metric: ClassVar[str]  # the validation quantity reported as "the" metric
    higher_is_better: ClassVar[bool] = True

    @classmethod
    def prepare(cls, y: torch.Tensor, d_out: int | None) -> torch.Tensor:
        """Targets as the loss wants them; ValueError naming the expected shape/dtype."""
        raise NotImplementedError

    @classmethod
    def check_targets(cls, y_train: torch.Tensor, y_val: torch.Tensor | None, cfg: FinetuneConfig) -> None:
        """Refuse targets the head cannot learn, before any work is done."""

    @classmethod
    def build(cls, dim: int, y_train: torch.Tensor, cfg: FinetuneConfig) -> "Task":
        raise NotImplementedError

    def config(self) -> dict:
        """What ``load_finetuned`` needs to rebuild the head (head.json)."""
        return {"task": self.name}

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_original_units(self, out: torch.Tensor) -> torch.Tensor:
        return out.float()

    def metrics(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Metrics of the whole split, ``out`` in original units, on the CPU."""
        raise NotImplementedError


class Classification(Task):
    name, metric = "classification", "accuracy"

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, int(n_classes))

    @classmethod
    def prepare(cls, y, d_out):
        if y.ndim != 1 or y.is_floating_point() and not torch.equal(y, y.round()):
            raise ValueError(f"classification needs (N,) integer labels, got {tuple(y.shape)} {y.dtype}")
        return y.long()

    @classmethod
    def check_targets(cls, y_train, y_val, cfg):
        n_classes = cfg.n_classes or int(y_train.max()) + 1
        for y, split in ((y_train, "train"), (y_val, "val")):
            if y is not None and (int(y.min()) < 0 or int(y.max()) >= n_classes):
                raise ValueError(f"{split} labels must be in [0, {n_classes}); got [{int(y.min())}, {int(y.max())}]")

    @classmethod
    def build(cls, dim, y_train, cfg):
        return cls(dim, cfg.n_classes or int(y_train.max()) + 1)

    def config(self) -> dict:
        return {"task": self.name, "n_classes": self.linear.out_features}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)  # (B, D_tgt) -> (B, K) logits

    def loss(self, out, y):
        return F.cross_entropy(out.float(), y)

    def metrics(self, out, y):
        return {"accuracy": float((out.argmax(1) == y).double().mean())}


class Regression(Task):
    name, metric, higher_is_better = "regression", "rmse", False

    def __init__(self, dim: int, target_mean: float = 0.0, target_std: float = 1.0):
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        self.register_buffer("target_mean", torch.tensor(float(target_mean)))
        self.register_buffer("target_std", torch.tensor(float(target_std)))

    @classmethod
    def prepare(cls, y, d_out):
        if y.ndim != 1:
            raise ValueError(f"regression needs a (N,) numeric target, got shape {tuple(y.shape)}")
        y = y.to(torch.float32)
        if not torch.isfinite(y).all():
            raise ValueError("regression target has NaN/inf values; drop or impute them first")
        return y

    @classmethod
    def build(cls, dim, y_train, cfg):
        t = y_train.float()
        return cls(dim, float(t.mean()), float(t.std().clamp_min(1e-12)) if len(t) > 1 else 1.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z).squeeze(-1)  # (B, D_tgt) -> (B,) standardised prediction

    def loss(self, out, y):
        return F.mse_loss(out.float(), (y - self.target_mean) / self.target_std)

    def to_original_units(self, out):
        return out.float() * self.target_std + self.target_mean

    def metrics(self, out, y):
        pred, yd = out.double(), y.double()
        err = pred - yd
        sst = float(((yd - yd.mean()) ** 2).sum())
        return {"mae": float(err.abs().mean()), "rmse": float(err.pow(2).mean().sqrt()),
                "r2": 1.0 - float(err.pow(2).sum()) / sst if sst > 0 else float("nan")}  # fmt: skip


class Retrieval(Task):
    name, metric = "retrieval", "r1"

    def __init__(self, dim: int, temperature: float = 0.07):
        super().__init__()
        self.infonce = InfoNCELoss(temperature, learnable=True)

    @classmethod
    def prepare(cls, y, d_out):
        if y.ndim != 2 or y.shape[1] != d_out:
            raise ValueError(f"retrieval needs (N, {d_out}) target embeddings (projector d_out), got {tuple(y.shape)}")
        return y.to(torch.float32)

    @classmethod
    def build(cls, dim, y_train, cfg):
        return cls(dim, cfg.temperature)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z  # (B, D_tgt) projected embedding

    def loss(self, out, y):
        return self.infonce(out.float(), y)

    def metrics(self, out, y):
        p2t, t2p = bidirectional_ranks(out, y)
        res = {"p2t_r1": float((p2t == 1).mean()), "t2p_r1": float((t2p == 1).mean()),
               "p2t_mrr": float((1.0 / p2t).mean()), "t2p_mrr": float((1.0 / t2p).mean())}  # fmt: skip
        return res | {"r1": 0.5 * (res["p2t_r1"] + res["t2p_r1"])}


TASKS: dict[str, type[Task]] = {t.name: t for t in (Classification, Regression, Retrieval)}
TASK_METRIC = {name: t.metric for name, t in TASKS.items()}


def make_head(task: str, dim: int, **kwargs) -> Task:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    return TASKS[task](dim, **kwargs)


def task_metrics(head: Task, out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """All metrics of a split from head outputs and prepared targets: ``loss`` (training units),
    the task's metrics (original units) and ``metric`` = the task's own one repeated."""
    dev = next(iter(list(head.parameters()) + list(head.buffers())), torch.empty(0)).device
    with torch.no_grad():
        res = {"loss": float(head.loss(out.to(dev), y.to(dev)))}
        out = head.to_original_units(out.to(dev)).cpu()
    res |= head.metrics(out, y.cpu())
    res["metric"] = res[head.metric]
    return res
