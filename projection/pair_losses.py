"""Pair / metric-learning losses: the classic alternatives to CLIP-style InfoNCE.

`projection/losses.py` holds the losses the trainer uses by default (MSE, cosine, CLIP
InfoNCE, SigLIP). This module adds the metric-learning family, for ablations and for
regimes where those are a poor fit (tiny batches, labelled classes, explicit triplets).

Conventions (as in open_clip's loss.py):

* every loss is an `nn.Module` whose `forward` returns a scalar (mean over the batch);
* batch losses take `forward(features_a, features_b)`, both `(N, D)`; the positive of row
  `i` of `a` is row `i` of `b` (labels `torch.arange(N)` are derived, never passed in),
  unless an optional `labels: (N,)` tensor is given, in which case *every* pair with equal
  labels is a positive (row `i` of `a` and row `i` of `b` share `labels[i]`);
* no loss L2-normalises its inputs unless its docstring says so (NT-Xent, the queue loss
  and cosine-distance triplets do; N-pair, contrastive, lifted work on raw vectors).

`build_pair_loss(name, **kwargs)` builds one from `PAIR_LOSSES`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NTXentLoss",
    "ContrastiveLoss",
    "TripletLoss",
    "NPairLoss",
    "LiftedStructuredLoss",
    "MemoryQueue",
    "QueueInfoNCELoss",
    "PAIR_LOSSES",
    "build_pair_loss",
]


# ----------------------------------------------------------------------------- helpers


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("features_a", "features_b")) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"{names[0]} and {names[1]} must be 2-D (N, D); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")


def _labels(labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """labels (N,) if given, else arange(N): each row is its own class."""
    if labels is None:
        return torch.arange(n, device=device)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    return labels.to(device)


def _safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """sqrt that is exact for sq > 0 and has gradient 0 (not inf/NaN) at sq == 0."""
    zero = sq <= 0
    return torch.sqrt(torch.where(zero, torch.ones_like(sq), sq)) * (~zero)


def _pairwise_sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_i - y_j||^2 for x (N, D), y (M, D) -> (N, M), via the Gram expansion (O(NM) memory)."""
    sq = x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1).unsqueeze(0) - 2.0 * x @ y.T  # (N, M)
    return sq.clamp_min(0.0)


