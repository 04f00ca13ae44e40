"""Flow: train image towers contrastively on paired columns of a manifest (e.g. photo <-> sketch).

The story of the stage: read the manifest, decode both image columns once (bad rows are named by id
and column), split by id, train the towers (checkpointed, resumable), evaluate held-out retrieval in
both directions for the trained towers AND for the same towers at their random init, save each
trained tower as an open_clip local-dir folder the encoder factory loads, and record everything in
one MLflow run. The work happens in ``projection/contrastive/trainer.py``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field


from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from encoders.frozen import BadInput
from encoders.images import load_rgb
from encoders.manifest import Manifest, ManifestError
from flows.tracking import reporting
from flows.tracking.runlog import reported
from flows.tracking import runs
from flows.errors import FLOW_RESULTS
from flows.extract import _key
from projection.align.config import SplitConfig
from projection.contrastive.config import ContrastiveConfig
from projection.contrastive.towers import DualEncoder, save_tower, tower_spec
from projection.contrastive.trainer import evaluate_pairs, train_contrastive
from projection.align.data import make_split, save_split
from projection.engine.run_folder import hold_run_folder

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


@dataclass
class PairData:
    """Both image columns decoded once, split by id; what training and evaluation read."""

    dataset: str
    ids: list[str]
    xa: Any  # (N, 3, H, W) tower-a inputs
    xb: Any  # (N, 3, H, W) tower-b inputs
    split: dict[str, Any]  # split name -> row indices
    test_labels: np.ndarray | None
    n_skipped: int
    run_key: str  # settings + both columns' digests: names the run folder (same key -> resume)


@task(name="read-pairs", cache_policy=NO_CACHE)
def read_pairs(params: ContrastiveParams, init: DualEncoder) -> PairData:
    """Manifest -> decoded, split pairs; bad rows are named (or left out with on_error='skip')."""
    manifest = Manifest.read(params.manifest)
    manifest.require(params.column_a), manifest.require(params.column_b)
    labels_all = dict(zip(manifest.frame["id"], manifest.require(params.label_column))) if params.label_column else None
    ids, xa, xb, bad = _load_pairs(manifest, params, init.transform())
    if bad:
        get_run_logger().warning("skipped %d row(s) whose images did not load, e.g. %s", len({b[0] for b in bad}), bad[:3])
    split = make_split(ids, params.split.val_frac, params.split.test_frac, params.split.seed)
    if len(split["test"]) == 0:
        raise ValueError(f"the test split is empty ({len(ids)} rows, test_frac={params.split.test_frac})")
    test_labels = None if labels_all is None else np.asarray([labels_all[ids[i]] for i in split["test"]])
    return PairData(manifest.name, ids, xa, xb, split, test_labels, len({x[0] for x in bad}), params.run_key(manifest))


@task(name="train-towers", cache_policy=NO_CACHE)
def train_towers(pairs: PairData, cfg: ContrastiveConfig, run_dir: Path, run: runs.StageRun):
    """The shared training loop (checkpointed, resumable); each epoch's figures go to the run."""
    tr, va = pairs.split["train"], pairs.split["val"]

    def on_epoch(event: str, step: int, metrics: dict[str, float]) -> None:
        if event == "epoch":
            run.log_metrics({k: v for k, v in metrics.items() if k != "epoch" and v == v}, step=int(metrics["epoch"]))

    return train_contrastive(pairs.xa[tr], pairs.xb[tr], cfg, pairs.xa[va], pairs.xb[va],
                             checkpoint_dir=run_dir / "ckpt", callback=reported(on_epoch, "contrastive towers"))


@task(name="evaluate-towers", cache_policy=NO_CACHE)
def evaluate_towers(pairs: PairData, towers: dict, cfg: ContrastiveConfig) -> dict[str, dict[str, float]]:
    """Held-out retrieval both ways for each named pair of towers."""
    te = pairs.split["test"]
    return {name: evaluate_pairs(model, pairs.xa[te], pairs.xb[te], pairs.test_labels, cfg.eval_batch_size, cfg.device)
            for name, model in towers.items()}


