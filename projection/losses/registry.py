"""Every loss by name: one Literal of names, one table of classes, one ``build_loss``.

Stage 1 (a weighted sum of terms, ``LossConfig.terms``), stage 2's tasks and contrastive tower
training all build their losses here, so adding a loss is one class plus one line in ``_CLASSES``
(the name joins ``LossName`` and so every config, form and CLI choice). Every loss is an
``nn.Module`` called as ``loss(a, b) -> scalar`` on paired rows, labels derived (open_clip's
convention). Importing this module imports no torch: configs validate names against it cheaply.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Literal, get_args

LossName = Literal["mse", "cosine", "infonce", "siglip", "ntxent", "contrastive", "triplet", "npair", "lifted",
                   "queue_infonce"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)
# Losses that pull each row onto its partner only, with no other rows as negatives: they cannot train two towers
# from scratch (both collapse onto a constant), so contrastive training refuses them.
REGRESSION_LOSSES = ("mse", "cosine")

_CLASSES = {
    "mse": "projection.losses.core:MSELoss",
    "cosine": "projection.losses.core:CosineLoss",
    "infonce": "projection.losses.core:InfoNCELoss",
    "siglip": "projection.losses.core:SigLIPLoss",
    "ntxent": "projection.losses.pairs:NTXentLoss",
    "contrastive": "projection.losses.pairs:ContrastiveLoss",
    "triplet": "projection.losses.pairs:TripletLoss",
    "npair": "projection.losses.pairs:NPairLoss",
    "lifted": "projection.losses.pairs:LiftedStructuredLoss",
    "queue_infonce": "projection.losses.queue:QueueInfoNCELoss",
}


def loss_class(name: str) -> type:
    """The class registered under ``name`` (imported on first use: open_clip's losses cost seconds)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown loss {name!r}; choose from {', '.join(LOSS_NAMES)}")
    module, cls = _CLASSES[name].split(":")
    return getattr(import_module(module), cls)


def build_loss(name: str, **kwargs: Any):
    """``loss_class(name)(**kwargs)``, e.g. ``build_loss("triplet", margin=0.3, mining="hardest")``."""
    return loss_class(name)(**kwargs)
