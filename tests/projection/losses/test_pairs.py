"""Tests for projection/losses/pairs.py.

Each loss is checked against (1) a number worked out by hand on a tiny batch and (2) a slow,
independent pure-Python reference (math + lists, no torch ops) on small random batches.
"""

from __future__ import annotations

import math

import pytest
import torch

from projection.losses.pairs import ContrastiveLoss, LiftedStructuredLoss, NPairLoss, NTXentLoss, TripletLoss
from projection.losses.queue import MemoryQueue, QueueInfoNCELoss
from projection.losses.registry import build_loss, loss_class

PAIR_LOSSES = ("ntxent", "contrastive", "triplet", "npair", "lifted", "queue_infonce")

T = torch.tensor


# ----------------------------------------------------------------------------- pure-python helpers


def rows(x: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in r] for r in x]


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def norm(u):
    return math.sqrt(dot(u, u))


def unit(u):
    n = norm(u)
    return [a / n for a in u]


def euclid(u, v):
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v)))


def cos_dist(u, v):
    return 1.0 - dot(u, v) / (norm(u) * norm(v))


def relu(x):
    return max(0.0, x)


def close(got: torch.Tensor, want: float, tol: float = 1e-5) -> None:
    assert got.ndim == 0, f"loss must be a scalar, got shape {tuple(got.shape)}"
    assert float(got) == pytest.approx(want, rel=tol, abs=tol)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------------------- NT-Xent


def ref_ntxent(a, b, temp, labels=None):
    """Loop version of NT-Xent / SupCon L_out over the 2N pool."""
    z = [unit(r) for r in a + b]
    n2 = len(z)
    lab = (labels + labels) if labels is not None else list(range(len(a))) * 2
    total = 0.0
    for i in range(n2):
        denom = sum(math.exp(dot(z[i], z[k]) / temp) for k in range(n2) if k != i)
        pos = [p for p in range(n2) if p != i and lab[p] == lab[i]]
        total += sum(-math.log(math.exp(dot(z[i], z[p]) / temp) / denom) for p in pos) / len(pos)
    return total / n2


def test_ntxent_hand_value():
    # a = b = [e1, e2], T = 1. Pool z = [e1, e2, e1, e2]; for z_0 = e1 the others have
    # similarities [0, 1, 0], the positive (index 2) has 1:
    #   -log(e^1 / (e^0 + e^1 + e^0)) = log((e + 2) / e) = log(1 + 2/e) = 0.55144...
    # Every row is symmetric to this one, so the mean is the same.
    a = torch.eye(2)
    close(NTXentLoss(temperature=1.0)(a, a.clone()), math.log(1 + 2 / math.e))
    assert math.log(1 + 2 / math.e) == pytest.approx(0.551444, abs=1e-6)


def test_ntxent_matches_loop(gen):
    a, b = torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)
    close(NTXentLoss(0.5)(a, b), ref_ntxent(rows(a), rows(b), 0.5))
    # distinct labels == plain NT-Xent; shared labels -> multi-positive (SupCon) loop
    close(NTXentLoss(0.5)(a, b, labels=T([7, 3, 5])), ref_ntxent(rows(a), rows(b), 0.5))
    close(NTXentLoss(0.3)(a, b, labels=T([0, 1, 0])), ref_ntxent(rows(a), rows(b), 0.3, [0, 1, 0]))


def test_ntxent_is_scale_invariant(gen):
    a, b = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    torch.testing.assert_close(NTXentLoss()(a, b), NTXentLoss()(5 * a, 0.1 * b))


# ----------------------------------------------------------------------------- contrastive


