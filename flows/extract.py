"""Flow: a manifest column through a frozen encoder into an HDF5 store, as one MLflow run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows import _env  # noqa: F401

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from tqdm.auto import tqdm

from encoders.extract import ExtractionError, extract, store_path
from encoders.factory import load_encoder
from encoders.frozen import EncoderUnavailable
from encoders.manifest import Manifest, ManifestError
from encoders.spec import EncoderSpec
from encoders.store import StoreError
from flows import tracking


class ExtractParams(BaseModel):
    """What to embed, with which encoder, and where the store goes."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(description="CSV or Parquet manifest with an 'id' column; paths are relative to it.")
    column: str = Field(description="The modality column to embed (image paths or texts), e.g. 'image', 'caption'.")
    encoder: str = Field(
        description="Encoder spec '<backend>:<tower>:<model>[@weights][?opts]', "
        "e.g. 'open_clip:image:ViT-B-32@/ckpt/model.safetensors' or 'hf:text:/models/minilm?pooling=mean'."
    )
    out_dir: str = Field(default="runs/stores", description="Stores go to <out_dir>/<dataset>/<column>--<encoder>.h5.")
    on_error: Literal["skip", "fail"] = Field(
        default="skip", description="Bad rows: 'skip' records them in the errors table; 'fail' stops at the first."
    )
    store_dtype: Literal["float32", "float16"] = Field(default="float32", description="On-disk embedding dtype.")
    batch_size: int | None = Field(default=None, ge=1, description="Overrides the encoder spec's batch size.")
    refresh: bool = Field(default=False, description="Rebuild the store even if a complete one exists.")
    experiment: str | None = Field(default=None, description="MLflow experiment (default 'xmodal-extract-<dataset>').")
    tracking_uri: str | None = Field(default=None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db).")
    parent_run_id: str | None = Field(default=None, description="Nest this run under an MLflow parent run.")

    @field_validator("encoder")
    @classmethod
    def _valid_spec(cls, v: str) -> str:
        EncoderSpec.parse(v)
        return v


def _transient(task, task_run, state) -> bool:
    """Retry I/O hiccups and device errors, never bad input or a missing model: those fail the same way twice."""
    try:
        state.result()
    except (ExtractionError, EncoderUnavailable, ManifestError, StoreError, ValueError, KeyError):
        return False
    except Exception:
        return True
    return False


def _key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def _weights_fingerprint(spec: EncoderSpec) -> str:
    """Cheap stand-in for the weights digest: what names the weights, and the files' size and mtime."""
    parts = [spec.identity]
    for candidate in (spec.weights, spec.model, spec.model.removeprefix("local-dir:")):
        if candidate and Path(candidate).exists():
            p = Path(candidate)
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            parts += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    return "|".join(parts)


def extraction_cache_key(context, parameters: dict) -> str | None:
    """Manifest content x encoder x weights x destination: the same inputs reuse the same store."""
    import hashlib

    params: ExtractParams = parameters["params"]
    try:
        manifest = Manifest.read(params.manifest)
        spec = EncoderSpec.parse(params.encoder)
        key = "|".join([manifest.digest(params.column), _weights_fingerprint(spec),
                        str(Path(params.out_dir).resolve()), params.column, params.store_dtype, params.on_error])
    except Exception:  # an unreadable manifest is reported by the task itself
        return None
    return "extract-" + hashlib.sha256(key.encode()).hexdigest()


def _store_complete(path: str) -> bool:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete", False))
    except OSError:
        return False


@task(name="extract-store", retries=2, retry_delay_seconds=2, retry_condition_fn=_transient,
      cache_key_fn=extraction_cache_key, persist_result=True)
