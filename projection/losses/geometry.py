"""Shape checks, derived labels and distances shared by the pair losses (``pair_losses``, ``queue_loss``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("features_a", "features_b")) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"{names[0]} and {names[1]} must be 2-D (N, D); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")


def pair_labels(labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """labels (N,) if given, else arange(N): each row is its own class."""
    if labels is None:
        return torch.arange(n, device=device)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    return labels.to(device)


def safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt that is exact for sq > 0 and has gradient 0 (not inf/NaN) at sq == 0."""
    zero = sq <= 0
    return torch.sqrt(torch.where(zero, torch.ones_like(sq), sq)) * (~zero)


def pairwise_sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_i - y_j||^2 for x (N, D), y (M, D) -> (N, M), via the Gram expansion (O(NM) memory)."""
    sq = x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1).unsqueeze(0) - 2.0 * x @ y.T  # (N, M)
    return sq.clamp_min(0.0)


def pairwise_dist(x: torch.Tensor, y: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """(N, M) distance matrix: euclidean ||x_i - y_j|| or cosine 1 - cos(x_i, y_j)."""
    if distance == "euclidean":
        return safe_sqrt(pairwise_sq_dist(x, y))
    if distance == "cosine":
        return 1.0 - F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T
    raise ValueError(f"unknown distance {distance!r}; choose 'euclidean' or 'cosine'")
