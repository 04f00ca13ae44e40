"""Stage 2: fine-tune (part of) a frozen encoder together with the stage-1 projector and a task head.

    raw items --encoder (last_n blocks / all / nothing unfrozen)--> (B, D_src)
              --L2 norm if spec.normalize--> --projector (stage 1, trainable)--> (B, D_tgt)
              --task head (projection.finetune.tasks)--> logits | scalar | the embedding itself

Two paths, one loop (``projection.engine.loop``, shared with stage 1 and contrastive training):
- ``unfreeze="none"`` (fast path, also the *frozen-feature head baseline*): encoder features are
  computed ONCE with ``encoder.encode`` (inference mode, no grad) and only projector + head train.
- ``unfreeze="last_n"|"all"``: every step runs the encoder from raw items (``load_item`` results
  are cached in memory per item, there is no augmentation) through a TRAINABLE forward
  (``encoder.forward`` outside inference mode), so gradients reach the unfrozen blocks.

``frozen_head_baseline`` is ``finetune`` with ``unfreeze="none"`` and everything else equal (head
init, seed, schedule, epochs, early stopping), so its metric is the honest "before" for the
fine-tuned "after". What each policy unfreezes: ``projection.finetune.unfreeze`` over the encoder backend's
``layout()``. Discriminative learning rates: two parameter sets, ``encoder`` (encoder_lr) and
``head`` (head_lr: projector + task head), under the loop's one weight-decay rule.

After ``finetune`` returns, the encoder is frozen again (requires_grad False, eval) but HOLDS the
best fine-tuned weights; ``encoder.digest`` is recomputed so provenance shows the change.
Checkpoint: ``<checkpoint_dir>/finetune_checkpoint.pt`` after every epoch (trainable encoder
tensors by name, projector, head, optimiser, scheduler, RNG, loop state); a rerun with the same
settings and data resumes bit-identically. Artifacts: ``projection.finetune.io``.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.frozen import FrozenEncoder, freeze, weights_digest
from projection.engine import loop
from projection.engine.checkpoint import tensor_digest
from projection.finetune.config import FinetuneConfig
from projection.align.projector import load_projector
from projection.finetune.tasks import TASK_METRIC, TASKS, Task, task_metrics
from projection.finetune.unfreeze import EncoderPart, GradCheckpointing, apply_unfreeze, trainable_prefixes

CHECKPOINT_FILE = "finetune_checkpoint.pt"
__all__ = ["TASK_METRIC", "FinetuneModel", "FinetuneResult", "TaskData", "evaluate_task", "finetune",
           "frozen_head_baseline", "predict_task", "trainable_prefixes"]


class FinetuneModel(nn.Module):
    """encoder -> (normalise) -> projector -> head. The encoder is a FrozenEncoder, deliberately
    NOT a registered submodule: ``state_dict()`` is projector + head only; trainable encoder
    tensors are saved separately by name."""

    def __init__(self, encoder: FrozenEncoder, projector: nn.Module, head: Task):
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.head = head

    def embed(self, batch: Any) -> torch.Tensor:
        """Trainable encoder forward (no inference_mode): collated batch -> (B, D_src) float32."""
        feats = self.encoder.forward(batch).float()
        return F.normalize(feats, dim=-1) if self.encoder.spec.normalize else feats

    def forward(self, x: Any, raw: bool) -> torch.Tensor:
        feats = self.embed(x) if raw else x
        return self.head(self.projector(feats))


@dataclass
class TaskData:
    """Raw items plus what the task learns from them, row-aligned.

    items: image paths (image encoders) or texts (text encoders).
    y: classification: (N,) int labels; regression: (N,) numbers; retrieval: (N, D_tgt) fixed
    target embeddings (e.g. rows of a target-encoder store).
    """

    items: Sequence[Any]
    y: Any

    def __post_init__(self) -> None:
        self.items = list(self.items)
        if torch.is_tensor(self.y):
            y = self.y.detach().cpu()
        else:  # pandas 3 hands out read-only views (copy-on-write); torch warns on sharing one, so own a copy
            arr = np.asarray(self.y)
            y = torch.as_tensor(arr if arr.flags.writeable else arr.copy())
        if y.shape[0] != len(self.items):
            raise ValueError(f"{len(self.items)} items but {y.shape[0]} labels/targets")
        self.y = y

    def __len__(self) -> int:
        return len(self.items)


class _Inputs:
    """Batches of model input for one split: precomputed features (fast path) or raw items
    loaded once (``encoder.load_item``, cached) and collated per batch."""

    def __init__(self, encoder: FrozenEncoder, items: list, raw: bool, batch_size: int):
        self.encoder, self.items, self.raw = encoder, items, raw
        self.cache: list[Any] = [None] * len(items)
        self.feats = None if raw else self._precompute(batch_size)

    def _load(self, i: int) -> Any:
        if self.cache[i] is None:
            self.cache[i] = self.encoder.load_item(self.items[i])
        return self.cache[i]

    def _precompute(self, batch_size: int) -> torch.Tensor:
        out = []
        for s in range(0, len(self.items), batch_size):
            batch = self.encoder.collate([self._load(i) for i in range(s, min(s + batch_size, len(self.items)))])
            out.append(self.encoder.encode(batch).clone())  # clone: inference tensors cannot join autograd
        self.cache = [None] * len(self.items)  # the features are all we need now
        return torch.cat(out).float()  # (N, D_src)

    def get(self, idx: torch.Tensor) -> Any:
        if not self.raw:
            return self.feats[idx]
        return self.encoder.collate([self._load(int(i)) for i in idx])


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def _outputs(model: FinetuneModel, inputs: _Inputs, batch_size: int, bf16: bool) -> torch.Tensor:
    device = model.encoder.device
    outs = []
    for s in range(0, len(inputs.items), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(inputs.items)))
        x = inputs.get(idx)
        with _autocast(device, bf16):
            outs.append(model(x.to(device) if not inputs.raw else x, raw=inputs.raw).float())
    return torch.cat(outs)


def evaluate_task(model: FinetuneModel, data: TaskData, batch_size: int = 256, bf16: bool = False) -> dict[str, float]:
    """Task metrics of ``model`` on ``data`` (eval mode, no grad), always from raw items through
    the model's current encoder weights. Keys: see ``task_metrics``."""
    was = model.training
    model.eval()
    model.encoder.module.eval()
    try:
        inputs = _Inputs(model.encoder, data.items, raw=True, batch_size=batch_size)
        out = _outputs(model, inputs, batch_size, bf16)
        d_out = model.projector.cfg.d_out if hasattr(model.projector, "cfg") else out.shape[-1]
        return task_metrics(model.head, out, type(model.head).prepare(data.y, d_out))
    finally:
        model.train(was)


