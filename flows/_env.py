"""Environment defaults that must be in place before prefect or mlflow is imported.

Prefect's telemetry and MLflow's pip probing both try the network; on an offline machine they
only add errors and delays. Users can still override any of these in their own environment.

Telemetry is off by default for every library here that phones home (README, "Telemetry"):
MLflow >= 3.2 resolves config.mlflow-telemetry.io from a background thread as soon as a run is
tracked, the Prefect server sends usage analytics, and huggingface_hub reports hub usage. Each is
set only when the user has not chosen: an explicit ``MLFLOW_DISABLE_TELEMETRY=false`` (or
``PREFECT_SERVER_ANALYTICS_ENABLED=true``, ``HF_HUB_DISABLE_TELEMETRY=0``) turns it back on.
We set each library's own switch rather than the global ``DO_NOT_TRACK``, so a user's
``DO_NOT_TRACK`` keeps its meaning for every other tool in the shell.
"""

import os

TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def apply_defaults() -> None:
    """Set each default the user has not set (called by ``flows/__init__.py``)."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # xmodal passes each logged model's pip requirements (flows/tracking/served.py); MLflow's uv detection would
    # also copy the whole project's uv.lock into every model and print four uv_utils lines per model.
    os.environ.setdefault("MLFLOW_UV_AUTO_DETECT", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
