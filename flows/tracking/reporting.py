"""Plots and tables a person looks at: loss curves, similarity heatmaps, metric tables.

Matplotlib's Agg backend, so it works on a headless worker.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

TABLE_COLUMNS = ["mse", "cosine", "p2t_r1", "p2t_r5", "p2t_r10", "p2t_mrr", "p2t_median_rank",
                 "t2p_r1", "t2p_mrr", "p2t_class_r1", "t2p_class_r1", "zeroshot_acc", "transfer"]


def loss_curve(history: list[dict], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    for key in ("train_loss", "val_loss"):
        vals = [h.get(key) for h in history]
        if any(v is not None for v in vals):
            ax.plot(epochs, vals, marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(matrix: np.ndarray, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    im = ax.imshow(matrix, cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metrics_table(rows: dict[str, dict[str, float]]) -> pd.DataFrame:
    """method -> metrics, as a frame with the headline columns first."""
    frame = pd.DataFrame.from_dict(rows, orient="index")
    cols = [c for c in TABLE_COLUMNS if c in frame.columns] + [c for c in frame.columns if c not in TABLE_COLUMNS]
    frame = frame[cols]
    frame.index.name = "method"
    return frame


def markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
    cols = [c for c in TABLE_COLUMNS if c in frame.columns]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, row in frame[cols].iterrows():
        lines.append(f"| {method} | " + " | ".join("" if pd.isna(row[c]) else f"{row[c]:.{digits}g}" for c in cols) + " |")
    return "\n".join(lines)


def spaces_markdown(frame: pd.DataFrame) -> str:
    """The collapse diagnostic per space (source, target, projected) as a markdown table, warnings included."""
    lines = ["| space | mean off-diagonal cosine | effective rank | warning |", "|---|---|---|---|"]
    for space, row in frame.iterrows():
        lines.append(f"| {space} | {row['mean_offdiag_cosine']:.5f} | {row['effective_rank']:.2f} | {row['warning']} |")
    return "\n".join(lines)
