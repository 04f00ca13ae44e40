"""Pair / metric-learning losses: the classic alternatives to CLIP-style InfoNCE.

`projection/losses/registry.py` holds the losses the trainer uses by default (MSE, cosine, CLIP
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

`projection.losses.registry.build_loss(name, **kwargs)` builds any of them by name.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from projection.losses.geometry import check_pair, pair_labels, pairwise_dist, pairwise_sq_dist, safe_sqrt

__all__ = [
    "NTXentLoss",
    "ContrastiveLoss",
    "TripletLoss",
    "NPairLoss",
    "LiftedStructuredLoss",
]


class _BatchPairLoss(nn.Module):
    """``forward(features_a, features_b, labels=None)``: both (N, D), checked alike; ``batch_loss`` is the formula."""

    def forward(self, features_a: torch.Tensor, features_b: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        check_pair(features_a, features_b)
        return self.batch_loss(features_a, features_b, labels)

    def batch_loss(self, features_a: torch.Tensor, features_b: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


# ----------------------------------------------------------------------------- NT-Xent


class NTXentLoss(_BatchPairLoss):
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

    def batch_loss(self, features_a: torch.Tensor, features_b: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        n = features_a.shape[0]
        z = F.normalize(torch.cat([features_a, features_b]), dim=-1)  # (2N, D)
        logits = z @ z.T / self.temperature  # (2N, 2N)
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))  # a sample is not its own negative
        if labels is None:
            # Plain NT-Xent: one positive per row, the other view.
            targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # (2N,)
            return F.cross_entropy(logits, targets)
        lab = pair_labels(labels, n, z.device).repeat(2)  # (2N,)
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
        dist = safe_sqrt(sq_dist)
        return torch.where(same, sq_dist, F.relu(self.margin - dist).pow(2))

    def forward(self, features_a: torch.Tensor, features_b: torch.Tensor, same: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        check_pair(features_a, features_b)
        n = features_a.shape[0]
        if same is not None:
            if labels is not None:
                raise ValueError("give either `same` (pair mode) or `labels` (batch mode), not both")
            if same.shape != (n,):
                raise ValueError(f"same must have shape ({n},), got {tuple(same.shape)}")
            sq = (features_a - features_b).pow(2).sum(-1)  # (N,)
            return self._terms(sq, same.to(device=sq.device, dtype=torch.bool)).mean()
        lab = pair_labels(labels, n, features_a.device)
        same_mat = lab[:, None] == lab[None, :]  # (N, N), diagonal True
        sq = pairwise_sq_dist(features_a, features_b)  # (N, N)
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

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        check_pair(anchor, positive, ("anchor", "positive"))
        if negative is not None:
            if labels is not None:
                raise ValueError("labels are only used for in-batch mining; not with explicit negatives")
            check_pair(anchor, negative, ("anchor", "negative"))
            if self.distance == "euclidean":
                return F.triplet_margin_loss(anchor, positive, negative, margin=self.margin, p=2)
            return F.triplet_margin_with_distance_loss(
                anchor, positive, negative, margin=self.margin,
                distance_function=lambda x, y: 1.0 - F.cosine_similarity(x, y, dim=-1),
            )
        return self._mined(anchor, positive, labels)

    def _mined(self, anchor: torch.Tensor, positive: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        n = anchor.shape[0]
        dist = pairwise_dist(anchor, positive, self.distance)  # (N, N): d(anchor_i, positive_j)
        lab = pair_labels(labels, n, anchor.device)
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


class NPairLoss(_BatchPairLoss):
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

    def batch_loss(self, features_a: torch.Tensor, features_b: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        n = features_a.shape[0]
        logits = features_a @ features_b.T  # (N, N): a_i . p_j
        if labels is None:
            loss = F.cross_entropy(logits, torch.arange(n, device=logits.device))
        else:
            lab = pair_labels(labels, n, logits.device)
            same = (lab[:, None] == lab[None, :]).to(logits.dtype)  # (N, N)
            loss = F.cross_entropy(logits, same / same.sum(1, keepdim=True))
        if self.l2_reg:
            reg = features_a.pow(2).sum(-1).mean() + features_b.pow(2).sum(-1).mean()
            loss = loss + 0.25 * self.l2_reg * reg
        return loss


# ----------------------------------------------------------------------------- lifted


class LiftedStructuredLoss(_BatchPairLoss):
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

    def batch_loss(self, features_a: torch.Tensor, features_b: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        n = features_a.shape[0]
        x = torch.cat([features_a, features_b])  # (2N, D)
        lab = pair_labels(labels, n, x.device).repeat(2)  # (2N,)
        dist = pairwise_dist(x, x)  # (2N, 2N)
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


# ----------------------------------------------------------------------------- registry