def predict_task(model: FinetuneModel, items: Sequence[Any], batch_size: int = 256, bf16: bool = False) -> np.ndarray:
    """Predictions in original units: class logits (N, K) | values (N,) | projected embeddings (N, D_tgt)."""
    model.eval()
    model.encoder.module.eval()
    out = _outputs(model, _Inputs(model.encoder, list(items), raw=True, batch_size=batch_size), batch_size, bf16)
    dev = next(iter(list(model.head.parameters()) + list(model.head.buffers()))).device
    return model.head.to_original_units(out.to(dev)).cpu().numpy()


@dataclass
class FinetuneResult:
    model: FinetuneModel  # holds the best weights (encoder in place, projector, head)
    task: str
    metric_name: str  # TASK_METRIC[task]
    best_val_metric: float | None  # task metric of the best epoch on val (None without val data)
    best_val_loss: float | None
    best_epoch: int  # 0-based epoch whose weights the model now holds
    epochs_run: int  # epochs completed, including ones done before a resume
    steps: int
    stopped_early: bool
    resumed_from_epoch: int | None  # epochs already done in the checkpoint we resumed from
    unfreeze: str
    trainable_encoder_params: list[str]  # names relative to encoder.module
    n_trainable_encoder: int  # number of scalars
    n_trainable_head: int  # projector + task head scalars
    val_metrics: dict[str, float] = field(default_factory=dict)  # all val metrics of the best epoch
    encoder_state_keys: list[str] = field(default_factory=list)  # encoder state_dict keys that may have changed
    history: list[dict[str, float]] = field(default_factory=list)


