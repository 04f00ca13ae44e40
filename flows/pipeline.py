"""Flow: the whole pipeline, extract -> align -> (fine-tune) -> evaluate, under one MLflow parent run.

One typed config, so the Prefect UI shows one form; its defaults run on the bundled sample data
(Fashion-MNIST: image -> caption space, zero-shot over class prompts, classification in stage 2).
Each stage is its own flow and its own nested MLflow run, logging exactly as it does alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.tracking import runlog
from flows.errors import check_paths
from flows.tracking import reporting
from flows.tracking import runs
from flows.align import AlignParams, ProjectorParams, align
from flows.errors import FLOW_RESULTS
from flows.extract import ExtractParams, _key, extract_embeddings
from flows.finetune import FinetuneParams, finetune
from projection.align.config import BaselineConfig, LossConfig, SplitConfig, TrainConfig
from projection.finetune.config import FinetuneConfig

SAMPLE = Path("data/generated")
# Pretrained EfficientNet-Lite0 (ImageNet-1k; the packaged copy offline). 28x28 Fashion-MNIST at 64 px:
# a logistic probe on 600 images reads 0.72 (0.81 at 96 px, at 2.2x the compute; 224 px: ~10x).
LITE0 = "timm:image:tf_efficientnet_lite0.in1k?image_size=64&batch_size=128"


# Defaults are explicit instances, never `default_factory`: pydantic leaves factory defaults out of the JSON
# schema, and the Prefect UI's run form (the deployment's parameters merged over that schema) then showed and
# submitted each nested class's own defaults (stage 2: unfreeze 'none' and encoder_lr 1e-5, not 'last_n' and 1e-4).
# tests/flows/test_parameter_schemas.py checks that every default in the schema equals the Python one.
class AlignStageParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    projector: ProjectorParams = Field(ProjectorParams(), description="Projector architecture.")
    loss: LossConfig = Field(LossConfig(), description="Stage-1 objective (MSE by default).")
    train: TrainConfig = Field(TrainConfig(), description="Stage-1 optimiser and schedule (the defaults: a step budget).")
    split: SplitConfig = Field(SplitConfig(), description="Deterministic split by id (shared by stage 2).")
    baselines: BaselineConfig = Field(BaselineConfig(), description="Closed-form baselines.")


class FinetuneStageParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="Run stage 2 after stage 1.")
    manifest: str | None = Field(None, description="Stage 2 on these rows (a subset of the pipeline's manifest, "
                                 "e.g. a class-balanced one: every stage-2 step runs the encoder on raw inputs); "
                                 "split as in stage 1. Empty: the pipeline's manifest.")
    config: FinetuneConfig = Field(FinetuneConfig(unfreeze="last_n", last_n=1, epochs=5, encoder_lr=1e-4),
                                   description="Task, unfreeze policy, learning rates.")


class PipelineParams(BaseModel):
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
    label_column: str | None = Field("label", description="Class labels in the manifest (ints or strings): class-level "
                                     "R@1, the transfer figure, and zero-shot when class_manifest is set.")
    transfer_column: str | None = Field(None, description="Manifest column for the cross-modal transfer figure "
                                        "(classes or numbers, e.g. mean_disparity); default: label_column.")
    align: AlignStageParams = Field(AlignStageParams(), description="Stage 1.")
    finetune: FinetuneStageParams = Field(FinetuneStageParams(), description="Stage 2 (optional).")
    register_model: str | None = Field(None, description="After the run, register its projector in the MLflow Model "
                                       "Registry under this name (empty: do not register).")
    register_alias: str = Field("champion", description="Alias the registered version gets (with register_model).")
    out_dir: str = Field("runs", description="Stores, projectors and checkpoints go under this folder.")
    refresh: bool = Field(False, description="Re-extract embeddings even when cached stores exist.")
    experiment: str | None = Field(None, description="MLflow experiment (default: xmodal-pipeline-DATASET, DATASET being the manifest's name).")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db).")
    run_name: str | None = Field(None, description="Name of this run in Prefect and MLflow (default: dataset, "
                                 "modalities, projector kind, time).")


def ensure_sample_data(*paths: str | None) -> None:
    """The default parameters name the sample data; build it on first use (offline, seconds)."""
    missing = [p for p in paths if p and not Path(p).exists()]
    if any(Path(p).resolve().is_relative_to(SAMPLE.resolve()) for p in missing):
        from data.build import build_all

        build_all(SAMPLE)


def run_label(c: PipelineParams, dataset: str | None = None) -> str:
    """'digits: image -> caption, mlp (+ stage 2)': what tells one run from the next in both UIs."""
    dataset = dataset or _dataset_name(c.manifest)
    return (f"{dataset}: {c.source_column} -> {c.target_column}, {c.align.projector.kind}"
            + (" + stage 2" if c.finetune.enabled else ""))


def _dataset_name(manifest: str) -> str:
    p = Path(manifest)  # encoders.manifest.Manifest.name, before the file is read (the flow run's name)
    return p.parent.name if p.stem == "manifest" else p.stem


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters.get("params", PipelineParams())
    params = params if isinstance(params, PipelineParams) else PipelineParams.model_validate(params)
    if params.run_name:
        return params.run_name
    # A name typed in the Prefect UI's Custom run form is the run's name before this renames it; Prefect's own
    # names are two-word slugs ("gleeful-squid"). Keep the typed one.
    current = flow_run.name or ""
    return current if current and not re.fullmatch(r"[a-z]+-[a-z]+", current) else run_label(params)


def _stages(c: "PipelineParams", common: dict) -> tuple[list[dict], dict, dict | None]:
    """extract (source, target, class prompts) -> align -> optional finetune, each a subflow under the parent run."""
    stores = f"{c.out_dir}/stores"
    extract = lambda manifest, column, encoder: extract_embeddings(ExtractParams(  # noqa: E731
        manifest=manifest, column=column, encoder=encoder, out_dir=stores, refresh=c.refresh, **common))
    src = extract(c.manifest, c.source_column, c.source_encoder)
    tgt = extract(c.manifest, c.target_column, c.target_encoder)
    cls = extract(c.class_manifest, c.class_column, c.target_encoder) if c.class_manifest and c.label_column else None
    a = c.align
    stage1 = align(AlignParams(source_store=src["store"], target_store=tgt["store"], projector=a.projector, loss=a.loss,
                               train=a.train, split=a.split, baselines=a.baselines,
                               label_column=c.label_column, label_manifest=c.manifest,
                               transfer_column=c.transfer_column, class_store=cls["store"] if cls else None,
                               out_dir=f"{c.out_dir}/align", **common))
    stage2 = None
    if c.finetune.enabled:
        stage2 = finetune(FinetuneParams(projector_dir=stage1["projector_dir"], manifest=c.finetune.manifest or c.manifest,
                                         source_column=c.source_column, source_encoder=c.source_encoder,
                                         config=c.finetune.config, split_csv=f"{stage1['run_dir']}/split.csv",
                                         target_store=tgt["store"], out_dir=f"{c.out_dir}/finetune", **common))
    return [src, tgt] + ([cls] if cls else []), stage1, stage2


@flow(name="pipeline", log_prints=True, flow_run_name=_flow_run_name, **FLOW_RESULTS)
def pipeline(params: PipelineParams = PipelineParams()) -> dict:
    """Extract both modalities, align them, optionally fine-tune, and evaluate: one parent MLflow run."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    c = params
    uri = runs.tracking_uri(c.tracking_uri)
    ensure_sample_data(c.manifest, c.class_manifest)
    check_paths(manifest=c.manifest, class_manifest=c.class_manifest,
                **{"finetune.manifest": c.finetune.manifest if c.finetune.enabled else None})
    from encoders.manifest import Manifest

    dataset = Manifest.read(c.manifest).name
    experiment = c.experiment or f"xmodal-pipeline-{dataset}"
    # MLflow's runs table shows ~20 characters of a name: what differs (columns, projector, stage 2 as +s2); the
    # experiment names the dataset, the Created column tells reruns apart, the tags name the Prefect flow run
    run_name = c.run_name or f"{c.source_column}→{c.target_column} {c.align.projector.kind}{'+s2' if c.finetune.enabled else ''}"
    with runs.stage_run("pipeline", dataset, run_name, experiment=experiment,
                            tags={"prefect.flow_run_id": str(flow_run.id)}, work=f"pipeline:{c.model_dump_json()}",
                            params=runs.flatten(c.model_dump(mode="json"))) as run:  # the whole config, as run
        pid = run.run_id
        extracts, stage1, stage2 = _stages(c, {"experiment": experiment, "tracking_uri": uri, "parent_run_id": pid})
        summary = evaluate(pid, experiment, stage1, stage2, extracts)
        registered = None
        if c.register_model:
            from flows.tracking.promote import promote

            registered = promote(stage1["run_id"], c.register_model, c.register_alias)
        summary_md = summary_markdown(pid, extracts, stage1, stage2, registered)
        _summary_to_parent(run, stage1["run_id"], summary_md)
    # the summary belongs to the pipeline's own flow run (its Artifacts tab), not to a subflow
    create_markdown_artifact(summary_md, key=_key("pipeline-summary"))
    runs.link_artifact(pid, _key("pipeline-mlflow"))
    logger.info("pipeline finished: MLflow parent run %s", pid)
    return {"parent_run_id": pid, "extract": extracts, "align": stage1, "finetune": stage2, "summary": summary,
            "registered": registered}