def test_contrastive_pair_mode_hand_value():
    # margin 1, a = 0: d = ||b_i|| = [5, 0.5, 5], same = [T, F, F]
    #   same:      d^2                = 25
    #   different: max(0, 1 - 0.5)^2  = 0.25
    #   different: max(0, 1 - 5)^2    = 0
    # mean (no 1/2 factor) = 25.25 / 3 = 8.41667
    a = torch.zeros(3, 2)
    b = T([[3.0, 4.0], [0.3, 0.4], [3.0, 4.0]])
    same = T([True, False, False])
    close(ContrastiveLoss(margin=1.0)(a, b, same), 25.25 / 3)


def ref_contrastive_batch(a, b, margin, labels=None):
    n = len(a)
    lab = labels if labels is not None else list(range(n))
    terms = []
    for i in range(n):
        for j in range(n):
            d = euclid(a[i], b[j])
            terms.append(d * d if lab[i] == lab[j] else relu(margin - d) ** 2)
    return sum(terms) / len(terms)


def test_contrastive_batch_mode_matches_loop_and_pair_mode(gen):
    a, b = torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)
    loss = ContrastiveLoss(margin=2.0)
    close(loss(a, b), ref_contrastive_batch(rows(a), rows(b), 2.0))
    close(loss(a, b, labels=T([1, 0, 1])), ref_contrastive_batch(rows(a), rows(b), 2.0, [1, 0, 1]))
    # batch mode == pair mode on the explicitly enumerated N^2 pairs
    ii, jj = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    close(loss(a, b), float(loss(a[ii.flatten()], b[jj.flatten()], ii.flatten() == jj.flatten())))


def test_contrastive_rejects_same_and_labels():
    a = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="not both"):
        ContrastiveLoss()(a, a, T([True, False]), labels=T([0, 1]))


# ----------------------------------------------------------------------------- triplet


def test_triplet_explicit_hand_value():
    # anchor 0, positive at distance 1, negatives at distance 2 and 0.5, margin 0.2:
    #   max(0, 1 - 2 + 0.2) = 0 ;  max(0, 1 - 0.5 + 0.2) = 0.7  -> mean 0.35
    a = torch.zeros(2, 2)
    p = T([[1.0, 0.0], [0.0, 1.0]])
    n = T([[2.0, 0.0], [0.0, -0.5]])
    close(TripletLoss(margin=0.2)(a, p, n), 0.35, tol=1e-5)  # torch adds eps=1e-6 in the norm


def test_triplet_explicit_matches_loop(gen):
    a, p, n = (torch.randn(4, 3, generator=gen) for _ in range(3))
    A, P, N = rows(a), rows(p), rows(n)
    for dist, fn in [("euclidean", euclid), ("cosine", cos_dist)]:
        want = sum(relu(fn(x, y) - fn(x, z) + 0.5) for x, y, z in zip(A, P, N)) / 4
        close(TripletLoss(margin=0.5, distance=dist)(a, p, n), want, tol=1e-5)


# Mining batch (margin 1). anchor_0 = origin, its positive p_0 = (2, 0) at distance 2;
# the other positives (negatives of anchor 0) lie on other axes:
#   p_1 = (0, 1)   d = 1    hardest negative (closer than the positive)
#   p_2 = (-2.5,0) d = 2.5  semi-hard: closest negative farther than the positive
#   p_3 = (0, -6)  d = 6    easy
# anchors 1..3 sit on their own positives (d_ap = 0) and every other p_j is >= sqrt(5) > 1
# away, so they contribute exactly 0 for every mining strategy.
P_MINE = [[2.0, 0.0], [0.0, 1.0], [-2.5, 0.0], [0.0, -6.0]]
A_MINE = [[0.0, 0.0], [0.0, 1.0], [-2.5, 0.0], [0.0, -6.0]]


def _mine(mining: str, positives=P_MINE):
    a = T(A_MINE, requires_grad=True)
    p = T(positives, requires_grad=True)
    loss = TripletLoss(margin=1.0, mining=mining)(a, p)
    loss.backward()
    touched = sorted(int(j) for j in (p.grad.norm(dim=1) > 0).nonzero().flatten())
    return loss.item(), touched


