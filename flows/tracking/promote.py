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
from flows.tracking.served import META_FILE, spec_parts


def promote(run_id: str, name: str, alias: str = "champion", artifact: str = "projector",
            tracking_uri: str | None = None) -> dict:
    """Register the run's logged model ``artifact`` as a new version of ``name`` and point ``alias`` at it."""
    runs.tracking_uri(tracking_uri)
    client = MlflowClient()
    run = client.get_run(run_id)  # an unknown id fails here, naming it
    if run.data.tags.get("xmodal.stage") != "align":
        raise ValueError(f"run {run_id} is a {run.data.tags.get('xmodal.stage', 'non-xmodal')} run; promote the "
                         "align run (stage 1) that trained the projector (`xmodal compare --stage align` lists them)")
    # The run's logged model by id: registering "runs:/<id>/projector" works too, but only after MLflow finds no
    # files there and warns "Run ... has no artifacts at artifact path 'projector'" (MLflow 3 keeps logged
    # models apart from run artifacts).
    found = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                        filter_string=f"source_run_id = '{run_id}' AND name = '{artifact}'")
    try:
        model = max(found, key=lambda m: m.creation_timestamp)  # the newest, should a rerun log a second
        meta = json.loads(mlflow.artifacts.load_text(f"{model.artifact_location}/artifacts/{META_FILE}"))
    except Exception:
        raise ValueError(f"run {run_id} has no no-pickle xmodal projector model at {artifact!r} (runs logged before "
                         "the safetensors pyfunc format hold a pickle, which is not promoted); rerun align") from None
    uri = f"models:/{model.model_id}"
    tags = _tags(meta)
    version = mlflow.register_model(uri, name, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    client.update_model_version(name, version.version,
                                description=f"{tags['source.modality']} ({tags['source.encoder_spec']}) -> "
                                            f"{tags['target.modality']} space ({tags['target.encoder_spec']}); "
                                            f"from run {run_id}")
    return {"name": name, "alias": alias, "version": version.version, "run_id": run_id,
            "uri": f"models:/{name}@{alias}"}


def _tags(meta: dict) -> dict[str, str]:
    """'source.modality': image/text (what the encoder embeds); 'source.column': the manifest column it came from;
    'source.encoder': the model without its options; the full spec, weights digest and dim beside them."""
    tags = {}
    for side in ("source", "target"):
        m = meta[side]
        parts = spec_parts(m["encoder_spec"])
        tags |= {f"{side}.modality": parts.get("modality", "unknown"), f"{side}.encoder": parts.get("encoder", "unknown"),
                 f"{side}.encoder_spec": str(m["encoder_spec"]), f"{side}.weights_digest": str(m["weights_digest"]),
                 f"{side}.dim": str(m["dim"])}
        if m.get("column"):
            tags[f"{side}.column"] = m["column"]
    return tags
