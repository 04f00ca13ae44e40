"""Flow: stage 2, optional unfreezing and task fine-tuning from a stage-1 projector.

Reports the task metric before (stage-1 projector + a head trained on frozen features) and after
(fine-tuned per the unfreeze policy) on the same held-out split, and the stage-1 alignment
metrics before and after, so any forgetting of the alignment is visible.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field


import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from encoders.factory import load_encoder
from encoders.manifest import Manifest, ManifestError
from encoders.store import EmbeddingStore
from flows.tracking import reporting
from flows.tracking import runs
from flows.errors import FLOW_RESULTS
from flows.extract import _key
from flows.errors import check_paths
from flows.tracking import runlog
from flows.tracking.runlog import reported
from projection.align.config import SplitConfig
from projection.align.data import load_split, make_split
from projection.engine.run_folder import hold_run_folder
from projection.finetune.model import (TASK_METRIC, TaskData, evaluate_task, finetune as finetune_model,
                                 frozen_head_baseline, trainable_prefixes)
from projection.finetune.io import save_finetuned
from projection.finetune.distributed import launch, write_spec
from projection.finetune.config import FinetuneConfig
from projection.align.metrics import alignment_metrics
from projection.align.projector import load_projector


class FinetuneParams(BaseModel):
    """Stage 2: what to fine-tune (encoder + stage-1 projector), for which task, on which split."""

    model_config = ConfigDict(extra="forbid")

    projector_dir: str = Field(description="Stage-1 projector folder (projector.json + projector.safetensors).")
    manifest: str = Field(description="Manifest with the raw source inputs and the task column.")
    source_column: str = Field(description="Manifest column of the source modality (image paths or texts).")
    source_encoder: str = Field(description="Spec of the source encoder stage 1 was trained on.")
    config: FinetuneConfig = Field(FinetuneConfig(), description="Task, unfreeze policy, learning rates.")
    split_csv: str | None = Field(None, description="id -> split table from stage 1 (so test ids stay unseen); "
                                                    "default: a fresh split with `split`.")
    split: SplitConfig = Field(SplitConfig(), description="Used only without split_csv.")
    target_store: str | None = Field(None, description="Target-space store: retrieval targets, and the stage-1 "
                                                       "alignment metrics after fine-tuning (forgetting).")
    out_dir: str = Field("runs/finetune", description="Checkpoints and the fine-tuned model go here.")
    experiment: str | None = Field(None, description="MLflow experiment (default: xmodal-finetune-DATASET, DATASET being the manifest's name).")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db).")
    parent_run_id: str | None = Field(None, description="Nest this run under an MLflow parent run.")

    def run_key(self) -> str:
        cfg = self.model_dump(exclude={"experiment", "tracking_uri", "parent_run_id", "out_dir"})
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _task_targets(params: FinetuneParams, frame: pd.DataFrame, ids: list[str]) -> np.ndarray:
    cfg, manifest = params.config, params.manifest
    if cfg.task == "retrieval":
        if not params.target_store:
            raise ValueError("task 'retrieval' needs target_store (the target-space embeddings to retrieve)")
        return EmbeddingStore(params.target_store).get(ids)
    column = cfg.label_column if cfg.task == "classification" else cfg.target_column
    if not column or column not in frame.columns:
        raise ManifestError(f"manifest {manifest} has no column {column!r} for task {cfg.task!r} "
                            f"(columns: {', '.join(map(str, frame.columns))})")
    values = frame.loc[ids, column]
    if cfg.task == "classification":
        try:
            return values.astype(np.int64).to_numpy()
        except (TypeError, ValueError):
            raise ManifestError(f"manifest {manifest}: column {column!r} must hold integer class labels") from None
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.isna().any():
        bad = list(numeric[numeric.isna()].index[:5])
        raise ManifestError(f"manifest {manifest}: column {column!r} is not numeric for ids {bad}")
    return numeric.to_numpy(np.float32)


def _alignment(encoder, projector, items: list, y_target: np.ndarray) -> dict[str, float]:
    """Stage-1 metrics of (encoder, projector) on held-out items against their target embeddings."""
    embs = [encoder.encode_items(items[i:i + 128]) for i in range(0, len(items), 128)]
    with torch.no_grad():
        pred = projector.cpu().eval()(torch.cat(embs)).numpy()
    return alignment_metrics(pred, y_target)


@dataclass
class StageTwoInputs:
    """The task's data, split by id, read and checked before any run exists."""

    dataset: str
    weights_origin: str  # of the source encoder (pretrained / checkpoint / random-init)
    items: dict[str, Any]  # id -> raw input (image path or text)
    parts: dict[str, list[str]]  # split name -> ids
    data: dict[str, TaskData]  # split name -> (items, targets)


