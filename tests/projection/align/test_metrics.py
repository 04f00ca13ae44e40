import numpy as np
import pytest

from projection.align.metrics import alignment_metrics, similarity_matrix, true_match_ranks, zero_shot

KEYS = {"mse", "cosine"} | {f"{d}_{m}" for d in ("p2t", "t2p") for m in ("r1", "r5", "r10", "mrr", "median_rank")}


def test_perfect_predictions():
    y = np.random.default_rng(0).normal(size=(50, 8))
    m = alignment_metrics(y, y)
    assert set(m) == KEYS
    assert m["mse"] == 0 and m["cosine"] == pytest.approx(1.0)
    for d in ("p2t", "t2p"):
        assert m[f"{d}_r1"] == 1 and m[f"{d}_mrr"] == 1 and m[f"{d}_median_rank"] == 1


def test_known_permutation_ranks():
    # Orthonormal targets: query i predicts target perm[i], so its true match y_i has
    # similarity 0 and the one wrong candidate has similarity 1 -> rank 2 (ties don't count).
    y = np.eye(4)
    perm = [1, 0, 3, 2]
    p = y[perm]
    ranks = true_match_ranks(p, y)
    np.testing.assert_array_equal(ranks, [2, 2, 2, 2])
    m = alignment_metrics(p, y)
    assert m["p2t_r1"] == 0 and m["p2t_r5"] == 1 and m["p2t_mrr"] == 0.5 and m["p2t_median_rank"] == 2


def test_hand_ranks_with_graded_similarity():
    y = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    p = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    # q0 ~ y1: sims to (y0,y1,y2) = (0,1,0): true y0 = 0, one greater -> 2
    # q1 ~ y1: true 1 -> 1; q2 ~ y0: sims (1,0,-1): true y2 = -1 -> 3
    np.testing.assert_array_equal(true_match_ranks(p, y), [2, 1, 3])


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(300, 16)).astype(np.float32)
    p = y + rng.normal(size=y.shape).astype(np.float32)
    full = alignment_metrics(p, y, chunk_size=10_000)
    for chunk in (1, 7, 64):
        assert alignment_metrics(p, y, chunk_size=chunk) == full


def test_zero_shot_and_confusion():
    classes = np.eye(3)
    pred = np.array([[1, 0.1, 0], [0.9, 0.2, 0], [0, 1, 0], [0, 0, 2], [0, 1.5, 1]])
    labels = np.array([0, 1, 1, 2, 2])
    acc, conf = zero_shot(pred, labels, classes)
    assert acc == pytest.approx(3 / 5)
    np.testing.assert_array_equal(conf, [[1, 0, 0], [1, 1, 0], [0, 1, 1]])
    m = alignment_metrics(pred, pred, labels=labels, class_embeddings=classes)
    assert m["zeroshot_acc"] == pytest.approx(3 / 5)


def test_similarity_matrix():
    s = similarity_matrix(np.eye(3) * 5, np.eye(3))
    np.testing.assert_allclose(s, np.eye(3), atol=1e-7)
    assert s.shape == (3, 3)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        alignment_metrics(np.zeros((3, 2)), np.zeros((4, 2)))


def test_single_pass_t2p_equals_separate_pass():
    from projection.align.metrics import bidirectional_ranks

    rng = np.random.default_rng(2)
    y = rng.normal(size=(200, 8)).astype(np.float32)
    p = y + 1.5 * rng.normal(size=y.shape).astype(np.float32)
    p2t, t2p = bidirectional_ranks(p, y, chunk_size=17)
    np.testing.assert_array_equal(p2t, true_match_ranks(p, y, chunk_size=200))
    np.testing.assert_array_equal(t2p, true_match_ranks(y, p, chunk_size=200))
    assert t2p.min() == 1 and t2p.max() > 1


def test_duplicate_targets_tie_in_models_favour():
    y = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    m = alignment_metrics(y, y, chunk_size=1)
    assert m["p2t_r1"] == 1 and m["t2p_r1"] == 1


def _strict_ranks_numpy(p, y):
    """Independent reference: full float64 similarity matrix, rank = 1 + #(strictly greater)."""
    p = np.asarray(p, np.float64)
    y = np.asarray(y, np.float64)
    s = (p / np.linalg.norm(p, axis=1, keepdims=True)) @ (y / np.linalg.norm(y, axis=1, keepdims=True)).T
    true = np.diag(s)
    return 1 + (s > true[:, None]).sum(1), 1 + (s > true[None, :]).sum(0), s


