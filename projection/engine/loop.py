"""The one training loop: stage 1 (``train``), stage 2 (``finetune``) and contrastive towers.

A trainer supplies only what differs (its parts, parameter sets, batches, loss, validation
metrics); this module owns everything the three used to copy and let drift:

- Resumable bit-for-bit. The loop runs under a forked global RNG seeded with ``cfg.seed`` (dropout,
  augmentation, head init in ``setup``), shuffles with a fresh generator per (seed, epoch), and
  checkpoints after every epoch everything that evolves: the trainer's parts, optimizer,
  scheduler, the RNG and ``LoopState``. kill -9 + rerun ends with the same weights as an
  uninterrupted run. The checkpoint is guarded by ONE fingerprint over the whole config, the
  modules, the initial weights and the data (``projection.engine.checkpoint.fingerprint``).
- One parameter-group rule (``param_groups``), nanoGPT's ``configure_optimizers``: weights of
  matmuls and convolutions (ndim >= 2) decay; biases, norms, embeddings (token and positional,
  class tokens) and logit scales/biases do not.
- One last-batch rule (``batch_indices``): shuffled batches of ``batch_size``; the last partial
  batch is kept unless it holds a single item (a 1-item batch has no in-batch negatives for the
  contrastive losses and BatchNorm cannot normalise it), in which case that item waits for the
  next epoch's shuffle.
- Near-zero overhead over a bare torch loop: no ``.item()`` per step (the loss is accumulated as
  a tensor, one sync per epoch). ``benchmarks/align.py`` measures it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from projection.engine.checkpoint import fingerprint, load_checkpoint, save_checkpoint

Callback = Callable[[str, int, dict[str, float]], None]
MIN_BATCH = 2  # the smallest batch a training step runs (see the module doc)
_NO_DECAY_TYPES = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
_NO_DECAY_NAMES = frozenset({"positional_embedding", "class_embedding", "logit_scale", "logit_bias", "pos_embed",
                             "cls_token", "reg_token", "dist_token", "mask_token", "cls_emb"})


@dataclass(frozen=True)
class LoopConfig:
    """The loop's own settings; each trainer maps its pydantic config onto these."""

    epochs: int
    seed: int
    device: str
    weight_decay: float
    warmup_frac: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_frac when set
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    fused_adamw: bool = True
    patience: int | None = None  # epochs without improvement before stopping; None: never stop early
    min_delta: float = 0.0
    monitor: str | None = "val_loss"  # validation metric that picks the best epoch; None: the last epoch
    higher_is_better: bool = False
    # Seconds between "progress" events (epoch, batch, running loss, ETA) inside long epochs: a stage-2 epoch
    # on CPU can take many minutes, and a run log silent for 14 minutes looked hung. Default 60 s;
    # $XMODAL_PROGRESS_S sets it (tests use a short interval).
    progress_s: float = field(default_factory=lambda: float(os.environ.get("XMODAL_PROGRESS_S", "60")))


@dataclass
class LoopState:
    """Everything that evolves across epochs besides the parts, optimizer and scheduler."""

    epoch: int = 0  # epochs completed = the next epoch to run
    step: int = 0
    best_value: float = math.inf  # of cfg.monitor; -inf start when higher is better
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_weights: dict[str, dict[str, torch.Tensor]] | None = None  # part -> state dict at the best epoch
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:  # not dataclasses.asdict: that deep-copies every tensor
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ParamSet:
    """Modules whose trainable parameters share one learning rate (a discriminative-LR group)."""

    name: str
    modules: Sequence[nn.Module]
    lr: float


class Trainer:
    """What differs between the loops. ``run`` calls these; the defaults suit a trainer without extras."""

    def parts(self) -> dict[str, Any]:
        """name -> object with state_dict/load_state_dict: checkpointed, and kept at the best epoch."""
        raise NotImplementedError

    def param_sets(self) -> list[ParamSet]:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Config sections for the fingerprint (pydantic models or dicts), minus what cannot change the result."""
        raise NotImplementedError

    def data_digest(self) -> str:
        raise NotImplementedError

    def num_batches(self) -> int:
        raise NotImplementedError

    def batches(self, generator: torch.Generator) -> Iterable[Any]:
        raise NotImplementedError

    def loss(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def train_mode(self, training: bool) -> None:
        """Every part to train/eval mode; a part that is not a module (an encoder part) by its own train_mode."""
        for part in self.parts().values():
            part.train_mode(training) if hasattr(part, "train_mode") else part.train(training)

    def validate(self) -> dict[str, float]:
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def end_metrics(self, state: LoopState) -> dict[str, float]:
        return {}

    def finish(self) -> None:
        """After the last epoch and the best weights are back (e.g. recalibrate BatchNorm)."""

    def cleanup(self) -> None:
        """Always, even on error (e.g. freeze an encoder again)."""


T = TypeVar("T", bound=Trainer)


@dataclass
class LoopResult(Generic[T]):
    trainer: T
    state: LoopState
    resumed_from_epoch: int | None  # epochs already done in the checkpoint resumed from


def epoch_seed(seed: int, epoch: int) -> int:
    # Mixed rather than seed + epoch so (seed=0, epoch=1) and (seed=1, epoch=0) differ.
    return (seed * 1_000_003 + epoch) % (2**63)


def num_batches(n: int, batch_size: int) -> int:
    """Training steps per epoch over ``n`` items under the last-batch rule."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= MIN_BATCH or (rest and not full) else 0)


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches of one epoch: a shuffle (or 0..n-1 without a generator), cut by the last-batch rule."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[s : s + batch_size] for s in range(0, num_batches(n, batch_size) * batch_size, batch_size)]


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear 1/w..1 over warmup, then cosine from 1 to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _no_decay_names(module: nn.Module) -> set[str]:
    """Names the modules themselves list in ``no_weight_decay()`` (open_clip, timm), made absolute."""
    out = set()
    for prefix, m in module.named_modules():
        if callable(getattr(m, "no_weight_decay", None)):
            out |= {f"{prefix}.{n}" if prefix else n for n in m.no_weight_decay()}
    return out


