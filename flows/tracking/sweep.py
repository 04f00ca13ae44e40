"""Flow: a grid sweep over any stage-1 settings, each setting an align run under one MLflow parent run; the best
by a chosen metric is promoted to a registry alias.

This is what "compare runs in MLflow" is for: the parent run's children sit side by side in MLflow's UI (and in
``xmodal compare``), each named by the settings it tried, and the winner is loadable as ``models:/NAME@ALIAS``.
The grid names AlignParams fields by dotted path (``{"train.lr": [1e-3, 3e-3], "projector.hidden": [256, 512]}``);
every setting is validated before anything runs, so a misspelled field fails at once, naming it.
"""

from __future__ import annotations

import copy
import itertools
import json
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from encoders.store import EmbeddingStore
from flows.align import AlignParams, align
from flows.tracking import runs


class SweepParams(BaseModel):
    """A base stage-1 config, the grid over its fields, and how the best run is chosen and promoted."""

    model_config = ConfigDict(extra="forbid")

    base: AlignParams = Field(description="The stage-1 settings every run starts from (stores, split, ...).")
    grid: dict[str, list[Any]] = Field(
        description="Dotted AlignParams field -> values to try, e.g. {\"train.lr\": [0.001, 0.003], "
        "\"projector.hidden\": [256, 512]}: every combination is one align run.")
    metric: str = Field("test_p2t_r1", description="MLflow metric of the align runs that picks the best, e.g. "
                        "test_p2t_r1, test_cosine, test_zeroshot_acc, best_val_loss.")
    higher_is_better: bool = Field(True, description="Whether a higher value of the metric is better.")
    register_model: str | None = Field(None, description="Register the best run's projector under this name "
                                       "(empty: do not register).")
    alias: str = Field("champion", description="Alias the best run's registered version gets.")
    max_parallel: int = Field(2, ge=1, description="Align runs at once (threads; each also uses torch's threads).")
    run_name: str | None = Field(None, description="MLflow name of the parent run (default: the grid).")


def settings(p: SweepParams) -> list[tuple[str, AlignParams]]:
    """(label, params) per grid point, in grid order; every point validated here, before any run starts."""
    if not p.grid or any(not values for values in p.grid.values()):
        raise ValueError(f"sweep grid {p.grid} is empty; give each field a list of values, e.g. {{'train.lr': [0.001]}}")
    names = list(p.grid)
    out = []
    for values in itertools.product(*(p.grid[n] for n in names)):
        config = p.base.model_dump()
        for name, value in zip(names, values):
            node = config
            *parents, leaf = name.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ValueError(f"sweep grid field {name!r}: {part!r} is not a section of AlignParams "
                                     f"(sections: {', '.join(k for k, v in config.items() if isinstance(v, dict))})")
                node = node[part]
            if leaf not in node:
                raise ValueError(f"sweep grid field {name!r}: no field {leaf!r} there (fields: {', '.join(node)})")
            node[leaf] = copy.deepcopy(value)
        label = ", ".join(f"{n}={v}" for n, v in zip(names, values))
        try:
            out.append((label, AlignParams.model_validate(config)))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"sweep setting {label}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return out


@task(name="align-setting", cache_policy=NO_CACHE, task_run_name="align {label}")
def run_setting(label: str, params: AlignParams) -> dict:
    """One grid point: an align subflow (its own MLflow child run under the sweep's parent)."""
    return align(params)


def _flow_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters.get("params")
    grid = p.grid if isinstance(p, SweepParams) else (p or {}).get("grid", {})
    return "sweep: " + " x ".join(f"{k}({len(v)})" for k, v in grid.items())


