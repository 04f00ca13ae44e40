"""Flow: a manifest column through a frozen encoder into an HDF5 store, as one MLflow run."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from encoders.extract import extract, store_path
from encoders.factory import load_encoder
from encoders.manifest import Manifest
from encoders.store.shards import (extract_rows, merge_shards, remove_shards, shard_ranges, shard_store_path,
                             static_error_check)
from encoders.spec import EncoderSpec
from flows.tracking import runlog
from flows.tracking.runlog import interval_s, items_line
from flows.errors import check_paths
from flows import errors, process_guard


from flows.tracking import recovery
from flows.tracking import runs
process_guard.install()  # every flow module imports this one: its ephemeral Prefect server dies with it


class ExtractParams(BaseModel):
    """What to embed, with which encoder, and where the store goes."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(description="CSV or Parquet manifest with an 'id' column; paths are relative to it.")
    column: str = Field(description="The modality column to embed (image paths or texts), e.g. 'image', 'caption'.")
    encoder: str = Field(
        description="Encoder spec BACKEND:TOWER:MODEL[@WEIGHTS][?OPTIONS], "
        "e.g. 'open_clip:image:ViT-B-32@/ckpt/model.safetensors' or 'hf:text:/models/minilm?pooling=mean'."
    )
    out_dir: str = Field(default="runs/stores", description="Stores go to OUT_DIR/DATASET/COLUMN--ENCODER.h5.")
    on_error: Literal["skip", "fail"] = Field(
        default="skip", description="Bad rows: 'skip' records them in the errors table; 'fail' stops at the first."
    )
    store_dtype: Literal["float32", "float16"] = Field(default="float32", description="On-disk embedding dtype.")
    batch_size: int | None = Field(default=None, ge=1, description="Overrides the encoder spec's batch size.")
    cpu_workers: int | None = Field(
        default=None, ge=1,
        description="On the CPU, encode each batch as this many slices in parallel, one torch thread each "
        "(empty: one per torch thread while slices keep >= 8 items; 1: torch's own multi-threading). "
        "Speed only: embeddings are the same up to float rounding.",
    )
    refresh: bool = Field(default=False, description="Rebuild the store even if a complete one exists.")
    experiment: str | None = Field(default=None, description="MLflow experiment (default: xmodal-extract-DATASET, DATASET being the manifest's name).")
    tracking_uri: str | None = Field(default=None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db).")
    parent_run_id: str | None = Field(default=None, description="Nest this run under an MLflow parent run.")
    shards: int = Field(
        default=1, ge=1,
        description="Split the manifest into this many contiguous row ranges and embed them in parallel on Dask "
        "(one task per shard, each loading the encoder in its own worker), then merge them into the one store. "
        "1 = in this process. The merged store equals the single-process one.",
    )
    dask_address: str | None = Field(
        default=None,
        description="Dask scheduler to run the shards on, e.g. 'tcp://127.0.0.1:8786'. Empty: start a local "
        "cluster with `shards` worker processes of one thread each. Used only when shards > 1.",
    )

    @field_validator("encoder")
    @classmethod
    def _valid_spec(cls, v: str) -> str:
        EncoderSpec.parse(v)
        return v


def _transient(task, task_run, state) -> bool:
    """Retry I/O hiccups and device errors, never bad input or a missing model: those fail the same way twice."""
    try:
        state.result()
    except Exception as exc:
        return errors.is_transient(exc)  # a full disk or an out_dir that is a file fails the same way again
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
      cache_key_fn=extraction_cache_key, persist_result=True,
      result_serializer="json")  # the cached summary is plain data: no pickle written or read (cloudpickle is the default)
def extract_store(params: ExtractParams) -> dict:
    if params.shards > 1:  # the cache key and retries above cover the sharded path too: same inputs, same store
        return extract_sharded.with_options(task_runner=dask_task_runner(params))(params)
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
    last = {"t": time.monotonic(), "logged": time.monotonic(), "t0": time.monotonic()}
    every = interval_s()

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)
        if time.monotonic() - last["logged"] >= every and done < total:  # the run log, at least once a minute
            logger.info(items_line(f"extract {manifest.name}/{params.column}", done, total,
                                   time.monotonic() - last["t0"]))
            last["logged"] = time.monotonic()
        # Each update is an API call the server also works on: on two cores, at most one per 5 s.
        if time.monotonic() - last["t"] >= 5.0 and done < total:
            update_progress_artifact(artifact, 100.0 * done / max(total, 1))
            last["t"] = time.monotonic()

    try:
        summary = extract(manifest, params.column, encoder, store, on_error=params.on_error,
                          store_dtype=params.store_dtype, batch_size=params.batch_size,
                          overwrite=params.refresh, progress=progress, cpu_workers=params.cpu_workers)
    finally:
        bar.close()
    update_progress_artifact(artifact, 100.0)
    out = summary.__dict__ | {"weights_origin": encoder.origin, "weights_digest": encoder.digest,
                              "encoder_spec": str(encoder.spec), "batch_size": params.batch_size or encoder.spec.batch_size}
    out["errors"] = [list(e) for e in summary.errors]
    return out


