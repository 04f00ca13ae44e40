"""How a comparison looks: a terminal table that fits 160 columns, and a plot of small multiples.

Measured before this module: one table line of 1,105 characters (every param and metric in one frame) and a
2615x506 px bar chart of the first 10 metrics, half of it legend, without ridge or stage 2. Here the table is
split into blocks (runs and their labels; the params that differ; one block per stage and method), each cut to
the width, and the plot has one panel per metric family with the projector beside its baselines and stage 2's
before/after side by side; the legend sits under the panels, never over a bar.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from flows.tracking.compare import short_names, short_value

WIDTH = 160  # what a terminal or a CI log shows without wrapping
HEADS = ("p2t_r1", "p2t_mrr", "t2p_r1", "zeroshot_acc", "cosine", "mse")  # panel order: retrieval first
_HEAD = "|".join(HEADS)
_KEY_COLUMNS = ("run_id", "run", "label", "started")


def metric_cell(column: str) -> tuple[str, str] | None:
    """A metric column -> (family, method): the panel it belongs to and its bar there; None: not plotted."""
    rules = [  # (pattern, family, method), first match wins
        (r"stage2_(before|after)_(\w+)", r"stage 2: \2", r"\1"),
        (r"(before|after)_test_(accuracy|r2|metric|p2t_r1)", r"stage 2: \2", r"\1"),
        (rf"alignment_after_finetune_({_HEAD})", r"\1", "projector after stage 2"),
        (rf"stage1_({_HEAD})", r"\1", "projector"),
        (rf"stage1_(\w+?)_({_HEAD})", r"\2", r"\1"),
        (rf"test_({_HEAD})", r"\1", "projector"),
        (rf"(\w+?)_test_({_HEAD})", r"\2", r"\1"),
    ]
    for pattern, family, method in rules:
        m = re.fullmatch(pattern, column)
        if m:
            return m.expand(family), m.expand(method)
    return None


def metric_group(column: str) -> tuple[str, str]:
    """A metric column -> (block title, short column name) for the text table: 'stage1_ridge_p2t_r1' ->
    ('stage 1: ridge', 'p2t_r1')."""
    rules = [(r"stage2_(\w+)", "stage 2", r"\1"), (r"alignment_(\w+?)_(mse|cosine|p2t_r1)", r"alignment \1", r"\2"),
             (r"stage1_(ridge|procrustes|refined|identity)_(\w+)", r"stage 1: \1", r"\2"),
             (r"stage1_(\w+)", "stage 1: projector", r"\1"),
             (r"(before|after)_test_(\w+)", r"test, \1 stage 2", r"\2"),
             (r"(ridge|procrustes|refined|identity)_test_(\w+)", r"test: \1", r"\2"), (r"test_(\w+)", "test: projector", r"\1")]
    for pattern, group, name in rules:
        m = re.fullmatch(pattern, column)
        if m:
            return m.expand(group), m.expand(name)
    return "other", column


def format_table(table: pd.DataFrame, width: int = WIDTH) -> str:
    """The comparison as blocks no wider than ``width``: runs + labels, differing params, metrics by group."""
    key = table["run_id"].str[:8].rename("run")
    blocks = [("runs (label: the params in which they differ)",
               pd.DataFrame({"run_id": table["run_id"], "label": [_cut(lab, width - 36) for lab in table["label"]]}))]
    params = [c for c in table.columns if c not in _KEY_COLUMNS and not pd.api.types.is_float_dtype(table[c])
              and c not in _metric_columns(table)]
    if params:
        names = short_names(params)
        frame = pd.DataFrame({names[p]: table[p].map(lambda v: "" if pd.isna(v) else short_value(v)) for p in params})
        blocks += _chunks("params that differ", key, frame, width)
    groups: dict[str, dict[str, pd.Series]] = {}
    for column in _metric_columns(table):
        group, name = metric_group(column)
        groups.setdefault(group, {})[name] = table[column]
    for group, columns in groups.items():
        blocks += _chunks(group, key, pd.DataFrame(columns), width)
    out = []
    for title, frame in blocks:
        body = frame.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")
        out.append(f"{title}\n" + "\n".join(line.rstrip()[:width] for line in body.splitlines()))
    return "\n\n".join(out)


def _metric_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in _KEY_COLUMNS and pd.api.types.is_numeric_dtype(table[c])]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _chunks(title: str, key: pd.Series, frame: pd.DataFrame, width: int) -> list[tuple[str, pd.DataFrame]]:
    """The frame's columns in slices whose rendered lines fit ``width``, each slice keyed by the short run id."""
    out, current = [], []
    for column in frame.columns:
        trial = pd.concat([key, frame[current + [column]]], axis=1)
        rendered = trial.to_string(index=False, float_format=lambda v: f"{v:.4f}")
        if current and max(map(len, rendered.splitlines())) > width:
            out.append(current)
            current = []
        current.append(column)
    if current:
        out.append(current)
    return [(title if len(out) == 1 else f"{title} ({k + 1}/{len(out)})",
             pd.concat([key, frame[cols]], axis=1)) for k, cols in enumerate(out)]


def comparison_figure(table: pd.DataFrame):
    """Small multiples: one panel per metric family (methods on the x axis, one bar per run), legend below."""
    from flows.tracking.reporting import plt

    panels: dict[str, dict[str, str]] = {}
    for column in _metric_columns(table):
        cell = metric_cell(column)
        if cell and table[column].notna().any():
            panels.setdefault(cell[0], {})[cell[1]] = column
    order = sorted(panels, key=lambda f: (f.startswith("stage 2"), HEADS.index(f) if f in HEADS else len(HEADS), f))
    ncols = min(4, max(len(order), 1))
    nrows = max(1, math.ceil(len(order) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.7 * nrows), squeeze=False)
    colors = plt.get_cmap("tab10")
    width = 0.8 / max(len(table), 1)
    for ax, family in zip(axes.ravel(), order):
        methods = sorted(panels[family], key=_method_rank)
        for i, (_, row) in enumerate(table.iterrows()):
            ax.bar([k + i * width for k in range(len(methods))], [row[panels[family][m]] for m in methods], width,
                   color=colors(i % 10), label=_cut(f"{row['run_id'][:8]}: {row['label']}", 70))
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(methods))], methods, rotation=20, ha="right",
                      fontsize=7)
        ax.set_title(family + (" (lower is better)" if family == "mse" else ""), fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes.ravel()[len(order):]:
        ax.set_visible(False)
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(2, max(len(labels), 1)),
               fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def _method_rank(method: str) -> tuple[int, str]:
    """The projector first, its baselines after it, stage 2 before its after."""
    ranks = {"projector": 0, "ridge": 1, "procrustes": 2, "refined": 3, "projector after stage 2": 4,
             "before": 5, "after": 6}
    return ranks.get(method, 9), method


def figure_panels(fig) -> list[dict]:
    """What each visible panel shows, read back from the drawn figure: its title and x-axis labels."""
    return [{"title": ax.get_title(), "methods": [t.get_text() for t in ax.get_xticklabels()]}
            for ax in fig.axes if ax.get_visible()]


def comparison_plot(table: pd.DataFrame, path: str | Path) -> Path:
    """The figure as a PNG, and beside it ``<name>.json``: its panels and legend, for a script or a test."""
    from flows.tracking.reporting import plt

    fig = comparison_figure(table)
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    legend = [t.get_text() for t in fig.legends[0].get_texts()] if fig.legends else []
    path.with_suffix(".json").write_text(json.dumps({"panels": figure_panels(fig), "legend": legend}, indent=2))
    plt.close(fig)
    return path
