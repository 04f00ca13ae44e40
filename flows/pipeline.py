"""Flow: the whole pipeline, extract -> align -> (fine-tune) -> evaluate, under one MLflow parent run.

One typed config, so the Prefect UI shows one form; its defaults run on the bundled sample data
(Fashion-MNIST: image -> caption space, zero-shot over class prompts, classification in stage 2).
Each stage is its own flow and its own nested MLflow run, logging exactly as it does alone.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from flows._flow_module import expose_flow
from flows import _env  # noqa: F401

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows import reporting, tracking
from flows.align import AlignParams, ProjectorParams, align
from flows.extract import ExtractParams, _key, extract_embeddings
from flows.finetune import FinetuneParams, finetune
from projection.config import BaselineConfig, LossConfig, SplitConfig, TrainConfig
from projection.finetune_config import FinetuneConfig

SAMPLE = Path("data/generated")
TINY_RN = "data/models/xmodal-tiny-rn.json"
# Pretrained EfficientNet-Lite0 (ImageNet-1k; the packaged copy offline). 28x28 Fashion-MNIST at 64 px:
# a logistic probe on 600 images reads 0.72 (0.81 at 96 px, at 2.2x the compute; 224 px: ~10x).
LITE0 = "timm:image:tf_efficientnet_lite0.in1k?image_size=64&batch_size=128"


class AlignSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    projector: ProjectorParams = Field(default_factory=ProjectorParams, description="Projector architecture.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Stage-1 objective (MSE by default).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Stage-1 optimiser and schedule (the defaults: a step budget).")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Deterministic split by id (shared by stage 2).")
    baselines: BaselineConfig = Field(default_factory=BaselineConfig, description="Closed-form baselines.")


class FinetuneSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="Run stage 2 after stage 1.")
    config: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig(unfreeze="last_n", last_n=1, epochs=5,
                                                                          encoder_lr=1e-4),
                                   description="Task, unfreeze policy, learning rates.")


class PipelineConfig(BaseModel):
    """Everything one pipeline run needs. Relative paths resolve against the working folder."""

    model_config = ConfigDict(extra="forbid")

    manifest: str = Field(str(SAMPLE / "fashion" / "manifest.csv"), description="Paired dataset manifest (built if it is the sample).")
    source_column: str = Field("image", description="Source modality column (mapped from).")
    target_column: str = Field("caption", description="Target modality column (mapped into).")
    source_encoder: str = Field(LITE0, description="Frozen source encoder spec (default: EfficientNet-Lite0, pretrained).")
    target_encoder: str = Field("hf:text:sentence-transformers/all-MiniLM-L6-v2?pooling=mean&batch_size=128",
                                description="Frozen target encoder spec (default: pretrained all-MiniLM-L6-v2, packaged offline).")
    class_manifest: str | None = Field(str(SAMPLE / "fashion" / "classes.csv"),
                                       description="One prompt per class (embedded by the target encoder) for zero-shot.")
    class_column: str = Field("caption", description="Prompt column of class_manifest.")
    label_column: str | None = Field("label", description="Integer class labels in both manifests (zero-shot).")
    align: AlignSettings = Field(default_factory=AlignSettings, description="Stage 1.")
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings, description="Stage 2 (optional).")
    out_dir: str = Field("runs", description="Stores, projectors and checkpoints go under this folder.")
    refresh: bool = Field(False, description="Re-extract embeddings even when cached stores exist.")
    experiment: str | None = Field(None, description="MLflow experiment (default 'xmodal-pipeline-<dataset>').")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db).")


def ensure_sample_data(*paths: str | None) -> None:
    """The default parameters name the sample data; build it on first use (offline, seconds)."""
    missing = [p for p in paths if p and not Path(p).exists()]
    if any(Path(p).resolve().is_relative_to(SAMPLE.resolve()) for p in missing):
        from data.build import build_all

        build_all(SAMPLE)


@flow(name="pipeline", log_prints=True)
def pipeline(config: PipelineConfig = PipelineConfig()) -> dict:
    """Extract both modalities, align them, optionally fine-tune, and evaluate: one parent MLflow run."""
    logger = get_run_logger()
    c = config
    uri = tracking.tracking_uri(c.tracking_uri)
    ensure_sample_data(c.manifest, c.class_manifest)
    from encoders.manifest import Manifest

    dataset = Manifest.read(c.manifest).name
    experiment = c.experiment or f"xmodal-pipeline-{dataset}"
    exp = tracking.experiment_id(experiment)
    client = mlflow.MlflowClient()
    parent = client.create_run(exp, run_name=f"pipeline {dataset}: {c.source_column} -> {c.target_column}",
                               tags={"xmodal.stage": "pipeline", "xmodal.dataset": dataset})
    pid = parent.info.run_id
    common = {"experiment": experiment, "tracking_uri": uri, "parent_run_id": pid}
    try:
        tracking.log_params(pid, {"manifest": c.manifest, "source_column": c.source_column,
                                  "target_column": c.target_column, "source_encoder": c.source_encoder,
                                  "target_encoder": c.target_encoder, "finetune.enabled": c.finetune.enabled})
        stores = f"{c.out_dir}/stores"
        src = extract_embeddings(ExtractParams(manifest=c.manifest, column=c.source_column, encoder=c.source_encoder,
                                               out_dir=stores, refresh=c.refresh, **common))
        tgt = extract_embeddings(ExtractParams(manifest=c.manifest, column=c.target_column, encoder=c.target_encoder,
                                               out_dir=stores, refresh=c.refresh, **common))
        cls = None
        if c.class_manifest and c.label_column:
            cls = extract_embeddings(ExtractParams(manifest=c.class_manifest, column=c.class_column,
                                                   encoder=c.target_encoder, out_dir=stores, refresh=c.refresh, **common))
        a = c.align
        stage1 = align(AlignParams(source=src["store"], target=tgt["store"], projector=a.projector, loss=a.loss,
                                   train=a.train, split=a.split, baselines=a.baselines,
                                   label_column=c.label_column if cls else None, class_store=cls["store"] if cls else None,
                                   out_dir=f"{c.out_dir}/align", **common))
        stage2 = None
        if c.finetune.enabled:
            stage2 = finetune(FinetuneParams(projector_dir=stage1["projector_dir"], manifest=c.manifest,
                                             source_column=c.source_column, source_encoder=c.source_encoder,
                                             config=c.finetune.config, split_csv=f"{stage1['run_dir']}/split.csv",
                                             target_store=tgt["store"], out_dir=f"{c.out_dir}/finetune", **common))
        summary = evaluate(pid, experiment, stage1, stage2, [src, tgt] + ([cls] if cls else []))
        client.set_terminated(pid, "FINISHED")
    except BaseException:
        client.set_terminated(pid, "FAILED")
        raise
    logger.info("pipeline finished: MLflow parent run %s", pid)
    return {"parent_run_id": pid, "extract": [src, tgt] + ([cls] if cls else []), "align": stage1,
            "finetune": stage2, "summary": summary}


@flow(name="evaluate", log_prints=True)
def evaluate(parent_run_id: str, experiment: str, stage1: dict, stage2: dict | None, extracts: list[dict]) -> dict:
    """The final evaluation: one table of every stage's held-out numbers, in its own child run and the parent."""
    client = mlflow.MlflowClient()
    exp = tracking.experiment_id(experiment)
    run = client.create_run(exp, run_name="evaluate", tags={"xmodal.stage": "evaluate",
                                                            "mlflow.parentRunId": parent_run_id})
    rid = run.info.run_id
    headline = {f"stage1_{k}": v for k, v in stage1["metrics"]["projector"].items()}
    headline |= {f"stage1_ridge_{k}": v for k, v in stage1["metrics"].get("ridge", {}).items()
                 if k in ("p2t_r1", "zeroshot_acc", "mse")}
    if stage2:
        headline |= {f"stage2_before_{stage2['metric']}": stage2["before"]["metric"],
                     f"stage2_after_{stage2['metric']}": stage2["after"]["metric"]}
        for name, m in stage2["alignment"].items():
            headline |= {f"alignment_{name}_{k}": v for k, v in m.items() if k in ("mse", "cosine", "p2t_r1")}
    for target in (rid, parent_run_id):
        tracking.log_metrics(target, headline)
    tracking.log_json(rid, {"stage1": stage1["metrics"], "stage2": stage2 and {k: stage2[k] for k in
                                                                              ("task", "before", "after", "alignment")},
                            "weights_origin": stage1["weights_origin"]}, "evaluation.json")
    client.set_terminated(rid, "FINISHED")
    origins = stage1["weights_origin"]
    md = [f"### xmodal pipeline\n\nMLflow parent run `{parent_run_id}` · encoders: source {origins['source']}, "
          f"target {origins['target']}\n\n**Stage 1** (held-out test split)\n\n"
          + reporting.markdown_table(reporting.metrics_table(stage1["metrics"]))]
    if stage2:
        md.append(f"\n\n**Stage 2** {stage2['task']}: test {stage2['metric']} before {stage2['before']['metric']:.4f}"
                  f" -> after {stage2['after']['metric']:.4f}")
    create_markdown_artifact("".join(md), key=_key("pipeline-summary"))
    tracking.link_artifact(parent_run_id, _key("pipeline-mlflow"))
    return headline | {"evaluate_run_id": rid}


expose_flow(__name__, "pipeline")  # `from flows import pipeline` calls the flow; `flows.pipeline.X` is the module's
