"""Alignment from few pairs: test R@1 against the number of pairs, pairs-only vs semi-supervised, per set.

For each set (``benchmarks/semi_sets.py``: the digits stand-in it was designed on, and four it was
not: scikit-learn feature views, stereo RGB -> depth patches, procedurally drawn shapes under two
real packaged encoders) and each paired fraction of the training rows (default 1, 5, 20, 100 %),
the rest of the training rows are kept as UNPAIRED rows on both sides (target side shuffled), and
every method is scored on the same held-out test pairs (10 %, never trained on), strict R@1:
  ridge, procrustes, mlp    fitted on the budget's pairs alone (the MLP: stage 1's recipe, --steps steps)
  refined                   Procrustes seed + mutual-NN (CSLS) refinement on the unpaired rows (MUSE)
  transport                 rotation in the all-rows frame + Sinkhorn-plan refinement (projection/semi/transport.py)
  semi                      ``align(mode="semi")``'s method (projection/semi/method.py): 25 % of the budget's
                            pairs held out as val choose among pairs-only and unpaired-rows maps; the chosen
                            closed form is then refitted on all the budget's pairs. The val pairs are PART of
                            the budget: no extra pairs.
"fraction" = semi R@1 / the best fully paired R@1 (max of ridge, Procrustes, MLP on all training pairs).

``--cost``: a 3,000-row semi run with align's defaults (paired_frac 0.05) against the fully paired
align of the same stores (baselines + projector with defaults), both timed, on the shapes set.

usage: python benchmarks/semi.py [--sets a,b] [--fashion 3000] [--fracs 0.01,0.05,0.2,1] [--steps 150] [--cost]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common  # noqa: F401  (repo on sys.path)
import numpy as np
import torch

import semi_sets
from projection.align.baselines import ProcrustesBaseline, RidgeBaseline, fit_baselines
from projection.align.config import LossConfig, ProjectorConfig, TrainConfig
from projection.align.data import InMemoryPairs, make_split
from projection.align.fit import fit_projector
from projection.align.metrics import alignment_metrics
from projection.align.train import predict
from projection.semi.method import fit_semi_mode
from projection.semi.objective import SemiConfig
from projection.semi.partial import pair_budget
from projection.semi.refine import RefinedMap, RefineConfig
from projection.semi.transport import TransportConfig, TransportMap

METHODS = ("ridge", "procrustes", "mlp", "refined", "transport", "semi")
PAIRS_ONLY = ("ridge", "procrustes", "mlp")
VAL_SHARE = 0.25  # of the budget's pairs, held out to choose (semi only)


def fit_mlp(x, y, pcfg: ProjectorConfig, steps: int, seed: int) -> object:
    """Pairs-only MLP: stage 1's own recipe (ridge-started, step budget)."""
    train = TrainConfig(steps=steps, batch_size=min(256, len(x)), patience=None, seed=seed)
    return fit_projector(pcfg, LossConfig(), train, InMemoryPairs(x, y), None, x, y).model