def extract_store(params: ExtractParams) -> dict:
    logger = get_run_logger()
    manifest = Manifest.read(params.manifest)
    manifest.require(params.column)
    encoder = load_encoder(params.encoder)
    store = store_path(params.out_dir, manifest.name, params.column, encoder.spec.slug)
    if encoder.origin == "random-init":
        logger.warning("encoder %s has RANDOM-INIT weights: its embeddings carry no pretrained knowledge",
                       encoder.spec)
    artifact = create_progress_artifact(0.0, key=_key("extract", manifest.name, params.column),
                                        description=f"Embedding {manifest.name}/{params.column}")
    bar = tqdm(total=len(manifest), desc=f"{manifest.name}/{params.column}", unit="item", leave=False)
    last = {"pct": 0.0}

    def progress(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()
        pct = 100.0 * done / max(total, 1)
        if pct - last["pct"] >= 5 or done == total:
            update_progress_artifact(artifact, pct)
            last["pct"] = pct

    try:
        summary = extract(manifest, params.column, encoder, store, on_error=params.on_error,
                          store_dtype=params.store_dtype, batch_size=params.batch_size,
                          overwrite=params.refresh, progress=progress)
    finally:
        bar.close()
    update_progress_artifact(artifact, 100.0)
    out = summary.__dict__ | {"weights_origin": encoder.origin, "weights_digest": encoder.digest,
                              "encoder_spec": str(encoder.spec), "batch_size": params.batch_size or encoder.spec.batch_size}
    out["errors"] = [list(e) for e in summary.errors]
    return out


@flow(name="extract_embeddings", log_prints=True)
def extract_embeddings(params: ExtractParams) -> dict:
    """Embed one manifest column with one frozen encoder; returns the store summary and MLflow run id."""
    tracking.tracking_uri(params.tracking_uri)
    dataset = Manifest.read(params.manifest).name
    exp = tracking.experiment_id(params.experiment or f"xmodal-extract-{dataset}")
    tags = {"xmodal.stage": "extract", "xmodal.dataset": dataset, "xmodal.modality": params.column}
    if params.parent_run_id:
        tags["mlflow.parentRunId"] = params.parent_run_id
    run = mlflow.MlflowClient().create_run(exp, run_name=f"extract {dataset}/{params.column}", tags=tags)
    run_id = run.info.run_id
    try:
        state = extract_store.with_options(refresh_cache=params.refresh)(params, return_state=True)
        s = state.result()
        if state.is_completed() and state.name == "Cached":
            if _store_complete(s["store"]):
                s = s | {"reused": True, "cached": True}
            else:  # a cached result whose store was deleted since: rebuild it
                s = extract_store.with_options(refresh_cache=True)(params)
        tracking.log_params(run_id, {
            "encoder_spec": s["encoder_spec"], "dataset": dataset, "column": params.column, "manifest": params.manifest,
            "N": s["n"], "dim": s["dim"], "dtype": s["dtype"], "batch_size": s["batch_size"],
            "on_error": params.on_error, "store": s["store"],
        })
        tracking.log_metrics(run_id, {"items_per_s": s["items_per_s"], "errors": s["n_errors"], "n": s["n"],
                                      "seconds": s["seconds"], "rows_total": s["rows_total"],
                                      "resumed_from": s["resumed_from"]})
        client = mlflow.MlflowClient()
        client.set_tag(run_id, "weights_origin", s["weights_origin"])
        client.set_tag(run_id, "xmodal.weights_digest", s["weights_digest"])
        client.set_tag(run_id, "xmodal.reused_store", str(s["reused"]).lower())
        client.set_tag(run_id, "xmodal.prefect_cached", str(s.get("cached", False)).lower())
        summary = {k: v for k, v in s.items() if k != "errors"}
        tracking.log_json(run_id, summary, "store_summary.json")
        if s["errors_csv"]:
            tracking.log_file(run_id, s["errors_csv"])
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        mlflow.MlflowClient().set_terminated(run_id, "FAILED")
        raise
    md = (f"### Extracted {dataset}/{params.column}\n\n| store | N | dim | errors | items/s | weights | MLflow run |\n"
          f"|---|---|---|---|---|---|---|\n| `{Path(s['store']).name}` | {s['n']} | {s['dim']} | {s['n_errors']} | "
          f"{s['items_per_s']:.1f} | {s['weights_origin']} | `{run_id}` |\n")
    create_markdown_artifact(md, key=_key("extract-summary", dataset, params.column))
    print(f"{dataset}/{params.column}: {s['n']} x {s['dim']} ({s['n_errors']} errors, "
          f"{s['items_per_s']:.0f} items/s, {s['weights_origin']}) -> {s['store']}  [mlflow run {run_id}]")
    return summary | {"run_id": run_id}
