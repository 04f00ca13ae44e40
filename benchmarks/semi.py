"""Alignment from few pairs: test R@1 against the number of pairs, pairs-only vs semi-supervised.

For each setting and each paired fraction of the training rows (default 0, 1, 5, 20, 100 %), the
rest of the training rows are kept as UNPAIRED rows on both sides (the target side shuffled, so
no method can see which row goes with which), and five methods are scored on the same held-out
test pairs (always paired, never trained on) with strict R@1 (projected source -> target pool):
  ridge, procrustes, mlp          fitted on the pairs alone
  refined                         Procrustes seed + mutual-NN (CSLS) refinement on unpaired rows
  semi_mlp                        MLP on pairs + cycle + MMD + the refined map's pseudo-pairs
At 0 % only the zero-pair refined map runs (moment seed); at 100 % there are no unpaired rows.

Settings: ``--fashion N`` builds Fashion-MNIST and extracts, through the extract flow, images under
EfficientNet-Lite0 -> MobileNetV2 (migration) and images -> Sobel sketches under Lite0 (cross-modal);
or give stores: ``--migration SRC.h5 TGT.h5`` and ``--crossmodal SRC.h5 TGT.h5``; without any, a stand-in on scikit-learn's digits
(two random-feature "encoders" of the pixels; pixels vs their Sobel sketch), which is what the
CI smoke run uses. Prints the whole curve, writes a PNG, and ends with one JSON line.

usage: python benchmarks/semi.py [--fashion 3000] [--migration A.h5 B.h5] [--crossmodal A.h5 B.h5]
                                 [--fracs 0,0.01,0.05,0.2,1] [--steps 150] [--out runs/bench/semi]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common  # noqa: F401  (repo on sys.path)
import numpy as np
import torch

from projection.align.baselines import ProcrustesBaseline, RidgeBaseline
from projection.align.config import LossConfig, ProjectorConfig, TrainConfig
from projection.align.data import InMemoryPairs, make_split
from projection.align.fit import fit_projector
from projection.align.metrics import alignment_metrics
from projection.semi.partial import pair_budget
from projection.semi.refine import RefinedMap, RefineConfig
from projection.semi.trainer import SemiConfig, fit_semi_mode
from projection.align.train import predict

METHODS = ("ridge", "procrustes", "mlp", "refined", "semi_mlp")
PAIRS_ONLY = ("ridge", "procrustes", "mlp")


def digits_standin() -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Two settings on sklearn digits without any encoder: random-feature maps of pixels / sketches."""
    from scipy.ndimage import sobel
    from sklearn.datasets import load_digits

    img = load_digits().images / 16.0  # (N, 8, 8)
    px = img.reshape(len(img), -1)
    sk = np.hypot(sobel(img, 1), sobel(img, 2)).reshape(len(img), -1)

    def encoder(x, seed, dim, act):
        r = np.random.default_rng(seed)
        h = act(x @ (r.normal(size=(x.shape[1], dim)) / np.sqrt(x.shape[1])) + 0.1 * r.normal(size=dim))
        return (h / np.linalg.norm(h, axis=1, keepdims=True)).astype(np.float32)

    relu = lambda z: np.maximum(z, 0)  # noqa: E731
    ids = [f"digit-{i:04d}" for i in range(len(img))]
    a = encoder(px, 1, 256, relu)
    return {"migration": (a, encoder(px, 2, 192, np.tanh), ids), "crossmodal": (a, encoder(sk, 3, 256, relu), ids)}


LITE0 = "timm:image:tf_efficientnet_lite0.in1k?image_size=64&batch_size=128"  # as the pipeline's default
MOBILENET = "timm:image:mobilenetv2_100.deepsort_in1k?image_size=64&batch_size=128"


def fashion_stores(size: int) -> dict[str, tuple[str, str]]:
    """Build Fashion-MNIST (``size`` rows) and extract the stores of both settings through the extract flow.

    migration: images under EfficientNet-Lite0 -> the same images under MobileNetV2 (both pretrained);
    crossmodal: images -> their Sobel sketches, both under EfficientNet-Lite0.
    """
    from data.build import build_all
    from flows.extract import ExtractParams, extract_embeddings

    manifest = str(build_all(fashion_size=size)["fashion"])
    store = lambda column, encoder: extract_embeddings(  # noqa: E731
        ExtractParams(manifest=manifest, column=column, encoder=encoder, out_dir="runs/stores"))["store"]
    image = store("image", LITE0)
    return {"migration": (image, store("image", MOBILENET)), "crossmodal": (image, store("sketch", LITE0))}


