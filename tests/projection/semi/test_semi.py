"""Alignment from few pairs: synthetic spaces with a known map (a random rotation plus noise)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from projection.align.baselines import ProcrustesBaseline
from projection.align.config import ProjectorConfig, TrainConfig
from projection.align.metrics import alignment_metrics
from projection.semi.partial import check_pairs, pair_budget, partition_stores
from projection.semi.refine import RefinedMap, RefineConfig, moment_seed
from projection.semi.objective import SemiConfig
from projection.semi.trainer import train_semi
from projection.align.train import predict
from tests_support import make_store

D = 16


def rotated_spaces(n: int = 700, noise: float = 0.05, seed: int = 0):
    """x: a 12-cluster mixture with a decaying spectrum; y = x R + noise, R a random rotation."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(12, D)) * 3
    x = centers[rng.integers(0, 12, n)] + rng.normal(size=(n, D)) * np.linspace(2, 0.3, D)
    r = ortho_group.rvs(D, random_state=seed + 1)
    y = x @ r + noise * rng.normal(size=(n, D))
    return x.astype(np.float32), y.astype(np.float32), r


def rotation_error(fitted, r) -> float:
    return float(np.linalg.norm(fitted.map.r - r) / np.sqrt(D))


def test_refinement_recovers_rotation_from_unpaired_rows_and_a_handful_of_pairs():
    x, y, r = rotated_spaces()
    test, pairs, unpaired = slice(0, 100), slice(100, 108), slice(108, None)  # 8 pairs < D: underdetermined alone
    rng = np.random.default_rng(1)
    shuffled = rng.permutation(np.arange(108, len(y)))  # which target row goes with which source row: hidden
    refined = RefinedMap(RefineConfig(seed_from="pairs")).fit(x[pairs], y[pairs], x[unpaired], y[shuffled])
    alone = ProcrustesBaseline().fit(x[pairs], y[pairs])
    assert rotation_error(refined, r) < 0.02
    assert np.linalg.norm(alone.r - r) / np.sqrt(D) > 0.3  # the 8 pairs alone do not determine R
    r1 = alignment_metrics(refined.predict(x[test]), y[test])["p2t_r1"]
    assert r1 > 0.95 > alignment_metrics(alone.predict(x[test]), y[test])["p2t_r1"]
    i, j = refined.pseudo_pairs  # pseudo-pairs are true pairs
    assert (shuffled[j] == np.arange(108, len(y))[i]).mean() > 0.95


def test_zero_pairs_recovers_rotation_for_two_encoders_of_the_same_inputs():
    x, y, r = rotated_spaces(seed=3)
    shuffled = np.random.default_rng(0).permutation(len(y))
    i, j, _ = moment_seed(x, y[shuffled])
    assert (shuffled[j] == i).mean() > 0.5  # the label-free seed is mostly right already
    refined = RefinedMap().fit(x[:0], y[:0], x, y[shuffled])
    assert refined.seed_used == "moments"
    assert rotation_error(refined, r) < 0.02


def test_semi_supervised_mlp_beats_the_same_mlp_on_pairs_alone():
    x, y, _ = rotated_spaces(n=600, seed=5)
    test, pairs, rest = slice(0, 100), slice(100, 110), slice(110, None)
    rng = np.random.default_rng(2)
    xu, yu = x[rest], y[rest][rng.permutation(len(y) - 110)]
    refined = RefinedMap().fit(x[pairs], y[pairs], xu, yu)
    i, j = refined.pseudo_pairs
    pcfg = ProjectorConfig(d_in=D, d_out=D, hidden=64)
    train = TrainConfig(batch_size=64, lr=3e-3)
    semi = train_semi(x[pairs], y[pairs], xu, yu, pcfg, train, SemiConfig(steps=250),
                      (refined.x_unpaired[i], refined.y_unpaired[j])).model
    alone = train_semi(x[pairs], y[pairs], xu, yu, pcfg, train, SemiConfig(steps=250, cycle=0, mmd=0, pseudo=0)).model
    r1_semi = alignment_metrics(predict(semi, x[test]), y[test])["p2t_r1"]
    r1_alone = alignment_metrics(predict(alone, x[test]), y[test])["p2t_r1"]
    assert r1_semi > 0.9
    assert r1_semi > r1_alone


def test_no_pairs_where_a_mode_needs_them_is_one_clear_line():
    x, y, _ = rotated_spaces(n=50)
    with pytest.raises(ValueError, match="needs at least 1 pair"):
        train_semi(x[:0], y[:0], x, y, ProjectorConfig(d_in=D, d_out=D, hidden=8), TrainConfig(), SemiConfig(steps=1))
    with pytest.raises(ValueError, match=r"mode 'semi' needs at least 2 pairs in the training split, got 0"):
        check_pairs(0, 10, "semi", n_shared=10)
    with pytest.raises(ValueError, match="the test split has no pairs"):
        check_pairs(100, 0, "zero_pair", n_shared=0)
    check_pairs(0, 10, "zero_pair", n_shared=10)  # zero-pair needs pairs only to be scored
    with pytest.raises(ValueError, match="refinement needs at least 2 pairs or unpaired rows"):
        RefinedMap(RefineConfig(seed_from="pairs")).fit(x[:1], y[:1], x[:0], y[:0])


def test_partly_overlapping_stores_are_partitioned_by_id(tmp_path):
    rng = np.random.default_rng(0)
    src = make_store(tmp_path / "image.h5", [f"a{i}" for i in range(10)], rng.normal(size=(10, 4)).astype(np.float32))
    tgt = make_store(tmp_path / "caption.h5", [f"a{i}" for i in (9, 3, 5)] + ["b0", "b1"],
                     rng.normal(size=(5, 4)).astype(np.float32))
    from encoders.store import EmbeddingStore

    p = partition_stores(EmbeddingStore(src), EmbeddingStore(tgt))
    assert list(p.paired_ids) == ["a3", "a5", "a9"]
    assert list(p.paired_tgt) == [1, 2, 0]
    assert list(p.source_only) == [0, 1, 2, 4, 6, 7, 8]
    assert list(p.target_only) == [3, 4]


def test_pair_budgets_are_nested_and_exact():
    ids = [f"id{i}" for i in range(200)]
    rows = np.arange(20, 200)
    small, rest_small = pair_budget(ids, rows, 0.05)
    big, _ = pair_budget(ids, rows, 0.2)
    assert len(small) == 9 and len(big) == 36
    assert set(small) <= set(big)
    assert sorted(np.concatenate([small, rest_small]).tolist()) == rows.tolist()
