"""Compare runs: a pandas table of chosen runs' params and final metrics, and a comparison plot.

MLflow's UI compares runs too (`mlflow ui`); this is the same view from Python or a terminal,
so a sweep can be judged in a notebook or CI log.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from flows import _env  # noqa: F401

import mlflow

from flows import tracking

DEFAULT_METRICS = ["test_mse", "test_cosine", "test_p2t_r1", "test_p2t_mrr", "test_zeroshot_acc",
                   "ridge_test_p2t_r1", "best_epoch"]
DEFAULT_PARAMS = ["projector.kind", "projector.depth", "projector.hidden", "projector.activation", "loss.terms",
                  "train.lr", "train.epochs", "source_encoder", "target_encoder"]


def compare_runs(experiment: str | None = None, run_ids: list[str] | None = None, last: int = 10,
                 stage: str = "align", metrics: list[str] | None = None, params: list[str] | None = None,
                 tracking_uri: str | None = None) -> pd.DataFrame:
    """One row per run (newest first): chosen params and final metrics. Names what it cannot find."""
    tracking.tracking_uri(tracking_uri)
    if experiment:
        exps = [experiment]
        if mlflow.get_experiment_by_name(experiment) is None:
            known = [e.name for e in mlflow.search_experiments()]
            raise ValueError(f"no MLflow experiment {experiment!r}; known: {', '.join(known) or 'none'}")
    else:
        exps = [e.name for e in mlflow.search_experiments()]
    filt = f"tags.`xmodal.stage` = '{stage}'" if stage else ""
    if run_ids:
        filt = " and ".join(f for f in [filt, "attributes.run_id IN (" + ", ".join(f"'{r}'" for r in run_ids) + ")"] if f)
    runs = mlflow.search_runs(experiment_names=exps, filter_string=filt, order_by=["attributes.start_time DESC"],
                              max_results=len(run_ids) if run_ids else last)
    if runs.empty:
        raise ValueError(f"no {stage or ''} runs found in {', '.join(exps) or 'any experiment'}")
    metrics, params = metrics or DEFAULT_METRICS, params or DEFAULT_PARAMS
    cols = {"run_id": runs["run_id"], "run": runs.get("tags.mlflow.runName"), "started": runs["start_time"]}
    for p in params:
        if f"params.{p}" in runs:
            cols[p] = runs[f"params.{p}"]
    for m in metrics:
        if f"metrics.{m}" in runs:
            cols[m] = runs[f"metrics.{m}"]
    return pd.DataFrame(cols).reset_index(drop=True)


def comparison_plot(table: pd.DataFrame, path: str | Path, metrics: list[str] | None = None) -> Path:
    """Grouped bars: one group per metric, one bar per run."""
    from flows.reporting import plt

    metrics = [m for m in (metrics or ["test_p2t_r1", "test_zeroshot_acc", "test_cosine", "ridge_test_p2t_r1"])
               if m in table]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(metrics), 4))
    width = 0.8 / max(len(table), 1)
    for i, row in table.iterrows():
        ax.bar([k + i * width for k in range(len(metrics))], [row[m] for m in metrics], width,
               label=f"{row['run_id'][:8]} {row.get('projector.kind', '')} {row.get('projector.hidden', '')}")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(metrics))], metrics)
    ax.set_title("xmodal runs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
