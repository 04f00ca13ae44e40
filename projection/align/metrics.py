"""Test-split metrics for a map into target space: ranks that cannot flatter a collapsed space.

Ranks are STRICT and computed in float64. The old rule (a candidate within 1e-6 cosine of the
true match counts as a tie, in the model's favour) turned nearly collapsed stores into hits:
random-init image towers give off-diagonal cosines of 0.9990-1.0000 with top-2 gaps ~1e-7, so
ridge image -> depth read R@1 0.61 where a strict rank gives 0.19. The only tie left is an exact
duplicate of the true target: the same content id (when given) or the same vector.

Duplicate targets (one caption for many images) form groups, and both directions say what they
mean:
- p2t (projected source -> target pool): the pool is the DISTINCT targets; the rank is 1 + the
  number of other groups scoring strictly higher than the true target.
- t2p (target -> projected pool): a query is answered by any item whose target is identical, so
  its rank is 1 + the number of items of other groups scoring strictly above the best item of
  its own group.
Without duplicates both reduce to the textbook strict rank. With labels, class-level R@1 asks
only that the top-1 candidate has the query's class.

Similarities come in row blocks of S = P U^T (N x G), so N=50k never materialises N x N (a block
is ~16M float64, 128 MB); both directions come from the same blocks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

KS = (1, 5, 10)
COLLAPSE_COSINE = 0.99  # mean off-diagonal cosine above which a space is too collapsed to rank in


def _t(a, dtype=torch.float32) -> torch.Tensor:
    x = a.detach().cpu() if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a))
    return x.to(dtype)


def _auto_chunk(n: int) -> int:
    return max(1, (1 << 24) // max(n, 1))  # ~16M similarities per block


def target_groups(target, content_ids=None) -> np.ndarray:
    """(N,) group index per row: rows with the same content id (or, without ids, the same vector) share one."""
    if content_ids is not None:
        keys = np.asarray([str(c) for c in content_ids])
        if keys.shape[0] != np.shape(target)[0]:
            raise ValueError(f"got {keys.shape[0]} content ids for {np.shape(target)[0]} targets")
        return np.unique(keys, return_inverse=True)[1].astype(np.int64)
    rows = np.ascontiguousarray(_t(target).numpy())
    return np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _scan(pred, target, groups, chunk_size):
    """One pass over S = P U^T: strict counts and top-1 hits, both directions, in float64."""
    p = F.normalize(_t(pred, torch.float64), dim=-1)  # (N, D)
    y = F.normalize(_t(target, torch.float64), dim=-1)  # (N, D)
    if p.shape != y.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(y.shape)} must have the same shape")
    n = p.shape[0]
    g = torch.from_numpy(target_groups(target, groups))
    n_groups = int(g.max()) + 1 if n else 0
    rep = torch.full((n_groups,), n, dtype=torch.int64).scatter_reduce(0, g, torch.arange(n), "amin")
    u = y[rep]  # (G, D): one vector per distinct target
    own = (p * u[g]).sum(1)  # (N,) similarity of each item to its own target
    best_own = torch.full((n_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(0, g, own, "amax")
    p2t_count = torch.empty(n, dtype=torch.int64)
    p2t_top = torch.empty(n, dtype=torch.int64)  # group of the top-1 target per query
    t2p_count = torch.zeros(n_groups, dtype=torch.int64)
    t2p_best = torch.full((n_groups,), -torch.inf, dtype=torch.float64)  # best score per group query
    t2p_top = torch.zeros(n_groups, dtype=torch.int64)  # row of the top-1 item per group query
    cols = torch.arange(n_groups)
    chunk_size = chunk_size or _auto_chunk(n_groups)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = p[start:stop] @ u.T  # (chunk, G)
        other = g[start:stop, None] != cols[None, :]  # (chunk, G): candidates that are not a duplicate
        p2t_count[start:stop] = ((sims > own[start:stop, None]) & other).sum(1)
        p2t_top[start:stop] = sims.argmax(1)
        t2p_count += ((sims > best_own[None, :]) & other).sum(0)
        block_best, block_arg = sims.max(0)
        better = block_best > t2p_best
        t2p_best = torch.where(better, block_best, t2p_best)
        t2p_top = torch.where(better, block_arg + start, t2p_top)
    return (1 + p2t_count).numpy(), (1 + t2p_count[g]).numpy(), rep[p2t_top].numpy(), t2p_top[g].numpy()


def bidirectional_ranks(pred, target, chunk_size: int | None = None, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """(p2t, t2p) strict ranks of the true match, each (N,) int64, 1 = best (see the module docstring).

    groups: (N,) content ids, equal for rows whose targets are the same content (a caption's
    text, an image's path); default: rows with equal vectors.
    """
    p2t, t2p, _, _ = _scan(pred, target, groups, chunk_size)
    return p2t, t2p


def true_match_ranks(queries, candidates, chunk_size: int | None = None) -> np.ndarray:
    """Rank of candidates[i] among the distinct candidates for queries[i]; (N,) int64, 1 = best."""
    return bidirectional_ranks(queries, candidates, chunk_size)[0]


def rank_metrics(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {f"{prefix}_r{k}": float((ranks <= k).mean()) for k in KS}
    out[f"{prefix}_mrr"] = float((1.0 / ranks).mean())
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    return out


def zero_shot(pred, labels, class_embeddings) -> tuple[float, np.ndarray]:
    """Accuracy and (K, K) confusion matrix (rows = true class, cols = predicted); labels index the K rows."""
    p = F.normalize(_t(pred, torch.float64), dim=-1)  # (N, D)
    c = F.normalize(_t(class_embeddings, torch.float64), dim=-1)  # (K, D)
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


def collapse_stats(emb, sample: int = 4096, seed: int = 0) -> dict[str, float]:
    """How spread a store is: mean off-diagonal cosine (exact) and effective rank (on a sample).

    mean_cos = (||sum_i e_i||^2 - N) / (N (N - 1)) for unit rows e_i, in O(N D). Effective rank =
    exp(entropy of the normalised singular values) (Roy & Vetterli 2007): 1 when every vector
    points one way, D when the spread is isotropic.
    """
    e = F.normalize(_t(emb, torch.float64), dim=-1)  # (N, D)
    n = e.shape[0]
    mean_cos = float(((e.sum(0) ** 2).sum() - n) / max(n * (n - 1), 1))
    if n > sample:
        e = e[torch.from_numpy(np.random.default_rng(seed).choice(n, sample, replace=False))]
    s = torch.linalg.svdvals(e)
    prob = s / s.sum().clamp_min(1e-300)
    eff_rank = float(torch.exp(-(prob * torch.log(prob.clamp_min(1e-300))).sum()))
    return {"mean_offdiag_cosine": mean_cos, "effective_rank": eff_rank}


def collapse_warning(name: str, stats: dict[str, float]) -> str | None:
    """One line when a space is too collapsed for retrieval figures to mean anything, else None."""
    if stats["mean_offdiag_cosine"] <= COLLAPSE_COSINE:
        return None
    return (f"{name} is nearly collapsed (mean off-diagonal cosine {stats['mean_offdiag_cosine']:.5f} > "
            f"{COLLAPSE_COSINE}, effective rank {stats['effective_rank']:.2f}): its neighbours differ by float "
            "rounding, so retrieval figures in it say little; use a trained/pretrained encoder")


def alignment_metrics(pred, target, labels=None, class_embeddings=None, chunk_size: int | None = None,
                      groups=None) -> dict[str, float]:
    """mse, cosine, p2t_* / t2p_* strict ranks, class-level *_class_r1 (labels) and zeroshot_acc (+ class store).

    labels: (N,) class of each test pair, any hashable values; class_embeddings: (K, D) rows
    indexed by integer labels 0..K-1 (see flows.align for matching string labels by value).
    groups: (N,) content ids of the targets (equal = the same target), see `bidirectional_ranks`.
    """
    p, y = _t(pred), _t(target)
    if p.shape != y.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(y.shape)} must have the same shape")
    out = {
        "mse": float(F.mse_loss(p.double(), y.double())),
        "cosine": float(F.cosine_similarity(p.double(), y.double(), dim=-1).mean()),
    }
    p2t, t2p, p2t_top, t2p_top = _scan(p, y, groups, chunk_size)
    out |= rank_metrics(p2t, "p2t")
    out |= rank_metrics(t2p, "t2p")
    if labels is not None:
        lab = np.asarray(labels)
        out["p2t_class_r1"] = float((lab[p2t_top] == lab).mean())
        out["t2p_class_r1"] = float((lab[t2p_top] == lab).mean())
        if class_embeddings is not None:
            out["zeroshot_acc"] = zero_shot(p, lab, class_embeddings)[0]
    return out


def similarity_matrix(pred, target) -> np.ndarray:
    """(n, n) cosine similarities for a heatmap; pass a small slice, e.g. P[:64], Y[:64]."""
    return (F.normalize(_t(pred), dim=-1) @ F.normalize(_t(target), dim=-1).T).numpy()
