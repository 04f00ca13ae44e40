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
- Resumable bit-for-bit, like ``projection.train``: shuffling from a generator seeded by
  (seed, epoch), augmentation from the forked global RNG saved in the checkpoint, and towers, loss,
  optimiser and scheduler all in the per-epoch checkpoint.
- Plain torch: no prefect, no mlflow. The flow in ``flows/contrastive.py`` is the recipe.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from projection.metrics import bidirectional_ranks, rank_metrics
from projection.checkpoint import commit_epoch, resume
from projection.steps import loss_param_metrics, optimizer_step
from projection.train import _epoch_seed, _param_groups, warmup_cosine

ROOT = Path(__file__).resolve().parents[1]
TINY_RN = ROOT / "data" / "models" / "xmodal-tiny-rn.json"
CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
Callback = Callable[[str, int, dict[str, float]], None]

ContrastiveLossName = Literal["infonce", "siglip", "ntxent", "triplet", "npair", "lifted", "queue_infonce", "contrastive"]
_TEMPERATURE_LOSSES = ("infonce", "ntxent", "queue_infonce")


def _loss_class(name: str) -> type[nn.Module]:
    from projection.losses import InfoNCELoss, SigLIPLoss
    from projection.pair_losses import PAIR_LOSSES

    return {"infonce": InfoNCELoss, "siglip": SigLIPLoss, **PAIR_LOSSES}[name]


class ContrastiveConfig(BaseModel):
    """How to train image towers contrastively; every field shows in the Prefect run form."""

    model_config = ConfigDict(extra="forbid")

    model_json: str = Field(
        str(TINY_RN),
        description="open_clip model-config JSON (embed_dim, vision_cfg, text_cfg) the towers are built from; "
        "embed_dim comes from it. Default: the tiny ResNet (32x32 input) of data/models.",
    )
    towers: Literal["two", "shared"] = Field(
        "two",
        description="'two': a separate image tower per modality (e.g. photo tower and sketch tower); "
        "'shared': one tower embeds both modalities (or two augmented views of one).",
    )
    tie_init: bool = Field(False, description="'two' towers only: start both towers from the same random weights.")
    loss: ContrastiveLossName = Field(
        "infonce",
        description="infonce/siglip: CLIP/SigLIP losses (projection.losses); the rest are the metric-learning "
        "losses of projection.pair_losses. The a-tower's embedding plays CLIP's 'image'.",
    )
    loss_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra constructor arguments of the loss, e.g. {'margin': 0.3, 'mining': 'hardest'} for triplet.",
    )
    temperature: float | None = Field(
        None, gt=0.0,
        description="Initial (or fixed) temperature of infonce / ntxent / queue_infonce; empty: the loss's own default "
        "(0.07, 0.5, 0.07).",
    )
    learn_temperature: bool = Field(True, description="infonce/siglip: learn the logit scale (and SigLIP bias).")
    epochs: int = Field(10, ge=1, description="Passes over the training pairs.")
    batch_size: int = Field(128, ge=2, description="Pairs per step; also the number of in-batch negatives + 1.")
    lr: float = Field(2e-3, gt=0.0, description="Peak AdamW learning rate (after warmup).")
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW decoupled weight decay on matrices/kernels only.")
    warmup_frac: float = Field(0.1, ge=0.0, le=1.0, description="Linear warmup as a fraction of all steps; cosine decay after.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine decay ends at lr * min_lr_ratio.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Max global grad norm; empty disables clipping.")
    augment: bool = Field(
        False,
        description="Random resized crop + small affine (torchvision.transforms.v2) on each training image, each step. "
        "Needed for 'shared' towers trained on two views of one modality.",
    )
    crop_scale: float = Field(0.7, gt=0.0, le=1.0, description="augment: smallest crop area fraction.")
    max_rotation: float = Field(10.0, ge=0.0, description="augment: max rotation in degrees.")
    max_translate: float = Field(0.1, ge=0.0, lt=1.0, description="augment: max shift as a fraction of the image size.")
    recalibrate_bn: bool = Field(
        True,
        description="After training, recompute BatchNorm running statistics over the training images with the final "
        "weights (few steps leave the running averages lagging behind the weights; eval mode uses them).",
    )
    seed: int = Field(0, description="Seeds tower init, shuffling and augmentation: same seed -> bit-identical run.")
    device: str = Field("cpu", description="Torch device, e.g. 'cpu' or 'cuda'.")
    threads: int | None = Field(
        None, ge=1,
        description="CPU threads torch uses while training (restored after); empty: leave torch's setting. On a busy "
        "machine 1 can be many times faster than OpenMP threads competing with other processes for the cores.",
    )
    eval_batch_size: int = Field(512, ge=1, description="Images per forward pass when embedding for validation.")

    @model_validator(mode="after")
    def _check(self) -> "ContrastiveConfig":
        path = Path(self.model_json)
        if not path.is_file():
            raise ValueError(f"model_json {self.model_json!r} does not exist (an open_clip model-config JSON)")
        cfg = json.loads(path.read_text())
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ValueError(f"model_json {self.model_json} is not an open_clip model config: no {missing}")
        kwargs = self.loss_kwargs_resolved(int(cfg["embed_dim"]))
        try:
            inspect.signature(_loss_class(self.loss)).bind(**kwargs)
        except TypeError as exc:
            raise ValueError(f"loss_kwargs {self.loss_kwargs} do not fit loss {self.loss!r}: {exc}") from None
        return self

    def loss_kwargs_resolved(self, embed_dim: int) -> dict[str, Any]:
        kw = dict(self.loss_kwargs)
        if self.temperature is not None and self.loss in _TEMPERATURE_LOSSES:
            kw.setdefault("temperature", self.temperature)
        if self.loss in ("infonce", "siglip"):
            kw.setdefault("learnable", self.learn_temperature)
        if self.loss == "queue_infonce":
            kw.setdefault("dim", embed_dim)
        return kw

    def model_cfg(self) -> dict:
        return json.loads(Path(self.model_json).read_text())