def test_triplet_mining_picks_hardest_and_semihard():
    # hardest:  anchor 0 -> p_1: max(0, 2 - 1 + 1) = 2, / 4 anchors
    loss, touched = _mine("hardest")
    assert loss == pytest.approx(2 / 4)
    assert touched == [0, 1]  # gradient only reaches the positive and the mined negative
    # semihard: anchor 0 -> p_2: max(0, 2 - 2.5 + 1) = 0.5, / 4
    loss, touched = _mine("semihard")
    assert loss == pytest.approx(0.5 / 4)
    assert touched == [0, 2]
    # none (batch-all): anchor 0 gives 2 + 0.5 + 0 over 4 * 3 = 12 triplets
    loss, touched = _mine("none")
    assert loss == pytest.approx(2.5 / 12)
    assert touched == [0, 1, 2]  # p_3 is an easy negative: zero loss, zero gradient


def test_triplet_semihard_falls_back_to_hardest():
    # p_0 = (7, 0): d_ap = 7 exceeds every negative distance (1, 2.5, 6), so no semi-hard
    # negative exists and the hardest (p_1, d = 1) is used: max(0, 7 - 1 + 1) = 7, / 4.
    positives = [[7.0, 0.0]] + P_MINE[1:]
    loss, touched = _mine("semihard", positives)
    assert loss == pytest.approx(7 / 4)
    assert touched == [0, 1]


def ref_triplet_mined(A, P, labels, margin, mining, dist_fn):
    n = len(A)
    D = [[dist_fn(A[i], P[j]) for j in range(n)] for i in range(n)]
    per = []
    for i in range(n):
        pos = [j for j in range(n) if labels[j] == labels[i]]
        neg = [j for j in range(n) if labels[j] != labels[i]]
        if not neg:
            continue
        if mining == "hardest":
            per.append(relu(max(D[i][j] for j in pos) - min(D[i][k] for k in neg) + margin))
        elif mining == "semihard":
            for j in pos:
                farther = [D[i][k] for k in neg if D[i][k] > D[i][j]]
                d_n = min(farther) if farther else min(D[i][k] for k in neg)
                per.append(relu(D[i][j] - d_n + margin))
        else:
            per.extend(relu(D[i][j] - D[i][k] + margin) for j in pos for k in neg)
    return sum(per) / len(per)


@pytest.mark.parametrize("mining", ["none", "hardest", "semihard"])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_triplet_mining_matches_loop(gen, mining, distance):
    a, p = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    fn = euclid if distance == "euclidean" else cos_dist
    loss = TripletLoss(margin=0.5, mining=mining, distance=distance)
    close(loss(a, p), ref_triplet_mined(rows(a), rows(p), list(range(6)), 0.5, mining, fn))
    labels = [0, 1, 0, 2, 1, 0]
    close(loss(a, p, labels=T(labels)), ref_triplet_mined(rows(a), rows(p), labels, 0.5, mining, fn))


