"""Training loop for the projector: AdamW, warmup + cosine, clipping, early stopping.

Two properties drive the design:
- Resumable bit-for-bit. All randomness is either a fresh torch.Generator seeded from
  (seed, epoch) (shuffling) or the global torch RNG forked for this call and saved in the
  checkpoint (dropout). A checkpoint holds everything else that evolves (model,
  optimizer, scheduler, loss temperatures, early-stopping state), so kill -9 + rerun ends
  with the same weights as an uninterrupted run.
- Near-zero overhead over a bare torch loop: no .item() per step (loss accumulated as a
  tensor, one sync per epoch), in-memory data indexed from one tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from projection.checkpoint import commit_epoch, resume
from projection.steps import loss_param_metrics, optimizer_step
from projection.config import TrainConfig, resolve_epochs

CHECKPOINT_FILE = "checkpoint.pt"
Callback = Callable[[str, int, dict[str, float]], None]


@dataclass
class TrainResult:
    best_val_loss: float | None  # None when there was no validation split
    best_epoch: int  # 0-based epoch whose weights the model now holds
    epochs_run: int  # epochs completed, including ones done before a resume
    steps: int
    stopped_early: bool
    resumed_from_epoch: int | None  # epochs already done in the checkpoint we resumed from
    history: list[dict[str, float]] = field(default_factory=list)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Mixed rather than seed + epoch so (seed=0, epoch=1) and (seed=1, epoch=0) differ.
    return (seed * 1_000_003 + epoch) % (2**63)


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear 1/w..1 over warmup, then cosine from 1 to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    # Decay matrices only, as CLIP does: decaying biases, norm gains or a logit scale hurts.
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


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
        t = t.float()
        chunks = (t[s : s + batch_size].to(device) for s in range(0, t.shape[0], batch_size))
    return torch.cat([model(xb).cpu() for xb in chunks]).numpy()  # (N, D_src) -> (N, D_tgt)


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

    Resumes from `checkpoint_dir/checkpoint.pt` when present. The caller's global torch
    RNG is left untouched (the loop runs under a forked RNG seeded with cfg.seed).
    """
    cfg = resolve_epochs(cfg, len(train_pairs))  # a step budget becomes epochs here
    device = torch.device(cfg.device)
    if hasattr(model, "cfg"):
        train_pairs.check_dims(model.cfg.d_in, model.cfg.d_out)
        if val_pairs is not None:
            val_pairs.check_dims(model.cfg.d_in, model.cfg.d_out)
    if len(train_pairs) == 0:
        raise ValueError("training split is empty")
    if val_pairs is not None and len(val_pairs) == 0:
        val_pairs = None
    model.to(device)
    loss_fn.to(device)

    steps_per_epoch = train_pairs.num_batches(cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_frac * total_steps)
    params = [p for p in chain(model.parameters(), loss_fn.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(_param_groups(params, cfg.weight_decay), lr=cfg.lr, fused=cfg.fused_adamw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total_steps, cfg.min_lr_ratio))
    # Resuming under a different schedule or data order would silently break determinism.
    fingerprint = {"seed": cfg.seed, "batch_size": cfg.batch_size, "epochs": cfg.epochs, "lr": cfg.lr, "n_train": len(train_pairs)}

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices, device_type=device.type if device.type != "cpu" else "cuda"):
        torch.manual_seed(cfg.seed)
        s = {  # everything that evolves across epochs besides model/opt/sched
            "epoch": 0, "step": 0, "best_val": math.inf, "best_epoch": -1, "bad_epochs": 0, "stopped": False,
            "best_model": None, "best_loss": None, "history": [],
        }  # fmt: skip
        s, resumed_from = resume(ckpt_path, device, fingerprint, s, {
            "model": model.load_state_dict, "loss": loss_fn.load_state_dict,
            "optimizer": opt.load_state_dict, "scheduler": sched.load_state_dict})

        total = torch.zeros((), device=device)
        while s["epoch"] < cfg.epochs and not s["stopped"]:
            epoch = s["epoch"]
            gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
            model.train()
            loss_fn.train()
            total.zero_()
            n_batches = 0
            for xb, yb in train_pairs.batches(cfg.batch_size, gen, device):
                loss = loss_fn(model(xb), yb)  # (B, D_src) -> (B, D_tgt) -> ()
                optimizer_step(loss, opt, sched, params, cfg.grad_clip)
                total.add_(loss.detach())
                n_batches += 1
            s["step"] += n_batches

            metrics = {"epoch": float(epoch), "train_loss": float(total) / max(n_batches, 1), "lr": sched.get_last_lr()[0]}
            if val_pairs is not None:
                val = evaluate_loss(model, loss_fn, val_pairs, cfg.eval_batch_size, device)
                metrics["val_loss"] = val
                if val < s["best_val"] - cfg.min_delta:
                    s.update(best_val=val, best_epoch=epoch, bad_epochs=0)
                    s["best_model"], s["best_loss"] = _clone_state(model), _clone_state(loss_fn)
                else:
                    s["bad_epochs"] += 1
                    s["stopped"] = cfg.patience is not None and s["bad_epochs"] >= cfg.patience
            else:
                s["best_epoch"] = epoch
            metrics |= loss_param_metrics(loss_fn)
            commit_epoch(s, epoch, metrics, ckpt_path, device, fingerprint, lambda: {
                "model": model.state_dict(), "loss": loss_fn.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, callback)

    if s["best_model"] is not None:
        model.load_state_dict(s["best_model"])
        loss_fn.load_state_dict(s["best_loss"])
    result = TrainResult(
        best_val_loss=None if val_pairs is None else s["best_val"],
        best_epoch=s["best_epoch"],
        epochs_run=s["epoch"],
        steps=s["step"],
        stopped_early=s["stopped"],
        resumed_from_epoch=resumed_from,
        history=s["history"],
    )
    if callback is not None:
        end = {"epochs_run": float(result.epochs_run), "best_epoch": float(result.best_epoch)}
        if result.best_val_loss is not None:
            end["best_val_loss"] = result.best_val_loss
        callback("end", result.steps, end)
    return result
