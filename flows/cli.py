"""`xmodal` command line: thin wrappers over the flows (which stay callable from Python)."""

from __future__ import annotations

from typing import Any, Optional, get_args

import typer

from projection.align.config import LossName, ProjectorConfig
from projection.contrastive.config import ContrastiveConfig, ContrastiveLossName
from projection.finetune.config import FinetuneConfig, TaskName, UnfreezePolicy


def _choices(literal: Any) -> str:
    """CLI help for a family, derived from its Literal (which the config validates against)."""
    return " | ".join(get_args(literal))


def _default(model: type, field: str) -> Any:
    """The config's own default, so the CLI never drifts from Python (tests/flows/test_names.py)."""
    return model.model_fields[field].default



class _App(typer.Typer):
    """Errors that are the user's to fix end as one line on stderr and exit code 2 (flows/errors.py);
    anything else keeps its traceback."""

    def __call__(self, *args, **kwargs):
        from flows import errors

        errors.quiet_expected_tracebacks()
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            if not errors.is_user_error(exc):
                raise
            typer.echo(f"xmodal: error: {errors.one_line(exc)}", err=True)
            raise SystemExit(2) from None


app = _App(add_completion=False, no_args_is_help=True, help="Cross-modal embedding alignment.")


@app.command()
def extract(
    manifest: str = typer.Argument(..., help="CSV/Parquet manifest with an id column."),
    column: str = typer.Option(..., "--column", "-c", help="Modality column to embed."),
    encoder: str = typer.Option(..., "--encoder", "-e", help="Encoder spec, e.g. open_clip:image:ViT-B-32@/ckpt.safetensors"),
    out_dir: str = typer.Option("runs/stores", help="Where stores go."),
    on_error: str = typer.Option("skip", help="skip | fail"),
    store_dtype: str = typer.Option("float32", help="float32 | float16"),
    batch_size: Optional[int] = typer.Option(None, help="Override the spec's batch size."),
    cpu_workers: Optional[int] = typer.Option(
        None, help="CPU only: encode each batch as this many parallel one-thread slices (default: one per torch thread)."),
    refresh: bool = typer.Option(False, help="Rebuild even if a complete store exists."),
):
    """Embed one manifest column with a frozen encoder into an HDF5 store (a Prefect flow, an MLflow run)."""
    from flows.extract import ExtractParams, extract_embeddings

    extract_embeddings(ExtractParams(manifest=manifest, column=column, encoder=encoder, out_dir=out_dir,
                                     on_error=on_error, store_dtype=store_dtype, batch_size=batch_size,
                                     cpu_workers=cpu_workers, refresh=refresh))


@app.command("build-data")
def build_data(out_dir: str = typer.Option("data/generated", help="Output folder."),
               fashion: int = typer.Option(3000, help="Balanced Fashion-MNIST rows; 0 = all 70,000.")):
    """Build the offline sample data (digits, sketches, captions; RGB/depth scenes)."""
    from pathlib import Path

    from data.build import build_all

    for name, path in build_all(Path(out_dir), fashion_size=fashion).items():
        typer.echo(f"{name}: {path}")


@app.command()
def compare(
    experiment: Optional[str] = typer.Option(None, help="MLflow experiment (default: all)."),
    run_id: Optional[list[str]] = typer.Option(None, "--run-id", help="Runs to compare (repeatable)."),
    last: int = typer.Option(10, help="Without --run-id: the newest K runs."),
    stage: Optional[str] = typer.Option(
        None, help="align | pipeline | finetune | extract (default: the experiment's stage, else align)."),
    plot: str = typer.Option("runs/compare.png", help="Where to write the comparison plot."),
):
    """Table of runs' params and final metrics (and a plot), newest first."""
    from pathlib import Path

    import pandas as pd

    from flows.tracking.compare import compare_runs, comparison_plot

    table = compare_runs(experiment, run_id, last, stage)
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.float_format", "{:.4f}".format):
        typer.echo(table.drop(columns=["started"]).to_string(index=False))
    Path(plot).parent.mkdir(parents=True, exist_ok=True)
    typer.echo(f"plot: {comparison_plot(table, plot)}")


