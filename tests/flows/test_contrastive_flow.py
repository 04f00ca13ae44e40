"""Sketch -> product search on the digits: contrastive towers through the `contrastive_train` flow.

Honest numbers: the trained towers must beat the SAME towers at random init and chance, on held-out
ids; the MLflow run must hold the record; the saved towers must load through the encoder factory
and extract a store like any other encoder.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from encoders.factory import load_encoder
from encoders.manifest import Manifest, ManifestError
from flows.contrastive import ContrastiveParams, contrastive_train

# Found on the digits: 3 epochs of InfoNCE, batch 64, lr 3e-3, two tiny-ResNet towers (~20-25 s on 1 thread).
# threads=1: on a busy 2-core box, 2 OpenMP threads competing with other processes were 3-4x slower.
CONFIG = {"epochs": 3, "batch_size": 64, "lr": 3e-3, "threads": 1}


@pytest.fixture(scope="module")
def digits_run(prefect_server, mlflow_uri, sample_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("contrastive")
    params = ContrastiveParams(manifest=str(sample_data["digits"]), column_a="image", column_b="sketch",
                               label_column="label", config=CONFIG, out_dir=str(out))
    return contrastive_train(params)


def test_trained_towers_beat_random_init_and_chance_for_sketch_to_image_search(digits_run):
    m, r = digits_run["metrics"], digits_run["random_init_metrics"]
    print({k: (round(m[k], 3), round(r[k], 3)) for k in ("b2a_r1", "b2a_r10", "b2a_label_r1", "a2b_r1",
                                                         "a2b_r10", "a2b_label_r1", "chance_r1")})
    chance = m["chance_r1"]
    assert chance == pytest.approx(1.0 / digits_run["n_test"])
    # b2a: sketch queries, photo pool (the sketch-to-product search direction)
    assert m["b2a_r1"] > max(3 * chance, r["b2a_r1"])
    assert m["b2a_r10"] > r["b2a_r10"]
    assert m["b2a_label_r1"] > max(0.2, r["b2a_label_r1"])  # 10 classes: chance is ~0.1
    assert m["a2b_r1"] > max(3 * chance, r["a2b_r1"])
    assert m["a2b_label_r1"] > r["a2b_label_r1"]


def test_mlflow_run_holds_params_stepped_metrics_and_artifacts(digits_run):
    client = MlflowClient()
    run = client.get_run(digits_run["run_id"])
    assert run.data.tags["xmodal.stage"] == "contrastive"
    assert run.data.tags["weights_origin"] == "trained-contrastive"
    p = run.data.params
    assert p["contrastive.epochs"] == str(CONFIG["epochs"]) and p["column_b"] == "sketch"
    metrics = run.data.metrics
    for key in ("test_b2a_r1", "test_b2a_r10", "test_b2a_label_r1", "test_a2b_r1", "random_init_test_b2a_r1",
                "random_init_test_b2a_label_r1", "test_chance_r1"):
        assert key in metrics, key
    assert metrics["test_b2a_r1"] == pytest.approx(digits_run["metrics"]["b2a_r1"])
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(h.step for h in history) == list(range(CONFIG["epochs"]))
    assert len(client.get_metric_history(run.info.run_id, "val_r1")) == CONFIG["epochs"]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "config.json", "metrics.csv", "split.csv", "tower_a", "tower_b"} <= arts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "tower_b")} == {
        "tower_b/open_clip_config.json", "tower_b/open_clip_model.safetensors"}


def test_returned_tower_specs_load_and_extract(digits_run, sample_data, tmp_path):
    from flows.extract import ExtractParams, extract_embeddings
    from encoders.store import EmbeddingStore

    manifest = Manifest.read(sample_data["digits"])
    sketches = manifest.values("sketch", "image")[:5]
    enc = load_encoder(digits_run["tower_specs"]["b"])
    assert enc.origin == "checkpoint" and enc.dim == 64
    emb = enc.encode_items(sketches)
    assert emb.shape == (5, 64) and torch.allclose(emb.norm(dim=1), torch.ones(5), atol=1e-5)

    small = tmp_path / "manifest.csv"  # 5 rows, absolute paths
    frame = manifest.frame.head(5).copy()
    frame["sketch"] = sketches
    frame.to_csv(small, index=False)
    out = extract_embeddings(ExtractParams(manifest=str(small), column="sketch", encoder=digits_run["tower_specs"]["b"],
                                           out_dir=str(tmp_path / "stores")))
    store = EmbeddingStore(out["store"])
    assert store.attrs["weights_origin"] == "checkpoint"
    torch.testing.assert_close(torch.from_numpy(store.get(list(frame["id"]))), emb, atol=1e-5, rtol=0)


def test_bad_rows_are_named_by_id_and_column(prefect_server, mlflow_uri, sample_data, tmp_path):
    manifest = Manifest.read(sample_data["digits"])
    frame = manifest.frame.head(12).copy()
    frame["image"] = manifest.values("image", "image")[:12]
    frame["sketch"] = manifest.values("sketch", "image")[:12]
    frame.loc[3, "sketch"] = str(tmp_path / "missing.png")
    bad = tmp_path / "manifest.csv"
    frame.to_csv(bad, index=False)
    with pytest.raises(ManifestError, match=rf"id '{frame.loc[3, 'id']}', column 'sketch'"):
        contrastive_train(ContrastiveParams(manifest=str(bad), config={"epochs": 1, "batch_size": 4},
                                            out_dir=str(tmp_path / "out")))
