"""`xmodal` command line: one command per flow, generated from its ``*Params`` model, plus a few tools.

The flow commands (extract, align, finetune, contrastive, pipeline) are built from the pydantic model
the flow takes (``flows/params_cli.py``): every top-level field is an option (or an argument) with the
model's name, default, choices and description, and ``--set key=value`` sets any field, nested ones
included (``--set train.lr=3e-4``). Nothing is retyped here, so a field added to a model is on the
command line at once. The flows stay callable from Python with the same models.
"""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import dataclass, field
from importlib import import_module
from typing import Annotated, Any, Iterator, Optional, get_origin

import typer
from pydantic import BaseModel


@dataclass(frozen=True)
class FlowCommand:
    """A flow on the command line: its module, its ``*Params`` model, the flow, and how fields are typed."""

    name: str
    module: str
    model: str
    flow: str
    positional: tuple[str, ...] = ()
    short: dict[str, str] = field(default_factory=dict)
    check: str | None = None  # a function of the module run on the params before the flow (bad input in one line)


FLOW_COMMANDS = (
    FlowCommand("extract", "flows.extract", "ExtractParams", "extract_embeddings", ("manifest",),
                {"column": "-c", "encoder": "-e"}),
    FlowCommand("align", "flows.align", "AlignParams", "align", ("source_store", "target_store"), check="check_inputs"),
    FlowCommand("finetune", "flows.finetune", "FinetuneParams", "finetune", ("projector_dir",)),
    FlowCommand("contrastive", "flows.contrastive", "ContrastiveParams", "contrastive_train", ("manifest",)),
    FlowCommand("pipeline", "flows.pipeline", "PipelineParams", "pipeline"),
)
# Commands that import no flow: `xmodal search ...` does not pay for torch, prefect and mlflow.
LIGHT_COMMANDS = {"search", "build-data", "--help"}


def apply_sets(config: dict, items: list[str]) -> dict:
    """Apply 'a.b.c=value' overrides to a nested dict; values are JSON when they parse (numbers, lists, null), else text."""
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


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def nested_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted name, default, description) of every field below the top level: what ``--set`` reaches."""
    for name, info in model.model_fields.items():
        if _is_model(info.annotation):
            default = info.get_default(call_default_factory=True)
            for sub, sub_info in type(default).model_fields.items():
                if _is_model(sub_info.annotation):
                    yield from nested_fields(sub_info.annotation, f"{prefix}{name}.{sub}.")
                else:
                    yield f"{prefix}{name}.{sub}", getattr(default, sub), sub_info.description or ""


def _parameter(name: str, info: Any, spec: FlowCommand) -> inspect.Parameter:
    """One model field as a typer argument or option: its name, type, default and description."""
    help_text = (info.description or "").replace("[", "(").replace("]", ")")  # rich markup
    if name in spec.positional:
        marker, default = typer.Argument(help=help_text, show_default=False), inspect.Parameter.empty
    else:
        decls = [f"--{name.replace('_', '-')}", *([spec.short[name]] if name in spec.short else [])]
        default = ... if info.is_required() else info.get_default(call_default_factory=True)
        marker = typer.Option(*decls, help=help_text)
    annotation = info.annotation
    if get_origin(annotation) in (dict, list) or annotation in (dict, list):  # JSON on the command line
        annotation, default = str, (None if default is ... else json.dumps(default))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, marker])


def add_flow_command(app: typer.Typer, spec: FlowCommand) -> None:
    """Register ``spec``'s flow as a command whose options are its Params model's top-level fields."""
    module = import_module(spec.module)
    model: type[BaseModel] = getattr(module, spec.model)
    top = {n: i for n, i in model.model_fields.items() if not _is_model(i.annotation)}
    params = [_parameter(n, top[n], spec) for n in (*spec.positional, *[n for n in top if n not in spec.positional])]
    params.append(inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[list[str]], typer.Option("--set", "-s", help="Any field, nested ones too: KEY=VALUE (repeatable); "
                                          "values are JSON when they parse, e.g. --set train.lr=3e-4.")]))

    def run(**values: Any) -> None:
        config = {k: (json.loads(v) if isinstance(v, str) and get_origin(top[k].annotation) in (dict, list) else v)
                  for k, v in values.items() if k != "set_" and v is not None}
        from flows import errors

        try:
            params_obj = model.model_validate(apply_sets(config, values.get("set_") or []))
            if spec.check:
                getattr(module, spec.check)(params_obj)  # bad input fails here, in one line, before any run exists
            getattr(module, spec.flow)(params_obj)
        except Exception as exc:  # the user's to fix: one line and exit code 2, however the command was invoked
            if not errors.is_user_error(exc):
                raise
            typer.echo(f"xmodal: error: {errors.one_line(exc)}", err=True)
            raise typer.Exit(2) from None

    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__name__ = spec.flow
    nested = "\n".join(f"  {k} = {json.dumps(v, default=str)}" for k, v, _ in nested_fields(model))
    doc = next(iter(inspect.getdoc(model).splitlines()), spec.model)
    epilog = f"Nested settings (--set KEY=VALUE), with their defaults:\n\n{nested}" if nested else None
    app.command(spec.name, help=f"{doc} (flow `{spec.flow}`, model `{spec.model}`)", epilog=epilog,
                rich_help_panel="Flows")(run)


class _App(typer.Typer):
    """Errors that are the user's to fix end as one line on stderr and exit code 2 (flows/errors.py);
    anything else keeps its traceback. The flow commands are added on first use of the command list."""

    light = False  # set for a light command: its run imports no flow module
    armed = False  # set once this module's own commands are registered (the end of the module)

    @property
    def registered_commands(self) -> list:
        commands = self.__dict__.setdefault("_commands", [])
        if self.armed and not self.light and not self.__dict__.get("_flows_added"):
            self.__dict__["_flows_added"] = True
            for spec in FLOW_COMMANDS:
                add_flow_command(self, spec)
        return commands

    @registered_commands.setter
    def registered_commands(self, value: list) -> None:
        self.__dict__["_commands"] = value

    def __call__(self, *args, **kwargs):
        from flows import errors

        errors.quiet_expected_tracebacks()
        self.light = not args and not kwargs and len(sys.argv) > 1 and sys.argv[1] in LIGHT_COMMANDS - {"--help"}
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            if not errors.is_user_error(exc):
                raise
            typer.echo(f"xmodal: error: {errors.one_line(exc)}", err=True)
            raise SystemExit(2) from None


app = _App(add_completion=False, no_args_is_help=True, help="Cross-modal embedding alignment.")


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
    """Table of runs' params and final metrics (and a plot), newest first; lines fit 160 columns."""
    from pathlib import Path

    from flows.tracking.compare import compare_runs
    from flows.tracking.compare_view import comparison_plot, format_table

    table = compare_runs(experiment, run_id, last, stage)
    typer.echo(format_table(table))
    Path(plot).parent.mkdir(parents=True, exist_ok=True)
    typer.echo(f"plot: {comparison_plot(table, plot)}")


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


