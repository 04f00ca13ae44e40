"""Flow: train image towers contrastively on paired columns of a manifest (e.g. photo <-> sketch).

The story of the stage: read the manifest, decode both image columns once (bad rows are named by id
and column), split by id, train the towers (checkpointed, resumable), evaluate held-out retrieval in
both directions for the trained towers AND for the same towers at their random init, save each
trained tower as an open_clip local-dir folder the encoder factory loads, and record everything in
one MLflow run. The work happens in ``projection/contrastive.py``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from flows import _env  # noqa: F401

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from encoders.frozen import BadInput
from encoders.images import load_rgb
from encoders.manifest import Manifest, ManifestError
from flows import reporting, tracking
from flows.extract import _key
from projection.config import SplitConfig
from projection.contrastive import (ContrastiveConfig, DualEncoder, evaluate_pairs, save_tower, tower_spec,
                                    train_contrastive)
from projection.data import make_split, save_split

HEADLINE = ["b2a_r1", "b2a_r10", "b2a_label_r1", "a2b_r1", "a2b_r10", "a2b_label_r1", "b2a_mrr", "a2b_mrr"]


class ContrastiveParams(BaseModel):
    """Contrastive tower training: which paired image columns, how to train, where results go."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(description="CSV or Parquet manifest with an 'id' column and two image-path columns.")
    column_a: str = Field("image", description="Modality A (tower a), e.g. product photos: 'image'.")
    column_b: str = Field("sketch", description="Modality B (tower b), e.g. the sketches users search with: 'sketch'.")
    label_column: str | None = Field(
        None, description="Optional class-label column: adds label_r1 (the top-1 retrieved item has the query's label).")
    config: ContrastiveConfig = Field(default_factory=ContrastiveConfig, description="Towers, loss, optimiser, augmentation.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Deterministic train/val/test split by id.")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="Rows whose image is missing or corrupt: 'fail' lists them and stops; 'skip' leaves them out.")
    out_dir: str = Field("runs/contrastive", description="Checkpoints, split and the trained towers go under this folder.")
    experiment: str | None = Field(None, description="MLflow experiment (default 'xmodal-contrastive-<dataset>').")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db).")
    parent_run_id: str | None = Field(None, description="Nest this run under an MLflow parent run.")

    def run_key(self, manifest: Manifest) -> str:
        """Same data and settings -> same folder, so a killed run resumes from its checkpoint."""
        cfg = self.model_dump(exclude={"experiment", "tracking_uri", "parent_run_id", "out_dir"})
        cfg["config"].pop("device")
        cfg |= {"digest_a": manifest.digest(self.column_a), "digest_b": manifest.digest(self.column_b)}
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _load_pairs(manifest: Manifest, params: ContrastiveParams, transform) -> tuple[list[str], "torch.Tensor", "torch.Tensor", list]:
    """Decode + preprocess both columns once; bad rows are named (id, column, reason)."""
    import torch

    ids = manifest.frame["id"].tolist()
    if len(set(ids)) != len(ids):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].tolist()[:5]
        raise ManifestError(f"manifest {manifest.path} has duplicate ids, e.g. {dup}")
    cols = {c: manifest.values(c, "image") for c in (params.column_a, params.column_b)}
    keep, xa, xb, bad = [], [], [], []
    for row, i in enumerate(ids):
        loaded = {}
        for c, values in cols.items():
            try:
                if values[row] is None:
                    raise BadInput("empty cell")
                loaded[c] = transform(load_rgb(values[row]))
            except BadInput as exc:
                bad.append((i, c, str(exc)))
        if len(loaded) == 2:
            keep.append(i)
            xa.append(loaded[params.column_a])
            xb.append(loaded[params.column_b])
    if bad and params.on_error == "fail":
        lines = "\n".join(f"  id {i!r}, column {c!r}: {why}" for i, c, why in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise ManifestError(f"manifest {manifest.path}: {len(bad)} image(s) could not be loaded "
                            f"(set on_error='skip' to leave those rows out):\n{lines}{more}")
    if len(keep) < 4:
        raise ManifestError(f"manifest {manifest.path}: only {len(keep)} rows with both images; need at least 4")
    return keep, torch.stack(xa), torch.stack(xb), bad


@flow(name="contrastive-train", log_prints=True)
def contrastive_train(params: ContrastiveParams) -> dict:
    """Train two (or one shared) image towers contrastively; report held-out retrieval vs the random-init towers."""
    logger = get_run_logger()
    cfg = params.config
    tracking.tracking_uri(params.tracking_uri)
    manifest = Manifest.read(params.manifest)
    manifest.require(params.column_a), manifest.require(params.column_b)
    labels_all = None
    if params.label_column:
        labels_all = dict(zip(manifest.frame["id"], manifest.require(params.label_column)))

    init = DualEncoder.from_config(cfg)  # the random-init towers: the exact start of training
    ids, xa, xb, bad = _load_pairs(manifest, params, init.transform())
    if bad:
        logger.warning("skipped %d row(s) whose images did not load, e.g. %s", len({b[0] for b in bad}), bad[:3])
    split = make_split(ids, params.split.val_frac, params.split.test_frac, params.split.seed)
    tr, va, te = split["train"], split["val"], split["test"]
    if len(te) == 0:
        raise ValueError(f"the test split is empty ({len(ids)} rows, test_frac={params.split.test_frac})")
    test_labels = None if labels_all is None else np.asarray([labels_all[ids[i]] for i in te])

    dataset = manifest.name
    a, b = params.column_a, params.column_b
    run_dir = Path(params.out_dir) / f"{dataset}-{a}-{b}-{cfg.towers}-{cfg.loss}-{params.run_key(manifest)}"
    run_dir.mkdir(parents=True, exist_ok=True)
    save_split(ids, split, run_dir / "split.csv")

    exp = tracking.experiment_id(params.experiment or f"xmodal-contrastive-{dataset}")
    tags = {"xmodal.stage": "contrastive", "xmodal.dataset": dataset, "weights_origin": "trained-contrastive"}
    if params.parent_run_id:
        tags["mlflow.parentRunId"] = params.parent_run_id
    run_name = f"contrastive {dataset}: {a} <-> {b} ({cfg.towers} towers, {cfg.loss})"
    with mlflow.start_run(experiment_id=exp, run_name=run_name, tags=tags) as run:
        run_id = run.info.run_id
        mlflow.log_params({f"contrastive.{k}": json.dumps(v) if isinstance(v, dict) else v
                           for k, v in cfg.model_dump().items()})
        mlflow.log_params({f"split.{k}": v for k, v in params.split.model_dump().items()})
        mlflow.log_params({"manifest": params.manifest, "column_a": a, "column_b": b, "label_column": params.label_column,
                           "n_train": len(tr), "n_val": len(va), "n_test": len(te), "n_skipped": len({x[0] for x in bad}),
                           "embed_dim": init.embed_dim, "run_dir": str(run_dir)})

        def on_epoch(event: str, step: int, metrics: dict[str, float]) -> None:
            if event == "epoch":
                mlflow.log_metrics({k: v for k, v in metrics.items() if k != "epoch" and v == v},
                                   step=int(metrics["epoch"]))

        result = train_contrastive(xa[tr], xb[tr], cfg, xa[va], xb[va], checkpoint_dir=run_dir / "ckpt", callback=on_epoch)
        trained = evaluate_pairs(result.model, xa[te], xb[te], test_labels, cfg.eval_batch_size, cfg.device)
        random_init = evaluate_pairs(init, xa[te], xb[te], test_labels, cfg.eval_batch_size, cfg.device)
        mlflow.log_metrics({f"test_{k}": v for k, v in trained.items()})
        mlflow.log_metrics({f"random_init_test_{k}": v for k, v in random_init.items()})
        mlflow.log_metrics({"epochs_run": result.epochs_run, "train_seconds": result.train_seconds,
                            "resumed_from_epoch": result.resumed_from_epoch or 0})

        towers = {w: save_tower(result.model, w, run_dir / f"tower_{w}") for w in ("a", "b")}
        rows = {"trained": trained, "random-init (same towers, untrained)": random_init}
        table = pd.DataFrame.from_dict(rows, orient="index")
        table.index.name = "towers"
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            table.to_csv(d / "metrics.csv")
            (d / "config.json").write_text(params.model_dump_json(indent=2))
            reporting.loss_curve(result.history, d / "loss_curve.png", run_name)
            for f in d.iterdir():
                mlflow.log_artifact(str(f))
        mlflow.log_artifact(str(run_dir / "split.csv"))
        for w, folder in towers.items():
            mlflow.log_artifacts(str(folder), artifact_path=f"tower_{w}")

    specs = {w: tower_spec(folder) for w, folder in towers.items()}
    cols = [c for c in HEADLINE if c in trained]
    md = (f"### Contrastive towers: {run_name}\n\nMLflow run `{run_id}` · {len(tr)} train / {len(te)} test pairs · "
          f"chance R@1 = {trained['chance_r1']:.4f} · a = {a}, b = {b} (b2a: {b} queries search {a})\n\n"
          "| towers | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|\n"
          + "".join(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |\n" for name, m in rows.items())
          + f"\nTower specs:\n\n- a: `{specs['a']}`\n- b: `{specs['b']}`\n")
    create_markdown_artifact(md, key=_key("contrastive", dataset, a, b))
    logger.info("%s: test %s->%s R@1 %.4f (random init %.4f), label_r1 %s -> MLflow run %s", run_name, b, a,
                trained["b2a_r1"], random_init["b2a_r1"], trained.get("b2a_label_r1"), run_id)
    return {"run_id": run_id, "run_dir": str(run_dir),
            "tower_dirs": {w: str(p) for w, p in towers.items()}, "tower_specs": specs,
            "metrics": trained, "random_init_metrics": random_init,
            "epochs_run": result.epochs_run, "resumed_from_epoch": result.resumed_from_epoch,
            "train_seconds": result.train_seconds, "n_train": len(tr), "n_test": len(te),
            "weights_origin": "trained-contrastive"}