def build_loss(cfg: ContrastiveConfig, embed_dim: int) -> nn.Module:
    """The loss module; any learnable temperature lives in it and is optimised with the towers."""
    return _loss_class(cfg.loss)(**cfg.loss_kwargs_resolved(embed_dim))


# ----------------------------------------------------------------------------- towers


def _create_clip(model_cfg: dict, name: str, seed: int) -> nn.Module:
    """A full open_clip CLIP from a model-config dict, seeded, built the way the encoder loader builds it.

    The caller's global RNG is left untouched.
    """
    import open_clip

    with tempfile.TemporaryDirectory() as d:  # open_clip registers configs by file stem
        path = Path(d) / f"{name}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(name, pretrained=None, pretrained_text=False)


class DualEncoder(nn.Module):
    """Two open_clip image towers (or one shared), each followed by L2 normalisation.

    tower a embeds modality A (e.g. photos), tower b modality B (e.g. sketches); with
    towers='shared' both names refer to the same module.
    """

    def __init__(self, model_cfg: dict, towers: Literal["two", "shared"] = "two", seed: int = 0,
                 tie_init: bool = False, name: str = "xmodal-contrastive"):
        super().__init__()
        self.model_cfg = dict(model_cfg)
        self.name = name
        self.shared = towers == "shared"
        self.seeds = {"a": seed, "b": seed if (self.shared or tie_init) else seed + 1}
        clip_a = _create_clip(self.model_cfg, name, self.seeds["a"])
        self.preprocess_cfg = dict(clip_a.visual.preprocess_cfg)  # size, mean, std, interpolation, ...
        self.tower_a = clip_a.visual
        if not self.shared:
            self.tower_b = _create_clip(self.model_cfg, name, self.seeds["b"]).visual
        self.embed_dim = int(self.model_cfg["embed_dim"])

    @classmethod
    def from_config(cls, cfg: ContrastiveConfig) -> "DualEncoder":
        return cls(cfg.model_cfg(), cfg.towers, cfg.seed, cfg.tie_init, Path(cfg.model_json).stem)

    def tower(self, which: Literal["a", "b"]) -> nn.Module:
        if which not in ("a", "b"):
            raise ValueError(f"tower must be 'a' or 'b', got {which!r}")
        return self.tower_a if (which == "a" or self.shared) else self.tower_b

    def encode(self, x: torch.Tensor, which: Literal["a", "b"]) -> torch.Tensor:
        return F.normalize(self.tower(which)(x), dim=-1)  # (B, 3, H, W) -> (B, D)

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared:  # one pass, so BatchNorm sees both modalities together
            z = self.encode(torch.cat([xa, xb]), "a")  # (2B, D)
            return z[: xa.shape[0]], z[xa.shape[0]:]
        return self.encode(xa, "a"), self.encode(xb, "b")

    def transform(self):
        """open_clip's eval transform for this model's preprocess_cfg: what the encoder loader will use."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)


def save_tower(dual: DualEncoder, which: Literal["a", "b"], out_dir: str | Path) -> Path:
    """Write tower `which` as an open_clip local-dir folder: open_clip_config.json + open_clip_model.safetensors.

    The weights file holds a full CLIP state dict (the loader loads strictly): `visual.*` is the trained
    tower, the text tower is the same seeded random init (unused, but required by the format).
    Load it with ``encoders.factory.load_encoder(f"open_clip:image:local-dir:{out_dir}")``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clip = _create_clip(dual.model_cfg, dual.name, dual.seeds[which])
    clip.visual.load_state_dict(dual.tower(which).state_dict())
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in clip.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "xmodal.tower": which})
    os.replace(tmp, out / WEIGHTS_FILE)
    cfg = {"model_cfg": dual.model_cfg, "preprocess_cfg": _jsonable(dual.preprocess_cfg)}
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, out / CONFIG_FILE)
    return out


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def tower_spec(out_dir: str | Path) -> str:
    """The encoder spec that loads a saved tower."""
    return f"open_clip:image:local-dir:{Path(out_dir).resolve()}"


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
def embed(model: DualEncoder, images: torch.Tensor, which: Literal["a", "b"], batch_size: int = 512,
          device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, 3, H, W) -> (N, D) L2-normalised embeddings on the CPU, eval mode."""
    model.eval().to(device)
    if len(images) == 0:
        return torch.empty(0, model.embed_dim)
    return torch.cat([model.encode(images[s:s + batch_size].to(device), which).cpu()
                      for s in range(0, len(images), batch_size)])


def _batches(n: int, batch_size: int, gen: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches; the last partial batch is dropped when there is a full one (a 1-pair contrastive
    batch has no negatives, and BatchNorm cannot normalise one 1x1 feature map)."""
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    if n <= batch_size:
        return [order]
    return [order[s:s + batch_size] for s in range(0, n - batch_size + 1, batch_size)]


