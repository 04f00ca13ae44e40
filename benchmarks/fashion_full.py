"""The full Fashion-MNIST (70,000 rows) through the CLI as a user runs it: build the data, then the pipeline with defaults.

Two commands of the installed ``xmodal`` CLI, each a subprocess, in a work folder (its own runs/ and mlflow.db):

    xmodal build-data --fashion 0 --out-dir WORK/data          # Debian's dataset-fashion-mnist, offline
    xmodal pipeline --manifest WORK/data/fashion/manifest.csv --class-manifest WORK/data/fashion/classes.csv

then reads the pipeline's MLflow runs (sqlite3 on WORK/mlflow.db; only flows/ imports mlflow) for what a user
looks at: the wall time of each stage (its nested run's start to end), extract items/s per store, the test R@1
(image -> caption, p2t) of the MLP projector beside ridge and Procrustes, the number of test pairs and whether
the projector kept its ridge start. Why a script: the README's figure for the full set comes from here.

Costs ~15-25 min on 2 shared cores, so the suite does not run it; ``--fashion N`` (>= 10) builds a balanced
subset instead, ``--summarise`` only reads a finished run's folder.

usage: nice -n 10 python benchmarks/fashion_full.py [--work /tmp/xmodal-fashion-full] [--fashion 0] [--summarise]
Prints figures, then a LAST line holding one JSON object.
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, emit_json, loadavg  # noqa: E402

XMODAL = Path(sys.executable).parent / "xmodal"


def _cli(args: list[str], cwd: Path, log: Path) -> float:
    """Run one xmodal command, its output appended to ``log``; seconds it took."""
    t0 = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"$ xmodal {' '.join(args)}\n")
        out.flush()
        proc = subprocess.run([str(XMODAL), *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"xmodal {args[0]} failed (rc {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def summarise(db: Path) -> dict:
    """The newest pipeline run in ``db`` and its nested stage runs: times, rates, test figures."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    q = lambda sql, *a: con.execute(sql, a).fetchall()  # noqa: E731
    (parent, p_start, p_end), = q(
        "SELECT r.run_uuid, r.start_time, r.end_time FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
        "WHERE e.name LIKE 'xmodal-pipeline-%' AND r.status = 'FINISHED' AND r.run_uuid NOT IN "
        "(SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId') ORDER BY r.start_time DESC LIMIT 1")
    children = q("SELECT r.run_uuid, r.name, r.start_time, r.end_time FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                 "WHERE t.key = 'mlflow.parentRunId' AND t.value = ? ORDER BY r.start_time", parent)
    out: dict = {"run_id": parent, "wall_s": round((p_end - p_start) / 1000, 1), "stages": []}
    for run_id, name, start, end in children:
        metrics = dict(q("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", run_id))
        params = dict(q("SELECT key, value FROM params WHERE run_uuid = ?", run_id))
        stage = {"run": name, "seconds": round((end - start) / 1000, 1)}
        if "items_per_s" in metrics:
            stage |= {"items_per_s": round(metrics["items_per_s"], 1), "n": int(metrics.get("n", 0))}
        if "test_p2t_r1" in metrics:
            stage |= {"test_p2t_r1": {m: round(metrics[k], 4) for m, k in (("projector", "test_p2t_r1"), ("ridge", "ridge_test_p2t_r1"),
                                                                           ("procrustes", "procrustes_test_p2t_r1")) if k in metrics},
                      "n_train": int(params.get("n_train", 0)), "n_val": int(params.get("n_val", 0)),
                      "n_test": int(params.get("n_test", 0)), "kept_ridge_start": bool(metrics.get("kept_ridge_start", 0.0))}
        out["stages"].append(stage)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/xmodal-fashion-full"))
    ap.add_argument("--fashion", type=int, default=0, help="xmodal build-data --fashion (0: all 70,000 rows)")
    ap.add_argument("--summarise", action="store_true", help="only read the finished run in --work")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"work": str(work), "code": str(ROOT), "load_start": loadavg()}
    if not args.summarise:
        log = work / "cli.log"
        build_s = _cli(["build-data", "--fashion", str(args.fashion), "--out-dir", "data"], work, log)
        print(f"xmodal build-data --fashion {args.fashion}: {build_s:.0f} s", flush=True)
        pipe_s = _cli(["pipeline", "--manifest", "data/fashion/manifest.csv", "--class-manifest", "data/fashion/classes.csv"],
                      work, log)
        print(f"xmodal pipeline (defaults): {pipe_s:.0f} s; its output: {log}", flush=True)
        out |= {"build_data_s": round(build_s, 1), "pipeline_s": round(pipe_s, 1)}
    rows = sum(1 for _ in open(work / "data" / "fashion" / "manifest.csv")) - 1
    out |= {"manifest_rows": rows, **summarise(work / "mlflow.db"), "load_end": loadavg()}
    print(f"Fashion-MNIST, {rows:,} rows: pipeline run {out['run_id']}, {out['wall_s']:.0f} s from its MLflow run's start to end")
    for s in out["stages"]:
        extra = (f", {s['items_per_s']} items/s over {s['n']:,} items" if "items_per_s" in s else "")
        if "test_p2t_r1" in s:
            extra += (f"; test R@1 (p2t) {s['test_p2t_r1']} on {s['n_test']:,} test pairs "
                      f"({s['n_train']:,} train, {s['n_val']:,} val); kept ridge start: {s['kept_ridge_start']}")
        print(f"  {s['run']}: {s['seconds']:.0f} s{extra}")
    emit_json(out)


if __name__ == "__main__":
    main()