def _summary_to_parent(run: runs.StageRun, stage1_run_id: str, summary_md: str) -> None:
    """The parent is the run a user opens first: it holds the summary and stage 1's tables and plots (copies of
    the align run's CSV and PNG files, under stage1/), not only params and headline metrics."""
    import tempfile

    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "summary.md").write_text(summary_md)
        run.log_file(Path(d) / "summary.md")
        for art in client.list_artifacts(stage1_run_id):
            if not art.is_dir and art.path.endswith((".csv", ".png")) and art.path != "split.csv":
                run.log_file(client.download_artifacts(stage1_run_id, art.path, d), "stage1")


def summary_markdown(parent_run_id: str, extracts: list[dict], stage1: dict, stage2: dict | None,
                     registered: dict | None = None) -> str:
    """Stores, stage 1 beside its baselines, stage 2 before/after, and where the MLflow run is."""
    uri = mlflow.get_tracking_uri()
    run = mlflow.MlflowClient().get_run(parent_run_id)
    link = (f"[{run.info.run_name}]({runs.run_url(uri, run.info.experiment_id, parent_run_id)})"
            if uri.startswith(("http://", "https://")) else f"`{parent_run_id}` in {uri} (open with `mlflow ui`)")
    origins = stage1["weights_origin"]
    md = [f"### xmodal pipeline: {run.info.run_name}\n\nMLflow parent run: {link}\n\n**Stores**\n\n"
          "| dataset/column | N | dim | errors | weights | store |\n|---|---|---|---|---|---|\n"]
    md += [f"| {r['dataset']}/{r['column']} | {r['n']} | {r['dim']} | {r['n_errors']} | {r['weights_origin']} "
           f"| `{r['store']}` |\n" for r in extracts]
    md.append(f"\n**Stage 1** (held-out test split; encoders: source {origins['source']}, target {origins['target']})"
              "\n\n" + reporting.markdown_table(reporting.metrics_table(stage1["metrics"])))
    if stage2:
        md.append(f"\n\n**Stage 2** {stage2['task']}: test {stage2['metric']} before (frozen-feature head) "
                  f"{stage2['before']['metric']:.4f} -> after (fine-tuned) {stage2['after']['metric']:.4f}")
    if registered:
        md.append(f"\n\nRegistered: `models:/{registered['name']}@{registered['alias']}` (version {registered['version']})")
    return "".join(md)


