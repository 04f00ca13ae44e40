"""`make demo`: real pretrained encoders on real data, through every stage, offline.

Encoders: EfficientNet-Lite0 pretrained on ImageNet-1k (``timm:image:tf_efficientnet_lite0.in1k``,
the packaged copy) for images, sketches and depth; all-MiniLM-L6-v2 (packaged) for captions.
Depth is the ground-truth disparity rendered as a grey image (near = bright) and read by the same
pretrained image encoder: no pretrained depth encoder ships offline, and an ImageNet CNN on a
disparity map still sees its edges and layout. Runs:

1. Fashion-MNIST image -> caption space, zero-shot over the 10 class prompts (the pipeline defaults),
   with stage 2 on classification in the same pipeline run: the last Lite0 block unfrozen, on a
   class-balanced subset of the same manifest and the same stage-1 split (``STAGE2_PER_CLASS`` items
   per class), because every stage-2 step runs the encoder from pixels. Stage 2 is the pipeline's own
   child run, so `xmodal compare --experiment xmodal-pipeline-fashion` shows it beside stage 1.
2. Fashion-MNIST sketch -> image search (Sobel edges -> photo), same image encoder on both sides.
3. Stereo RGB -> depth on the Middlebury patches, with the builder's block split (no test patch
   shares a pixel with a training patch).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from data.build import build_all

ROOT = Path(__file__).resolve().parents[1]
STAGE2_PER_CLASS = 50  # 500 images: ~400 train steps' worth of pixels per epoch on 2 cores
STAGE2_EPOCHS = 2


def run_demo() -> dict:
    """Run the three jobs, print the stores, the stage-1 tables and stage 2; return every result."""
    import os

    from flows.pipeline import PipelineParams, pipeline

    os.chdir(ROOT)  # the defaults (shared with the Prefect deployments) are paths relative to the repo
    console, t0 = Console(width=150), time.perf_counter()  # tables are wider than a default 80-column pipe
    manifests = build_all(ROOT / "data/generated")
    base = PipelineParams()  # the same defaults the Prefect deployments use
    runs = {
        "fashion image -> caption": pipeline(with_stage2(base)),
        "fashion sketch -> image": pipeline(base.model_copy(update={
            "source_column": "sketch", "target_column": "image", "target_encoder": base.source_encoder,
            "class_manifest": None})),
        "stereo rgb -> depth": pipeline(PipelineParams(
            manifest=str(manifests["stereo"].relative_to(ROOT)), source_column="rgb", target_column="depth",
            source_encoder=STEREO_ENCODER, target_encoder=STEREO_ENCODER, class_manifest=None, label_column=None,
            transfer_column="mean_disparity",
            align={"split": {"file": str((manifests["stereo"].parent / "split.csv").relative_to(ROOT))}})),
    }
    stage2 = runs["fashion image -> caption"]["finetune"]
    _print_stores(console, [r for run in runs.values() for r in run["extract"]])
    for title, run in runs.items():
        _print_stage1(console, title, run)
    _print_stage2(console, stage2)
    console.print(f"demo finished in {time.perf_counter() - t0:.1f} s. Open results: `.venv/bin/mlflow ui` "
                  "(http://127.0.0.1:5000); Prefect UI: `.venv/bin/prefect server start`.")
    return runs | {"stage2": stage2}


STEREO_ENCODER = "timm:image:tf_efficientnet_lite0.in1k?image_size=64&batch_size=128"  # patches are 64 px


def with_stage2(base, per_class: int = STAGE2_PER_CLASS, epochs: int = STAGE2_EPOCHS):
    """``base`` with stage 2 on (classification, last encoder block unfrozen) over a class-balanced subset of its
    manifest (the first ``per_class`` rows of each label), in the same pipeline run and stage-1 split.

    Run by the pipeline, not after it: the stage-2 run is a child of the pipeline run in its experiment, and the
    parent's stage2_* metrics are what `xmodal compare` plots (run separately, it had its own experiment)."""
    from flows.pipeline import FinetuneStageParams
    from projection.finetune.config import FinetuneConfig

    full = Path(base.manifest)
    frame = pd.read_csv(full, dtype={"id": str}, keep_default_na=False)
    subset = full.parent / f"stage2-{per_class}-per-class.csv"  # beside the images it names
    frame.groupby(base.label_column, sort=True).head(per_class).to_csv(subset, index=False)
    return base.model_copy(update={"finetune": FinetuneStageParams(enabled=True, manifest=str(subset), config=FinetuneConfig(
        unfreeze="last_n", last_n=1, epochs=epochs, encoder_lr=1e-4, patience=None))})


def _print_stores(console: Console, extracts: list[dict]) -> None:
    table = Table(title="xmodal demo: embedding stores")
    for col in ("store", "N", "dim", "errors", "items/s", "weights"):
        table.add_column(col)
    seen = set()
    for r in extracts:
        if r["store"] in seen:
            continue
        seen.add(r["store"])
        table.add_row(f"{r['dataset']}/{r['column']}", str(r["n"]), str(r["dim"]), str(r["n_errors"]),
                      "reused" if r["reused"] else f"{r['items_per_s']:.0f}", r["weights_origin"])
    console.print(table)


def _print_stage1(console: Console, title: str, run: dict) -> None:
    r = run["align"]
    origin = r["weights_origin"]
    label = " ".join(f"{side} {o.upper() if o == 'random-init' else o}" for side, o in origin.items())
    t = Table(title=f"stage 1 {title}: held-out test split (encoder weights: {label})")
    keys = {k for m in r["metrics"].values() for k in m}
    cols = [c for c in ("mse", "cosine", "p2t_r1", "p2t_r10", "t2p_r1", "p2t_class_r1", "t2p_class_r1", "zeroshot_acc",
                        "transfer") if c in keys]
    t.add_column("method")
    for c in cols:
        t.add_column(c)
    for method, m in r["metrics"].items():
        t.add_row(method, *(f"{m[c]:.4f}" if isinstance(m.get(c), float) and m[c] == m[c] else "" for c in cols))
    console.print(t)
    for side, stats in run["align"].get("spaces", {}).items():
        if stats.get("warning"):
            console.print(f"[bold red]{side} space: {stats['warning']}[/]")
    console.print(f"MLflow parent run {run['parent_run_id']}")


def _print_stage2(console: Console, f: dict) -> None:
    console.print(f"stage 2 {f['task']} (last Lite0 block unfrozen, {STAGE2_PER_CLASS} images per class, "
                  f"{STAGE2_EPOCHS} epochs) on the test split: {f['metric']} before (frozen-feature head) "
                  f"{f['before']['metric']:.4f} -> after (fine-tuned) {f['after']['metric']:.4f}")
    if f["alignment"]:
        s1, s2 = f["alignment"]["stage1"], f["alignment"]["after_finetune"]
        console.print(f"stage-1 alignment after stage 2 (forgetting): cosine {s1['cosine']:.4f} -> "
                      f"{s2['cosine']:.4f}, p2t R@1 {s1['p2t_r1']:.4f} -> {s2['p2t_r1']:.4f}")