def _pairwise_dist(x: torch.Tensor, y: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """(N, M) distance matrix: euclidean ||x_i - y_j|| or cosine 1 - cos(x_i, y_j)."""
    if distance == "euclidean":
        return _safe_sqrt(_pairwise_sq_dist(x, y))
    if distance == "cosine":
        return 1.0 - F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T
    raise ValueError(f"unknown distance {distance!r}; choose 'euclidean' or 'cosine'")


# ----------------------------------------------------------------------------- NT-Xent


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent (normalised temperature-scaled cross entropy), Chen et al. 2020.

    When: two augmented *views of the same modality* (or two encoders' outputs that you
    want to treat symmetrically as one pool). Unlike CLIP's InfoNCE, which only contrasts a
    against b, every sample here is also pushed away from the other samples of its own
    view, so all 2N - 2 non-partners are negatives.

    With z = normalize(cat(a, b)) (2N, D), s_ik = z_i . z_k / T and p(i) the index of i's
    other view (i <-> i + N):

        loss = 1/(2N) sum_i -log( exp(s_{i,p(i)}) / sum_{k != i} exp(s_ik) )

    With `labels`, samples sharing a label are all positives and the loss becomes the
    supervised-contrastive L_out of Khosla et al. 2020 (mean over each anchor's positives
    P(i) of the same log-ratio); with all-distinct labels this is exactly NT-Xent.
    """

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(
        self, features_a: torch.Tensor, features_b: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        _check_pair(features_a, features_b)
        n = features_a.shape[0]
        z = F.normalize(torch.cat([features_a, features_b]), dim=-1)  # (2N, D)
        logits = z @ z.T / self.temperature  # (2N, 2N)
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))  # a sample is not its own negative
        if labels is None:
            # Plain NT-Xent: one positive per row, the other view.
            targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # (2N,)
            return F.cross_entropy(logits, targets)
        lab = _labels(labels, n, z.device).repeat(2)  # (2N,)
        pos = (lab[:, None] == lab[None, :]) & ~self_mask  # (2N, 2N); never empty: i's other view
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (2N, 2N), -inf on diagonal
        log_prob = log_prob.masked_fill(~pos, 0.0)  # drop diagonal -inf before summing
        return -(log_prob.sum(1) / pos.sum(1)).mean()


# ----------------------------------------------------------------------------- contrastive


class ContrastiveLoss(nn.Module):
    """Margin contrastive loss on pairs (Hadsell, Chopra & LeCun 2006).

    When: you have explicit same/different pair annotations (e.g. verified matches and
    hard non-matches) or want a non-softmax loss whose per-pair terms are independent, so
    the loss does not depend on batch composition. Negatives only contribute while closer
    than `margin`, so embeddings are not pushed apart without bound.

    With d = ||a_i - b_i|| (euclidean, unnormalised vectors):

        l_i = d^2                       if same_i
        l_i = max(0, margin - d)^2      otherwise
        loss = mean_i l_i

    NOTE: no 1/2 factor (Hadsell et al. write (1/2) d^2 and (1/2) max(0, m - d)^2); it only
    rescales the loss and its gradient by 2, so multiply by 0.5 for the paper's numbers.

    Pair mode: `forward(a, b, same)` with `same: (N,) bool`. Batch mode: `forward(a, b)`
    (or with `labels`) uses all N x N pairs (a_i, b_j); (i, i) are the positives (or every
    pair with labels_i == labels_j) and the mean is over all N^2 pairs, i.e. exactly pair
    mode applied to the enumerated N^2 pairs (so ~N-1 negatives per positive).
    """

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = float(margin)

    def _terms(self, sq_dist: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        dist = _safe_sqrt(sq_dist)
        return torch.where(same, sq_dist, F.relu(self.margin - dist).pow(2))

    def forward(
        self,
        features_a: torch.Tensor,
        features_b: torch.Tensor,
        same: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_pair(features_a, features_b)
        n = features_a.shape[0]
        if same is not None:
            if labels is not None:
                raise ValueError("give either `same` (pair mode) or `labels` (batch mode), not both")
            if same.shape != (n,):
                raise ValueError(f"same must have shape ({n},), got {tuple(same.shape)}")
            sq = (features_a - features_b).pow(2).sum(-1)  # (N,)
            return self._terms(sq, same.to(device=sq.device, dtype=torch.bool)).mean()
        lab = _labels(labels, n, features_a.device)
        same_mat = lab[:, None] == lab[None, :]  # (N, N), diagonal True
        sq = _pairwise_sq_dist(features_a, features_b)  # (N, N)
        return self._terms(sq, same_mat).mean()


# ----------------------------------------------------------------------------- triplet

Mining = Literal["none", "hardest", "semihard"]
Distance = Literal["euclidean", "cosine"]


class TripletLoss(nn.Module):
    """Triplet margin loss (Weinberger & Saul 2009; FaceNet, Schroff et al. 2015), with mining.

    When: you care about *ranking* (is the match closer than the non-matches?) rather than
    calibrated similarities, or you have explicit hard negatives. Cheaper than a softmax
    over the batch, but needs mining: with random negatives most triplets are already
    satisfied and give zero gradient.

        l(a, p, n) = max(0, d(a, p) - d(a, n) + margin)

    d is euclidean ||x - y|| or cosine 1 - cos(x, y) (the latter L2-normalises).

    * `forward(anchor, positive, negative)`: explicit triplets, all (N, D); mean of l over
      rows via `F.triplet_margin_loss` (euclidean; torch adds eps=1e-6 inside the norm) or
      `F.triplet_margin_with_distance_loss` (cosine). `mining` is not used here.
    * `forward(anchor, positive)` (optionally `labels`): in-batch. D = d(anchor_i, positive_j)
      (N, N); for anchor i the positive is positive[i] and the negatives are positive[j], j != i
      (with labels: positives are j with labels_j == labels_i, negatives the rest).
        - "none":     batch-all, mean of l over every valid (i, p, n) triplet (zeros included);
        - "hardest":  batch-hard (Hermans et al. 2017): per anchor, farthest positive vs
                      closest negative, mean over anchors;
        - "semihard": per positive pair (i, p), the closest negative with d(i, n) > d(i, p)
                      (strictly farther than the positive); if none exists, the closest
                      (hardest) negative. Mean over positive pairs.
      Anchors without any negative (e.g. a batch of one class) are skipped; if none are
      left the loss is 0 (still attached to the graph).
    """

    def __init__(self, margin: float = 0.2, mining: Mining = "none", distance: Distance = "euclidean"):
        super().__init__()
        if mining not in ("none", "hardest", "semihard"):
            raise ValueError(f"unknown mining {mining!r}; choose 'none', 'hardest' or 'semihard'")
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"unknown distance {distance!r}; choose 'euclidean' or 'cosine'")
        self.margin = float(margin)
        self.mining = mining
        self.distance = distance

    def forward(
        self,
        anchor: torch.Tensor,
        positive: torch.Tensor,
        negative: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_pair(anchor, positive, ("anchor", "positive"))
        if negative is not None:
            if labels is not None:
                raise ValueError("labels are only used for in-batch mining; not with explicit negatives")
            _check_pair(anchor, negative, ("anchor", "negative"))
            if self.distance == "euclidean":
                return F.triplet_margin_loss(anchor, positive, negative, margin=self.margin, p=2)
            return F.triplet_margin_with_distance_loss(
                anchor, positive, negative, margin=self.margin,
                distance_function=lambda x, y: 1.0 - F.cosine_similarity(x, y, dim=-1),
            )
        return self._mined(anchor, positive, labels)

    def _mined(self, anchor: torch.Tensor, positive: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        n = anchor.shape[0]
        dist = _pairwise_dist(anchor, positive, self.distance)  # (N, N): d(anchor_i, positive_j)
        lab = _labels(labels, n, anchor.device)
        pos = lab[:, None] == lab[None, :]  # (N, N), diagonal always True
        neg = ~pos  # (N, N)
        has_neg = neg.any(1)  # (N,)
        zero = dist.sum() * 0.0  # graph-attached zero for degenerate batches
        if not bool(has_neg.any()):
            return zero
        inf = torch.finfo(dist.dtype).max

        if self.mining == "none":
            # (N, N_p, N_n): d(i, p) - d(i, n) + m for every triplet, masked to valid ones.
            valid = pos[:, :, None] & neg[:, None, :]
            per = F.relu(dist[:, :, None] - dist[:, None, :] + self.margin)
            return per[valid].mean() if bool(valid.any()) else zero

        if self.mining == "hardest":
            hardest_pos = dist.masked_fill(~pos, -inf).amax(1)  # (N,) farthest positive
            hardest_neg = dist.masked_fill(neg.logical_not(), inf).amin(1)  # (N,) closest negative
            per = F.relu(hardest_pos - hardest_neg + self.margin)  # (N,)
            return per[has_neg].mean()

        # semihard: for every positive pair (i, p), closest negative farther than d(i, p).
        d_ap = dist[:, :, None]  # (N, N_p, 1)
        d_an = dist[:, None, :]  # (N, 1, N_n)
        farther = neg[:, None, :] & (d_an > d_ap)  # (N, N_p, N_n)
        semi = d_an.masked_fill(~farther, inf).amin(2)  # (N, N_p)
        hardest_neg = dist.masked_fill(~neg, inf).amin(1, keepdim=True).expand(n, n)  # (N, N_p)
        chosen = torch.where(farther.any(2), semi, hardest_neg)  # (N, N_p)
        per = F.relu(dist - chosen + self.margin)  # (N, N_p)
        valid = pos & has_neg[:, None]
        return per[valid].mean()


# ----------------------------------------------------------------------------- N-pair


class NPairLoss(nn.Module):
    """Multi-class N-pair loss (Sohn, NeurIPS 2016).

    When: the batch is N (anchor, positive) pairs of N distinct classes and you want each
    anchor to beat all N-1 other positives at once (rather than one negative per triplet).
    It is one-directional (a -> p) InfoNCE on *raw inner products* with temperature 1; the
    embeddings are not normalised, so use `l2_reg` to keep their norms from growing.

        loss = 1/N sum_i log(1 + sum_{j != i} exp(a_i . p_j - a_i . p_i))
             = cross_entropy(a @ p.T, arange(N))
             + l2_reg * 1/4 * (mean_i ||a_i||^2 + mean_i ||p_i||^2)

    The 1/4 in the regulariser follows TensorFlow's `npairs_loss(reg_lambda=...)`, so
    `l2_reg` means the same as its `reg_lambda`. With `labels`, the target row i is uniform
    over all j with labels_j == labels_i (soft-target cross entropy, as TF does).
    """

    def __init__(self, l2_reg: float = 0.0):
        super().__init__()
        self.l2_reg = float(l2_reg)

    def forward(
        self, features_a: torch.Tensor, features_b: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        _check_pair(features_a, features_b)
        n = features_a.shape[0]
        logits = features_a @ features_b.T  # (N, N): a_i . p_j
        if labels is None:
            loss = F.cross_entropy(logits, torch.arange(n, device=logits.device))
        else:
            lab = _labels(labels, n, logits.device)
            same = (lab[:, None] == lab[None, :]).to(logits.dtype)  # (N, N)
            loss = F.cross_entropy(logits, same / same.sum(1, keepdim=True))
        if self.l2_reg:
            reg = features_a.pow(2).sum(-1).mean() + features_b.pow(2).sum(-1).mean()
            loss = loss + 0.25 * self.l2_reg * reg
        return loss


# ----------------------------------------------------------------------------- lifted


class LiftedStructuredLoss(nn.Module):
    """Smooth lifted structured embedding loss (Song, Xiang, Jegelka & Savarese, CVPR 2016).

    When: you want every positive pair in the batch to be pushed past *all* of its
    negatives (of both endpoints), with hard negatives weighted most, without picking
    triplets. The log-sum-exp is a smooth max over negatives, so it mines softly.

    The 2N samples x = cat(a, b) (2N, D) carry labels cat(l, l) with l = arange(N) unless
    `labels` is given, so a_i <-> b_i (and with labels, every same-label pair, within or
    across modalities) is positive and every other pair negative. With euclidean
    D_ij = ||x_i - x_j||, N(i) = negatives of i, P = unordered positive pairs {i < j}:

        J_ij = log( sum_{k in N(i)} exp(m - D_ik) + sum_{l in N(j)} exp(m - D_jl) ) + D_ij
        loss = 1/(2|P|) sum_{(i,j) in P} max(0, J_ij)^2

    (the paper's 1/(2|P|), with P counted once per unordered pair).
    """

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.margin = float(margin)

    def forward(
        self, features_a: torch.Tensor, features_b: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        _check_pair(features_a, features_b)
        n = features_a.shape[0]
        x = torch.cat([features_a, features_b])  # (2N, D)
        lab = _labels(labels, n, x.device).repeat(2)  # (2N,)
        dist = _pairwise_dist(x, x)  # (2N, 2N)
        same = lab[:, None] == lab[None, :]  # (2N, 2N)
        neg = ~same
        # Per-row soft-max over negatives: s_i = log sum_{k in N(i)} exp(m - D_ik)   (2N,)
        # (rows without negatives get a huge negative value instead of -inf, so no NaN grads)
        very_neg = torch.finfo(dist.dtype).min
        s = torch.logsumexp((self.margin - dist).masked_fill(~neg, very_neg), dim=1)
        eye = torch.eye(2 * n, dtype=torch.bool, device=x.device)
        pos_pairs = torch.triu(same & ~eye)  # (2N, 2N), each unordered positive pair once
        i, j = pos_pairs.nonzero(as_tuple=True)  # (|P|,), (|P|,)
        if i.numel() == 0:
            return dist.sum() * 0.0
        J = torch.logaddexp(s[i], s[j]) + dist[i, j]  # (|P|,)
        return F.relu(J).pow(2).sum() / (2 * i.numel())


# ----------------------------------------------------------------------------- MoCo queue


class MemoryQueue(nn.Module):
    """FIFO of the last K key embeddings (MoCo, He et al. 2020), used as extra negatives.

    When: batches are small (big models, few GPUs) so in-batch negatives are too few; the
    queue supplies K >> N negatives from recent steps at no extra encoder cost. Keys are
    stored detached (no gradient through old steps). Buffers move with `.to()` and are
    saved in `state_dict`. Any batch size works: writes wrap around modulo K (MoCo needs
    K % N == 0; this does not). A batch larger than K keeps only its last K rows.
    """

    def __init__(self, queue_size: int, dim: int):
        super().__init__()
        if queue_size < 1 or dim < 1:
            raise ValueError(f"queue_size and dim must be >= 1, got {queue_size} and {dim}")
        self.queue_size = int(queue_size)
        self.dim = int(dim)
        self.register_buffer("queue", torch.zeros(self.queue_size, self.dim))  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))  # valid rows, <= K

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys (B, D) at ptr, ptr+1, ... (mod K), overwriting the oldest entries."""
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (B, {self.dim}), got {tuple(keys.shape)}")
        keys = keys.detach()[-self.queue_size :].to(self.queue.dtype)  # (B', D), B' <= K
        b = keys.shape[0]
        idx = (self.ptr + torch.arange(b, device=self.queue.device)) % self.queue_size  # (B',)
        self.queue[idx] = keys.to(self.queue.device)
        self.ptr.copy_((self.ptr + b) % self.queue_size)
        self.num_filled.copy_(torch.clamp(self.num_filled + b, max=self.queue_size))

    def negatives(self) -> torch.Tensor:
        """A copy of the valid keys (M, D), M = min(#enqueued, K) (rows [0, M) until the first wrap).

        A copy, not a view: a loss built on it must survive a later in-place `enqueue`
        before `backward()` (autograd would otherwise fail with a version-counter error).
        """
        return self.queue[: int(self.num_filled)].clone()

    def __len__(self) -> int:
        return int(self.num_filled)


class QueueInfoNCELoss(nn.Module):
    """InfoNCE against a MoCo memory queue of past keys (He et al. 2020).

    When: small batches. Each query's only positive is its own key; its negatives are the
    M <= K queued keys from earlier steps (no in-batch negatives, as in MoCo). Query and key
    are L2-normalised; with q = norm(query_i), k = norm(key_i), Q the queue (M, D):

        logits_i = [q . k, q . Q_1, ..., q . Q_M] / T          (1 + M,)
        loss = 1/N sum_i -log softmax(logits_i)_0
        then enqueue(k)   (only in training mode, so evaluation does not pollute the queue)

    On the very first step the queue is empty and the loss is exactly 0. Gradients flow
    into both query and key through q . k; in MoCo the key comes from a momentum encoder
    under `torch.no_grad()`, which the caller controls.
    """

    def __init__(self, temperature: float = 0.07, queue_size: int = 4096, dim: int | None = None):
        super().__init__()
        if dim is None:
            raise TypeError("QueueInfoNCELoss needs `dim`, the embedding size of the queued keys")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.queue = MemoryQueue(queue_size, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        _check_pair(query, key, ("query", "key"))
        q = F.normalize(query, dim=-1)  # (N, D)
        k = F.normalize(key, dim=-1)  # (N, D)
        negatives = self.queue.negatives().to(q.dtype)  # (M, D), snapshot before this step's keys
        l_pos = (q * k).sum(-1, keepdim=True)  # (N, 1)
        l_neg = q @ negatives.T  # (N, M)
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature  # (N, 1 + M)
        targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # positive is column 0
        loss = F.cross_entropy(logits, targets)
        if self.training:
            self.queue.enqueue(k)
        return loss


# ----------------------------------------------------------------------------- registry

PAIR_LOSSES: dict[str, type[nn.Module]] = {
    "ntxent": NTXentLoss,
    "contrastive": ContrastiveLoss,
    "triplet": TripletLoss,
    "npair": NPairLoss,
    "lifted": LiftedStructuredLoss,
    "queue_infonce": QueueInfoNCELoss,
}


def build_pair_loss(name: str, **kwargs) -> nn.Module:
    """PAIR_LOSSES[name](**kwargs), e.g. build_pair_loss("triplet", margin=0.3, mining="hardest")."""
    try:
        cls = PAIR_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown pair loss {name!r}; choose from {sorted(PAIR_LOSSES)}") from None
    return cls(**kwargs)
