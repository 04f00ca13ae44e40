"""The alignment losses (MSE, cosine, InfoNCE, SigLIP) and their weighted sum: `loss(pred, target) -> scalar`.

Regression losses (MSE, cosine) pull each projected vector onto its own target.
Contrastive losses (InfoNCE, SigLIP) also push it away from the other targets in the
batch, which is what retrieval metrics reward. The contrastive ones reuse open_clip's
implementations so our numbers mean the same as CLIP/SigLIP papers'. Learnable
temperatures live inside the loss module: the trainer optimises `loss.parameters()` too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config is plain pydantic; the losses never need it at import
    from projection.align.config import LossConfig


class MSELoss(nn.Module):
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target)  # mean over N * D elements


class CosineLoss(nn.Module):
    """1 - mean cosine: ignores norms, which often differ arbitrarily between encoders."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - F.cosine_similarity(pred, target, dim=-1).mean()


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (the CLIP loss) on L2-normalised vectors; pred plays 'image'."""

    def __init__(self, temperature: float = 0.07, learnable: bool = True, max_logit_scale: float = 100.0):
        super().__init__()
        from open_clip.loss import ClipLoss  # lazy: importing open_clip costs seconds

        self.clip_loss = ClipLoss()
        self.max_logit_scale = max_logit_scale
        init = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.exp().clamp(max=self.max_logit_scale)
        return self.clip_loss(F.normalize(pred, dim=-1), F.normalize(target, dim=-1), scale)


class SigLIPLoss(nn.Module):
    """Pairwise sigmoid loss (SigLIP) on L2-normalised vectors; no batch-wide softmax."""

    def __init__(self, logit_scale: float = 10.0, bias: float = -10.0, learnable: bool = True, max_logit_scale: float = 100.0):
        super().__init__()
        from open_clip.loss import SigLipLoss

        self.siglip_loss = SigLipLoss()
        self.max_logit_scale = max_logit_scale
        scale, b = torch.tensor(math.log(logit_scale)), torch.tensor(float(bias))
        if learnable:
            self.logit_scale, self.logit_bias = nn.Parameter(scale), nn.Parameter(b)
        else:
            self.register_buffer("logit_scale", scale)
            self.register_buffer("logit_bias", b)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale.exp().clamp(max=self.max_logit_scale)
        return self.siglip_loss(F.normalize(pred, dim=-1), F.normalize(target, dim=-1), scale, self.logit_bias)


class WeightedLoss(nn.Module):
    """sum_k w_k * loss_k; `components` gives the unweighted terms for logging."""

    def __init__(self, terms: dict[str, tuple[nn.Module, float]]):
        super().__init__()
        self.losses = nn.ModuleDict({name: mod for name, (mod, _) in terms.items()})
        self.weights = {name: float(w) for name, (_, w) in terms.items()}

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = None
        for name, loss in self.losses.items():
            w = self.weights[name]
            term = loss(pred, target) if w == 1.0 else w * loss(pred, target)
            total = term if total is None else total + term
        return total

    @torch.no_grad()
    def components(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {name: float(loss(pred, target)) for name, loss in self.losses.items()}


def build_weighted(cfg: LossConfig) -> WeightedLoss:
    """Stage 1's objective: each named term built by the registry with its settings from ``cfg``, weighted."""
    from projection.losses.registry import build_loss

    return WeightedLoss({name: (build_loss(name, **cfg.kwargs_for(name)), w) for name, w in cfg.terms.items()})