@dataclass
class StageTwoResult:
    """What the flow returns (and the pipeline's summary reads): before/after on the test split, forgetting."""

    run_id: str
    task: str
    metric: str
    before: dict[str, float]
    after: dict[str, float]
    alignment: dict[str, dict[str, float]]
    model_dir: str
    resumed_from_epoch: int | None
    weights_origin: str


def _split_ids(params: FinetuneParams, items: dict[str, Any]) -> tuple[list[str], dict]:
    if params.split_csv:
        ids = [i for i in pd.read_csv(params.split_csv)["id"].astype(str) if i in items]
        return ids, load_split(params.split_csv, ids)
    ids = [i for i, v in items.items() if v is not None]
    return ids, make_split(ids, params.split.val_frac, params.split.test_frac, params.split.seed)


def _check_classes(parts: dict[str, list[str]], y: dict[str, np.ndarray]) -> None:
    seen = set(y["train"].tolist())
    for name in ("val", "test"):
        unseen = sorted(set(y[name].tolist()) - seen)
        if unseen:
            example = [parts[name][k] for k in range(len(parts[name])) if y[name][k] in unseen][:3]
            raise ValueError(f"label(s) {unseen} in the {name} split never occur in training "
                             f"(e.g. ids {example}); a classifier cannot learn them")


@task(name="read-task-data", cache_policy=NO_CACHE)
def read_task_data(params: FinetuneParams) -> StageTwoInputs:
    """Manifest -> split task data; a missing column or a policy the encoder cannot meet fails here."""
    cfg = params.config
    manifest = Manifest.read(params.manifest)
    encoder = load_encoder(params.source_encoder)
    items = dict(zip(manifest.frame["id"], manifest.values(params.source_column, encoder.modality)))
    frame = manifest.frame.drop_duplicates("id").set_index("id")
    _task_targets(params, frame.iloc[:1], list(frame.index[:1]))  # fail fast on a missing task column
    trainable_prefixes(encoder, cfg.unfreeze, cfg.last_n)  # ... and on a policy the encoder cannot meet
    ids, split = _split_ids(params, items)
    parts = {name: [ids[i] for i in idx] for name, idx in split.items()}
    y = {name: _task_targets(params, frame, part) for name, part in parts.items()}
    if cfg.task == "classification":
        _check_classes(parts, y)
    data = {name: TaskData([items[i] for i in parts[name]], y[name]) for name in parts}
    return StageTwoInputs(manifest.name, encoder.origin, items, parts, data)


def _epoch_logger(run: runs.StageRun, prefix: str):
    def on_epoch(event: str, step: int, metrics: dict[str, float]) -> None:
        if event == "epoch":
            run.log_metrics({k: v for k, v in metrics.items() if v is not None and k != "epoch"},
                            step=int(metrics.get("epoch", step)), prefix=f"{prefix}_")
    return on_epoch


@task(name="train-before-and-after", cache_policy=NO_CACHE)
def train_before_and_after(params: FinetuneParams, inputs: StageTwoInputs, run_dir: Path, run: runs.StageRun):
    """(before, after, encoder_after): a head on frozen features, then the unfreeze policy, both resumable."""
    cfg, data = params.config, inputs.data
    encoder = load_encoder(params.source_encoder)
    before = frozen_head_baseline(encoder, params.projector_dir, data["train"], data["val"], cfg,
                                  checkpoint_dir=run_dir / "ckpt-before",
                                  callback=reported(_epoch_logger(run, "before"), "stage 2, head on frozen features"))
    if cfg.unfreeze == "none":
        return before, before, encoder
    encoder_after = load_encoder(params.source_encoder)
    if cfg.processes > 1:  # DDP workers train to the end; below, this process resumes their finished checkpoint
        launch(write_spec(run_dir / "ddp", params.source_encoder, params.projector_dir, data["train"], data["val"], cfg,
                          run_dir / "ckpt-after"), cfg.processes)
    after = finetune_model(encoder_after, params.projector_dir, data["train"], data["val"], cfg,
                           checkpoint_dir=run_dir / "ckpt-after",
                           callback=reported(_epoch_logger(run, "after"), f"stage 2, fine-tuning ({cfg.unfreeze})"))
    if cfg.processes > 1:  # the epochs ran in the workers: their history is the checkpoint's
        log = _epoch_logger(run, "after")
        for metrics in after.history:
            log("epoch", 0, metrics)
    return before, after, encoder_after


