"""Flow: stage 2, optional unfreezing and task fine-tuning from a stage-1 projector.

Reports the task metric before (stage-1 projector + a head trained on frozen features) and after
(fine-tuned per the unfreeze policy) on the same held-out split, and the stage-1 alignment
metrics before and after, so any forgetting of the alignment is visible.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from flows._flow_module import expose_flow
from flows import _env  # noqa: F401

import mlflow
import torch
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from encoders.factory import load_encoder
from encoders.manifest import Manifest, ManifestError
from encoders.store import EmbeddingStore
from flows import reporting, tracking
from flows.extract import _key
from projection.config import SplitConfig
from projection.data import load_split, make_split
from projection.finetune import (TASK_METRIC, TaskData, evaluate_task, finetune as finetune_model,
                                 frozen_head_baseline, trainable_prefixes)
from projection.finetune_io import save_finetuned
from projection.finetune_config import FinetuneConfig
from projection.metrics import alignment_metrics
from projection.projector import load_projector


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


@flow(name="finetune", log_prints=True)
def finetune(params: FinetuneParams) -> dict:
    """Fine-tune encoder (per policy) + stage-1 projector + task head; report before/after and forgetting."""
    logger = get_run_logger()
    cfg = params.config
    tracking.tracking_uri(params.tracking_uri)
    manifest = Manifest.read(params.manifest)
    encoder_before = load_encoder(params.source_encoder)
    kind = encoder_before.modality
    items_all = dict(zip(manifest.frame["id"], manifest.values(params.source_column, kind)))
    frame = manifest.frame.drop_duplicates("id").set_index("id")
    _task_targets(params, frame.iloc[:1], list(frame.index[:1]))  # fail fast on a missing task column
    trainable_prefixes(encoder_before, cfg.unfreeze, cfg.last_n)  # ... and on a policy the encoder cannot meet
    if params.split_csv:
        split_ids = pd.read_csv(params.split_csv)
        ids = [i for i in split_ids["id"].astype(str) if i in items_all]
        split = load_split(params.split_csv, ids)
    else:
        ids = [i for i, v in items_all.items() if v is not None]
        split = make_split(ids, params.split.val_frac, params.split.test_frac, params.split.seed)
    parts = {name: [ids[i] for i in idx] for name, idx in split.items()}
    y = {name: _task_targets(params, frame, part) for name, part in parts.items()}
    if cfg.task == "classification":
        seen = set(y["train"].tolist())
        for name in ("val", "test"):
            unseen = sorted(set(y[name].tolist()) - seen)
            if unseen:
                example = [parts[name][k] for k in range(len(parts[name])) if y[name][k] in unseen][:3]
                raise ValueError(f"label(s) {unseen} in the {name} split never occur in training "
                                 f"(e.g. ids {example}); a classifier cannot learn them")
    data = {name: TaskData([items_all[i] for i in parts[name]], y[name]) for name in parts}

    run_dir = Path(params.out_dir) / f"{manifest.name}-{cfg.task}-{cfg.unfreeze}-{params.run_key()}"
    dataset = manifest.name
    exp = tracking.experiment_id(params.experiment or f"xmodal-finetune-{dataset}")
    tags = {"xmodal.stage": "finetune", "xmodal.dataset": dataset, "weights_origin": encoder_before.origin,
            **tracking.source_tags("finetune")}
    if params.parent_run_id:
        tags["mlflow.parentRunId"] = params.parent_run_id
    run_name = f"finetune {dataset}: {cfg.task}, unfreeze={cfg.unfreeze}" + (f"({cfg.last_n})" if cfg.unfreeze == "last_n" else "")
    metric = TASK_METRIC[cfg.task]
    with mlflow.start_run(experiment_id=exp, run_name=run_name, tags=tags) as run:
        run_id = run.info.run_id
        mlflow.log_params({f"finetune.{k}": v for k, v in cfg.model_dump().items()})
        mlflow.log_params({"projector_dir": params.projector_dir, "manifest": params.manifest,
                           "source_column": params.source_column, "source_encoder": params.source_encoder,
                           "n_train": len(parts["train"]), "n_val": len(parts["val"]), "n_test": len(parts["test"])})

        def logger_for(prefix: str):
            def on_epoch(event: str, step: int, metrics: dict[str, float]) -> None:
                if event == "epoch":
                    mlflow.log_metrics({f"{prefix}_{k}": v for k, v in metrics.items()
                                        if v is not None and k != "epoch"}, step=int(metrics.get("epoch", step)))
            return on_epoch

        # before: stage-1 projector + head on frozen features
        before = frozen_head_baseline(encoder_before, params.projector_dir, data["train"], data["val"], cfg,
                                      checkpoint_dir=run_dir / "ckpt-before", callback=logger_for("before"))
        test_before = evaluate_task(before.model, data["test"], cfg.eval_batch_size)
        # after: the chosen unfreeze policy, from the same stage-1 projector
        if cfg.unfreeze == "none":
            after, test_after, encoder_after = before, test_before, encoder_before
        else:
            encoder_after = load_encoder(params.source_encoder)
            after = finetune_model(encoder_after, params.projector_dir, data["train"], data["val"], cfg,
                                   checkpoint_dir=run_dir / "ckpt-after", callback=logger_for("after"))
            test_after = evaluate_task(after.model, data["test"], cfg.eval_batch_size)
        mlflow.log_metrics({f"before_test_{k}": v for k, v in test_before.items()})
        mlflow.log_metrics({f"after_test_{k}": v for k, v in test_after.items()})
        mlflow.log_metrics({"resumed_from_epoch": after.resumed_from_epoch or 0,
                            "n_trainable_encoder": after.n_trainable_encoder})

        forgetting = {}
        if params.target_store:  # the stage-1 alignment, before and after stage 2
            tgt = EmbeddingStore(params.target_store).get(parts["test"])
            items = [items_all[i] for i in parts["test"]]
            forgetting["stage1"] = _alignment(load_encoder(params.source_encoder), load_projector(params.projector_dir),
                                              items, tgt)
            forgetting["after_finetune"] = _alignment(encoder_after, after.model.projector, items, tgt)
            for name, m in forgetting.items():
                mlflow.log_metrics({f"alignment_{name}_{k}": v for k, v in m.items()})
        out_model = save_finetuned(after, run_dir / "model")
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            (d / "config.json").write_text(params.model_dump_json(indent=2))
            rows = {"before (frozen-feature head)": test_before, f"after (unfreeze={cfg.unfreeze})": test_after}
            pd.DataFrame.from_dict(rows, orient="index").to_csv(d / "task_metrics.csv")
            if forgetting:
                reporting.metrics_table(forgetting).to_csv(d / "alignment_metrics.csv")
            for f in d.iterdir():
                mlflow.log_artifact(str(f))
        mlflow.log_artifacts(str(out_model), artifact_path="finetuned")
    md = (f"### Stage 2: {run_name}\n\nMLflow run `{run_id}` · encoder weights: {encoder_before.origin}\n\n"
          f"| | test {metric} |\n|---|---|\n| before (frozen-feature head) | {test_before['metric']:.4f} |\n"
          f"| after (unfreeze={cfg.unfreeze}) | {test_after['metric']:.4f} |\n")
    if forgetting:
        md += "\nStage-1 alignment on the test split:\n\n" + reporting.markdown_table(reporting.metrics_table(forgetting))
    create_markdown_artifact(md, key=_key("finetune", dataset, cfg.task))
    tracking.link_artifact(run_id, _key("finetune-mlflow", dataset))
    logger.info("%s: test %s before %.4f, after %.4f (MLflow run %s)", run_name, metric, test_before["metric"],
                test_after["metric"], run_id)
    return {"run_id": run_id, "task": cfg.task, "metric": metric, "before": test_before, "after": test_after,
            "alignment": forgetting, "model_dir": str(out_model), "resumed_from_epoch": after.resumed_from_epoch,
            "weights_origin": encoder_before.origin}


expose_flow(__name__, "finetune")  # `from flows import finetune` calls the flow; `flows.finetune.X` is the module's
