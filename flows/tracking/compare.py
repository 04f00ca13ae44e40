"""Compare runs: a pandas table of chosen runs' params and final metrics, and a comparison plot.

MLflow's UI compares runs too (`mlflow ui`); this is the same view from Python or a terminal, so a sweep can be
judged in a notebook or CI log. Any stage: stage-1 runs with their baselines (``ridge_*``, ``procrustes_*``),
pipeline parent runs with stage 1, its baselines and stage 2 before/after. Each run is labelled by the params in
which it differs from the others, so a table of ten runs reads as ten settings, not ten ids.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

import mlflow

from flows.tracking import runs as tracking

STAGES = ("align", "pipeline", "finetune", "extract", "evaluate", "contrastive")
_HEAD = r"(mse|cosine|p2t_r1|p2t_mrr|t2p_r1|zeroshot_acc)"
# Which final metrics each stage's table shows, in this order (each pattern matched against the metric name).
STAGE_METRICS = {
    "align": [rf"test_{_HEAD}", rf"(?!test_)\w+?_test_{_HEAD}", r"best_epoch"],
    "pipeline": [rf"stage1_{_HEAD}", rf"stage1_(?!{_HEAD}$)\w+?_{_HEAD}", r"stage2_\w+",
                 r"alignment_after_finetune_(cosine|p2t_r1)"],
    "finetune": [r"before_test_\w+", r"after_test_\w+", r"alignment_\w+_(cosine|p2t_r1)"],
}
STAGE_METRICS["evaluate"] = STAGE_METRICS["pipeline"]
# Params that differ between any two runs without saying anything about the setting.
VOLATILE = {"run_dir", "tracking_uri", "experiment", "parent_run_id"}
# Fields a linear projector does not have: shown blank for it, never as a width it does not use.
MLP_ONLY = ("depth", "hidden", "activation", "dropout", "layernorm", "residual")


class UnknownExperiment(ValueError):
    """A misspelled experiment, or one with no runs of the stage: the user's to fix, said in one line."""


def compare_runs(experiment: str | None = None, run_ids: list[str] | None = None, last: int = 10,
                 stage: str | None = None, metrics: list[str] | None = None, params: list[str] | None = None,
                 tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per run (newest first): a label of what differs, those params, and the stage's final metrics.

    ``stage`` defaults to the one the experiment is named for (``xmodal-<stage>-<dataset>``), else pipeline when
    the experiment holds pipeline runs, else align. Runs of
    a stage are found wherever they were logged: ``xmodal-align-digits`` also finds the align runs nested under
    pipelines in ``xmodal-pipeline-digits``."""
    tracking.tracking_uri(tracking_uri)
    named = re.fullmatch(rf"xmodal-({'|'.join(STAGES)})-(.+)", experiment or "")
    stage = stage or (named.group(1) if named else _top_stage(experiment))
    filters = [f"tags.`xmodal.stage` = '{stage}'"]
    if named and named.group(1) == stage:  # the stage's own experiment: its dataset, in any experiment
        exps = [e.experiment_id for e in mlflow.search_experiments()]
        filters.append(f"tags.`xmodal.dataset` = '{named.group(2)}'")
    elif experiment:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            known = sorted(e.name for e in mlflow.search_experiments())
            raise UnknownExperiment(f"no MLflow experiment {experiment!r}; experiments that exist: "
                                    f"{', '.join(known) or 'none'}")
        exps = [exp.experiment_id]
    else:
        exps = [e.experiment_id for e in mlflow.search_experiments()]
    if run_ids:
        filters.append("attributes.run_id IN (" + ", ".join(f"'{r}'" for r in run_ids) + ")")
    found = mlflow.search_runs(experiment_ids=exps, filter_string=" and ".join(filters),
                               order_by=["attributes.start_time DESC"], max_results=len(run_ids) if run_ids else last)
    if found.empty:
        raise UnknownExperiment(f"no {stage} runs found in {experiment or 'any experiment'}")
    found = _blank_mlp_only(found)
    shown = sorted(params or _differing(found))
    table = pd.DataFrame({"run_id": found["run_id"], "run": found.get("tags.mlflow.runName"),
                          "label": _labels(found, shown), "started": found["start_time"]})
    for p in shown:
        if f"params.{p}" in found:
            table[p] = found[f"params.{p}"]
    for m in metrics or _stage_metrics(found, stage):
        if f"metrics.{m}" in found:
            table[m] = found[f"metrics.{m}"]
    return table.reset_index(drop=True)


def _top_stage(experiment: str | None) -> str:
    """An experiment holding pipeline runs compares those (their stages are nested in them); otherwise align."""
    exp = mlflow.get_experiment_by_name(experiment) if experiment else None
    has_pipeline = exp is not None and not mlflow.search_runs(
        [exp.experiment_id], "tags.`xmodal.stage` = 'pipeline'", max_results=1).empty
    return "pipeline" if has_pipeline else "align"


def _blank_mlp_only(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    for kind_col in [c for c in runs if c.endswith("projector.kind")]:
        prefix = kind_col.removesuffix("kind")
        linear = runs[kind_col] == "linear"
        for field in MLP_ONLY:
            if prefix + field in runs:
                runs.loc[linear, prefix + field] = None
    return runs


def _differing(runs: pd.DataFrame) -> list[str]:
    """Params with two or more values among the runs where they apply (a blanked mlp-only field applies to none)."""
    cols = [c for c in runs if c.startswith("params.") and c.removeprefix("params.") not in VOLATILE]
    return [c.removeprefix("params.") for c in cols if runs[c].dropna().astype(str).nunique() > 1]


def short_names(shown: list[str]) -> dict[str, str]:
    """Each param's shortest dotted suffix that names the setting and is unique among the shown ones:
    'align.projector.kind' -> 'projector.kind', 'finetune.enabled' stays; a one-part key stays as it is."""
    out = {}
    for p in shown:
        parts = p.split(".")
        for k in range(min(2, len(parts)), len(parts) + 1):
            name = ".".join(parts[-k:])
            if sum(q == name or q.endswith("." + name) for q in shown) == 1:
                break
        out[p] = name
    return out


def short_value(value, limit: int = 28) -> str:
    """A value as a label shows it: an encoder spec loses its query string, anything longer is cut with '...'."""
    text = str(value)
    if ":" in text and "?" in text:  # encoder specs: 'timm:image:name?image_size=64&...' -> the model
        text = text.split("?", 1)[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _labels(runs: pd.DataFrame, shown: list[str]) -> list[str]:
    """'projector.kind=mlp, train.lr=0.003' from the differing params, in name order (stable between calls)."""
    names = short_names(shown)
    order = sorted(shown, key=lambda p: names[p])
    out = []
    for (_, row), name in zip(runs.iterrows(), runs.get("tags.mlflow.runName", runs["run_id"])):
        parts = [f"{names[p]}={short_value(row[f'params.{p}'])}" for p in order
                 if f"params.{p}" in row and pd.notna(row[f"params.{p}"])]
        out.append(", ".join(parts) or str(name))
    return out


def _stage_metrics(runs: pd.DataFrame, stage: str) -> list[str]:
    have = [c.removeprefix("metrics.") for c in runs if c.startswith("metrics.") and runs[c].notna().any()]
    patterns = STAGE_METRICS.get(stage)
    if not patterns:
        return sorted(have)
    return [m for pat in patterns for m in sorted(have) if re.fullmatch(pat, m)]