@task(name="measure-forgetting", cache_policy=NO_CACHE)
def measure_forgetting(params: FinetuneParams, inputs: StageTwoInputs, encoder_after, after) -> dict:
    """Stage-1 alignment on the test split with the stage-1 projector and after fine-tuning ({} without a target)."""
    if not params.target_store:
        return {}
    test = inputs.parts["test"]
    tgt, items = EmbeddingStore(params.target_store).get(test), [inputs.items[i] for i in test]
    return {"stage1": _alignment(load_encoder(params.source_encoder), load_projector(params.projector_dir), items, tgt),
            "after_finetune": _alignment(encoder_after, after.model.projector, items, tgt)}


def _log_outputs(run: runs.StageRun, params: FinetuneParams, out: StageTwoResult, after) -> None:
    run.log_metrics(out.before, prefix="before_test_")
    run.log_metrics(out.after, prefix="after_test_")
    run.log_metrics({"resumed_from_epoch": after.resumed_from_epoch or 0, "n_trainable_encoder": after.n_trainable_encoder})
    for name, m in out.alignment.items():
        run.log_metrics(m, prefix=f"alignment_{name}_")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "config.json").write_text(params.model_dump_json(indent=2))
        rows = {"before (frozen-feature head)": out.before, f"after (unfreeze={params.config.unfreeze})": out.after}
        pd.DataFrame.from_dict(rows, orient="index").to_csv(d / "task_metrics.csv")
        if out.alignment:
            reporting.metrics_table(out.alignment).to_csv(d / "alignment_metrics.csv")
        for f in d.iterdir():
            run.log_file(f)
    run.log_dir(out.model_dir, artifact_path="finetuned")


def _report(out: StageTwoResult, run_name: str, unfreeze: str, dataset: str, task_name: str) -> None:
    md = (f"### Stage 2: {run_name}\n\nMLflow run `{out.run_id}` · encoder weights: {out.weights_origin}\n\n"
          f"| | test {out.metric} |\n|---|---|\n| before (frozen-feature head) | {out.before['metric']:.4f} |\n"
          f"| after (unfreeze={unfreeze}) | {out.after['metric']:.4f} |\n")
    if out.alignment:
        md += "\nStage-1 alignment on the test split:\n\n" + reporting.markdown_table(reporting.metrics_table(out.alignment))
    create_markdown_artifact(md, key=_key("finetune", dataset, task_name))
    runs.link_artifact(out.run_id, _key("finetune-mlflow", dataset))
    get_run_logger().info("%s: test %s before %.4f, after %.4f (MLflow run %s)", run_name, out.metric,
                          out.before["metric"], out.after["metric"], out.run_id)


@flow(name="finetune", log_prints=True, flow_run_name=runlog.finetune_name, **FLOW_RESULTS)
def finetune(params: FinetuneParams) -> dict:
    """Fine-tune encoder (per policy) + stage-1 projector + task head; report before/after and forgetting."""
    check_paths(projector_dir=params.projector_dir, manifest=params.manifest, split_csv=params.split_csv,
                target_store=params.target_store)
    cfg = params.config
    runs.tracking_uri(params.tracking_uri)
    inputs = read_task_data(params)
    run_dir = Path(params.out_dir) / f"{inputs.dataset}-{cfg.task}-{cfg.unfreeze}-{params.run_key()}"
    run_name = (f"finetune {inputs.dataset}: {cfg.task}, unfreeze={cfg.unfreeze}"
                + (f"({cfg.last_n})" if cfg.unfreeze == "last_n" else ""))
    logged = {"projector_dir": params.projector_dir, "manifest": params.manifest, "source_column": params.source_column,
              "source_encoder": params.source_encoder, **{f"n_{k}": len(v) for k, v in inputs.parts.items()},
              **{f"finetune.{k}": v for k, v in cfg.model_dump().items()}}
    with hold_run_folder(run_dir), runs.stage_run(  # work: a killed run of this folder is marked KILLED, linked
            "finetune", inputs.dataset, run_name, experiment=params.experiment, parent_run_id=params.parent_run_id,
            tags={"weights_origin": inputs.weights_origin}, params=logged, work=run_dir) as run:
        before, after, encoder_after = train_before_and_after(params, inputs, run_dir, run)
        test_before = evaluate_task(before.model, inputs.data["test"], cfg.eval_batch_size)
        test_after = test_before if after is before else evaluate_task(after.model, inputs.data["test"], cfg.eval_batch_size)
        out = StageTwoResult(run.run_id, cfg.task, TASK_METRIC[cfg.task], test_before, test_after,
                             measure_forgetting(params, inputs, encoder_after, after),
                             str(save_finetuned(after, run_dir / "model")), after.resumed_from_epoch, inputs.weights_origin)
        _log_outputs(run, params, out, after)
    _report(out, run_name, cfg.unfreeze, inputs.dataset, cfg.task)
    return asdict(out)
