"""Promote a stage-1 run's projector into the MLflow Model Registry under a name and an alias.

What a user does after ``xmodal compare``: pick the run, register its projector (``models:/<name>@champion``),
and load it anywhere with ``mlflow.pyfunc.load_model``: raw inputs in, target-space embeddings out
(see flows/tracking/served.py). The registered version carries the encoders' specs, digests and dims as tags too, so the
registry UI shows what the model expects.
"""

from __future__ import annotations

import json


import mlflow
from mlflow.tracking import MlflowClient

from flows.tracking import runs
from flows.tracking.served import META_FILE


def promote(run_id: str, name: str, alias: str = "champion", artifact: str = "projector",
            tracking_uri: str | None = None) -> dict:
    """Register ``runs:/<run_id>/<artifact>`` as a new version of ``name`` and point ``alias`` at it."""
    runs.tracking_uri(tracking_uri)
    client = MlflowClient()
    run = client.get_run(run_id)  # an unknown id fails here, naming it
    if run.data.tags.get("xmodal.stage") != "align":
        raise ValueError(f"run {run_id} is a {run.data.tags.get('xmodal.stage', 'non-xmodal')} run; promote the "
                         "align run (stage 1) that trained the projector (`xmodal compare --stage align` lists them)")
    uri = f"runs:/{run_id}/{artifact}"
    try:
        meta = json.loads(mlflow.artifacts.load_text(f"{uri}/artifacts/{META_FILE}"))
    except Exception:
        raise ValueError(f"run {run_id} has no no-pickle xmodal projector model at {artifact!r} (runs logged before "
                         "the safetensors pyfunc format hold a pickle, which is not promoted); rerun align") from None
    version = mlflow.register_model(uri, name, tags=_tags(meta))
    client.set_registered_model_alias(name, alias, version.version)
    src, tgt = meta["source"], meta["target"]
    client.update_model_version(name, version.version,
                                description=f"{src['modality']} ({src['encoder_spec']}) -> {tgt['modality']} space "
                                            f"({tgt['encoder_spec']}); from run {run_id}")
    return {"name": name, "alias": alias, "version": version.version, "run_id": run_id,
            "uri": f"models:/{name}@{alias}"}


def _tags(meta: dict) -> dict[str, str]:
    return {f"{side}.{key}": str(meta[side][key]) for side in ("source", "target")
            for key in ("encoder_spec", "weights_digest", "dim", "modality")}