@torch.no_grad()
def _validate(model: DualEncoder, loss_fn: nn.Module, xa: torch.Tensor, xb: torch.Tensor,
              cfg: ContrastiveConfig, device: torch.device) -> dict[str, float]:
    model.eval()
    loss_fn.eval()
    za = embed(model, xa, "a", cfg.eval_batch_size, device)  # (N, D)
    zb = embed(model, xb, "b", cfg.eval_batch_size, device)  # (N, D)
    total, count = 0.0, 0
    for idx in _batches(len(za), cfg.batch_size, None):
        if len(idx) < 2:
            continue
        total += float(loss_fn(za[idx].to(device), zb[idx].to(device))) * len(idx)
        count += len(idx)
    a2b, _ = bidirectional_ranks(za, zb)
    return {"val_loss": total / count if count else float("nan"), "val_r1": float((a2b == 1).mean())}


def train_contrastive(
    train_a,
    train_b,
    cfg: ContrastiveConfig,
    val_a=None,
    val_b=None,
    checkpoint_dir: str | Path | None = None,
    callback: Callback | None = None,
) -> ContrastiveResult:
    """Train a DualEncoder on pairs (train_a[i], train_b[i]); returns it with its final weights.

    train_a / train_b: image paths (decoded and preprocessed once with the towers' eval transform) or
    already-preprocessed (N, 3, H, W) tensors. train_b=None with towers='shared' and augment=True trains
    on two augmented views of train_a (SimCLR-style). Validation (val_a, val_b) reports val_loss and
    val_r1 (a -> b recall@1). Resumes from `checkpoint_dir/checkpoint.pt` when present. The caller's
    global torch RNG is left untouched.
    """
    if train_b is None and not (cfg.towers == "shared" and cfg.augment):
        raise ValueError("train_b=None (two views of one modality) needs towers='shared' and augment=True")
    device = torch.device(cfg.device)
    model = DualEncoder.from_config(cfg)
    transform = model.transform()
    xa = _as_images(train_a, transform)
    xb = xa if train_b is None else _as_images(train_b, transform)
    if len(xa) != len(xb):
        raise ValueError(f"train_a has {len(xa)} images, train_b {len(xb)}: pairs must align row by row")
    if len(xa) < 2:
        raise ValueError(f"contrastive training needs at least 2 training pairs, got {len(xa)}")
    has_val = val_a is not None and val_b is not None and len(val_a) > 0
    if has_val:
        va, vb = _as_images(val_a, transform), _as_images(val_b, transform)
        if len(va) != len(vb):
            raise ValueError(f"val_a has {len(va)} images, val_b {len(vb)}")
    size = int(model.preprocess_cfg["size"] if isinstance(model.preprocess_cfg["size"], int) else model.preprocess_cfg["size"][0])
    augment = _Augment(cfg, size) if cfg.augment else None

    model.to(device)
    loss_fn = build_loss(cfg, model.embed_dim).to(device)
    steps_per_epoch = len(_batches(len(xa), cfg.batch_size, None))
    total_steps = cfg.epochs * steps_per_epoch
    params = [p for p in chain(model.parameters(), loss_fn.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(_param_groups(params, cfg.weight_decay), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(int(cfg.warmup_frac * total_steps), total_steps,
                                                                 cfg.min_lr_ratio))
    # Resuming under other settings or data would silently break determinism.
    fingerprint = json.dumps(cfg.model_dump(exclude={"device", "eval_batch_size"}) | {"n_train": len(xa)},
                             sort_keys=True, default=str)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train_loop(model, loss_fn, opt, sched, params, xa, xb, va if has_val else None,
                           vb if has_val else None, augment, cfg, device, fingerprint, ckpt_path, callback, start)
    finally:
        torch.set_num_threads(threads_before)


def _train_loop(model, loss_fn, opt, sched, params, xa, xb, va, vb, augment, cfg, device, fingerprint, ckpt_path,
                callback, start) -> ContrastiveResult:
    has_val = va is not None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        s, resumed_from = resume(ckpt_path, device, fingerprint, {"epoch": 0, "step": 0, "history": []}, {
            "model": model.load_state_dict, "loss": loss_fn.load_state_dict,
            "optimizer": opt.load_state_dict, "scheduler": sched.load_state_dict})

        while s["epoch"] < cfg.epochs:
            epoch = s["epoch"]
            gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
            model.train()
            loss_fn.train()
            total = torch.zeros((), device=device)
            batches = _batches(len(xa), cfg.batch_size, gen)
            for idx in batches:
                ba, bb = xa[idx], xb[idx]  # (B, 3, H, W) each
                if augment is not None:
                    ba, bb = augment(ba), augment(bb)
                za, zb = model(ba.to(device), bb.to(device))  # (B, D) each, unit norm
                loss = loss_fn(za, zb)
                optimizer_step(loss, opt, sched, params, cfg.grad_clip)
                total += loss.detach()
            s["step"] += len(batches)
            metrics = {"epoch": float(epoch), "train_loss": float(total) / len(batches), "lr": sched.get_last_lr()[0]}
            if has_val:
                metrics |= _validate(model, loss_fn, va, vb, cfg, device)
            metrics |= loss_param_metrics(loss_fn)
            commit_epoch(s, epoch, metrics, ckpt_path, device, fingerprint, lambda: {
                "model": model.state_dict(), "loss": loss_fn.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, callback)

    if cfg.recalibrate_bn:
        recalibrate_bn(model, xa, xb, cfg.eval_batch_size, device)
    model.eval()
    loss_fn.eval()
    result = ContrastiveResult(model=model, loss_fn=loss_fn, epochs_run=s["epoch"], steps=s["step"],
                               resumed_from_epoch=resumed_from, train_seconds=time.perf_counter() - start,
                               history=s["history"])
    if callback is not None:
        callback("end", result.steps, {"epochs_run": float(result.epochs_run), "train_seconds": result.train_seconds})
    return result


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
    for idx in _batches(len(xa), batch_size, None):
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