class FinetuneTrainer(loop.Trainer):
    """Encoder part + projector + task head; built by ``loop.run`` under the run's seeded RNG (head init)."""

    def __init__(self, encoder: FrozenEncoder, projector: nn.Module, items: tuple[list, list | None],
                 y: tuple[torch.Tensor, torch.Tensor | None], dim_head: int, cfg: FinetuneConfig):
        self.cfg, self.device, self.raw = cfg, torch.device(cfg.device), cfg.unfreeze != "none"
        self.y_train, self.y_val = y
        head = TASKS[cfg.task].build(dim_head, self.y_train, cfg).to(self.device)
        self.model = FinetuneModel(encoder, projector, head)
        self.trainable_names = apply_unfreeze(encoder, cfg.unfreeze, cfg.last_n)
        self.enc = EncoderPart(encoder, cfg.unfreeze, cfg.last_n)
        self.train_in = _Inputs(encoder, items[0], self.raw, cfg.eval_batch_size)
        self.val_in = _Inputs(encoder, items[1], self.raw, cfg.eval_batch_size) if items[1] is not None else None
        self.autocast = cfg.bf16 or encoder.spec.dtype == "bf16"
        self.items = items

    def parts(self) -> dict[str, Any]:
        return {"encoder": self.enc, "projector": self.model.projector, "head": self.model.head}

    def param_sets(self) -> list[loop.ParamSet]:
        return [loop.ParamSet("encoder", [self.model.encoder.module], self.cfg.encoder_lr),
                loop.ParamSet("head", [self.model], self.cfg.head_lr)]

    def settings(self) -> dict[str, Any]:
        enc = self.model.encoder
        return {"finetune": self.cfg, "encoder": {"spec": enc.spec.identity, "weights_digest": enc.digest}}

    def data_digest(self) -> str:
        names = hashlib.sha256("\n".join(map(str, self.items[0] + (self.items[1] or []))).encode()).hexdigest()
        return names + tensor_digest(self.y_train, *([self.y_val] if self.y_val is not None else []))

    def num_batches(self) -> int:
        return loop.num_batches(len(self.y_train), self.cfg.batch_size)

    def batches(self, generator: torch.Generator):
        return loop.batch_indices(len(self.y_train), self.cfg.batch_size, generator)

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.train_in.get(idx)
        with _autocast(self.device, self.autocast):
            out = self.model(x if self.raw else x.to(self.device), raw=self.raw)
        return self.model.head.loss(out, self.y_train[idx.to(self.device)])

    def validate(self) -> dict[str, float]:
        if self.val_in is None:
            return {}
        out = _outputs(self.model, self.val_in, self.cfg.eval_batch_size, self.autocast)
        return {f"val_{k}": v for k, v in task_metrics(self.model.head, out, self.y_val).items()}

    def end_metrics(self, state: loop.LoopState) -> dict[str, float]:
        if self.val_in is None:
            return {}
        return {f"best_val_{self.model.head.metric}": state.best_metrics["val_metric"],
                "best_val_loss": state.best_metrics["val_loss"]}

    def cleanup(self) -> None:
        # Back to the frozen-encoder contract, with whatever weights it now holds.
        self.model.eval()
        encoder = self.model.encoder
        freeze(encoder.module)
        if self.raw:
            encoder.digest = weights_digest(encoder.module)


