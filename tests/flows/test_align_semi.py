"""`align` on stores whose ids overlap only partly: semi-supervised and zero-pair modes, through the real flow."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy.stats import ortho_group

from flows.align import AlignParams, align
from tests_support import make_store

D = 12


def rotated(tmp_path, src, tgt):
    """y = x R + noise for 600 items; the source store holds items ``src``, the target store items ``tgt``."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(10, D)) * 3)[rng.integers(0, 10, 600)] + rng.normal(size=(600, D)) * np.linspace(2, 0.3, D)
    y = x @ ortho_group.rvs(D, random_state=1) + 0.05 * rng.normal(size=(600, D))
    ids = np.array([f"item{k:03d}" for k in range(600)])
    return (make_store(tmp_path / "old.h5", list(ids[src]), x[src].astype(np.float32)),
            make_store(tmp_path / "new.h5", list(ids[tgt]), y[tgt].astype(np.float32)))


@pytest.fixture()
def partial_stores(tmp_path):
    """300 items embedded by both encoders, 150 only by the old one, 150 only by the new one."""
    return rotated(tmp_path, np.r_[0:450], np.r_[0:300, 450:600])


def test_semi_mode_uses_unpaired_rows_records_pairing_and_beats_pairs_alone(prefect_server, mlflow_uri, tmp_path,
                                                                             partial_stores):
    a, b = partial_stores
    out = align(AlignParams(source_store=a, target_store=b, mode="semi", paired_frac=0.04, semi_steps=150,
                            projector={"hidden": 32}, train={"batch_size": 64}, out_dir=str(tmp_path)))
    m = out["metrics"]
    assert m["refined"]["p2t_r1"] > 0.9 > m["procrustes"]["p2t_r1"]  # 10 pairs alone cannot fix a 12-d rotation
    assert m["refined"]["p2t_r1"] > m["ridge"]["p2t_r1"]
    client = MlflowClient()
    run = client.get_run(out["run_id"])
    assert run.data.params["mode"] == "semi" and int(run.data.params["n_unpaired_source"]) == 150 + 230
    pairing = pd.read_csv(client.download_artifacts(out["run_id"], "pairing.csv"))
    counts = pairing["role"].value_counts().to_dict()
    assert counts == {"pair": 10, "released": 230, "val": 30, "test": 30, "source_only": 150, "target_only": 150}
    split = pd.read_csv(client.download_artifacts(out["run_id"], "split.csv"))
    test_ids = set(split.loc[split["split"] == "test", "id"])
    assert test_ids == set(pairing.loc[pairing["role"] == "test", "id"])  # the test split is paired and held out


def test_zero_pair_mode_aligns_two_encoders_of_the_same_inputs(prefect_server, mlflow_uri, tmp_path):
    a, b = rotated(tmp_path, np.r_[0:600], np.r_[0:600])  # same inputs; no training pair is used
    out = align(AlignParams(source_store=a, target_store=b, mode="zero_pair", paired_frac=0.0, out_dir=str(tmp_path)))
    assert out["metrics"]["projector"]["p2t_r1"] > 0.9
    assert set(out["metrics"]) == {"projector", "refined"}  # no pairs: no pairs-only baseline to fit


def test_modes_without_the_pairs_they_need_fail_in_one_line(prefect_server, mlflow_uri, tmp_path, partial_stores):
    a, b = partial_stores
    with pytest.raises(ValueError, match=r"mode 'semi' needs at least 2 pairs in the training split, got 0"):
        align(AlignParams(source_store=a, target_store=b, mode="semi", paired_frac=0.0, out_dir=str(tmp_path)))
    rng = np.random.default_rng(0)
    other = make_store(tmp_path / "other.h5", [f"z{k}" for k in range(50)], rng.normal(size=(50, D)).astype(np.float32))
    with pytest.raises(ValueError, match=r"the test split has no pairs \(the stores share 0 ids\)"):
        align(AlignParams(source_store=a, target_store=other, mode="zero_pair", out_dir=str(tmp_path)))