def run_budget(x, y, ids, frac: float, args) -> dict:
    split = make_split(ids, val_frac=0.0, test_frac=args.test_frac, seed=args.seed)
    paired, released = pair_budget(ids, split["train"], frac, seed=args.seed)
    xp, yp, xt, yt = x[paired], y[paired], x[split["test"]], y[split["test"]]
    xu, yu = x[released], y[np.random.default_rng(args.seed).permutation(released)]  # correspondence hidden
    pcfg = ProjectorConfig(kind="mlp", d_in=x.shape[1], d_out=y.shape[1], hidden=args.hidden)
    out: dict = dict.fromkeys(METHODS) | {"seconds": {}}

    def score(name, fit):
        t0 = time.perf_counter()
        obj = fit()
        m = getattr(obj, "model", obj)  # a SemiFit: score what align would save
        out[name] = alignment_metrics(m.predict(xt) if hasattr(m, "predict") else predict(m, xt), yt)["p2t_r1"]
        out["seconds"][name] = round(time.perf_counter() - t0, 1)
        return obj

    score("ridge", lambda: RidgeBaseline((0.1, 1.0, 10.0, 100.0, 1000.0), standardize=True).fit(xp, yp))
    score("procrustes", lambda: ProcrustesBaseline().fit(xp, yp))
    score("mlp", lambda: fit_mlp(xp, yp, pcfg, args.steps, args.seed))
    if len(released):
        score("refined", lambda: RefinedMap(RefineConfig(seed=args.seed, seed_from="pairs")).fit(xp, yp, xu, yu))
        score("transport", lambda: TransportMap(TransportConfig(seed=args.seed)).fit(xp, yp, xu, yu))
        n_val = max(2, int(round(VAL_SHARE * len(paired))))
        order = np.random.default_rng(args.seed + 1).permutation(len(paired))
        v, f = order[:n_val], order[n_val:]
        fit = score("semi", lambda: fit_semi_mode("semi", xp[f], yp[f], xu, yu, pcfg, TrainConfig(seed=args.seed),
                                                  SemiConfig(steps=args.steps), val=(xp[v], yp[v]), refit_with_val=True))
        out["semi_chosen"] = fit.chosen
    return {"n_pairs": len(paired), "n_unpaired": len(released), **out}


def cost(x, y, ids, seed: int = 0) -> dict:
    """Must-show 3: a semi run with align's defaults vs the fully paired align, same stores, same splits."""
    split = make_split(ids, 0.1, 0.1, seed)
    tr, va = split["train"], split["val"]
    pcfg = ProjectorConfig(d_in=x.shape[1], d_out=y.shape[1])  # defaults: mlp, hidden 1024
    t0 = time.perf_counter()
    base = fit_baselines(x[tr], y[tr], None, x[va], y[va])
    fit_projector(pcfg, LossConfig(), TrainConfig(seed=seed), InMemoryPairs(x[tr], y[tr]), InMemoryPairs(x[va], y[va]),
                  x[tr], y[tr], ridge=base["ridge"])
    full_s = time.perf_counter() - t0
    kept, released = pair_budget(ids, tr, 0.05, seed)
    xu, yu = x[released], y[np.random.default_rng(seed).permutation(released)]
    t0 = time.perf_counter()
    fit_baselines(x[kept], y[kept], None, x[va], y[va])  # the flow fits them on the budget's pairs too
    fit = fit_semi_mode("semi", x[kept], y[kept], xu, yu, pcfg, TrainConfig(seed=seed), SemiConfig(), val=(x[va], y[va]))
    semi_s = time.perf_counter() - t0
    return {"rows": len(ids), "fully_paired_align_s": round(full_s, 1), "semi_5pct_s": round(semi_s, 1),
            "ratio": round(semi_s / full_s, 2), "semi_chosen": fit.chosen,
            "semi_steps_run": fit.train.steps if fit.train is not None else 0}


def verdict(curves: dict, at: float = 0.05) -> dict:
    """Must-show 2: at ``at`` paired, semi >= the best pairs-only map (every set); fraction of full-pairs R@1."""
    out = {}
    for name, rows in curves.items():
        by = {r["frac"]: r for r in rows}
        if 1.0 not in by:
            continue
        full = max(by[1.0][m] for m in PAIRS_ONLY if by[1.0][m] is not None)
        out[name] = {"full_r1": full, "not_tuned_on": name in semi_sets.NOT_TUNED}
        for frac, r in by.items():
            if frac < 1.0 and r["semi"] is not None:
                best = max(r[m] for m in PAIRS_ONLY if r[m] is not None)
                out[name][f"{frac:g}"] = {"semi": r["semi"], "fraction": round(r["semi"] / max(full, 1e-12), 3),
                                          "best_pairs_only": best, "semi_ge_pairs_only": r["semi"] >= best,
                                          "semi_s": r["seconds"]["semi"]}
    return out