def parse_loss(text: str) -> dict[str, float]:
    """'mse' -> {'mse': 1.0}; 'mse=1,infonce=0.1' -> {'mse': 1.0, 'infonce': 0.1}."""
    terms: dict[str, float] = {}
    for part in filter(None, (t.strip() for t in text.split(","))):
        name, _, weight = part.partition("=")
        try:
            terms[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise typer.BadParameter(f"loss term {part!r}: the weight after '=' must be a number, e.g. 'mse=1,infonce=0.1'") from None
    if not terms:
        raise typer.BadParameter("no loss terms given, e.g. 'mse' or 'mse=1,infonce=0.1'")
    return terms


def apply_sets(config: dict, items: list[str]) -> dict:
    """Apply 'a.b.c=value' overrides to a nested dict; values are JSON when they parse (numbers, lists, null), else text."""
    import json

    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set {item!r}: expected key=value, e.g. train.lr=3e-4")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise typer.BadParameter(f"--set {item!r}: {part!r} is not a section")
        node[leaf] = value
    return config


def _floats(text: str | None) -> list[float] | None:
    return None if text is None else [float(v) for v in text.split(",") if v.strip()]


@app.command()
def promote(
    run_id: str = typer.Argument(..., help="The align (stage-1) run whose projector to register."),
    name: str = typer.Option(..., "--name", help="Registered model name, e.g. digits-image-to-caption."),
    alias: str = typer.Option("champion", "--alias", help="Alias the new version gets."),
):
    """Register a run's projector in the MLflow Model Registry (no pickle); load it as models:/NAME@ALIAS."""
    from mlflow.exceptions import MlflowException

    from flows.tracking.promote import promote as promote_run

    try:
        out = promote_run(run_id, name, alias)
    except (ValueError, MlflowException) as exc:  # unknown run, or no xmodal projector in it: one line
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"registered {out['name']} version {out['version']} as {out['uri']} (from run {run_id})")


@app.command()
def align(
    source_store: str = typer.Argument(..., help="Source-modality store (.h5)."),
    target_store: str = typer.Argument(..., help="Target-modality store (.h5)."),
    kind: Optional[str] = typer.Option(None, help=f"Projector: {_choices(ProjectorConfig.model_fields['kind'].annotation)} "
                                                 f"(default {_default(ProjectorConfig, 'kind')})."),
    hidden: Optional[int] = typer.Option(None, help="MLP hidden width (default 1024)."),
    depth: Optional[int] = typer.Option(None, help="MLP hidden layers (default 1)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: set by --steps)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer-step budget when --epochs is not given."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    batch_size: Optional[int] = typer.Option(None, help="Pairs per step."),
    split_seed: Optional[int] = typer.Option(None, help="Salt of the id-hash split."),
    ridge_alphas: Optional[str] = typer.Option(None, help="Ridge alphas to choose from on validation, e.g. '0.1,1,10'."),
    loss: str = typer.Option("mse", help=f"Loss terms from {_choices(LossName)}, e.g. 'mse' or 'mse=1,infonce=0.1'."),
    label_column: Optional[str] = typer.Option(None, help="Class labels (ints or strings): class-level R@1, transfer, zero-shot."),
    label_manifest: Optional[str] = typer.Option(None, help="Manifest holding --label-column (default: the stores' own)."),
    class_store: Optional[str] = typer.Option(None, help="Class-prompt store in the target space (zero-shot)."),
    transfer_column: Optional[str] = typer.Option(None, help="Column for the transfer figure (default: --label-column)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Any AlignParams field, e.g. train.weight_decay=0 (repeatable)."),
    out_dir: str = typer.Option("runs/align", help="Where projectors go."),
):
    """Stage 1: train a projector source -> target, report it beside ridge and Procrustes."""
    from pydantic import ValidationError

    from encoders.store import StoreError
    from flows.align import AlignParams, align as align_flow, check_inputs

    options = {"projector": {"kind": kind, "hidden": hidden, "depth": depth},
               "train": {"epochs": epochs, "steps": steps, "lr": lr, "batch_size": batch_size},
               "split": {"seed": split_seed}, "baselines": {"ridge_alphas": _floats(ridge_alphas)}}
    config = {section: {k: v for k, v in fields.items() if v is not None} for section, fields in options.items()}
    config |= {"source_store": source_store, "target_store": target_store, "loss": {"terms": parse_loss(loss)}, "label_column": label_column,
               "label_manifest": label_manifest, "class_store": class_store, "transfer_column": transfer_column,
               "out_dir": out_dir}
    try:
        params = AlignParams.model_validate(apply_sets(config, set_ or []))
    except ValidationError as exc:
        raise typer.BadParameter("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
    try:
        check_inputs(params)  # outside the flow, so bad input is one line, not a flow-run traceback
    except (ValueError, StoreError) as exc:  # ManifestError, StoreError: bad input, said in one line
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    align_flow(params)


@app.command()
def finetune(
    projector_dir: str = typer.Argument(..., help="Stage-1 projector folder."),
    manifest: str = typer.Option(..., help="Manifest with raw inputs and the task column."),
    source_column: str = typer.Option(..., help="Source modality column."),
    source_encoder: str = typer.Option(..., help="Source encoder spec."),
    task: str = typer.Option(_default(FinetuneConfig, "task"), help=_choices(TaskName)),
    unfreeze: str = typer.Option(_default(FinetuneConfig, "unfreeze"), help=_choices(UnfreezePolicy)),
    last_n: int = typer.Option(_default(FinetuneConfig, "last_n"), help="Blocks to unfreeze with --unfreeze last_n."),
    epochs: int = typer.Option(_default(FinetuneConfig, "epochs"), help="Maximum epochs."),
    split_csv: Optional[str] = typer.Option(None, help="Stage-1 split.csv (keeps test ids unseen)."),
    target_store: Optional[str] = typer.Option(None, help="Target store (retrieval; forgetting metrics)."),
):
    """Stage 2: fine-tune encoder (per policy) + projector + task head; prints before/after."""
    from flows.finetune import FinetuneParams, finetune as finetune_flow

    finetune_flow(FinetuneParams(projector_dir=projector_dir, manifest=manifest, source_column=source_column,
                                 source_encoder=source_encoder, split_csv=split_csv, target_store=target_store,
                                 config={"task": task, "unfreeze": unfreeze, "last_n": last_n, "epochs": epochs}))


@app.command()
def pipeline(
    finetune_enabled: bool = typer.Option(False, "--finetune/--no-finetune", help="Run stage 2."),
    params_file: Optional[str] = typer.Option(None, help="A JSON file with a full PipelineParams."),
):
    """The whole pipeline (defaults: the sample data)."""
    from pathlib import Path

    from flows.pipeline import PipelineParams, pipeline as pipeline_flow

    cfg = PipelineParams.model_validate_json(Path(params_file).read_text()) if params_file else PipelineParams()
    if finetune_enabled:
        cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"enabled": True})})
    pipeline_flow(cfg)


