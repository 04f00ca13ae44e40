"""The extract_embeddings flow on the project's sample data, against a real Prefect server and MLflow store."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from encoders.compute import plan_workers
from encoders.factory import load_encoder
from encoders.store import EmbeddingStore
from flows.extract import ExtractParams, extract_embeddings
from tests_support import TINY_VIT


def test_flow_writes_store_and_tracks_run(prefect_server, mlflow_uri, sample_data, tmp_path):
    manifest = sample_data["digits"]
    spec = f"open_clip:image:{TINY_VIT}?batch_size=128"
    out = extract_embeddings(ExtractParams(manifest=str(manifest), column="sketch", encoder=spec, out_dir=str(tmp_path)))
    store = EmbeddingStore(out["store"])
    assert len(store) == 1797 and store.dim == 64 and out["n_errors"] == 0
    frame = pd.read_csv(manifest)
    assert list(store.ids) == list(frame["id"])
    enc = load_encoder(spec)
    some = [str(manifest.parent / p) for p in frame["sketch"][:50]]
    np.testing.assert_allclose(store.embeddings()[:50], enc.encode_items(some).numpy(), atol=1e-5)

    run = MlflowClient().get_run(out["run_id"])
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["encoder_spec"] == str(enc.spec) and p["dataset"] == "digits" and p["N"] == "1797"
    assert p["dim"] == "64" and p["dtype"] == "float32"
    assert p["cpu_workers"] == str(plan_workers(enc.device, 128, torch.get_num_threads(), None)[0])
    assert m["items_per_s"] > 0 and m["errors"] == 0
    assert t["weights_origin"] == "random-init"
    arts = {a.path for a in MlflowClient().list_artifacts(out["run_id"])}
    assert "store_summary.json" in arts
    assert mlflow.get_experiment(run.info.experiment_id).name == "xmodal-extract-digits"


def test_flow_logs_errors_table_and_rejects_bad_params(prefect_server, mlflow_uri, tmp_path):
    (tmp_path / "m.csv").write_text("id,caption\na,a cat\nb,\nc,a dog\n")
    spec = f"open_clip:text:{TINY_VIT}"
    out = extract_embeddings(ExtractParams(manifest=str(tmp_path / "m.csv"), column="caption", encoder=spec,
                                           out_dir=str(tmp_path)))
    assert out["n"] == 2 and out["n_errors"] == 1
    arts = {a.path for a in MlflowClient().list_artifacts(out["run_id"])}
    assert any(a.endswith(".errors.csv") for a in arts)
    with pytest.raises(ValueError, match="encoder"):
        ExtractParams(manifest="m.csv", column="caption", encoder="not-a-spec")


def test_second_identical_extraction_is_cached_and_refresh_forces_it(prefect_server, mlflow_uri, sample_data, tmp_path):
    """The extraction step of the second run is a cache hit: a small fraction of the first's time.
    (The whole flow also pays ~1 s of MLflow/Prefect bookkeeping either way.)"""
    import os
    import time

    from tests_support import TINY_RN

    manifest = sample_data["digits"].parent / "manifest_600.csv"
    if not manifest.exists():
        pd.read_csv(sample_data["digits"]).head(600).to_csv(manifest, index=False)
    params = ExtractParams(manifest=str(manifest), column="image", encoder=f"open_clip:image:{TINY_RN}?batch_size=64",
                           out_dir=str(tmp_path / "stores"))
    t0 = time.perf_counter()
    first = extract_embeddings(params)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = extract_embeddings(params, return_state=True)
    second = state.result()
    t_second = time.perf_counter() - t0
    said: list[str] = []
    for _ in range(30):  # what the run log says (shipped to the server in batches): not a rate it did not measure
        with get_client(sync_client=True) as client:
            said = [log.message for log in client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))]
        if any("mlflow run" in m for m in said):
            break
        time.sleep(1)
    assert any("served from cache" in m for m in said) and not any("0 items/s" in m for m in said), said
    print(f"extraction step: first {first['task_seconds']:.2f} s, cached second {second['task_seconds']:.2f} s; "
          f"whole flow runs {t_first:.2f} s and {t_second:.2f} s (MLflow + Prefect bookkeeping included)")
    assert not first.get("cached") and second.get("cached") and second["store"] == first["store"]
    assert MlflowClient().get_run(second["run_id"]).data.tags["xmodal.prefect_cached"] == "true"
    assert second["task_seconds"] < 0.25 * first["task_seconds"], (first["task_seconds"], second["task_seconds"])
    refreshed = extract_embeddings(params.model_copy(update={"refresh": True}))
    assert not refreshed.get("cached") and refreshed["n"] == 600
    # a deleted store is rebuilt, not served from a stale cache entry
    os.remove(first["store"])
    rebuilt = extract_embeddings(params)
    assert EmbeddingStore(rebuilt["store"]).n == 600
