"""The frozen-encoder contract every backend meets, and the run-time choices they share.

Frozen by construction: the module is put in eval mode with ``requires_grad=False`` before anyone
sees it, and ``encode`` runs under ``torch.inference_mode()``. Stage 2 may unfreeze later, but it
does so on purpose through ``module``; extraction can never train an encoder by accident.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from torch import nn

from encoders.layout import EncoderLayout
from encoders.spec import EncoderSpec

WeightsOrigin = Literal["pretrained", "checkpoint", "random-init"]


class EncoderUnavailable(RuntimeError):
    """A model's weights are not on this machine and downloading is off: fail fast, say how to fix."""


class BadInput(ValueError):
    """One item could not be turned into model input (missing/corrupt image, empty text)."""


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def weights_digest(module: nn.Module) -> str:
    """sha256 over parameters and buffers in name order: identifies the weights, whatever their origin."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FrozenEncoder(ABC):
    """Raw items (image paths, texts) -> (B, D) float32 embeddings.

    ``load_item`` runs in a prefetch thread and may raise ``BadInput`` for one item; ``collate``
    and ``forward`` run on the compute thread for a whole batch.
    """

    spec: EncoderSpec
    module: nn.Module
    device: torch.device
    origin: WeightsOrigin
    digest: str
    dim: int
    source: str = ""  # where the weights came from beyond the origin (package + file digest, file path)
    # Stage 2 keeps BatchNorm layers in eval mode (pretrained running statistics) while it trains
    # their block: batches of 32 small images re-estimate them badly (see TimmEncoder).
    freeze_bn_stats: bool = False

    @property
    def modality(self) -> str:
        return self.spec.tower

    @abstractmethod
    def load_item(self, raw: Any) -> Any:
        """One raw item -> model-ready input (a tensor for images, a str for texts)."""

    @abstractmethod
    def collate(self, items: list[Any]) -> Any:
        """Loaded items -> one batch on the device."""

    @abstractmethod
    def forward(self, batch: Any) -> torch.Tensor:
        """Batch -> (B, D) features, before normalisation."""

    def encode(self, batch: Any) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            feats = self.forward(batch)  # (B, D)
        feats = feats.float()
        if self.spec.normalize:
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats

    def encode_items(self, items: list[Any]) -> torch.Tensor:
        """Convenience for tests and search: raw items straight to (B, D) embeddings on the CPU."""
        return self.encode(self.collate([self.load_item(x) for x in items])).cpu()

    def _autocast(self):
        if self.spec.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _finish(self, module: nn.Module, origin: WeightsOrigin) -> None:
        """Shared tail of every backend's constructor: freeze, place, fingerprint, probe dim."""
        self.module = freeze(module).to(self.device)
        self.origin = origin
        self.digest = weights_digest(self.module)
        self.dim = int(self.encode(self.collate([self._probe_item()])).shape[-1])

    def layout(self) -> EncoderLayout:
        """Blocks, post-block layers and tower by name (``encoders.layout``): what stage 2 unfreezes.

        Each backend that supports partial fine-tuning overrides this (open_clip, hf, timm).
        """
        raise ValueError(f"{self.spec.backend} encoders do not describe their blocks yet ({self.spec}); "
                         "fine-tune them with unfreeze='none'")

    @abstractmethod
    def _probe_item(self) -> Any:
        """A valid dummy item, used once to learn the output dimension."""

    def describe(self) -> dict[str, Any]:
        return {
            "encoder_spec": self.spec.identity,
            "weights_origin": self.origin,
            "weights_digest": self.digest,
            "weights_source": self.source,
            "dim": self.dim,
            "device": str(self.device),
        }
