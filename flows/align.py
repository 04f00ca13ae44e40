"""Flow: stage 1, an MLP projector from a source store's space into a target store's space.

The story of the stage: join the two stores by id, split deterministically, fit the closed-form
baselines, train the projector (checkpointed, resumable), evaluate all of them on the held-out
split, and record everything in one MLflow run. The work happens in ``projection/``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows import _env  # noqa: F401

import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from encoders.manifest import Manifest
from encoders.store import EmbeddingStore, StoreError, join_stores
from flows import reporting, run_recovery, tracking
from flows.extract import _key
from projection.baselines import fit_baselines
from projection.config import BaselineConfig, LossConfig, ProjectorConfig, SplitConfig, TrainConfig
from projection.data import ChunkedPairs, InMemoryPairs, check_finite, check_split, make_split, save_split
from projection.losses import build_loss
from projection.metrics import alignment_metrics, similarity_matrix, zero_shot
from projection.projector import make_projector, save_projector
from projection.train import predict, train_projector


class ProjectorParams(ProjectorConfig):
    """The projector's shape; its dims default to the stores' dims (set them to assert them)."""

    d_in: int | None = Field(None, gt=0, description="Source dim; default: the source store's dim.")
    d_out: int | None = Field(None, gt=0, description="Target dim; default: the target store's dim.")

    @model_validator(mode="after")
    def _check_residual(self):  # dims may be unknown until the stores are read
        return self


class AlignParams(BaseModel):
    """Stage 1: which stores to align and how; every field shows in the Prefect UI form."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Source-modality store (.h5), e.g. image embeddings.")
    target: str = Field(description="Target-modality store (.h5) whose space the projector maps into.")
    projector: ProjectorParams = Field(default_factory=ProjectorParams, description="Projector architecture.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Training objective (MSE by default).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimiser, schedule, early stopping.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Deterministic train/val/test split by id.")
    baselines: BaselineConfig = Field(default_factory=BaselineConfig, description="Closed-form baselines.")
    label_column: str | None = Field(
        None, description="Manifest column with class labels (read from the source store's manifest) for zero-shot.")
    class_store: str | None = Field(
        None, description="Store of class-prompt embeddings in the target space (its manifest has the label column).")
    in_memory_max_gb: float = Field(4.0, gt=0, description="Load pairs into memory below this size; stream above.")
    out_dir: str = Field("runs/align", description="Projectors, checkpoints and splits go under this folder.")
    experiment: str | None = Field(None, description="MLflow experiment (default 'xmodal-align-<dataset>').")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db).")
    parent_run_id: str | None = Field(None, description="Nest this run under an MLflow parent run.")

    def run_key(self, src: EmbeddingStore, tgt: EmbeddingStore) -> str:
        """Same inputs and settings -> same folder, so a killed run resumes from its checkpoint."""
        cfg = self.model_dump(exclude={"experiment", "tracking_uri", "parent_run_id", "out_dir", "in_memory_max_gb"})
        cfg |= {"source_digest": src.digest, "target_digest": tgt.digest}
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _labels(store: EmbeddingStore, ids, column: str) -> np.ndarray:
    """Integer labels for ``ids`` from the manifest the store was built from."""
    manifest = Manifest.read(store.attrs["manifest_path"])
    table = manifest.frame.drop_duplicates("id").set_index("id")
    labels = table.reindex(list(ids))[manifest.require(column).name]
    if labels.isna().any():
        raise StoreError(f"manifest {manifest.path} has no {column!r} for ids {list(labels[labels.isna()].index[:5])}")
    return labels.to_numpy().astype(np.int64)


def _class_embeddings(class_store: str, column: str) -> np.ndarray:
    """(K, D) class-prompt embeddings, row k = label k."""
    cs = EmbeddingStore(class_store)
    labels = _labels(cs, cs.ids, column)
    k = int(labels.max()) + 1
    if sorted(labels.tolist()) != list(range(k)):
        raise StoreError(f"class store {class_store} must hold exactly one prompt per label 0..{k - 1}, got {sorted(labels)}")
    out = np.empty((k, cs.dim), np.float32)
    out[labels] = cs.embeddings()
    return out


@task(name="fit-baselines")
def fit_baselines_task(x_train: np.ndarray, y_train: np.ndarray, cfg: BaselineConfig) -> dict:
    return fit_baselines(x_train, y_train, cfg)


