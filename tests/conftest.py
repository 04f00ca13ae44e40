"""Session-wide real services: one Prefect test server and one MLflow sqlite store per test session.

Both are real (no mocks); they are started once because each costs seconds to boot.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests_support import ROOT, TINY_VIT  # noqa: F401

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
os.environ["HF_HUB_OFFLINE"] = "1"  # the suite must never reach a hub, even by accident



@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """A real sqlite-backed MLflow store for the session; flows find it through the env var."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.search_experiments()  # create the schema once, before anything fans out
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's real (ephemeral, sqlite) server, booted once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory) -> dict[str, Path]:
    """The project's own sample data (digits, scenes, stereo, a small Fashion-MNIST), built once into a temp folder."""
    from data.build import build_all

    return build_all(tmp_path_factory.mktemp("sample"), n_scenes=60, fashion_size=200)