def test_triplet_single_class_batch_is_zero_not_nan():
    a = torch.randn(3, 2, requires_grad=True)
    loss = TripletLoss(mining="hardest")(a, torch.randn(3, 2), labels=T([1, 1, 1]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(a.grad).all()


def test_triplet_rejects_bad_options():
    with pytest.raises(ValueError, match="mining"):
        TripletLoss(mining="hard")
    with pytest.raises(ValueError, match="distance"):
        TripletLoss(distance="manhattan")


# ----------------------------------------------------------------------------- N-pair


def test_npair_hand_value():
    # a = p = [e1, e2]: a @ p.T = I, so each row gives log(1 + exp(0 - 1)) = log(1 + 1/e)
    # = 0.31326. L2 term: 0.1 * 0.25 * (mean ||a||^2 + mean ||p||^2) = 0.1 * 0.25 * 2 = 0.05.
    a = torch.eye(2)
    close(NPairLoss()(a, a.clone()), math.log(1 + 1 / math.e))
    close(NPairLoss(l2_reg=0.1)(a, a.clone()), math.log(1 + 1 / math.e) + 0.05)


def test_npair_matches_loop(gen):
    a, p = torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)
    A, P = rows(a), rows(p)
    want = sum(
        math.log(1 + sum(math.exp(dot(A[i], P[j]) - dot(A[i], P[i])) for j in range(3) if j != i)) for i in range(3)
    ) / 3
    close(NPairLoss()(a, p), want)
    reg = 0.25 * 0.01 * (sum(dot(x, x) for x in A) / 3 + sum(dot(x, x) for x in P) / 3)
    close(NPairLoss(l2_reg=0.01)(a, p), want + reg)
    # labels: uniform soft target over same-label columns
    lab = [0, 1, 0]
    soft = 0.0
    for i in range(3):
        lse = math.log(sum(math.exp(dot(A[i], P[j])) for j in range(3)))
        pos = [j for j in range(3) if lab[j] == lab[i]]
        soft += sum(-(dot(A[i], P[j]) - lse) for j in pos) / len(pos)
    close(NPairLoss()(a, p, labels=T(lab)), soft / 3)


# ----------------------------------------------------------------------------- lifted


def ref_lifted(a, b, margin, labels=None):
    x = a + b
    n2 = len(x)
    lab = (labels + labels) if labels is not None else list(range(len(a))) * 2
    D = [[euclid(x[i], x[j]) for j in range(n2)] for i in range(n2)]
    pairs = [(i, j) for i in range(n2) for j in range(i + 1, n2) if lab[i] == lab[j]]
    total = 0.0
    for i, j in pairs:
        s = sum(math.exp(margin - D[i][k]) for k in range(n2) if lab[k] != lab[i])
        s += sum(math.exp(margin - D[j][l]) for l in range(n2) if lab[l] != lab[j])
        total += relu(math.log(s) + D[i][j]) ** 2
    return total / (2 * len(pairs))


def test_lifted_hand_value():
    # a = b = [(0,0), (1,0)], margin 1. Pool x = [(0,0), (1,0), (0,0), (1,0)], positives
    # P = {(0,2), (1,3)} with D = 0. Each sample has 2 negatives at distance 1, each
    # exp(1 - 1) = 1, so J = log(2 + 2) + 0 = log 4 for both pairs:
    #   loss = 1/(2*2) * 2 * (log 4)^2 = (log 4)^2 / 2 = 0.96091
    a = T([[0.0, 0.0], [1.0, 0.0]])
    close(LiftedStructuredLoss(margin=1.0)(a, a.clone()), math.log(4) ** 2 / 2)


def test_lifted_matches_loop(gen):
    a, b = torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)
    close(LiftedStructuredLoss(1.0)(a, b), ref_lifted(rows(a), rows(b), 1.0))
    close(LiftedStructuredLoss(0.5)(a, b, labels=T([2, 0, 2])), ref_lifted(rows(a), rows(b), 0.5, [2, 0, 2]))


# ----------------------------------------------------------------------------- queue


def test_memory_queue_wraps_around():
    q = MemoryQueue(queue_size=5, dim=2)
    k = lambda *vals: T([[float(v), -float(v)] for v in vals])  # noqa: E731
    assert len(q) == 0 and q.negatives().shape == (0, 2)
    q.enqueue(k(1, 2, 3))  # slots 0..2
    assert len(q) == 3 and int(q.ptr) == 3
    torch.testing.assert_close(q.negatives(), k(1, 2, 3))
    q.enqueue(k(4, 5, 6, 7))  # 4, 5 -> slots 3, 4; wrap: 6, 7 overwrite the oldest (1, 2)
    assert len(q) == 5 and int(q.ptr) == 2
    torch.testing.assert_close(q.queue, k(6, 7, 3, 4, 5))
    q.enqueue(k(*range(10, 17)))  # 7 > K keys: only the last 5 (12..16) survive, from slot 2
    torch.testing.assert_close(q.queue, k(15, 16, 12, 13, 14))
    assert int(q.ptr) == 2  # ptr always points at the oldest entry (12)
    keys = torch.ones(1, 2, requires_grad=True)
    q.enqueue(keys * 2)
    assert not q.queue.requires_grad  # stored detached
    assert set(dict(q.named_buffers())) == {"queue", "ptr", "num_filled"}


