"""Images travel as uint8 from decoding to the model, and are scaled and normalised there.

A torchvision/timm eval transform ends in ``ToTensor`` (float32, /255) and ``Normalize``: done in
a decode worker, every batch then crosses the process boundary (and, on a GPU, the PCIe bus) as
float32, four times the bytes of its pixels. Split off, the worker stops at uint8 (``PILToTensor``),
and ``PixelNorm`` applies the same two steps with the same float32 operations where the batch is
consumed, so embeddings are bit-identical to the fused transform. Measured on this project's
2-core machine (480 generated 224² PNGs, decode only): 2 workers / 1 worker went from 1.61-1.73x
with float32 batches to the figure in benchmarks/extract.py (d); a batch of 32 is 4.8 MB instead
of 19.3 MB. The same split is what GPU input pipelines (DALI, FFCV) do.

A transform of another shape is kept whole (``PixelNorm`` is then None), and a float batch
(a backend's probe item, a user's preprocessed tensor) passes through ``PixelNorm`` untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision import transforms as T

_TO_TENSOR = ("ToTensor", "MaybeToTensor")  # torchvision's, timm's


class PixelNorm:
    """uint8 (B, C, H, W) -> ((x / 255) - mean) / std in float32, then the compute dtype; floats pass through."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __call__(self, batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if batch.dtype != torch.uint8:
            return batch
        mean, std = self.mean.to(batch.device), self.std.to(batch.device)
        x = batch.to(torch.float32).div(255).sub_(mean).div_(std)  # ToTensor, then Normalize, op for op
        return x if dtype == torch.float32 else x.to(dtype)


def split_transform(transform: Callable) -> tuple[Callable, PixelNorm | None]:
    """(PIL -> uint8 tensor transform, its PixelNorm) for a Compose ending in ToTensor + Normalize; else (transform, None)."""
    steps = list(getattr(transform, "transforms", ()))
    if len(steps) < 2 or not isinstance(steps[-1], T.Normalize) or type(steps[-2]).__name__ not in _TO_TENSOR:
        return transform, None
    norm = steps[-1]
    return T.Compose(steps[:-2] + [T.PILToTensor()]), PixelNorm(norm.mean, norm.std)
