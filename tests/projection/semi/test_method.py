"""The choice ``align(mode="semi")`` makes on val pairs: never below the best pairs-only map when refinement misleads."""

from __future__ import annotations

import numpy as np
import torch

from projection.align.config import ProjectorConfig, TrainConfig
from projection.align.metrics import alignment_metrics
from projection.align.projector import Projector
from projection.align.train import predict
from projection.semi.method import candidate_fits, fit_semi_mode, val_mrr
from projection.semi.objective import SemiConfig


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
    misled = ("centred", "transport")  # rotations in the frame and plans the unpaired rows set
    assert fit.chosen not in misled
    test = lambda m: alignment_metrics(predict(m, x[100:]) if isinstance(m, Projector) else m.predict(x[100:]), y[100:])["p2t_r1"]  # noqa: E731
    maps = {k: f(x[:60], y[:60], xu, yu, x[60:100], y[60:100]) for k, f in candidate_fits(60, 0).items()}
    best_pairs_only = max(test(maps["ridge"]), test(maps["procrustes"]))
    assert test(fit.model) >= best_pairs_only > max(test(maps[k]) for k in misled)


def test_transport_refinement_recovers_a_rotation_that_the_few_pairs_cannot_fix():
    """10 pairs for a 16-d rotation (Procrustes on them is underdetermined); 600 unpaired rows per side fix it."""
    rng = np.random.default_rng(2)
    d = 16
    r = np.linalg.qr(rng.normal(size=(d, d)))[0]
    x = (rng.normal(size=(800, d)) * np.linspace(2, 0.5, d)).astype(np.float32)
    y = (x @ r + 0.05 * rng.normal(size=(800, d))).astype(np.float32)
    xu, yu = x[12:612], y[12:612][rng.permutation(600)]  # correspondence hidden
    test = lambda m: alignment_metrics(m.predict(x[700:]), y[700:])["p2t_r1"]  # noqa: E731
    maps = {k: f(x[:10], y[:10], xu, yu, x[612:700], y[612:700]) for k, f in candidate_fits(10, 0).items()}
    assert test(maps["transport"]) > 0.9 > max(test(maps["procrustes"]), test(maps["centred"]))


def test_a_semi_fit_is_a_pure_function_of_its_inputs():
    """Default semi trains no MLP (nothing to checkpoint): a rerun after kill -9 recomputes bit-identical weights."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(8, 8))).astype(np.float32)
    pcfg = ProjectorConfig(d_in=8, d_out=8, hidden=16)
    runs = [fit_semi_mode("semi", x[:30], y[:30], x[100:], y[100:][::-1], pcfg, TrainConfig(batch_size=16),
                          SemiConfig(steps=20), val=(x[30:60], y[30:60])) for _ in range(2)]
    assert runs[0].chosen == runs[1].chosen
    for k, v in runs[0].model.state_dict().items():
        assert torch.equal(v, runs[1].model.state_dict()[k]), k
