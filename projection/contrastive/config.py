"""Config of contrastive tower training (``projection.contrastive.trainer``), and its loss factory.

Its own module so the Prefect flow can use it as a typed run form, and so ``contrastive.py``
stays one concept (the training of towers). Every field shows in the Prefect run form.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from projection.losses.registry import REGRESSION_LOSSES, LossName, build_loss, loss_class

ROOT = Path(__file__).resolve().parents[2]
TINY_RN = ROOT / "data" / "models" / "xmodal-tiny-rn.json"

_TEMPERATURE_LOSSES = ("infonce", "ntxent", "queue_infonce")


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
    loss: LossName = Field(
        "infonce",
        description="infonce/siglip: CLIP/SigLIP losses (projection.losses.registry); the rest are the metric-learning "
        "losses of projection.losses.pairs. The a-tower's embedding plays CLIP's 'image'.",
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
        if self.loss in REGRESSION_LOSSES:
            raise ValueError(f"loss {self.loss!r} has no negatives: two towers trained on it collapse onto a constant; "
                             "choose a contrastive loss (infonce, siglip, ntxent, triplet, ...)")
        path = Path(self.model_json)
        if not path.is_file():
            raise ValueError(f"model_json {self.model_json!r} does not exist (an open_clip model-config JSON)")
        cfg = json.loads(path.read_text())
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ValueError(f"model_json {self.model_json} is not an open_clip model config: no {missing}")
        kwargs = self.loss_kwargs_resolved(int(cfg["embed_dim"]))
        try:
            inspect.signature(loss_class(self.loss)).bind(**kwargs)
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


def build_tower_loss(cfg: ContrastiveConfig, embed_dim: int):
    """The loss module; any learnable temperature lives in it and is optimised with the towers."""
    return build_loss(cfg.loss, **cfg.loss_kwargs_resolved(embed_dim))
