"""Stage 1 through the `align` flow: honest numbers on the digits, a complete MLflow record, clear errors."""

from __future__ import annotations

import h5py
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from encoders.store import EmbeddingStore, StoreError
from flows.align import AlignParams, align
from projection.align.config import TrainConfig
from projection.align.metrics import alignment_metrics
from tests_support import make_store

@pytest.fixture(scope="module")
def digits_run(digits_stores, tmp_path_factory):
    """Default settings, as a new user runs it."""
    out = tmp_path_factory.mktemp("align")
    return align(AlignParams(source_store=digits_stores["image"], target_store=digits_stores["caption"], label_column="label",
                             class_store=digits_stores["classes"], out_dir=str(out)))


def test_digits_projector_is_reported_beside_baselines_and_not_worse_than_ridge(digits_run):
    m = digits_run["metrics"]
    assert {"projector", "ridge", "procrustes"} <= set(m)
    for method in ("projector", "ridge", "procrustes"):
        assert {"p2t_r1", "zeroshot_acc", "mse", "p2t_mrr", "t2p_r1"} <= set(m[method])
    print({k: (round(v["p2t_r1"], 4), round(v["zeroshot_acc"], 4)) for k, v in m.items()})
    assert m["projector"]["zeroshot_acc"] >= m["ridge"]["zeroshot_acc"]
    assert m["projector"]["p2t_r1"] >= m["ridge"]["p2t_r1"]
    assert m["projector"]["zeroshot_acc"] > 0.5  # ten classes: chance is 0.1


def test_mlflow_run_holds_params_stepped_metrics_plots_and_a_reloadable_model(digits_run, digits_stores):
    client = MlflowClient()
    run = client.get_run(digits_run["run_id"])
    p = run.data.params
    assert p["projector.kind"] == "mlp" and p["train.steps"] == str(TrainConfig().steps) and "loss.terms" in p
    assert p["source_store"] == digits_stores["image"]
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) == digits_run["epochs_run"] and sorted(h.step for h in history) == [h.step for h in history]
    assert len({h.step for h in history}) == len(history)
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == len(history)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "similarity.png", "metrics.csv", "config.json", "split.csv",
            "zeroshot_confusion.png"} <= arts
    inputs = {d.dataset.digest for d in run.inputs.dataset_inputs}
    assert inputs == {EmbeddingStore(digits_stores["image"]).digest, EmbeddingStore(digits_stores["caption"]).digest}

    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/projector")  # safetensors + JSON, no pickle
    split = pd.read_csv(client.download_artifacts(run.info.run_id, "split.csv"))
    test_ids = split.loc[split["split"] == "test", "id"].tolist()
    src, tgt = EmbeddingStore(digits_stores["image"]), EmbeddingStore(digits_stores["caption"])
    pred = np.asarray(model.predict(pd.DataFrame({"embedding": list(src.get(test_ids))})))  # the projector alone
    captions = pd.read_csv(tgt.attrs["manifest_path"], dtype={"id": str}).set_index("id").loc[test_ids, "caption"]
    again = alignment_metrics(pred, tgt.get(test_ids), groups=captions.tolist())  # the same caption is one target
    logged = run.data.metrics
    for k in ("mse", "cosine", "p2t_r1", "p2t_mrr", "t2p_r1"):
        assert again[k] == pytest.approx(logged[f"test_{k}"], rel=1e-4, abs=1e-6), k


def test_bad_stores_are_clear_errors_naming_store_and_problem(prefect_server, mlflow_uri, tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(40)]
    a = make_store(tmp_path / "a.h5", ids, rng.normal(size=(40, 8)).astype(np.float32))
    b = make_store(tmp_path / "b.h5", ids, rng.normal(size=(40, 6)).astype(np.float32))
    other = make_store(tmp_path / "other.h5", [f"z{k}" for k in range(40)], rng.normal(size=(40, 6)).astype(np.float32))
    fast = {"epochs": 1}
    with pytest.raises(StoreError, match=r"a\.h5 and .*other\.h5 share no ids"):
        align(AlignParams(source_store=a, target_store=other, train=fast, out_dir=str(tmp_path)))
    with pytest.raises(StoreError, match=r"d_in=16 disagrees with store .*a\.h5 \(dim 8\)"):
        align(AlignParams(source_store=a, target_store=b, projector={"d_in": 16}, train=fast, out_dir=str(tmp_path)))
    nan = rng.normal(size=(40, 6)).astype(np.float32)
    nan[7, 2] = np.nan
    bad = make_store(tmp_path / "nan.h5", ids, nan)
    with pytest.raises(ValueError, match=r"nan\.h5.*i7|i7.*nan\.h5"):
        align(AlignParams(source_store=a, target_store=bad, train=fast, out_dir=str(tmp_path)))
    # a store whose ids and embeddings disagree in count (a truncated or hand-edited file)
    broken = make_store(tmp_path / "broken.h5", ids, rng.normal(size=(40, 6)).astype(np.float32))
    with h5py.File(broken, "r+") as f:
        f["embeddings"].resize(30, axis=0)
    with pytest.raises(StoreError, match=r"broken\.h5 is inconsistent: 40 ids, 30 embedding rows"):
        align(AlignParams(source_store=a, target_store=broken, train=fast, out_dir=str(tmp_path)))


def test_streaming_path_trains_from_chunks_when_pairs_exceed_the_memory_budget(prefect_server, mlflow_uri, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(8, 6))).astype(np.float32)
    ids = [f"s{k}" for k in range(600)]
    a, b = make_store(tmp_path / "a.h5", ids, x), make_store(tmp_path / "b.h5", ids, y)
    out = align(AlignParams(source_store=a, target_store=b, in_memory_max_gb=1e-6, train={"epochs": 30, "batch_size": 32},
                            out_dir=str(tmp_path)))
    run = MlflowClient().get_run(out["run_id"])
    assert run.data.params["in_memory"] == "False"
    m = out["metrics"]
    assert m["projector"]["mse"] < 0.5 * float(np.var(y))  # it learned from the streamed chunks
    assert m["projector"]["mse"] < m["procrustes"]["mse"]