@flow(name="evaluate", log_prints=True, flow_run_name=runlog.evaluate_name, **FLOW_RESULTS)
def evaluate(parent_run_id: str, experiment: str, stage1: dict, stage2: dict | None, extracts: list[dict]) -> dict:
    """The final evaluation: one table of every stage's held-out numbers, in its own child run and the parent."""
    dataset = extracts[0]["dataset"] if extracts else "data"
    with runs.stage_run("evaluate", dataset, "evaluate", experiment=experiment, parent_run_id=parent_run_id,
                            flow="pipeline") as run:
        headline = _headline(stage1, stage2)
        for target in (run.run_id, parent_run_id):
            runs.log_metrics(target, headline)
        run.log_json({"stage1": stage1["metrics"], "weights_origin": stage1["weights_origin"],
                      "stage2": stage2 and {k: stage2[k] for k in ("task", "before", "after", "alignment")}},
                     "evaluation.json")
    return headline | {"evaluate_run_id": run.run_id}


def _headline(stage1: dict, stage2: dict | None) -> dict[str, float]:
    # every stage-1 row: the projector as stage1_*, each baseline as stage1_<name>_* (what compare shows)
    headline = {f"stage1_{k}": v for k, v in stage1["metrics"]["projector"].items()}
    for name, m in stage1["metrics"].items():
        if name != "projector":
            headline |= {f"stage1_{name}_{k}": v for k, v in m.items()}
    if stage2:
        headline |= {f"stage2_before_{stage2['metric']}": stage2["before"]["metric"],
                     f"stage2_after_{stage2['metric']}": stage2["after"]["metric"]}
        for name, m in stage2["alignment"].items():
            headline |= {f"alignment_{name}_{k}": v for k, v in m.items() if k in ("mse", "cosine", "p2t_r1")}
    return headline