def from_stores(source: str, target: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from encoders.store import join_stores

    pairs = join_stores(source, target)
    x, y = pairs.arrays()
    return x, y, [str(i) for i in pairs.ids]


def fit_mlp(x, y, pcfg: ProjectorConfig, steps: int, seed: int) -> object:
    """Pairs-only MLP: stage 1's own recipe (ridge-started, step budget), same steps as the semi-supervised one."""
    train = TrainConfig(steps=steps, batch_size=min(256, len(x)), patience=None, seed=seed)
    return fit_projector(pcfg, LossConfig(), train, InMemoryPairs(x, y), None, x, y).model


def run_budget(x, y, ids, frac: float, args, rng: np.random.Generator) -> dict[str, float | None]:
    split = make_split(ids, val_frac=0.0, test_frac=args.test_frac, seed=args.seed)
    paired, released = pair_budget(ids, split["train"], frac, seed=args.seed)
    xp, yp, xt, yt = x[paired], y[paired], x[split["test"]], y[split["test"]]
    xu, yu = x[released], y[rng.permutation(released)]  # correspondence hidden
    pcfg = ProjectorConfig(kind="mlp", d_in=x.shape[1], d_out=y.shape[1], hidden=args.hidden)
    out: dict[str, float | None] = dict.fromkeys(METHODS)
    score = lambda m: alignment_metrics(m.predict(xt) if hasattr(m, "predict") else predict(m, xt), yt)["p2t_r1"]  # noqa: E731
    if len(paired) >= 2:
        out["ridge"] = score(RidgeBaseline(1.0, standardize=True).fit(xp, yp))
        out["procrustes"] = score(ProcrustesBaseline().fit(xp, yp))
        out["mlp"] = score(fit_mlp(xp, yp, pcfg, args.steps, args.seed))
    if len(released):
        refined = RefinedMap(RefineConfig(csls_k=10, seed=args.seed)).fit(xp, yp, xu, yu)
        out["refined"] = score(refined)
        if len(paired):
            f, _ = fit_semi_mode("semi", xp, yp, xu, yu, pcfg, TrainConfig(seed=args.seed), SemiConfig(steps=args.steps),
                                 refined=refined)
            out["semi_mlp"] = score(f)
    return {"n_pairs": len(paired), "n_unpaired": len(released), **out}


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (setting, rows) in zip(axes[0], curves.items()):
        for m in METHODS:
            pts = [(100 * r["frac"], r[m]) for r in rows if r[m] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m, linestyle="--" if m in PAIRS_ONLY else "-")
        ax.set(xscale="symlog", xlabel="% of training rows paired", ylabel="test R@1 (strict)", title=setting, ylim=(0, 1.02))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(curves: dict, at: float) -> dict:
    """Must-show 2: at ``at`` paired, semi >= 90 % of the fully paired MLP (some setting), beats pairs-only (all)."""
    out = {}
    for setting, rows in curves.items():
        by = {r["frac"]: r for r in rows}
        if at not in by or 1.0 not in by or by[1.0]["mlp"] is None or by[at]["semi_mlp"] is None:
            continue
        best_pairs_only = max(by[at][m] for m in PAIRS_ONLY if by[at][m] is not None)
        out[setting] = {"semi_over_full_mlp": by[at]["semi_mlp"] / max(by[1.0]["mlp"], 1e-12),
                        "semi": by[at]["semi_mlp"], "best_pairs_only": best_pairs_only,
                        "beats_pairs_only": by[at]["semi_mlp"] > best_pairs_only}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--migration", nargs=2, metavar=("SRC", "TGT"))
    ap.add_argument("--crossmodal", nargs=2, metavar=("SRC", "TGT"))
    ap.add_argument("--fashion", type=int, metavar="N", help="build Fashion-MNIST (N rows) and extract both settings' stores")
    ap.add_argument("--fracs", default="0,0.01,0.05,0.2,1")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps of each MLP (both start at a closed form)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--test-frac", type=float, default=0.1)
    ap.add_argument("--max-rows", type=int, default=None, help="use only the first N joined rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/bench/semi")
    ap.add_argument("--mlflow", metavar="EXPERIMENT", help="also log the curve and its plot as one MLflow run")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    given = {k: getattr(args, k) for k in ("migration", "crossmodal") if getattr(args, k)}
    if args.fashion:
        given = fashion_stores(args.fashion) | given
    data = {k: from_stores(*v) for k, v in given.items()} if given else digits_standin()
    source = ("Fashion-MNIST, pretrained EfficientNet-Lite0 / MobileNetV2" if args.fashion else "stores") if given \
        else "digits stand-in (random-feature encoders)"
    fracs = [float(f) for f in args.fracs.split(",")]
    curves: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for setting, (x, y, ids) in data.items():
        if args.max_rows:
            x, y, ids = x[: args.max_rows], y[: args.max_rows], ids[: args.max_rows]
        print(f"\n{setting} ({source}): {len(ids)} rows, D {x.shape[1]} -> {y.shape[1]}, test {args.test_frac:.0%}")
        print(f"{'paired':>8} {'n_pairs':>8} {'unpaired':>8} " + " ".join(f"{m:>10}" for m in METHODS))
        curves[setting] = []
        for frac in fracs:
            row = {"frac": frac} | run_budget(x, y, ids, frac, args, np.random.default_rng(args.seed))
            curves[setting].append(row)
            cells = " ".join(f"{row[m]:>10.3f}" if row[m] is not None else f"{'-':>10}" for m in METHODS)
            print(f"{frac:>8.0%} {row['n_pairs']:>8} {row['n_unpaired']:>8} {cells}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(curves, out / "semi_curve.png")
    v = verdict(curves, 0.05)
    for setting, s in v.items():
        print(f"{setting} at 5 % pairs: semi_mlp {s['semi']:.3f} = {s['semi_over_full_mlp']:.0%} of the fully paired MLP; "
              f"best pairs-only {s['best_pairs_only']:.3f} (beaten: {s['beats_pairs_only']})")
    result = {"benchmark": "semi", "data": source, "curves": curves, "at_5pct": v, "plot": str(out / "semi_curve.png"),
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "semi_curve.json").write_text(json.dumps(result, indent=1))
    if args.mlflow:
        from flows.tracking.runs import log_report

        series = {f"{setting}.{m}.test_r1": [(r["n_pairs"], r[m]) for r in rows if r[m] is not None]
                  for setting, rows in curves.items() for m in METHODS}  # step = number of pairs
        result["mlflow_run"] = log_report(args.mlflow, f"semi curve: {source}", {"data": source, "fracs": args.fracs,
                                          "steps": args.steps, "hidden": args.hidden}, series,
                                          [out / "semi_curve.png", out / "semi_curve.json"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