def _split_decay(modules: Sequence[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay, keep = [], []
    for module in modules:
        listed = _no_decay_names(module)
        for prefix, m in module.named_modules():
            for name, p in m.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                full = f"{prefix}.{name}" if prefix else name
                no = p.ndim < 2 or isinstance(m, _NO_DECAY_TYPES) or name in _NO_DECAY_NAMES or full in listed
                (keep if no else decay).append(p)
    return decay, keep


def param_groups(sets: Sequence[ParamSet], weight_decay: float) -> list[dict]:
    """The one rule: per set, ``<name>`` (decays) and ``<name>_no_decay``; empty groups dropped."""
    groups = []
    for s in sets:
        decay, keep = _split_decay(s.modules)
        if decay:
            groups.append({"params": decay, "lr": s.lr, "weight_decay": weight_decay, "name": s.name})
        if keep:
            groups.append({"params": keep, "lr": s.lr, "weight_decay": 0.0, "name": f"{s.name}_no_decay"})
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    return groups


def make_optimizer(sets: Sequence[ParamSet], cfg: LoopConfig) -> torch.optim.AdamW:
    groups = param_groups(sets, cfg.weight_decay)
    fused = cfg.fused_adamw and all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=fused)


def scalar_metrics(prefix: str, module: nn.Module) -> dict[str, float]:
    """Learnable scalars (temperatures, logit biases): worth watching as they train."""
    return {f"{prefix}/{name}": float(p.detach()) for name, p in module.named_parameters() if p.numel() == 1}


def _clone(part: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in part.state_dict().items()}


def _lr_metrics(opt: torch.optim.Optimizer, sched, n_sets: int) -> dict[str, float]:
    if n_sets == 1:
        return {"lr": sched.get_last_lr()[0]}
    return {f"lr_{g['name'].removesuffix('_no_decay')}": lr for g, lr in zip(opt.param_groups, sched.get_last_lr())}


def optimizer_step(loss: torch.Tensor, opt, sched, params: list[nn.Parameter], grad_clip: float | None) -> None:
    # The order (zero grads, backward, clip, step, schedule) is part of the bit-identical-resume contract.
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)  # foreach only where it pays (CUDA)
    opt.step()
    sched.step()


def _judge(state: LoopState, epoch: int, metrics: dict[str, float], cfg: LoopConfig, parts: dict[str, Any]) -> None:
    """Early stopping: keep the best epoch's weights by cfg.monitor; without it, the last epoch is best."""
    if cfg.monitor is None or cfg.monitor not in metrics:
        state.best_epoch = epoch
        return
    value = metrics[cfg.monitor]
    if cfg.higher_is_better:
        better = value > state.best_value + cfg.min_delta
    else:
        better = value < state.best_value - cfg.min_delta
    if better:
        state.best_value, state.best_epoch, state.bad_epochs = value, epoch, 0
        state.best_metrics = {k: v for k, v in metrics.items() if k.startswith("val_")}
        state.best_weights = {name: _clone(part) for name, part in parts.items()}
    else:
        state.bad_epochs += 1
        state.stopped = cfg.patience is not None and state.bad_epochs >= cfg.patience


def _resume(path: Path | None, device: torch.device, print_: dict, state: LoopState, restore: dict[str, Any]) -> int | None:
    ck = load_checkpoint(path, device, print_)
    if ck is None:
        return None
    for name, part in restore.items():
        part.load_state_dict(ck[name])
    for f in fields(state):
        setattr(state, f.name, ck[f.name])
    return state.epoch


