"""The frozen-encoder contract every backend meets, and the run-time choices they share.

Frozen by construction: the module is put in eval mode with ``requires_grad=False`` before anyone
sees it, and ``encode`` runs under ``torch.inference_mode()``. Stage 2 may unfreeze later, but it
does so on purpose through ``module``; extraction can never train an encoder by accident.

Reduced precision (``dtype=bf16`` / ``fp16``) is done by casting once, not by autocast: the weights
are cast when the encoder is built and every floating input when it enters ``encode``. Autocast
re-casts each weight at every op; on this project's 2-core EPYC (AVX-512 BF16, ViT-B-32, batch
32) that made bf16 *slower* than fp32 (13.2 vs 15.9 items/s) where weights cast once ran 36 items/s
(issue 14). Norm layers keep float32 parameters: torch's mixed-dtype LayerNorm/GroupNorm/BatchNorm
kernels then compute their statistics in float32 and return the input's dtype, with no extra copy
(casting activations to float32 around each norm cost 9 % of the forward pass here). The pooled
features leave the model, become float32 and are L2-normalised in float32.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from typing import Any, Literal

import torch
from torch import nn

from encoders.layout import EncoderLayout
from encoders.packed import cpu_has_fast, pack_linears
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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The dtype an encoder computes in: the spec's, except bf16 on a CUDA GPU without bf16 (pre-Ampere),
    which gets fp16 (same speed class there, 3 more mantissa bits; the store records what ran)."""
    dtype = DTYPES[requested]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        logging.getLogger(__name__).warning("%s has no bf16: computing in fp16 instead", torch.cuda.get_device_name(device))
        return torch.float16
    if dtype != torch.float32 and device.type == "cpu" and not cpu_has_fast(dtype):
        logging.getLogger(__name__).warning("this CPU has no native %s matmul: expect it to be slower than fp32", dtype)
    return dtype


def cast_for_inference(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast weights to ``dtype`` once; norm layers keep float32 parameters (see the module doc); on a CPU
    with native bf16/fp16 matmul, linear layers are prepacked for oneDNN (encoders/packed.py)."""
    if dtype == torch.float32:
        return module
    module.to(dtype)
    for sub in module.modules():
        if isinstance(sub, NORMS):
            sub.float()
    device = next(module.parameters(), torch.empty(0)).device
    if device.type == "cpu" and cpu_has_fast(dtype):
        pack_linears(module)
    return module


def to_compute(batch: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A collated batch (tensor, or dict of tensors) on ``device``; floating tensors in ``dtype``, ids untouched."""
    if isinstance(batch, dict):
        return {k: to_compute(v, device, dtype) for k, v in batch.items()}
    if not isinstance(batch, torch.Tensor):
        return batch
    non_blocking = device.type == "cuda"  # pinned host memory -> the copy overlaps the previous batch's compute
    if batch.is_floating_point():
        return batch.to(device, dtype, non_blocking=non_blocking)
    return batch.to(device, non_blocking=non_blocking)


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
    # Image backends whose transform ends in ToTensor + Normalize decode to uint8 and normalise in
    # ``pixels`` (encoders/pixels.PixelNorm); None: the collated batch is the model's input as is.
    pixel_norm: Any = None

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

    def pixels(self, batch: Any) -> Any:
        """An image batch as the model wants it: uint8 from decoding is scaled and normalised here (encoders/pixels.py)."""
        return batch if self.pixel_norm is None else self.pixel_norm(batch, self.compute_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(self, "_compute_dtype", torch.float32)

    def encode(self, batch: Any) -> torch.Tensor:
        with torch.inference_mode():
            feats = self.forward(to_compute(batch, self.device, self.compute_dtype))  # (B, D)
        feats = feats.float()
        if self.spec.normalize:
            feats = torch.nn.functional.normalize(feats, dim=-1)
        return feats

    def encode_items(self, items: list[Any]) -> torch.Tensor:
        """Convenience for tests and search: raw items straight to (B, D) embeddings on the CPU."""
        return self.encode(self.collate([self.load_item(x) for x in items])).cpu()

    def _finish(self, module: nn.Module, origin: WeightsOrigin) -> None:
        """Shared tail of every backend's constructor: freeze, place, fingerprint, cast, probe dim."""
        self.module = freeze(module).to(self.device)
        self.origin = origin
        self.digest = weights_digest(self.module)  # of the weights as loaded, whatever they compute in
        self._compute_dtype = resolve_dtype(self.spec.dtype, self.device)
        cast_for_inference(self.module, self._compute_dtype)
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
            "compute_dtype": {v: k for k, v in DTYPES.items()}[self.compute_dtype],
            "device": str(self.device),
        }