def _log_outputs(run: runs.StageRun, params: ContrastiveParams, rows: dict, result, towers: dict,
                 run_dir: Path, run_name: str) -> None:
    run.log_metrics(rows["trained"], prefix="test_")
    run.log_metrics(rows[RANDOM_INIT], prefix="random_init_test_")
    run.log_metrics({"epochs_run": result.epochs_run, "train_seconds": result.train_seconds,
                     "resumed_from_epoch": result.resumed_from_epoch or 0})
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "towers"
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        table.to_csv(d / "metrics.csv")
        (d / "config.json").write_text(params.model_dump_json(indent=2))
        reporting.loss_curve(result.history, d / "loss_curve.png", run_name)
        for f in d.iterdir():
            run.log_file(f)
    run.log_file(run_dir / "split.csv")
    for w, folder in towers.items():
        run.log_dir(folder, artifact_path=f"tower_{w}")


def _report(out: "TowersResult", rows: dict, pairs: PairData, params: ContrastiveParams, run_name: str) -> None:
    a, b, trained = params.column_a, params.column_b, rows["trained"]
    cols = [c for c in HEADLINE if c in trained]
    md = (f"### Contrastive towers: {run_name}\n\nMLflow run `{out.run_id}` · {out.n_train} train / {out.n_test} test "
          f"pairs · chance R@1 = {trained['chance_r1']:.4f} · a = {a}, b = {b} (b2a: {b} queries search {a})\n\n"
          "| towers | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|\n"
          + "".join(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |\n" for name, m in rows.items())
          + f"\nTower specs:\n\n- a: `{out.tower_specs['a']}`\n- b: `{out.tower_specs['b']}`\n")
    create_markdown_artifact(md, key=_key("contrastive", pairs.dataset, a, b))
    get_run_logger().info("%s: test %s->%s R@1 %.4f (random init %.4f), label_r1 %s -> MLflow run %s", run_name, b, a,
                          trained["b2a_r1"], rows[RANDOM_INIT]["b2a_r1"], trained.get("b2a_label_r1"), out.run_id)


@dataclass
class TowersResult:
    """What the flow returns: where the towers are (and their encoder specs), and their test figures."""

    run_id: str
    run_dir: str
    tower_dirs: dict[str, str]
    tower_specs: dict[str, str]
    metrics: dict[str, float]
    random_init_metrics: dict[str, float]
    epochs_run: int
    resumed_from_epoch: int | None
    train_seconds: float
    n_train: int
    n_test: int
    weights_origin: str = "trained-contrastive"


RANDOM_INIT = "random-init (same towers, untrained)"


@flow(name="contrastive-train", log_prints=True, **FLOW_RESULTS)
def contrastive_train(params: ContrastiveParams) -> dict:
    """Train two (or one shared) image towers contrastively; report held-out retrieval vs the random-init towers."""
    cfg, a, b = params.config, params.column_a, params.column_b
    runs.tracking_uri(params.tracking_uri)
    init = DualEncoder.from_config(cfg)  # the random-init towers: the exact start of training
    pairs = read_pairs(params, init)
    run_dir = Path(params.out_dir) / f"{pairs.dataset}-{a}-{b}-{cfg.towers}-{cfg.loss}-{pairs.run_key}"
    n = {f"n_{k}": len(v) for k, v in pairs.split.items()}
    logged = runs.flatten({"contrastive": cfg.model_dump(), "split": params.split.model_dump()}) | n | {
        "manifest": params.manifest, "column_a": a, "column_b": b, "label_column": params.label_column,
        "n_skipped": pairs.n_skipped, "embed_dim": init.embed_dim, "run_dir": str(run_dir)}
    run_name = f"contrastive {pairs.dataset}: {a} <-> {b} ({cfg.towers} towers, {cfg.loss})"
    with hold_run_folder(run_dir), runs.stage_run(  # work: a killed run of this folder is marked KILLED, linked
            "contrastive", pairs.dataset, run_name, experiment=params.experiment, parent_run_id=params.parent_run_id,
            tags={"weights_origin": "trained-contrastive"}, params=logged, work=run_dir) as run:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_split(pairs.ids, pairs.split, run_dir / "split.csv")
        result = train_towers(pairs, cfg, run_dir, run)
        rows = evaluate_towers(pairs, {"trained": result.model, RANDOM_INIT: init}, cfg)
        towers = {w: save_tower(result.model, w, run_dir / f"tower_{w}") for w in ("a", "b")}
        _log_outputs(run, params, rows, result, towers, run_dir, run_name)
    out = TowersResult(run.run_id, str(run_dir), {w: str(p) for w, p in towers.items()},
                       {w: tower_spec(folder) for w, folder in towers.items()}, rows["trained"], rows[RANDOM_INIT],
                       result.epochs_run, result.resumed_from_epoch, result.train_seconds, n["n_train"], n["n_test"])
    _report(out, rows, pairs, params, run_name)
    return asdict(out)