def load_sets(args) -> dict:
    cache = Path(args.cache)
    want = args.sets.split(",")
    sets = {}
    if any(s.startswith("digits-random") for s in want):
        sets |= semi_sets.digits_random()
    if any(s.startswith("sklearn") for s in want):
        sets |= semi_sets.sklearn_views()
    if "stereo-rgb-depth" in want:
        sets |= semi_sets.stereo(cache)
    if "shapes-lite0-mnv2" in want or args.cost:
        sets |= semi_sets.shapes(cache)
    if "photos-lite0-mnv2" in want:
        sets |= semi_sets.photos(cache)
    if args.fashion:
        sets |= semi_sets.fashion(args.fashion, cache)
        want += ["fashion-migration", "fashion-crossmodal"]
    return {k: sets[k] for k in want if k in sets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="digits-random-migration,digits-random-crossmodal," + ",".join(semi_sets.NOT_TUNED))
    ap.add_argument("--fashion", type=int, metavar="N", help="also Fashion-MNIST (N rows), both settings")
    ap.add_argument("--fracs", default="0.01,0.05,0.2,1")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps of each MLP (both start at a closed form)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--test-frac", type=float, default=0.1)
    ap.add_argument("--max-rows", type=int, default=None, help="use only the first N rows of each set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cost", action="store_true", help="also time semi (defaults, 5 %%) against the fully paired align")
    ap.add_argument("--cache", default="runs/bench/semi_cache", help="data and stores, built once")
    ap.add_argument("--out", default="runs/bench/semi")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    fracs = [float(f) for f in args.fracs.split(",")]
    curves: dict[str, list[dict]] = {}
    t_all = time.perf_counter()
    for name, (x, y, ids) in load_sets(args).items():
        x, y, ids = x[: args.max_rows], y[: args.max_rows], ids[: args.max_rows]
        print(f"\n{name}{'' if name in semi_sets.NOT_TUNED else ' (designed on)'}: {len(ids)} rows, "
              f"D {x.shape[1]} -> {y.shape[1]}, test {args.test_frac:.0%}")
        print(f"{'paired':>7} {'n_pairs':>7} " + " ".join(f"{m:>10}" for m in METHODS) + "  semi chose        semi s")
        curves[name] = []
        for frac in fracs:
            row = {"frac": frac} | run_budget(x, y, ids, frac, args)
            curves[name].append(row)
            cells = " ".join(f"{row[m]:>10.3f}" if row[m] is not None else f"{'-':>10}" for m in METHODS)
            print(f"{frac:>7.0%} {row['n_pairs']:>7} {cells}  {row.get('semi_chosen', '-'):<17} "
                  f"{row['seconds'].get('semi', 0):>6}", flush=True)
    v = verdict(curves)
    print("\nfraction of the fully paired R@1 (best of ridge/Procrustes/MLP on all pairs):")
    for name, s in v.items():
        cells = "  ".join(f"{k}: {d['semi']:.3f} = {d['fraction']:.0%} ({d['semi_s']} s, best pairs-only {d['best_pairs_only']:.3f}"
                          f"{'' if d['semi_ge_pairs_only'] else ' NOT reached'})" for k, d in s.items() if isinstance(d, dict))
        print(f"  {name} (full {s['full_r1']:.3f}){'' if s['not_tuned_on'] else ' [designed on]'}: {cells}")
    result = {"benchmark": "semi", "curves": curves, "summary": v}
    at5 = [s["0.05"] for s in v.values() if "0.05" in s]
    result["all_sets_semi_ge_pairs_only_at_5pct"] = bool(at5) and all(d["semi_ge_pairs_only"] for d in at5)
    result["not_tuned_sets_ge_0.8_at_5pct"] = [n for n, s in v.items() if s["not_tuned_on"] and "0.05" in s
                                               and s["0.05"]["fraction"] >= 0.8]
    if args.cost:
        x, y, ids = semi_sets.shapes(Path(args.cache))["shapes-lite0-mnv2"]
        result["cost"] = c = cost(x, y, ids, args.seed)
        print(f"\ncost on {c['rows']} rows (shapes, Lite0 -> MobileNetV2, defaults): fully paired align {c['fully_paired_align_s']} s, "
              f"semi at 5 % {c['semi_5pct_s']} s = {c['ratio']}x (chose {c['semi_chosen']})")
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "semi.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