def is_main_process() -> bool:
    """Rank 0 of a torch.distributed group, or the only process (projection.finetune.distributed)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def _fit(trainer: Trainer, cfg: LoopConfig, device: torch.device, path: Path | None,
         callback: Callback | None) -> tuple[LoopState, int | None]:
    sets = trainer.param_sets()
    opt = make_optimizer(sets, cfg)
    params = [p for g in opt.param_groups for p in g["params"]]  # what clipping sees, in the optimizer's order
    total_steps = cfg.epochs * trainer.num_batches()
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_frac * total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total_steps, cfg.min_lr_ratio))
    parts = trainer.parts()
    print_ = fingerprint(trainer.settings(), parts, trainer.data_digest()) if path is not None else {}
    state = LoopState(best_value=-math.inf if cfg.higher_is_better else math.inf)
    resumed_from = _resume(path, device, print_, state, parts | {"optimizer": opt, "scheduler": sched})

    total = torch.zeros((), device=device)
    clock = _Progress(cfg, state.epoch, trainer.num_batches())
    while state.epoch < cfg.epochs and not state.stopped:
        epoch = state.epoch
        gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
        trainer.train_mode(True)
        total.zero_()
        n = 0
        for batch in trainer.batches(gen):
            loss = trainer.loss(batch)
            optimizer_step(loss, opt, sched, params, cfg.grad_clip)
            total.add_(loss.detach())
            n += 1
            if callback is not None and clock.due():
                callback("progress", state.step + n, clock.metrics(epoch, n, float(total) / n))
        state.step += n
        metrics = {"epoch": float(epoch), "train_loss": float(total) / max(n, 1)} | _lr_metrics(opt, sched, len(sets))
        trainer.train_mode(False)
        metrics |= trainer.validate()
        if callback is not None and clock.due():  # a long validation pass counts against the interval too
            callback("progress", state.step, clock.metrics(epoch, n, metrics["train_loss"]))
        _judge(state, epoch, metrics, cfg, parts)
        metrics |= trainer.epoch_metrics()
        # Counters move before the save, so a checkpoint says which epoch comes next; the callback runs
        # last, so what a tracker sees has already survived a kill -9.
        state.history.append(metrics)
        state.epoch = epoch + 1
        if path is not None and is_main_process():  # DDP: one writer; every rank resumes from its file
            save_checkpoint(path, device, print_, {name: p.state_dict() for name, p in parts.items()}
                            | {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()} | state.as_dict())
        if callback is not None:
            callback("epoch", state.step, metrics)
    if state.best_weights is not None:
        for name, part in parts.items():
            part.load_state_dict(state.best_weights[name])
    return state, resumed_from


class _Progress:
    """When the next "progress" event is due, and the ETA from the pace since this process started: the first
    batch reports at once (the run has started, and its pace), then at most every ``cfg.progress_s`` seconds."""

    def __init__(self, cfg: LoopConfig, start_epoch: int, batches: int):
        self.cfg, self.start_epoch, self.batches = cfg, start_epoch, max(batches, 1)
        self.t0 = time.monotonic()
        self.last: float | None = None

    def due(self) -> bool:
        now = time.monotonic()
        if self.last is not None and now - self.last < self.cfg.progress_s:
            return False
        self.last = now
        return True

    def metrics(self, epoch: int, batch: int, running_loss: float) -> dict[str, float]:
        done = (epoch + batch / self.batches - self.start_epoch) / max(self.cfg.epochs - self.start_epoch, 1)
        elapsed = time.monotonic() - self.t0
        return {"epoch": float(epoch), "epochs": float(self.cfg.epochs), "batch": float(batch),
                "batches": float(self.batches), "running_loss": running_loss, "elapsed_s": elapsed,
                "eta_s": elapsed * (1 - done) / done if done > 0 else math.nan}


def run(setup: Callable[[], T], cfg: LoopConfig, checkpoint_dir: str | Path | None = None,
        checkpoint_file: str = "checkpoint.pt", callback: Callback | None = None) -> LoopResult[T]:
    """Build the trainer with ``setup()`` under the run's seeded RNG, train it, return it with the loop's state.

    Resumes from ``checkpoint_dir/checkpoint_file`` when present (refusing one made with other
    settings). On return the parts hold the best epoch's weights. The caller's global torch RNG is
    left untouched.
    """
    device = torch.device(cfg.device)
    path = Path(checkpoint_dir) / checkpoint_file if checkpoint_dir is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices, device_type=device.type if device.type != "cpu" else "cuda"):
        torch.manual_seed(cfg.seed)
        trainer = setup()
        try:
            state, resumed_from = _fit(trainer, cfg, device, path, callback)
            trainer.finish()
        finally:
            trainer.cleanup()
    result = LoopResult(trainer, state, resumed_from)
    if callback is not None:
        callback("end", state.step, {"epochs_run": float(state.epoch), "best_epoch": float(state.best_epoch)}
                 | trainer.end_metrics(state))
    return result