@flow(name="align", log_prints=True)
def align(params: AlignParams) -> dict:
    """Train a stage-1 projector source -> target and report it beside closed-form baselines."""
    logger = get_run_logger()
    tracking.tracking_uri(params.tracking_uri)
    src, tgt = EmbeddingStore(params.source), EmbeddingStore(params.target)
    pairs = join_stores(src, tgt)
    sname, tname = f"{Path(src.path).name}", f"{Path(tgt.path).name}"
    if pairs.dropped_source or pairs.dropped_target:
        logger.warning("joined %d pairs; %d source and %d target rows had no partner", len(pairs),
                       pairs.dropped_source, pairs.dropped_target)
    proj = params.projector
    for side, want, store in (("d_in", proj.d_in, src), ("d_out", proj.d_out, tgt)):
        if want is not None and want != store.dim:
            raise StoreError(f"projector {side}={want} disagrees with store {store.path} (dim {store.dim})")
    pcfg = ProjectorConfig(**(proj.model_dump() | {"d_in": src.dim, "d_out": tgt.dim}))

    nbytes = len(pairs) * (src.dim + tgt.dim) * 4
    in_memory = nbytes <= params.in_memory_max_gb * 2**30
    ids = list(pairs.ids)
    split = make_split(ids, params.split.val_frac, params.split.test_frac, params.split.seed)
    check_split(split, params.split.val_frac)  # before any training: tiny stores failed only at evaluation
    if in_memory:
        x, y = pairs.arrays()  # (N, D_src), (N, D_tgt)
        data = InMemoryPairs(x, y, ids, sname, tname)
        train_set, val_set, test_set = (data.subset(split[s]) for s in ("train", "val", "test"))
    else:  # stream train/val in chunks; the test split is held in memory for ranking metrics
        train_set = ChunkedPairs(pairs, 65536, split["train"], ids, sname, tname)
        val_set = ChunkedPairs(pairs, 65536, split["val"], ids, sname, tname)
        test_set = InMemoryPairs(*pairs.take(split["test"]), [ids[i] for i in split["test"]], sname, tname)
    key = params.run_key(src, tgt)
    run_dir = Path(params.out_dir) / f"{src.attrs.get('dataset', 'data')}-{src.attrs.get('modality')}-to-{tgt.attrs.get('modality')}-{key}"
    run_dir.mkdir(parents=True, exist_ok=True)
    save_split(ids, split, run_dir / "split.csv")

    labels = class_emb = None
    if params.label_column and params.class_store:
        labels = _labels(src, [ids[i] for i in split["test"]], params.label_column)
        class_emb = _class_embeddings(params.class_store, params.label_column)
        if class_emb.shape[1] != tgt.dim:
            raise StoreError(f"class store {params.class_store} has dim {class_emb.shape[1]}, target store {tgt.path} has {tgt.dim}")

    dataset = src.attrs.get("dataset", "data")
    exp = tracking.experiment_id(params.experiment or f"xmodal-align-{dataset}")
    tags = {"xmodal.stage": "align", "xmodal.dataset": dataset,
            "source_weights_origin": src.attrs.get("weights_origin", ""),
            "target_weights_origin": tgt.attrs.get("weights_origin", "")}
    if params.parent_run_id:
        tags["mlflow.parentRunId"] = params.parent_run_id
    tags |= run_recovery.claim(exp, run_dir)  # a run killed on this run_dir is marked KILLED and linked
    run_name = f"align {dataset}: {src.attrs.get('modality')} -> {tgt.attrs.get('modality')} ({pcfg.kind})"
    with mlflow.start_run(experiment_id=exp, run_name=run_name, tags=tags) as run:
        run_id = run.info.run_id
        mlflow.log_params(_flat({"projector": pcfg.model_dump(), "loss": params.loss.model_dump(),
                                 "train": params.train.model_dump(), "split": params.split.model_dump(),
                                 "baselines": params.baselines.model_dump()}))
        mlflow.log_params({"source_store": str(src.path), "target_store": str(tgt.path), "n_pairs": len(pairs),
                           "n_train": len(split["train"]), "n_val": len(split["val"]), "n_test": len(split["test"]),
                           "source_encoder": src.attrs.get("encoder_spec"), "target_encoder": tgt.attrs.get("encoder_spec"),
                           "in_memory": in_memory, "run_dir": str(run_dir)})
        for store, ctx in ((src, "source"), (tgt, "target")):
            ds = mlflow.data.from_numpy(np.zeros((0, store.dim), np.float32), source=str(store.path),
                                        name=Path(store.path).stem[:60], digest=store.digest)
            mlflow.log_input(ds, context=ctx)

        # closed-form baselines on the same split (on a 200k-pair sample when streaming)
        x_fit, y_fit = ((train_set.x.numpy(), train_set.y.numpy()) if in_memory
                        else pairs.take(split["train"][:200_000]))
        baselines = fit_baselines_task(x_fit, y_fit, params.baselines)

        def on_epoch(event: str, step: int, metrics: dict[str, float]) -> None:
            mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None and k != "epoch"}, step=step)

        model = make_projector(pcfg, seed=params.train.seed)
        model.fit_stats(x_fit, y_fit)
        loss_fn = build_loss(params.loss)
        result = train_projector(model, loss_fn, train_set, val_set, params.train,
                                 checkpoint_dir=run_dir / "ckpt", callback=on_epoch)
        model.eval()
        save_projector(model, run_dir / "projector")

        # evaluation on the held-out split, projector and baselines alike
        x_test, y_test = test_set.x.numpy(), test_set.y.numpy()
        preds = {"projector": predict(model, x_test, device=params.train.device)}
        preds |= {name: b.predict(x_test) for name, b in baselines.items()}
        rows = {name: alignment_metrics(p, y_test, labels, class_emb) for name, p in preds.items()}
        table = reporting.metrics_table(rows)
        for name, metrics in rows.items():
            mlflow.log_metrics({f"test_{k}" if name == "projector" else f"{name}_test_{k}": v
                                for k, v in metrics.items()})
        mlflow.log_metrics({"best_epoch": result.best_epoch, "epochs_run": result.epochs_run})
        run_recovery.fill_history(run_id, result.history, result.steps)  # epochs logged before a kill, or by none

        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            table.to_csv(d / "metrics.csv")
            (d / "config.json").write_text(params.model_dump_json(indent=2))
            reporting.loss_curve(result.history, d / "loss_curve.png", run_name)
            n = min(64, len(x_test))
            reporting.heatmap(similarity_matrix(preds["projector"][:n], y_test[:n]), d / "similarity.png",
                              f"cosine(projected source, target), first {n} test pairs", "target", "projected source")
            if labels is not None:
                _, confusion = zero_shot(preds["projector"], labels, class_emb)
                reporting.heatmap(confusion, d / "zeroshot_confusion.png", "zero-shot confusion (projector)",
                                  "predicted class", "true class")
            for f in d.iterdir():
                mlflow.log_artifact(str(f))
        mlflow.log_artifact(str(run_dir / "split.csv"))
        example = x_test[:4].astype(np.float32)
        with torch.no_grad():
            out_example = model(torch.from_numpy(example)).numpy()
        signature = mlflow.models.infer_signature(example, out_example)
        mlflow.pytorch.log_model(model, name="projector", signature=signature, input_example=example,
                                 serialization_format="pickle")
        # Published last: a run that fails anywhere above leaves the previous -latest in place.
        _publish_latest(run_dir, Path(params.out_dir) / f"{run_dir.name.rsplit('-', 1)[0]}-latest")
    origins = f"source {src.attrs.get('weights_origin')}, target {tgt.attrs.get('weights_origin')}"
    md = (f"### Stage 1: {run_name}\n\nMLflow run `{run_id}` · encoders: {origins} · "
          f"{len(split['test'])} test pairs\n\n{reporting.markdown_table(table)}\n")
    create_markdown_artifact(md, key=_key("align", dataset, str(src.attrs.get("modality")), str(tgt.attrs.get("modality"))))
    tracking.link_artifact(run_id, _key("align-mlflow", dataset))
    print(f"{run_name} [{origins}] -> MLflow run {run_id}\n{table.to_string(float_format=lambda v: f'{v:.4f}')}")
    return {"run_id": run_id, "projector_dir": str(run_dir / "projector"), "run_dir": str(run_dir),
            "metrics": {k: dict(v) for k, v in table.to_dict(orient="index").items()},
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "weights_origin": {"source": src.attrs.get("weights_origin"), "target": tgt.attrs.get("weights_origin")}}


def _publish_latest(run_dir: Path, latest: Path) -> None:
    """A stable path to the newest projector of a (dataset, source, target): what stage 2 defaults to."""
    import os
    import shutil

    tmp = latest.with_name(latest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir / "projector", tmp / "projector")
    shutil.copy2(run_dir / "split.csv", tmp / "split.csv")
    (tmp / "source_run.txt").write_text(str(run_dir) + "\n")
    if latest.exists():
        shutil.rmtree(latest)
    os.replace(tmp, latest)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "terms":
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, dict) else v
    return out
