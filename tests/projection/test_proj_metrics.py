import numpy as np
import pytest

from projection.metrics import alignment_metrics, similarity_matrix, true_match_ranks, zero_shot

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
    from projection.metrics import bidirectional_ranks

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