# ---------------------------------------------------------------------------------------------
# Scale-out: shards on Dask
# ---------------------------------------------------------------------------------------------


def dask_task_runner(params: ExtractParams):
    """The task runner for the shards: an existing scheduler, or a LocalCluster of `shards` 1-thread processes."""
    from prefect_dask import DaskTaskRunner

    if params.dask_address:
        return DaskTaskRunner(address=params.dask_address)
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": params.shards, "threads_per_worker": 1, "processes": True,
        "dashboard_address": "127.0.0.1:0",  # no fixed port; nothing listens beyond localhost
    })


@task(name="extract-shard", retries=2, retry_delay_seconds=2, retry_condition_fn=_transient,
      cache_policy=NO_CACHE, persist_result=False)
def extract_shard(manifest: str, column: str, encoder: str, store: str, lo: int, hi: int, on_error: str,
                  store_dtype: str, batch_size: int | None, overwrite: bool) -> dict:
    """Rows [lo, hi) into the shard store at `store`. Plain arguments only: it runs in a Dask worker
    process, which reads the manifest and loads the encoder itself (no handle crosses processes)."""
    logger = get_run_logger()
    m = Manifest.read(manifest)
    enc = load_encoder(encoder)
    logger.info("shard rows [%d, %d) of %s with %s -> %s", lo, hi, m.path, enc.spec, store)
    started = time.time()  # wall clock, so the flow can measure the span over all shards
    s = extract_rows(m, column, enc, store, lo, hi, on_error=on_error, store_dtype=store_dtype,
                     batch_size=batch_size, overwrite=overwrite)
    out = s.__dict__ | {"lo": lo, "hi": hi, "weights_origin": enc.origin, "weights_digest": enc.digest,
                        "encoder_spec": str(enc.spec), "encoded": round(s.items_per_s * s.seconds),
                        "started": started, "ended": time.time()}
    out["errors"] = [list(e) for e in s.errors]
    return out


def _store_summary(store: Path, manifest: Manifest, column: str, shard_results: list[dict], seconds: float,
                   batch_size: int) -> dict:
    """The single-process summary's shape, read back from the merged store.

    ``seconds`` is what the caller waited (cluster start, worker imports, encoding, merge);
    ``items_per_s`` is the aggregate encoding rate: items encoded over the wall-clock span from
    the first shard's start to the last shard's end (right whether shards overlapped or queued).
    """
    import pandas as pd

    from encoders.store import EmbeddingStore

    encoded = sum(r["encoded"] for r in shard_results)
    span = max(r["ended"] for r in shard_results) - min(r["started"] for r in shard_results)
    st = EmbeddingStore(store)
    errors = [list(e) for e in st.errors().itertuples(index=False, name=None)]
    csv = None
    if errors:
        csv = str(store.with_suffix(".errors.csv"))
        pd.DataFrame(errors, columns=["id", "reason"]).assign(column=column).to_csv(csv, index=False)
    first = shard_results[0]
    return {
        "store": str(store), "dataset": manifest.name, "modality": column, "column": column, "n": st.n,
        "n_errors": len(errors), "dim": st.dim, "dtype": str(st.attrs["dtype"]), "rows_total": len(manifest),
        "resumed_from": sum(r["resumed_from"] for r in shard_results), "seconds": seconds,
        "items_per_s": encoded / span if span > 0 and encoded else 0.0, "encode_seconds": span,
        "reused": all(r["reused"] for r in shard_results), "errors_csv": csv, "errors": errors,
        "weights_origin": first["weights_origin"], "weights_digest": first["weights_digest"],
        "encoder_spec": first["encoder_spec"], "batch_size": batch_size, "shards": len(shard_results),
    }