def ref_queue_infonce(Q, K, negs, temp):
    total = 0.0
    for qv, kv in zip(Q, K):
        q, k = unit(qv), unit(kv)
        logits = [dot(q, k) / temp] + [dot(q, m) / temp for m in negs]
        total += -math.log(math.exp(logits[0]) / sum(math.exp(v) for v in logits))
    return total / len(Q)


def test_queue_infonce_equals_explicit_and_enqueues(gen):
    loss_fn = QueueInfoNCELoss(temperature=0.5, queue_size=4, dim=2)
    q1, k1 = torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)
    close(loss_fn(q1, k1), 0.0)  # empty queue: the positive is the only logit
    k1n = [unit(r) for r in rows(k1)]
    torch.testing.assert_close(loss_fn.queue.negatives(), T(k1n))  # normalised keys queued
    q2, k2 = torch.randn(3, 2, generator=gen), torch.randn(3, 2, generator=gen)
    # negatives are the queue *before* this step (k1 only, not k2)
    close(loss_fn(q2, k2), ref_queue_infonce(rows(q2), rows(k2), k1n, 0.5))
    k2n = [unit(r) for r in rows(k2)]
    # K = 4: slot 3 gets k2[0], then k2[1], k2[2] wrap into slots 0, 1
    torch.testing.assert_close(loss_fn.queue.queue, T([k2n[1], k2n[2], k1n[2], k2n[0]]))
    # eval mode: the loss uses the queue but does not modify it
    before = loss_fn.queue.queue.clone()
    loss_fn.eval()
    q3, k3 = torch.randn(2, 2, generator=gen), torch.randn(2, 2, generator=gen)
    close(loss_fn(q3, k3), ref_queue_infonce(rows(q3), rows(k3), rows(before), 0.5))
    torch.testing.assert_close(loss_fn.queue.queue, before)


def test_queue_infonce_requires_dim():
    with pytest.raises(TypeError, match="dim"):
        QueueInfoNCELoss(temperature=0.1, queue_size=8)


# ----------------------------------------------------------------------------- gradients, registry

BUILD_KWARGS = {
    "ntxent": {},
    "contrastive": {},
    "triplet": {"mining": "semihard", "margin": 5.0},  # large margin: nonzero loss on this batch
    "npair": {"l2_reg": 0.01},
    "lifted": {},
    "queue_infonce": {"dim": 4, "queue_size": 8},
}


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_gradients_flow(name, gen):
    loss_fn = build_loss(name, **BUILD_KWARGS[name])
    assert isinstance(loss_fn, loss_class(name))
    a = torch.randn(5, 4, generator=gen)
    b = a + 0.1 * torch.randn(5, 4, generator=gen)
    b[0] = a[0]  # an exact duplicate pair: zero distance must not give NaN gradients
    # Two steps: on the second the queue loss has negatives (and backward must survive the
    # in-place enqueue done inside forward). The first queue step is exactly 0 (empty queue).
    for _ in range(2):
        xa, xb = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = loss_fn(xa, xb)
        loss.backward()
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert torch.isfinite(xa.grad).all() and torch.isfinite(xb.grad).all()
    assert loss.item() > 0 and xa.grad.abs().sum() > 0


def test_registry_names_and_unknown_name():
    assert loss_class("triplet") is TripletLoss and loss_class("queue_infonce") is QueueInfoNCELoss
    with pytest.raises(ValueError, match=r"unknown loss 'arcface'.*contrastive.*queue_infonce"):
        build_loss("arcface")