@app.command()
def search(
    query: str = typer.Argument(..., help="An image path, a text, or an id held by --source-store."),
    target_store: str = typer.Option(..., "--target-store", "-t", help="Store to search (target space)."),
    projector_dir: Optional[str] = typer.Option(None, help="Stage-1 projector folder (source -> target space)."),
    source_encoder: Optional[str] = typer.Option(None, help="Encoder spec for the query (default: the source store's)."),
    source_store: Optional[str] = typer.Option(None, help="Store holding the query id / naming its encoder."),
    k: int = typer.Option(10, "-k", help="How many results."),
):
    """Top-k ids (with cosine scores) of a target store for one query; exact, in chunks."""
    from projection.search.exact import search as search_fn

    try:
        results = search_fn(query, target_store=target_store, projector_dir=projector_dir, source_encoder=source_encoder,
                            source_store=source_store, k=k)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(results.table())


@app.command()
def contrastive(
    manifest: str = typer.Argument(..., help="Manifest with two image columns (e.g. image, sketch)."),
    column_a: str = typer.Option("image", help="First modality (tower a)."),
    column_b: str = typer.Option("sketch", help="Second modality (tower b)."),
    loss: str = typer.Option(_default(ContrastiveConfig, "loss"), help=_choices(ContrastiveLossName)),
    epochs: int = typer.Option(_default(ContrastiveConfig, "epochs"), help="Epochs."),
    batch_size: int = typer.Option(_default(ContrastiveConfig, "batch_size"), help="Pairs per step (the contrastive batch)."),
    label_column: Optional[str] = typer.Option(None, help="Labels for class-level retrieval metrics (e.g. 'label')."),
):
    """Train two small towers contrastively; prints held-out retrieval, trained vs random init, and the tower specs."""
    from flows.contrastive import ContrastiveParams, contrastive_train

    out = contrastive_train(ContrastiveParams(manifest=manifest, column_a=column_a, column_b=column_b,
                                              label_column=label_column,
                                              config={"loss": loss, "epochs": epochs, "batch_size": batch_size}))
    for name, spec in out["tower_specs"].items():
        typer.echo(f"tower {name}: {spec}")


@app.command()
def demo():
    """Run the whole pipeline on the bundled sample data with embedded defaults."""
    from flows.demo import run_demo

    run_demo()


if __name__ == "__main__":
    app()