@flow(name="sweep", log_prints=True, flow_run_name=_flow_run_name, task_runner=ThreadPoolTaskRunner(max_workers=8))
def sweep(params: SweepParams) -> dict:
    """Run every grid point as an align run under one parent run; promote the best by ``metric``."""
    from mlflow.tracking import MlflowClient

    uri = runs.tracking_uri(params.base.tracking_uri)
    points = settings(params)
    src = EmbeddingStore(params.base.source_store)
    dataset = src.attrs.get("dataset", "data")
    experiment = params.base.experiment or f"xmodal-sweep-{dataset}"
    name = params.run_name or f"sweep {dataset}: " + " x ".join(params.grid)
    logger = get_run_logger()
    with runs.stage_run("sweep", dataset, name, experiment=experiment, flow="sweep",
                        params={"grid": json.dumps(params.grid), "metric": params.metric, "n_settings": len(points),
                                **runs.flatten(params.base.model_dump(mode="json"), "base.")}) as parent:
        futures = []
        for k, (label, point) in enumerate(points):
            child = point.model_copy(update={"experiment": experiment, "tracking_uri": uri,
                                             "parent_run_id": parent.run_id, "run_name": f"sweep {k + 1}: {label}",
                                             "out_dir": str(Path(point.out_dir) / f"sweep-{k + 1}")})
            futures.append(run_setting.with_options(task_run_name=f"align {k + 1}/{len(points)}: {label}")
                           .submit(label, child))
            if len(futures) % params.max_parallel == 0:  # at most max_parallel at once: wait for this batch
                for f in futures[-params.max_parallel:]:
                    f.wait()
        results = [f.result() for f in futures]
        client = MlflowClient()
        rows = []
        for (label, _), r in zip(points, results):
            value = client.get_run(r["run_id"]).data.metrics.get(params.metric)
            if value is None:
                raise ValueError(f"align run {r['run_id']} logged no metric {params.metric!r}; choose one it logs, "
                                 f"e.g. {', '.join(sorted(client.get_run(r['run_id']).data.metrics)[:6])}")
            rows.append({"setting": label, "run_id": r["run_id"], params.metric: value})
        best = (max if params.higher_is_better else min)(rows, key=lambda row: row[params.metric])
        parent.log_metrics({f"best_{params.metric}": best[params.metric]})
        parent.set_tags({"xmodal.best_run_id": best["run_id"], "xmodal.best_setting": best["setting"]})
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "sweep.json").write_text(json.dumps(rows, indent=2))
            parent.log_file(Path(d) / "sweep.json")
        registered = None
        if params.register_model:
            from flows.tracking.promote import promote

            registered = promote(best["run_id"], params.register_model, params.alias)
    for row in rows:
        logger.info("%s: %s = %.4f (run %s)", row["setting"], params.metric, row[params.metric], row["run_id"])
    logger.info("best: %s (%s = %.4f)%s", best["setting"], params.metric, best[params.metric],
                f" -> {registered['uri']}" if registered else "")
    return {"parent_run_id": parent.run_id, "runs": rows, "best": best, "registered": registered}


def sweep_command(source_store: str, target_store: str, grid: list[str], metric: str, higher_is_better: bool,
                  register: str | None, alias: str, base: dict, echo=print) -> dict:
    """`xmodal sweep`: 'FIELD=[v1,v2]' items (JSON lists, else comma-separated text) -> a sweep; prints the table."""
    parsed: dict[str, list[Any]] = {}
    for item in grid:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--grid {item!r}: expected FIELD=[v1,v2], e.g. train.lr=[0.001,0.003]")
        try:
            values = json.loads(raw)
        except ValueError:
            values = [v.strip() for v in raw.strip("[]").split(",") if v.strip()]
        parsed[name] = values if isinstance(values, list) else [values]
    out = sweep(SweepParams(base=AlignParams.model_validate(base), grid=parsed, metric=metric,
                            higher_is_better=higher_is_better, register_model=register, alias=alias))
    for row in out["runs"]:
        echo(f"{row['run_id']}  {metric}={row[metric]:.4f}  {row['setting']}")
    echo(f"best: {out['best']['setting']} ({metric}={out['best'][metric]:.4f}, run {out['best']['run_id']})"
         + (f" -> {out['registered']['uri']}" if out["registered"] else ""))
    return out
