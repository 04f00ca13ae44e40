"""Flow: stage 1, an MLP projector from a source store's space into a target store's space.

The story of the stage: join the two stores by id, split deterministically, fit the closed-form
baselines, train the projector (checkpointed, resumable), evaluate all of them on the held-out
split, and record everything in one MLflow run. The work happens in ``projection/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from encoders.manifest import ManifestError
from encoders.store import EmbeddingStore, StoreError, join_stores
from flows.tracking import reporting
from flows.tracking import recovery
from flows.tracking import served
from flows.tracking import runs
from flows.errors import FLOW_RESULTS
from flows.extract import _key
from flows.errors import check_paths
from flows.tracking import runlog
from flows.tracking.runlog import reported
from flows.labels import class_embeddings, content_ids, read_column, stage1_manifests
from projection.align.baselines import fit_baselines
from projection.align.config import BaselineConfig, LossConfig, ProjectorConfig, SplitConfig, TrainConfig
from projection.align.data import (BASELINE_TRAIN_ROWS, BASELINE_VAL_ROWS, ChunkedPairs, InMemoryPairs, check_split,
                                   gather_pairs, load_split, make_split, save_split)
from projection.align.fit import FitResult, fit_projector
from projection.align.metrics import alignment_metrics, collapse_stats, collapse_warning, similarity_matrix, zero_shot
from projection.semi.partial import check_pairs, partition_stores, semi_inputs
from projection.align.projector import save_projector
from projection.semi.method import fit_semi_mode
from projection.semi.objective import SemiConfig
from projection.align.train import TrainResult, predict
from projection.align.transfer import transfer_scores
from projection.engine.run_folder import hold_run_folder


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

    source_store: str = Field(description="Source-modality store (.h5), e.g. image embeddings.")
    target_store: str = Field(description="Target-modality store (.h5) whose space the projector maps into.")
    projector: ProjectorParams = Field(ProjectorParams(), description="Projector architecture.")
    loss: LossConfig = Field(LossConfig(), description="Training objective (MSE by default).")
    train: TrainConfig = Field(TrainConfig(), description="Optimiser, schedule, early stopping.")
    split: SplitConfig = Field(SplitConfig(), description="Deterministic train/val/test split by id.")
    baselines: BaselineConfig = Field(BaselineConfig(), description="Closed-form baselines.")
    label_column: str | None = Field(
        None, description="Manifest column with class labels (ints or strings): class-level R@1, the transfer figure, "
        "and zero-shot with a class store. Read from label_manifest, else the source's, else the target's manifest.")
    label_manifest: str | None = Field(None, description="Manifest (CSV/Parquet, with an id column) holding label_column.")
    class_store: str | None = Field(
        None, description="Store of class-prompt embeddings in the target space; its manifest's label column names "
        "each prompt's class, matched to the labels by value.")
    transfer_column: str | None = Field(
        None, description="Column for the cross-modal transfer figure (classes or numbers); default: label_column.")
    mode: Literal["pairs", "semi", "zero_pair"] = Field(
        "pairs", description="'pairs': train on rows whose id is in both stores. 'semi': also use the rows without a "
        "partner (maps in the all-rows frame, refined by transport plans, chosen on val pairs). 'zero_pair': no "
        "training pairs at all (two encoders of the same inputs only). The test split is always drawn from shared ids and held out.")
    paired_frac: float = Field(
        1.0, ge=0.0, le=1.0, description="semi/zero_pair: fraction of the training pairs used as pairs; the rest join "
        "the unpaired rows (to measure how few pairs suffice). Which ids were pairs is logged as pairing.csv.")
    semi_mlp: bool = Field(False, description="semi: also train the semi-supervised MLP (cycle, MMD, pseudo-pairs) from "
                           "the chosen map; kept only if val says it helps. Off: it rarely did, at 8x the run time.")
    semi_steps: int = Field(600, ge=1, description="semi: optimizer steps of the semi-supervised MLP, and of stage 1's MLP "
                            "on the pairs alone (a candidate).")
    in_memory_max_gb: float = Field(4.0, gt=0, description="Load pairs into memory below this size; stream above.")
    out_dir: str = Field("runs/align", description="Projectors, checkpoints and splits go under this folder.")
    experiment: str | None = Field(None, description="MLflow experiment (default: xmodal-align-DATASET, DATASET being the stores' dataset).")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db).")
    parent_run_id: str | None = Field(None, description="Nest this run under an MLflow parent run.")
    run_name: str | None = Field(None, description="MLflow run name (default: dataset, modalities and projector kind).")

    def run_key(self, src: EmbeddingStore, tgt: EmbeddingStore) -> str:
        """Same inputs and settings -> same folder, so a killed run resumes from its checkpoint."""
        cfg = self.model_dump(exclude={"experiment", "tracking_uri", "parent_run_id", "out_dir", "in_memory_max_gb",
                                       "run_name"})
        cfg |= {"source_digest": src.digest, "target_digest": tgt.digest}
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


@task(name="fit-baselines")
def fit_baselines_task(x_train: np.ndarray, y_train: np.ndarray, cfg: BaselineConfig, x_val: np.ndarray | None = None,
                       y_val: np.ndarray | None = None) -> dict:
    return fit_baselines(x_train, y_train, cfg, x_val, y_val)


def check_inputs(params: AlignParams) -> tuple:
    """Open and join the stores, split, read labels and class prompts: every bad input fails HERE, in one line,
    before a run folder or an MLflow run exists. (src, tgt, pairs, projector config, ids, split, task inputs)."""
    src, tgt = EmbeddingStore(params.source_store), EmbeddingStore(params.target_store)
    pairs = join_stores(src, tgt, allow_disjoint=params.mode != "pairs")
    proj = params.projector
    for side, want, store in (("d_in", proj.d_in, src), ("d_out", proj.d_out, tgt)):
        if want is not None and want != store.dim:
            raise StoreError(f"projector {side}={want} disagrees with store {store.path} (dim {store.dim})")
    pcfg = ProjectorConfig(**(proj.model_dump() | {"d_in": src.dim, "d_out": tgt.dim}))
    ids = list(pairs.ids)
    split = (load_split(params.split.file, ids) if params.split.file  # a builder's block-aware split
             else make_split(ids, params.split.val_frac, params.split.test_frac, params.split.seed))
    semi = None
    if params.mode != "pairs":  # pairs, released pairs and unpaired rows; which is which is logged
        nbytes = (len(src) * src.dim + len(tgt) * tgt.dim) * 4
        if nbytes > params.in_memory_max_gb * 2**30:
            raise StoreError(f"mode {params.mode!r} holds both stores in memory ({nbytes / 2**30:.1f} GiB > in_memory_max_gb)")
        semi = semi_inputs(src, tgt, partition_stores(src, tgt), split, params.paired_frac, params.split.seed)
        check_pairs(len(semi.xp), len(split["test"]), params.mode, len(pairs))
    check_split(split, params.split.val_frac)  # before any training: tiny stores failed only at evaluation
    task = _task_inputs(params, src, tgt, ids, split)
    return src, tgt, pairs, pcfg, ids, split, task if semi is None else task | {"semi": semi}


@flow(name="align", log_prints=True, flow_run_name=runlog.align_name, **FLOW_RESULTS)
def align(params: AlignParams) -> dict:
    """Train a stage-1 projector source -> target and report it beside closed-form baselines."""
    check_paths(source_store=params.source_store, target_store=params.target_store, class_store=params.class_store,
                label_manifest=params.label_manifest, **{"split.file": params.split.file})
    runs.tracking_uri(params.tracking_uri)
    src, tgt, pairs, pcfg, ids, split, task = check_inputs(params)
    if pairs.dropped_source or pairs.dropped_target:
        get_run_logger().warning("joined %d pairs; %d source and %d target rows had no partner", len(pairs),
                                 pairs.dropped_source, pairs.dropped_target)
    data = _datasets(params, pairs, ids, split, Path(src.path).name, Path(tgt.path).name)
    if "semi" in task:  # train on the budget's pairs only; the val and test splits stay as they are
        semi = task["semi"]
        data |= {"train": InMemoryPairs(semi.xp, semi.yp, semi.pair_ids, Path(src.path).name, Path(tgt.path).name),
                 "fit": (semi.xp, semi.yp)}
    key = params.run_key(src, tgt)
    run_dir = Path(params.out_dir) / f"{src.attrs.get('dataset', 'data')}-{src.attrs.get('modality')}-to-{tgt.attrs.get('modality')}-{key}"
    with hold_run_folder(run_dir):  # an identical run started at the same time waits here, then resumes
        fresh = not run_dir.exists()  # an existing folder holds a killed run's checkpoint: resume, never delete it
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            out = _run(params, src, tgt, pcfg, data, split, ids, task, run_dir)
        except Exception:
            if fresh:
                shutil.rmtree(run_dir, ignore_errors=True)  # a failed run leaves no half-made folder
            raise
        _publish_latest(run_dir, Path(params.out_dir) / f"{run_dir.name.rsplit('-', 1)[0]}-latest")
    return out


def _task_inputs(params: AlignParams, src: EmbeddingStore, tgt: EmbeddingStore, ids: list, split: dict) -> dict:
    """Labels, class prompts, transfer column and target content ids for the splits, each checked here."""
    test_ids = [ids[i] for i in split["test"]]
    out: dict = {"groups": content_ids(tgt, test_ids)}
    manifests = stage1_manifests(params.label_manifest, src, tgt)
    if params.label_column:
        labels = read_column(manifests, ids, params.label_column, "class labels, one per id")
        out["labels"] = labels[split["test"]]
        if params.class_store:  # every label must have a prompt, not only the test split's
            class_emb, index = class_embeddings(params.class_store, params.label_column, labels)
            if class_emb.shape[1] != tgt.dim:
                raise StoreError(f"class store {params.class_store} has dim {class_emb.shape[1]}, target store {tgt.path} has {tgt.dim}")
            out["class_emb"], out["class_index"] = class_emb, index[split["test"]]
    elif params.class_store:
        raise ManifestError("class_store is set but label_column is not: zero-shot needs the labels' column name")
    column = params.transfer_column or params.label_column
    if column:
        values = read_column(manifests, ids, column, "a class or a number per id, for the transfer head")
        out["transfer"] = (column, values[split["train"]], values[split["test"]])
    return out


def _datasets(params: AlignParams, pairs, ids: list, split: dict, sname: str, tname: str) -> dict:
    """train/val/test pair sets (in memory below the budget, else streamed) and the arrays the baselines fit on."""
    nbytes = len(pairs) * (pairs.source.dim + pairs.target.dim) * 4
    in_memory = nbytes <= params.in_memory_max_gb * 2**30
    if in_memory:  # each split read once into its final arrays (no whole copy to index from)
        parts = gather_pairs(pairs, [split[s] for s in ("train", "val", "test")])
        train_set, val_set, test_set = (InMemoryPairs(x, y, [ids[i] for i in split[s]], sname, tname)
                                        for (x, y), s in zip(parts, ("train", "val", "test")))
        fit, val = (train_set.x.numpy(), train_set.y.numpy()), (val_set.x.numpy(), val_set.y.numpy())
    else:  # stream train/val in chunks; the test split is held in memory for ranking metrics
        train_set = ChunkedPairs(pairs, 65536, split["train"], ids, sname, tname)
        val_set = ChunkedPairs(pairs, 65536, split["val"], ids, sname, tname)
        test, fit, val = gather_pairs(pairs, [split["test"], split["train"][:BASELINE_TRAIN_ROWS],
                                              split["val"][:BASELINE_VAL_ROWS]])  # baselines on a sample
        test_set = InMemoryPairs(*test, [ids[i] for i in split["test"]], sname, tname)
    return {"train": train_set, "val": val_set, "test": test_set, "fit": fit, "val_arrays": val, "in_memory": in_memory}


def _run(params: AlignParams, src, tgt, pcfg: ProjectorConfig, data: dict, split: dict, ids: list, task: dict,
         run_dir: Path) -> dict:
    """The MLflow run: baselines, projector, evaluation, artifacts."""
    save_split(ids, split, run_dir / "split.csv")
    dataset = src.attrs.get("dataset", "data")
    run_name = params.run_name or f"align {dataset}: {src.attrs.get('modality')} -> {tgt.attrs.get('modality')} ({pcfg.kind})"
    origins_tags = {"source_weights_origin": src.attrs.get("weights_origin", ""),
                    "target_weights_origin": tgt.attrs.get("weights_origin", "")}
    with runs.stage_run("align", dataset, run_name, experiment=params.experiment, parent_run_id=params.parent_run_id,
                            tags=origins_tags, work=run_dir) as run:  # work: a killed run here is marked KILLED, linked
        _log_inputs(params, src, tgt, pcfg, data, split, run_dir)
        baselines = fit_baselines_task(*data["fit"], params.baselines, *data["val_arrays"]) if len(data["fit"][0]) > 1 else {}
        if "ridge" in baselines:
            mlflow.log_metric("ridge_alpha", baselines["ridge"].alpha)

        def on_epoch(event: str, step: int, metrics: dict[str, float]) -> None:
            mlflow.log_metrics({k: v for k, v in metrics.items() if v is not None and k != "epoch"}, step=step)

        if "semi" in task:
            fit = _fit_semi(params, pcfg, task["semi"], baselines, run_dir, on_epoch, data["val_arrays"])
        else:
            fit = fit_projector(pcfg, params.loss, params.train, data["train"], data["val"], *data["fit"],
                                ridge=baselines["ridge"], checkpoint_dir=run_dir / "ckpt",
                                callback=reported(on_epoch, f"stage 1 ({pcfg.kind})"))
        model, result = fit.model, fit.train
        save_projector(model, run_dir / "projector")
        mlflow.log_metrics({"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                            "kept_ridge_start": float(fit.kept_start)}
                           | ({"keep_p": fit.trained_val["keep_p"]} if fit.trained_val else {}))
        recovery.fill_history(run.run_id, result.history, result.steps)  # epochs logged before a kill, or by none
        x_test, y_test = data["test"].x.numpy(), data["test"].y.numpy()
        preds = {"projector": predict(model, x_test, device=params.train.device)}
        preds |= {name: b.predict(x_test) for name, b in baselines.items()}
        table, spaces = _evaluate(preds, x_test, y_test, data, task)
        _log_artifacts(table, spaces, params, result, preds, y_test, task, run_dir, run_name)
        # safetensors + JSON as a pyfunc model (no pickle), naming both encoders: what `xmodal promote` registers
        served.log_projector_model(run_dir / "projector", src, tgt)
    origins = f"source {src.attrs.get('weights_origin')}, target {tgt.attrs.get('weights_origin')}"
    md = (f"### Stage 1: {run_name}\n\nMLflow run `{run.run_id}` · encoders: {origins} · "
          f"{len(split['test'])} test pairs\n\n{reporting.markdown_table(table)}\n\n{reporting.spaces_markdown(spaces)}\n")
    create_markdown_artifact(md, key=_key("align", dataset, str(src.attrs.get("modality")), str(tgt.attrs.get("modality"))))
    runs.link_artifact(run.run_id, _key("align-mlflow", dataset))
    print(f"{run_name} [{origins}] -> MLflow run {run.run_id}\n{table.to_string(float_format=lambda v: f'{v:.4f}')}"
          f"\nspaces (collapse diagnostic):\n{spaces.drop(columns='warning').to_string(float_format=lambda v: f'{v:.4f}')}"
          + "".join(f"\nWARNING: {w}" for w in spaces["warning"] if w))
    return {"run_id": run.run_id, "projector_dir": str(run_dir / "projector"), "run_dir": str(run_dir),
            "metrics": {k: dict(v) for k, v in table.to_dict(orient="index").items()},
            "spaces": {k: dict(v) for k, v in spaces.to_dict(orient="index").items()},
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "kept_ridge_start": fit.kept_start,
            "weights_origin": {"source": src.attrs.get("weights_origin"), "target": tgt.attrs.get("weights_origin")}}


def _fit_semi(params: AlignParams, pcfg: ProjectorConfig, semi, baselines: dict, run_dir: Path, callback,
              val: tuple[np.ndarray, np.ndarray]) -> FitResult:
    """Modes 'semi' and 'zero_pair': the refined closed form joins the baselines; which ids were pairs is logged.

    The val split chooses among pairs-only and unpaired-rows maps (projection/semi/method.py); the semi
    MLP, when asked for, checkpoints under run_dir/ckpt and resumes after a kill like stage 1."""
    pd.DataFrame(semi.roles, columns=["id", "role"]).to_csv(run_dir / "pairing.csv", index=False)
    mlflow.log_artifact(str(run_dir / "pairing.csv"))
    mlflow.log_params({"mode": params.mode, "paired_frac": params.paired_frac, "n_train_pairs_used": len(semi.xp),
                       "n_unpaired_source": len(semi.xu), "n_unpaired_target": len(semi.yu)})
    fit = fit_semi_mode(params.mode, semi.xp, semi.yp, semi.xu, semi.yu, pcfg, params.train,
                        SemiConfig(steps=params.semi_steps, mlp=params.semi_mlp), callback, val=val, checkpoint_dir=run_dir / "ckpt")
    baselines["refined"] = fit.refined
    mlflow.log_param("semi_chosen", fit.chosen)
    history = [{"epoch": float(k), "train_loss": h["score"]} for k, h in enumerate(fit.refined.history)]
    result = fit.train or TrainResult(None, 0, 1, len(history), False, None, history)  # one step per refinement round
    return FitResult(fit.model, result, None, None, False)


def _log_inputs(params: AlignParams, src, tgt, pcfg: ProjectorConfig, data: dict, split: dict, run_dir: Path) -> None:
    mlflow.log_params(runs.flatten({"projector": pcfg.model_dump(), "loss": params.loss.model_dump(),
                                        "train": params.train.model_dump(), "split": params.split.model_dump(),
                                        "baselines": params.baselines.model_dump()}))
    mlflow.log_params({"source_store": str(src.path), "target_store": str(tgt.path), "n_pairs": sum(map(len, split.values())),
                       "n_train": len(split["train"]), "n_val": len(split["val"]), "n_test": len(split["test"]),
                       "source_encoder": src.attrs.get("encoder_spec"), "target_encoder": tgt.attrs.get("encoder_spec"),
                       "in_memory": data["in_memory"], "run_dir": str(run_dir), "n_baseline_fit": len(data["fit"][0]),
                       "label_column": params.label_column, "label_manifest": params.label_manifest})
    for store, ctx in ((src, "source"), (tgt, "target")):
        runs.log_store_input(store, ctx)


def _evaluate(preds: dict, x_test: np.ndarray, y_test: np.ndarray, data: dict, task: dict):
    """(metrics table: method -> test metrics, spaces table: collapse diagnostic per space), both logged."""
    labels, class_emb = task.get("labels"), task.get("class_emb")
    rows = {name: alignment_metrics(p, y_test, labels, None, groups=task["groups"]) for name, p in preds.items()}
    if class_emb is not None:
        for name, p in preds.items():
            rows[name]["zeroshot_acc"] = zero_shot(p, task["class_index"], class_emb)[0]
    if "transfer" in task:
        column, train_values, test_values = task["transfer"]
        scores = transfer_scores(data["fit"][1], train_values, y_test, test_values, preds)
        for name in preds:
            rows[name]["transfer"] = scores[f"transfer_{name}"]
        rows["true target"] = {"transfer": scores["transfer_true"]}
        mlflow.log_metrics({k: v for k, v in scores.items() if k != "transfer_task"}
                           | {"transfer_is_classification": scores["transfer_task"]})
        mlflow.log_param("transfer_column", column)
    table = reporting.metrics_table(rows)
    for name, metrics in rows.items():
        if name != "true target":
            mlflow.log_metrics({f"test_{k}" if name == "projector" else f"{name}_test_{k}": v for k, v in metrics.items()})
    spaces = {"source": collapse_stats(x_test), "target": collapse_stats(y_test), "projected": collapse_stats(preds["projector"])}
    logger = get_run_logger()
    for name, stats in spaces.items():
        mlflow.log_metrics({f"{name}_{k}": v for k, v in stats.items()})
        warning = collapse_warning(f"the {name} space", stats)
        stats["warning"] = warning or ""
        if warning:
            logger.warning(warning)
    return table, pd.DataFrame.from_dict(spaces, orient="index").rename_axis("space")


def _log_artifacts(table, spaces, params: AlignParams, result, preds: dict, y_test, task: dict, run_dir: Path,
                   run_name: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        table.to_csv(d / "metrics.csv")
        spaces.to_csv(d / "spaces.csv")
        (d / "config.json").write_text(params.model_dump_json(indent=2))
        reporting.loss_curve(result.history, d / "loss_curve.png", run_name)
        n = min(64, len(y_test))
        reporting.heatmap(similarity_matrix(preds["projector"][:n], y_test[:n]), d / "similarity.png",
                          f"cosine(projected source, target), first {n} test pairs", "target", "projected source")
        if task.get("class_emb") is not None:
            _, confusion = zero_shot(preds["projector"], task["class_index"], task["class_emb"])
            reporting.heatmap(confusion, d / "zeroshot_confusion.png", "zero-shot confusion (projector)",
                              "predicted class", "true class")
        for f in d.iterdir():
            mlflow.log_artifact(str(f))
    mlflow.log_artifact(str(run_dir / "split.csv"))


def _publish_latest(run_dir: Path, latest: Path) -> None:
    """A stable path to the newest projector of a (dataset, source, target): what stage 2 defaults to.

    Called only once a run has succeeded, so a failed run never replaces it."""
    tmp = latest.with_name(latest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run_dir / "projector", tmp / "projector")
    shutil.copy2(run_dir / "split.csv", tmp / "split.csv")
    (tmp / "source_run.txt").write_text(str(run_dir) + "\n")
    if latest.exists():
        shutil.rmtree(latest)
    os.replace(tmp, latest)