def _trainer_class() -> type[FinetuneTrainer]:
    """The DDP trainer inside a torch.distributed group of several ranks (projection.finetune.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        from projection.finetune.distributed import DistributedFinetuneTrainer  # lazy: it imports this module

        return DistributedFinetuneTrainer
    return FinetuneTrainer


def loop_config(cfg: FinetuneConfig) -> loop.LoopConfig:
    return loop.LoopConfig(epochs=cfg.epochs, seed=cfg.seed, device=cfg.device, weight_decay=cfg.weight_decay,
                           warmup_frac=cfg.warmup_frac, min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip,
                           fused_adamw=cfg.fused_adamw, patience=cfg.patience, min_delta=cfg.min_delta,
                           monitor="val_metric" if cfg.early_stop_on == "metric" else "val_loss",
                           higher_is_better=cfg.higher_is_better)


def _check_inputs(encoder: FrozenEncoder, projector: nn.Module, train_data, val_data, cfg: FinetuneConfig):
    """Everything that can be refused before any work: devices, dims, policy, targets."""
    if encoder.device.type != torch.device(cfg.device).type:
        raise ValueError(f"encoder {encoder.spec} lives on {encoder.device} but cfg.device is {cfg.device!r}; build it with ?device={cfg.device}")
    d_in = getattr(getattr(projector, "cfg", None), "d_in", encoder.dim)
    d_out = getattr(getattr(projector, "cfg", None), "d_out", None)
    if d_in != encoder.dim:
        raise ValueError(f"projector expects D_src={d_in} but encoder {encoder.spec} gives {encoder.dim}")
    if len(train_data) == 0:
        raise ValueError("training split is empty")
    trainable_prefixes(encoder, cfg.unfreeze, cfg.last_n)  # validates last_n
    if cfg.unfreeze != "none" and encoder.compute_dtype != torch.float32:  # cast for inference (encoders/frozen.py)
        raise ValueError(f"stage 2 trains float32 weights but {encoder.spec} computes in {encoder.compute_dtype}: "
                         "load the encoder with dtype=fp32 and set bf16=true in the fine-tune config")
    task = TASKS[cfg.task]
    y_train = task.prepare(train_data.y, d_out).to(cfg.device)
    y_val = task.prepare(val_data.y, d_out).to(cfg.device) if val_data is not None else None
    task.check_targets(y_train, y_val, cfg)
    dim_head = d_out if d_out is not None else int(projector(torch.zeros(1, d_in, device=cfg.device)).shape[-1])
    return (y_train, y_val), dim_head


def finetune(
    encoder: FrozenEncoder,
    projector: nn.Module | str | Path,
    train_data: TaskData,
    val_data: TaskData | None,
    cfg: FinetuneConfig,
    checkpoint_dir: str | Path | None = None,
    callback: loop.Callback | None = None,
) -> FinetuneResult:
    """Train encoder (per ``cfg.unfreeze``) + projector + a new task head; see the module doc.

    ``projector``: a Projector (trained in place) or the directory of a saved one. The best
    epoch's weights (by ``cfg.early_stop_on`` on val) are in ``result.model`` and, for the
    encoder, in ``encoder.module`` itself. Resumes from ``checkpoint_dir/finetune_checkpoint.pt``.
    The caller's global torch RNG is left untouched (the run uses a forked RNG seeded by cfg.seed).
    """
    if isinstance(projector, (str, Path)):
        projector = load_projector(projector, cfg.device)
    projector.to(device=cfg.device, dtype=torch.float32)  # a kept ridge start is saved in float64; stage 2 trains it
    if val_data is not None and len(val_data) == 0:
        val_data = None
    y, dim_head = _check_inputs(encoder, projector, train_data, val_data, cfg)
    items = (train_data.items, val_data.items if val_data is not None else None)
    with GradCheckpointing(encoder, cfg.grad_checkpointing and cfg.unfreeze != "none"):
        res = loop.run(lambda: _trainer_class()(encoder, projector, items, y, dim_head, cfg), loop_config(cfg),
                       checkpoint_dir, CHECKPOINT_FILE, callback)
    t, s = res.trainer, res.state
    best = {k.removeprefix("val_"): v for k, v in s.best_metrics.items()}
    return FinetuneResult(
        model=t.model, task=cfg.task, metric_name=TASK_METRIC[cfg.task],
        best_val_metric=best.get("metric") if val_data is not None else None,
        best_val_loss=best.get("loss") if val_data is not None else None,
        best_epoch=s.best_epoch, epochs_run=s.epoch, steps=s.step, stopped_early=s.stopped,
        resumed_from_epoch=res.resumed_from_epoch, unfreeze=cfg.unfreeze, trainable_encoder_params=t.trainable_names,
        n_trainable_encoder=sum(encoder.module.get_parameter(n).numel() for n in t.trainable_names),
        n_trainable_head=sum(p.numel() for p in t.model.parameters()),
        val_metrics=best, history=s.history, encoder_state_keys=t.enc.keys,
    )  # fmt: skip


def frozen_head_baseline(encoder: FrozenEncoder, projector: nn.Module | str | Path, train_data: TaskData,
                         val_data: TaskData | None, cfg: FinetuneConfig, **run: Any) -> FinetuneResult:
    """The "before" number: ``finetune`` with ``unfreeze='none'`` and everything else equal (same
    head init from cfg.seed, same head_lr schedule, epochs, batches, early stopping), i.e. a
    projector + head trained on frozen encoder features. Pass a FRESH projector (or its directory):
    the one given is trained in place. ``run``: ``checkpoint_dir`` (not the fine-tuning run's) and
    ``callback``, as for ``finetune``."""
    return finetune(encoder, projector, train_data, val_data, cfg.model_copy(update={"unfreeze": "none"}), **run)
