"""Test-split metrics for a map into target space.

Retrieval uses cosine similarity and is computed in row chunks, so N=50k never
materialises an N x N matrix (a chunk is chunk_size x N, ~64 MB by default); both
retrieval directions come from the same blocks. Rank of the true match = 1 + number of
candidates with STRICTLY greater similarity (beyond a 1e-6 float-noise tolerance), so
ties count in the model's favour and a perfect map scores rank 1 even with duplicates.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

KS = (1, 5, 10)


def _t(a) -> torch.Tensor:
    x = a.detach().cpu() if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a))
    return x.to(torch.float32)


def _auto_chunk(n: int) -> int:
    return max(1, (1 << 24) // max(n, 1))  # ~16M similarities (64 MB float32) per chunk


def bidirectional_ranks(pred, target, chunk_size: int | None = None, tie_tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(p2t, t2p) ranks of the true match, each (N,) int64, 1 = best, from ONE pass.

    S = P Y^T is computed once in row blocks: a block's rows give p2t ranks and its columns
    add to the t2p counts (S^T is the t2p similarity), halving the matmul cost. A candidate
    beats the true match only if its cosine is greater by more than `tie_tol`, so float32
    rounding (~1e-7) cannot break an exact tie between duplicate vectors.
    chunk_size: rows per block; None sizes blocks to ~16M similarities.
    """
    p = F.normalize(_t(pred), dim=-1)  # (N, D)
    y = F.normalize(_t(target), dim=-1)  # (N, D)
    if p.shape != y.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(y.shape)} must have the same shape")
    n = p.shape[0]
    chunk_size = chunk_size or _auto_chunk(n)
    true = (p * y).sum(1) + tie_tol  # (N,) cosine of each true pair, plus tolerance
    p2t = torch.empty(n, dtype=torch.int64)
    t2p = torch.ones(n, dtype=torch.int64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = p[start:stop] @ y.T  # (chunk, N)
        p2t[start:stop] = 1 + (sims > true[start:stop, None]).sum(1)
        t2p += (sims > true[None, :]).sum(0)
    return p2t.numpy(), t2p.numpy()


def true_match_ranks(queries, candidates, chunk_size: int | None = None, tie_tol: float = 1e-6) -> np.ndarray:
    """Rank of candidates[i] among all candidates for queries[i]; (N,) int64, 1 = best."""
    return bidirectional_ranks(queries, candidates, chunk_size, tie_tol)[0]


def rank_metrics(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {f"{prefix}_r{k}": float((ranks <= k).mean()) for k in KS}
    out[f"{prefix}_mrr"] = float((1.0 / ranks).mean())
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    return out


def zero_shot(pred, labels, class_embeddings) -> tuple[float, np.ndarray]:
    """Accuracy and (K, K) confusion matrix (rows = true class, cols = predicted)."""
    p = F.normalize(_t(pred), dim=-1)  # (N, D)
    c = F.normalize(_t(class_embeddings), dim=-1)  # (K, D)
    labels = np.asarray(labels, dtype=np.int64)
    k = c.shape[0]
    if labels.shape != (p.shape[0],):
        raise ValueError(f"labels must have shape ({p.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must be in [0, {k}) to index the {k} class embeddings")
    predicted = (p @ c.T).argmax(1).numpy()  # (N, K) -> (N,)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return float((predicted == labels).mean()), confusion


def alignment_metrics(pred, target, labels=None, class_embeddings=None, chunk_size: int | None = None) -> dict[str, float]:
    """mse, cosine, p2t_* (projected -> target pool), t2p_* (target -> projected pool), zeroshot_acc."""
    p, y = _t(pred), _t(target)
    if p.shape != y.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(y.shape)} must have the same shape")
    out = {
        "mse": float(F.mse_loss(p, y)),
        "cosine": float(F.cosine_similarity(p, y, dim=-1).mean()),
    }
    p2t, t2p = bidirectional_ranks(p, y, chunk_size)
    out |= rank_metrics(p2t, "p2t")
    out |= rank_metrics(t2p, "t2p")
    if labels is not None and class_embeddings is not None:
        out["zeroshot_acc"] = zero_shot(p, labels, class_embeddings)[0]
    return out


def similarity_matrix(pred, target) -> np.ndarray:
    """(n, n) cosine similarities for a heatmap; pass a small slice, e.g. P[:64], Y[:64]."""
    return (F.normalize(_t(pred), dim=-1) @ F.normalize(_t(target), dim=-1).T).numpy()