def test_nearly_collapsed_pair_reports_the_strict_float64_rank():
    # A random-init tower's store: every vector within ~1e-4 of one direction (off-diagonal
    # cosines 0.99999...), so top-2 gaps are ~1e-8, far inside the old 1e-6 "tie" tolerance.
    rng = np.random.default_rng(0)
    n, d = 300, 32
    base = rng.normal(size=d)
    y = (base + 3e-4 * rng.normal(size=(n, d))).astype(np.float32)
    p = (y + 1e-3 * rng.normal(size=(n, d))).astype(np.float32)  # a noisy map into that space
    m = alignment_metrics(p, y, chunk_size=37)
    p2t, t2p, s = _strict_ranks_numpy(p, y)
    assert m["p2t_r1"] == (p2t == 1).mean() and m["t2p_r1"] == (t2p == 1).mean()
    assert m["p2t_mrr"] == pytest.approx((1 / p2t).mean(), abs=1e-12)
    tolerant_r1 = ((s > np.diag(s)[:, None] + 1e-6).sum(1) == 0).mean()  # what the old metric read
    assert m["p2t_r1"] < 0.5 * tolerant_r1, (m["p2t_r1"], tolerant_r1)
    from projection.align.metrics import collapse_stats, collapse_warning
    stats = collapse_stats(y)
    assert stats["mean_offdiag_cosine"] > 0.999 and "nearly collapsed" in collapse_warning("target", stats)


# Hand example with a duplicate target: rows 0 and 1 share caption "a".
#   targets a=(1,0,0) twice, b=(0,1,0), c=(0,0,1); labels 0, 0, 1, 1
#   p2t (pool = distinct targets a, b, c): p0 -> a first (1); p1 (0.2,1,0): b beats a (2);
#       p2 (0.3,0.8,0.5): b first (1); p3 (0,0.9,0.5): b beats c (2)
#   t2p (a query is answered by any item whose target is identical): a -> p0 (0.995) is a's own
#       item (1, for rows 0 and 1 alike); b -> p1 0.98, p3 0.874 beat p2 0.808 (3); c -> p2 0.505
#       beats p3 0.486 (2)
#   class-level top-1: p2t a, b, b, b -> labels 0, 1, 1, 1 vs 0, 0, 1, 1: 3/4;
#                      t2p p0, p0, p1, p2 -> labels 0, 0, 0, 1 vs 0, 0, 1, 1: 3/4
DUP_Y = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
DUP_P = np.array([[1.0, 0.1, 0], [0.2, 1.0, 0], [0.3, 0.8, 0.5], [0, 0.9, 0.5]])


def test_duplicate_targets_and_class_level_match_hand_values():
    from projection.align.metrics import bidirectional_ranks

    p2t, t2p = bidirectional_ranks(DUP_P, DUP_Y, chunk_size=3)
    np.testing.assert_array_equal(p2t, [1, 2, 1, 2])
    np.testing.assert_array_equal(t2p, [1, 1, 3, 2])
    m = alignment_metrics(DUP_P, DUP_Y, labels=np.array(["x", "x", "y", "y"]), chunk_size=2)
    assert m["p2t_r1"] == 0.5 and m["p2t_mrr"] == 0.75
    assert m["t2p_r1"] == 0.5 and m["t2p_mrr"] == pytest.approx((1 + 1 + 1 / 3 + 1 / 2) / 4)
    assert m["p2t_class_r1"] == 0.75 and m["t2p_class_r1"] == 0.75


def test_content_ids_make_near_identical_vectors_one_target():
    # The same caption embedded in two batches can differ in the 7th decimal: its content id says they are one.
    y = DUP_Y.copy()
    y[1, 1] = 1e-7
    assert bidirectional_ranks_of(y, None)[1][1] == 3  # as two vectors, p0 and p2 beat row 1's own item p1
    p2t, t2p = bidirectional_ranks_of(y, ["a", "a", "b", "c"])
    np.testing.assert_array_equal(p2t, [1, 2, 1, 2])
    np.testing.assert_array_equal(t2p, [1, 1, 3, 2])


def bidirectional_ranks_of(y, ids):
    from projection.align.metrics import bidirectional_ranks

    return bidirectional_ranks(DUP_P, y, groups=ids)


def test_collapse_stats_match_brute_force_and_spread_stores_do_not_warn():
    from projection.align.metrics import collapse_stats, collapse_warning

    e = np.random.default_rng(3).normal(size=(200, 16))
    u = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = u @ u.T
    stats = collapse_stats(e)
    assert stats["mean_offdiag_cosine"] == pytest.approx(s[~np.eye(200, dtype=bool)].mean(), abs=1e-12)
    assert 12 < stats["effective_rank"] <= 16
    assert collapse_warning("source", stats) is None
