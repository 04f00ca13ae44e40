"""The choice ``align(mode="semi")`` makes on val pairs: never below the best pairs-only map when refinement misleads."""

from __future__ import annotations

import numpy as np

from projection.align.config import ProjectorConfig, TrainConfig
from projection.align.metrics import alignment_metrics
from projection.align.projector import Projector
from projection.align.train import predict
from projection.semi.method import candidate_fits, fit_semi_mode, val_mrr
from projection.semi.objective import SemiConfig
from projection.semi.refine import RefineConfig
from projection.semi.whiten import WhitenedRefinedMap


def test_val_mrr_ranks_the_true_target_among_val_and_pool():
    y = np.eye(4)
    assert val_mrr(y[:2], y[:2], y[2:]) == 1.0
    # the first prediction is nearest to a pool row, second-nearest to its own target: rank 1 -> 1/2
    pred = np.array([[0.5, 0.0, 0.9, 0.0], [0.0, 1.0, 0.0, 0.0]])
    assert val_mrr(pred, y[:2], y[2:]) == (0.5 + 1.0) / 2


def test_unpaired_rows_that_mislead_fall_back_to_the_best_pairs_only_map():
    """Unpaired rows drawn from unrelated clusters: refinement's pseudo-pairs are wrong, val says so."""
    rng = np.random.default_rng(0)
    d = 8
    w = rng.normal(size=(d, d))
    x = rng.normal(size=(400, d)).astype(np.float32)
    y = (x @ w + 0.05 * rng.normal(size=(400, d))).astype(np.float32)  # linear, not a rotation: ridge fits it
    xu = (rng.normal(size=(600, d)) * 3 + 5).astype(np.float32)
    yu = (rng.normal(size=(600, d)) * 0.2 - 4).astype(np.float32)
    pcfg = ProjectorConfig(d_in=d, d_out=d, hidden=16)
    fit = fit_semi_mode("semi", x[:60], y[:60], xu, yu, pcfg, TrainConfig(batch_size=32), SemiConfig(steps=20),
                        val=(x[60:100], y[60:100]))
    assert fit.chosen in ("ridge", "procrustes", "mlp_pairs")
    test = lambda m: alignment_metrics(predict(m, x[100:]) if isinstance(m, Projector) else m.predict(x[100:]), y[100:])["p2t_r1"]  # noqa: E731
    maps = {k: f(x[:60], y[:60], xu, yu, x[60:100], y[60:100]) for k, f in candidate_fits(60, (d, d), 0).items()}
    best_pairs_only = max(test(maps["ridge"]), test(maps["procrustes"]))
    assert test(fit.model) >= best_pairs_only > max(test(m) for k, m in maps.items() if k.startswith("refined"))


def test_the_whitened_map_is_one_affine_map():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 12)).astype(np.float32) * np.linspace(3, 0.2, 12).astype(np.float32)
    y = x @ np.linalg.qr(rng.normal(size=(12, 12)))[0].astype(np.float32)
    m = WhitenedRefinedMap(6, RefineConfig(seed_from="pairs", iters=2)).fit(x[:20], y[:20], x[20:], y[20:][::-1])
    a, c = m.affine()
    np.testing.assert_allclose(x[:5] @ a + c, m.predict(x[:5]), rtol=1e-4, atol=1e-4)