@app.command("serve-search")
def serve_search(
    gallery: str = typer.Argument(..., help="Gallery store (.h5) to search; its manifest's files are the thumbnails."),
    sketch_projector: Optional[str] = typer.Option(None, help="Sketch -> gallery projector folder (enables sketch queries)."),
    sketch_encoder: Optional[str] = typer.Option(None, help="Sketch encoder spec or store (default: the gallery's encoder)."),
    text_projector: Optional[str] = typer.Option(
        None, help="Gallery -> caption projector folder (image -> caption; enables text queries)."),
    text_encoder: Optional[str] = typer.Option(None, help="Caption encoder spec, or the caption store it was trained on."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8765, help="Port."),
):
    """Search page + JSON API (POST /api/search): encoders, projectors and gallery loaded once."""
    from projection.search.app import serve
    from projection.search.service import load_service

    service = load_service(gallery, sketch_projector=sketch_projector, sketch_encoder=sketch_encoder,
                           text_projector=text_projector, text_encoder=text_encoder)
    typer.echo(f"gallery {service.gallery.store.path}: {len(service.gallery)} items, modes "
               f"{', '.join(service.routes)}; loaded in {service.load_s:.1f} s; http://{host}:{port}/")
    serve(service, host=host, port=port)


@app.command("build-index")
def build_index(
    store: str = typer.Argument(..., help="Embedding store (.h5) to index; saved beside it as STORE.faiss + .faiss.json."),
    kind: Optional[str] = typer.Option(None, help="flat | ivf_flat | ivf_pq | hnsw (default: by size and memory)."),
    memory_gib: float = typer.Option(8.0, help="Memory the index may hold (GiB); above it IVF-PQ."),
):
    """Build a FAISS index for a large gallery (a Prefect flow); search and serve-search use it above 100k rows."""
    from flows.search.index import IndexParams, build_index as build_index_flow

    side = build_index_flow(IndexParams(store=store, kind=kind, memory_gib=memory_gib))
    typer.echo(f"{side['plan']['factory']}: nprobe {side['nprobe']}, recall@10 {side['tuning']['recall_at_k']:.3f}, "
               f"{side['build']['build_s']:.1f} s, {side['index_bytes'] / 2**20:.1f} MiB")


@app.command()
def sweep(
    source_store: str = typer.Argument(..., help="Source-modality store (.h5)."),
    target_store: str = typer.Argument(..., help="Target-modality store (.h5)."),
    grid: list[str] = typer.Option(..., "--grid", help="FIELD=[v1,v2,...] over any AlignParams field, e.g. "
                                   "train.lr=[0.001,0.003] (repeatable; every combination is one run)."),
    metric: str = typer.Option("test_p2t_r1", help="MLflow metric that picks the best run."),
    lower_is_better: bool = typer.Option(False, "--lower-is-better", help="The metric is a loss or an error."),
    register: Optional[str] = typer.Option(None, "--register", help="Register the best projector under this name."),
    alias: str = typer.Option("champion", help="Alias the best run's version gets."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Base AlignParams field, e.g. train.epochs=5 (repeatable)."),
    out_dir: str = typer.Option("runs/align", help="Where projectors go."),
):
    """A grid over stage-1 settings: each an align run under one MLflow parent run; promotes the best."""
    from flows.tracking.sweep import sweep_command

    sweep_command(source_store, target_store, grid, metric, not lower_is_better, register, alias,
                  apply_sets({"source_store": source_store, "target_store": target_store, "out_dir": out_dir}, set_ or []),
                  echo=typer.echo)


@app.command()
def demo():
    """Run the whole pipeline on the bundled sample data with embedded defaults."""
    from flows.demo import run_demo

    run_demo()


app.armed = True

if __name__ == "__main__":
    app()
