"""What every training loop here does the same way: one optimizer step, and the loss's own knobs as metrics.

Kept in one place because resumed runs must be bit-identical to uninterrupted ones: the order
(zero grads, backward, clip, step, schedule) is part of that contract for all three loops.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, params: Iterable[nn.Parameter],
                   grad_clip: float | None) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)  # foreach only where it pays (CUDA)
    opt.step()
    sched.step()


def loss_param_metrics(loss_fn: nn.Module) -> dict[str, float]:
    """Learnable scalars of the loss (temperatures, biases): worth watching as they train."""
    return {f"loss_param/{name}": float(p.detach()) for name, p in loss_fn.named_parameters() if p.numel() == 1}
