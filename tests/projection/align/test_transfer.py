"""The cross-modal transfer figure: a head trained on true targets, scored on true vs projected test embeddings."""

import numpy as np
import pytest

from projection.align.transfer import is_classification, transfer_scores


def _classes(seed=0, n=600, d=16, k=4):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    labels = rng.integers(0, k, size=n)
    return centres[labels] + rng.normal(size=(n, d)), np.array([f"class-{c}" for c in labels])


def test_classification_head_scores_true_targets_above_noisy_projections_and_random_at_chance():
    y, labels = _classes()
    tr, te = slice(0, 400), slice(400, 600)
    rng = np.random.default_rng(1)
    projected = {"good": y[te] + 0.3 * rng.normal(size=y[te].shape), "noisy": y[te] + 4.0 * rng.normal(size=y[te].shape),
                 "random": rng.normal(size=y[te].shape) * 3}
    s = transfer_scores(y[tr], labels[tr], y[te], labels[te], projected)
    assert s["transfer_task"] == 1.0  # string labels are classes
    # the true-target row is what a user would compute by hand: a classifier fitted on the true train
    # embeddings, scored on the true test embeddings (well-separated classes: near-perfect)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(y[tr])
    by_hand = LogisticRegression(max_iter=2000).fit(scaler.transform(y[tr]), labels[tr]).score(scaler.transform(y[te]), labels[te])
    assert by_hand > 0.9 and abs(s["transfer_true"] - by_hand) <= 0.02
    assert s["transfer_good"] > s["transfer_noisy"] > s["transfer_random"]
    assert s["transfer_random"] < 0.45  # four classes: chance is 0.25


def test_regression_head_reports_r2():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(500, 8))
    target = y @ rng.normal(size=8) + 0.1 * rng.normal(size=500)  # a numeric column, linear in target space
    assert not is_classification(target)
    s = transfer_scores(y[:400], target[:400], y[400:], target[400:], {"projector": y[400:] + 0.5 * rng.normal(size=(100, 8))})
    assert s["transfer_task"] == 0.0
    resid = target[400:] - target[400:].mean()
    assert s["transfer_true"] == pytest.approx(1 - 0.01 / resid.var(), abs=0.02)
    assert 0 < s["transfer_projector"] < s["transfer_true"]