@flow(name="extract_sharded", log_prints=True, **errors.FLOW_RESULTS)
def extract_sharded(params: ExtractParams) -> dict:
    """One task per contiguous row range on the flow's (Dask) task runner, then one merged store.

    Returns the same summary as the single-process `extract-store` task, plus `shards`.
    """
    logger = get_run_logger()
    manifest = Manifest.read(params.manifest)
    manifest.require(params.column)
    spec = EncoderSpec.parse(params.encoder)
    store = store_path(params.out_dir, manifest.name, params.column, spec.slug)
    static = manifest.static_errors(params.column)  # on the FULL manifest: duplicates across shards count
    static_error_check(manifest, params.column, static, params.on_error)
    batch_size = params.batch_size or spec.batch_size
    if not params.refresh and _store_complete(str(store)):
        # A finished store: reuse it if it was made from these inputs, refuse it if not, exactly as
        # the single-process path does (StoreWriter checks the identity attrs, weights included).
        encoder = load_encoder(params.encoder)
        s = extract(manifest, params.column, encoder, store, on_error=params.on_error,
                    store_dtype=params.store_dtype, batch_size=params.batch_size)
        out = s.__dict__ | {"weights_origin": encoder.origin, "weights_digest": encoder.digest,
                            "encoder_spec": str(encoder.spec), "batch_size": batch_size, "shards": params.shards}
        out["errors"] = [list(e) for e in s.errors]
        return out

    ranges = shard_ranges(len(manifest), params.shards, align=batch_size)
    logger.info("%s/%s: %d rows in %d shards %s", manifest.name, params.column, len(manifest), len(ranges), ranges)
    t0 = time.perf_counter()
    paths = [str(shard_store_path(store, i, len(ranges))) for i in range(len(ranges))]
    futures = [
        extract_shard.with_options(task_run_name=f"extract-shard-{i}-of-{len(ranges)}").submit(
            str(manifest.path), params.column, params.encoder, path, lo, hi, params.on_error, params.store_dtype,
            params.batch_size, params.refresh)
        for i, ((lo, hi), path) in enumerate(zip(ranges, paths))
    ]
    artifact = create_progress_artifact(0.0, key=_key("extract", manifest.name, params.column),
                                        description=f"Embedding {manifest.name}/{params.column} in {len(ranges)} shards")
    from prefect.futures import as_completed

    rows = 0
    for fut in as_completed(futures):
        r = fut.result()
        rows += r["hi"] - r["lo"]
        update_progress_artifact(artifact, 100.0 * rows / max(len(manifest), 1))
    results = [f.result() for f in futures]  # shard order
    seconds = time.perf_counter() - t0
    merge_shards(paths, store, {"manifest_digest": manifest.digest(params.column),
                                "manifest_path": str(manifest.path), "seconds": seconds})
    remove_shards(store)
    seconds = time.perf_counter() - t0
    update_progress_artifact(artifact, 100.0)
    return _store_summary(store, manifest, params.column, results, seconds, batch_size)


def _extract_once(params: ExtractParams) -> dict:
    """The store-building task, reusing Prefect's cached result only while its store still exists."""
    t0 = time.perf_counter()
    state = extract_store.with_options(refresh_cache=params.refresh)(params, return_state=True)
    s = state.result()
    if state.is_completed() and state.name == "Cached":
        if _store_complete(s["store"]):
            s = s | {"reused": True, "cached": True}
        else:  # a cached result whose store was deleted since: rebuild it
            s = extract_store.with_options(refresh_cache=True)(params)
    return s | {"task_seconds": time.perf_counter() - t0}  # what the extraction step cost this run


@flow(name="extract_embeddings", log_prints=True, flow_run_name=runlog.extract_name, **errors.FLOW_RESULTS)
def extract_embeddings(params: ExtractParams) -> dict:
    """Embed one manifest column with one frozen encoder; returns the store summary and MLflow run id."""
    check_paths(manifest=params.manifest)
    runs.tracking_uri(params.tracking_uri)
    dataset = Manifest.read(params.manifest).name
    spec = EncoderSpec.parse(params.encoder)  # the store this run writes is the work a killed run left undone
    with runs.stage_run("extract", dataset, f"extract {dataset}/{params.column}", experiment=params.experiment,
                            parent_run_id=params.parent_run_id, tags={"xmodal.modality": params.column},
                            work=store_path(params.out_dir, dataset, params.column, spec.slug)) as run:
        run_id = run.run_id
        s = _extract_once(params)
        run.log_params({
            "encoder_spec": s["encoder_spec"], "dataset": dataset, "column": params.column, "manifest": params.manifest,
            "N": s["n"], "dim": s["dim"], "dtype": s["dtype"], "batch_size": s["batch_size"],
            "on_error": params.on_error, "store": s["store"], "shards": params.shards,
            "cpu_workers": s.get("cpu_workers", 1),
        })
        run.log_metrics({k: s[k] for k in ("items_per_s", "n", "seconds", "task_seconds", "rows_total", "resumed_from")}
                        | {"errors": s["n_errors"]})
        run.set_tags({"weights_origin": s["weights_origin"], "xmodal.weights_digest": s["weights_digest"],
                      "xmodal.reused_store": str(s["reused"]).lower(),
                      "xmodal.prefect_cached": str(s.get("cached", False)).lower()})
        summary = {k: v for k, v in s.items() if k != "errors"}
        run.log_json(summary, "store_summary.json")
        if s["errors_csv"]:
            run.log_file(s["errors_csv"])
    # a store reused as it was (Prefect's cache, or complete on disk) was not encoded now: no rate to show
    rate = "served from cache" if s["reused"] else f"{s['items_per_s']:.0f} items/s"
    md = (f"### Extracted {dataset}/{params.column}\n\n| store | N | dim | errors | items/s | weights | MLflow run |\n"
          f"|---|---|---|---|---|---|---|\n| `{Path(s['store']).name}` | {s['n']} | {s['dim']} | {s['n_errors']} | "
          f"{rate} | {s['weights_origin']} | `{run_id}` |\n")
    create_markdown_artifact(md, key=_key("extract-summary", dataset, params.column))
    print(f"{dataset}/{params.column}: {s['n']} x {s['dim']} ({s['n_errors']} errors, "
          f"{rate}, {s['weights_origin']}) -> {s['store']}  [mlflow run {run_id}]")
    return summary | {"run_id": run_id}
