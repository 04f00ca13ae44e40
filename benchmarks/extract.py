"""Extraction benchmark: the Prefect flow against a bare open_clip loop, and the writer's memory.

    .venv/bin/python benchmarks/extract.py [--quick] [--threads N] [--keep]

(a) Throughput. open_clip ViT-B-32 at RANDOM init (no weights are loaded or downloaded) over
    ~300 generated 224x224 RGB PNGs, batch size 32, the same torch thread count on both sides.
    Peer: the loop a user would write (PIL open + convert, preprocess, stack, encode_image,
    L2-normalise) under inference_mode, torch's intra-op threads doing the parallel work. Flow:
    ``extract_embeddings`` with default settings and the items/s it logs to MLflow (the timed
    extract loop: decode + forward + HDF5 writes; model creation, weight hashing and the Prefect
    server start are outside it, and its end-to-end wall time is reported beside it). By default
    the flow encodes each batch as one-thread slices on the same thread budget
    (encoders/compute.py); a last flow run with ``cpu_workers=1`` uses the bare loop's threading,
    which isolates the orchestration's own cost. Runs interleave (bare, flow, bare, flow, bare,
    flow) so drift of the machine's speed hits both sides alike. ratio = best of the three flow
    runs / best of the three bare passes (goal >= 1.0); the median ratio is printed beside it.
(b) Memory. Peak RSS of ``encoders.extract.extract`` over N=5,000 and N=50,000 short texts with
    the tiny text tower (data/models/xmodal-tiny-vit.json), each in a fresh subprocess that imports
    only ``encoders`` (no prefect, no mlflow). ratio = peak(50k) / peak(5k) (goal <= 1.1).

Human-readable figures go to stdout as it runs; the last stdout line is one JSON object with all
figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _extract_fast as fast  # noqa: E402
from benchmarks._common import LOADS, ROOT, emit_json, last_json_line, peak_rss_mib, phase, ru_maxrss_mib, rss_mib  # noqa: E402

IMAGE_SPEC = "open_clip:image:ViT-B-32?batch_size=32"
IMAGE_ARCH = "ViT-B-32"
IMAGE_SIZE = 224
BATCH = 32
TEXT_SPEC = "open_clip:text:data/models/xmodal-tiny-vit.json?batch_size=256"


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# (b) memory: child process
# ---------------------------------------------------------------------------------------------


def mem_child(manifest_csv: str, out_dir: str, threads: int) -> None:
    """Runs in a fresh interpreter: one extraction, then its own figures as JSON."""
    import torch

    torch.set_num_threads(threads)
    from encoders.extract import extract, store_path
    from encoders.factory import load_encoder
    from encoders.manifest import Manifest
    from encoders.store import EmbeddingStore

    rss_after_import = rss_mib()
    t0 = time.perf_counter()
    encoder = load_encoder(TEXT_SPEC)
    load_s = time.perf_counter() - t0
    manifest = Manifest.read(manifest_csv)
    rss_before = rss_mib()
    store = store_path(out_dir, manifest.name, "text", encoder.spec.slug)
    summary = extract(manifest, "text", encoder, store, overwrite=True)
    peak, method = peak_rss_mib()
    n_store = len(EmbeddingStore(store))
    emit_json({
        "n": summary.n, "n_store": n_store, "n_errors": summary.n_errors, "dim": summary.dim,
        "seconds": round(summary.seconds, 3), "items_per_s": round(summary.items_per_s, 1),
        "encoder_load_s": round(load_s, 2), "weights_origin": encoder.origin,
        "rss_after_import_mib": round(rss_after_import, 1), "rss_before_extract_mib": round(rss_before, 1),
        "rss_after_extract_mib": round(rss_mib(), 1), "peak_rss_mib": round(peak, 1), "peak_method": method,
        "ru_maxrss_mib": round(ru_maxrss_mib(), 1), "torch_threads": torch.get_num_threads(),
        "imported_prefect": "prefect" in sys.modules, "imported_mlflow": "mlflow" in sys.modules,
    })


def write_text_manifest(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        for i in range(n):
            w.writerow([f"t{i:06d}", f"item {i} of the set"])
    return path


def run_memory(tmp: Path, sizes: list[int], threads: int, timings: dict) -> dict:
    runs = {}
    for n in sizes:
        manifest = write_text_manifest(tmp / f"texts-{n}" / "manifest.csv", n)
        with phase(f"memory N={n:,} (fresh subprocess)", timings):
            proc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--mem-child", str(manifest), str(tmp / "mem-stores"),
                 "--threads", str(threads)],
                cwd=ROOT, capture_output=True, text=True,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"memory child for N={n} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = last_json_line(proc.stdout)
        if r["n"] != n or r["n_store"] != n:
            raise RuntimeError(f"memory child for N={n} stored {r['n']} / {r['n_store']} rows, expected {n}")
        runs[n] = r
        print(f"  N={n:>7,}: peak RSS {r['peak_rss_mib']:.1f} MiB (RSS before extract {r['rss_before_extract_mib']:.1f} MiB, "
              f"growth during extract {r['peak_rss_mib'] - r['rss_before_extract_mib']:+.1f} MiB), "
              f"{r['items_per_s']:,.0f} items/s over {r['seconds']:.1f} s, dim {r['dim']}, "
              f"prefect imported: {r['imported_prefect']}", flush=True)
    lo, hi = min(sizes), max(sizes)
    ratio = runs[hi]["peak_rss_mib"] / runs[lo]["peak_rss_mib"]
    return {
        "encoder": TEXT_SPEC, "weights": runs[lo]["weights_origin"], "entrypoint": "encoders.extract.extract",
        "peak_method": runs[lo]["peak_method"], "sizes": sizes,
        "runs": {str(n): r for n, r in runs.items()},
        "peak_rss_mib_small": runs[lo]["peak_rss_mib"], "peak_rss_mib_large": runs[hi]["peak_rss_mib"],
        "ratio_large_over_small": round(ratio, 4), "goal": "<= 1.1", "meets_goal": ratio <= 1.1,
    }


# ---------------------------------------------------------------------------------------------
# (a) throughput
# ---------------------------------------------------------------------------------------------


def write_images(folder: Path, n: int, seed: int = 0) -> Path:
    """n smooth-ish random 224x224 RGB PNGs (blocky colour fields + noise) and manifest.csv (id,image)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        arr = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int16)
        rel = f"img/{i:05d}.png"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB").save(folder / rel)
        rows.append((f"im{i:05d}", rel))
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image"])
        w.writerows(rows)
    return folder / "manifest.csv"


def bare_pass(model, preprocess, paths: list[str], autocast: bool = False):
    """What a user would write (``autocast``: under bf16 autocast). Returns (items/s, seconds, (N, D) embeddings)."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from PIL import Image

    out = []
    t0 = time.perf_counter()
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        for lo in range(0, len(paths), BATCH):
            x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[lo:lo + BATCH]])
            out.append(F.normalize(model.encode_image(x).float(), dim=-1))
    seconds = time.perf_counter() - t0
    return len(paths) / seconds, seconds, torch.cat(out)


def run_throughput(tmp: Path, n_images: int, threads: int, timings: dict) -> dict:
    with phase(f"generate {n_images} PNGs {IMAGE_SIZE}x{IMAGE_SIZE}", timings):
        manifest = write_images(tmp / "bench-images", n_images)
    with phase("import torch + open_clip", timings):
        import open_clip
        import torch
    torch.set_num_threads(threads)
    from encoders.manifest import Manifest

    paths = Manifest.read(manifest).values("image", "image")

    with phase("bare: create model (random-init) + warm-up batch", timings):
        torch.manual_seed(0)  # the same seed the encoder uses, so both sides compute identical embeddings
        model, _, preprocess = open_clip.create_model_and_transforms(IMAGE_ARCH)
        model.eval()
        bare_pass(model, preprocess, paths[:BATCH])
    with phase("bare: pass 1", timings):
        ips1, sec1, emb_bare = bare_pass(model, preprocess, paths)
    print(f"  bare pass 1: {ips1:.2f} items/s ({n_images} images in {sec1:.1f} s)", flush=True)

    prefect_home = tmp / "prefect-home"  # isolated Prefect DB: no contention with ~/.prefect or other runs
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with phase("import flows (prefect + mlflow)", timings):
        import mlflow

        from flows.extract import ExtractParams, extract_embeddings
    base = ExtractParams(manifest=str(manifest), column="image", encoder=IMAGE_SPEC, out_dir=str(tmp / "stores"),
                         tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    client = mlflow.MlflowClient(tracking_uri=base.tracking_uri)

    def flow_pass(label: str, **overrides) -> dict:
        params = base.model_copy(update=overrides)
        with phase(f"flow: {label}", timings):
            t0 = time.perf_counter()
            res = extract_embeddings(params)
            e2e = time.perf_counter() - t0
        logged = client.get_run(res["run_id"]).data
        res |= {"e2e": e2e, "logged_ips": logged.metrics.get("items_per_s"),
                "logged_workers": logged.params.get("cpu_workers")}
        print(f"  flow {label}: {res['items_per_s']:.2f} items/s in its extract loop ({res['n']} items in "
              f"{res['seconds']:.1f} s; MLflow items_per_s = {res['logged_ips']:.2f}, cpu_workers = {res['logged_workers']}); "
              f"end-to-end {e2e:.1f} s incl. model build, weight hashing, MLflow logging"
              f"{' and the Prefect ephemeral-server start' if label.endswith('#1') else ''}", flush=True)
        return res

    bares = [ips1]
    flows_auto = []
    for k in (1, 2, 3):
        flows_auto.append(flow_pass(f"default settings #{k}", refresh=k > 1))
        if k < 3:
            with phase(f"bare: pass {k + 1}", timings):
                ips, sec, _ = bare_pass(model, preprocess, paths)
            bares.append(ips)
            print(f"  bare pass {k + 1}: {ips:.2f} items/s ({n_images} images in {sec:.1f} s)", flush=True)
    flow_intra = flow_pass("cpu_workers=1 (torch's own threading, like the bare loop)", cpu_workers=1, refresh=True)
    threads_after_flow = torch.get_num_threads()

    from encoders.store import EmbeddingStore

    store = EmbeddingStore(flows_auto[-1]["store"])
    emb_flow = torch.from_numpy(store.get([f"im{i:05d}" for i in range(n_images)]))
    max_diff = float((emb_flow - emb_bare).abs().max())

    bare = max(bares)
    best = max(flows_auto, key=lambda r: r["items_per_s"])
    ratio = best["items_per_s"] / bare
    return {
        "encoder": IMAGE_SPEC, "weights": best.get("weights_origin", "random-init"), "n_images": n_images,
        "image_size": IMAGE_SIZE, "batch_size": BATCH, "n_stored": best["n"], "n_errors": best["n_errors"],
        "bare_items_per_s_passes": [round(x, 3) for x in bares],
        "bare_items_per_s": round(bare, 3), "bare_rule": "best of 3 passes, interleaved with the flow runs",
        "flow_items_per_s_passes": [round(r["items_per_s"], 3) for r in flows_auto],
        "flow_items_per_s": round(best["items_per_s"], 3), "flow_rule": "best of 3 flow runs with default settings, interleaved with the bare passes",
        "flow_items_per_s_mlflow_metric": best["logged_ips"], "flow_cpu_workers": best["logged_workers"],
        "flow_extract_seconds": round(best["seconds"], 2),
        "flow_end_to_end_seconds": [round(r["e2e"], 2) for r in flows_auto],
        "ratio_flow_over_bare": round(ratio, 4), "goal": ">= 1.0", "meets_goal": ratio >= 1.0,
        "ratio_median_flow_over_median_bare": round(
            sorted(r["items_per_s"] for r in flows_auto)[1] / sorted(bares)[1], 4),
        "flow_cpu_workers_1_items_per_s": round(flow_intra["items_per_s"], 3),
        "ratio_cpu_workers_1_over_bare": round(flow_intra["items_per_s"] / bare, 4),
        "max_abs_diff_flow_vs_bare_embeddings": max_diff, "torch_threads_after_flow": threads_after_flow,
        "mlflow_run_ids": [r["run_id"] for r in flows_auto + [flow_intra]], "prefect_home": os.environ.get("PREFECT_HOME"),
    }


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and texts (a smoke run)")
    ap.add_argument("--images", type=int, default=None, help="images for (a) (default 300, --quick 64)")
    ap.add_argument("--mem-sizes", default=None, help="comma-separated N for (b) (default 5000,50000; --quick 2000,20000)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every side (default: usable CPUs)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-precision", action="store_true", help="skip (c), fp32 vs bf16")
    ap.add_argument("--skip-decode", action="store_true", help="skip (d), decode-only scaling")
    ap.add_argument("--precision-images", type=int, default=None, help="images for (c) (default 128, --quick 32)")
    ap.add_argument("--decode-images", type=int, default=None, help="images for (d) (default 1536, --quick 96)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (c) and (d); figures are best-of")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (images, stores, mlflow.db)")
    ap.add_argument("--mem-child", nargs=2, metavar=("MANIFEST", "OUT_DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--decode-child", metavar="MANIFEST", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = args.threads or default_threads()

    if args.decode_child:
        print(json.dumps(fast.run_decode(Path(args.decode_child), default_threads(), args.rounds, {})))
        return

    if args.mem_child:
        mem_child(*args.mem_child, threads=threads)
        return

    n_images = args.images or (64 if args.quick else 300)
    sizes = [int(s) for s in (args.mem_sizes or ("2000,20000" if args.quick else "5000,50000")).split(",")]
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="xmodal-bench-extract-"))
    print(f"xmodal extraction benchmark{' (--quick)' if args.quick else ''}: torch threads = {threads} on every side "
          f"(usable CPUs {default_threads()}), python {platform.python_version()}, temp {tmp}", flush=True)
    result: dict = {"benchmark": "extract", "quick": args.quick, "torch_threads": threads, "usable_cpus": default_threads(),
                    "python": platform.python_version(), "machine": platform.machine()}
    try:
        if not args.skip_memory:
            print(f"\n(b) memory: peak RSS of encoders.extract.extract, {TEXT_SPEC} (random-init tiny text tower), "
                  f"N = {', '.join(f'{n:,}' for n in sizes)}, one fresh subprocess each", flush=True)
            result["memory"] = run_memory(tmp, sizes, threads, timings)
        if not args.skip_throughput:
            print(f"\n(a) throughput: {IMAGE_SPEC} (random-init, no weights), {n_images} images, batch {BATCH}", flush=True)
            result["throughput"] = run_throughput(tmp, n_images, threads, timings)
        run_fast_paths(args, tmp, threads, result, timings)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    import importlib.metadata as md

    result["versions"] = {p: md.version(p) for p in ("torch", "open_clip_torch", "prefect", "mlflow", "h5py")
                          if _has(md, p)}
    result["timings_s"] = timings
    result["loadavg_1m_start_end"] = LOADS  # > torch threads means other processes competed for the CPUs
    result["total_s"] = round(time.perf_counter() - t_start, 1)

    print("\n== summary ==")
    fast.print_summary(result.get("precision"), result.get("decode"), result.get("gpu_plan"))
    if "throughput" in result:
        t = result["throughput"]
        print(f"(a) ViT-B-32 random-init, {t['n_images']} images {IMAGE_SIZE}x{IMAGE_SIZE}, batch {BATCH}, {threads} torch threads")
        print(f"    bare open_clip loop : passes {', '.join(f'{x:.2f}' for x in t['bare_items_per_s_passes'])} "
              f"-> best {t['bare_items_per_s']:.2f} items/s ({threads} intra-op threads)")
        print(f"    flow extract loop   : runs {', '.join(f'{x:.2f}' for x in t['flow_items_per_s_passes'])} "
              f"-> best {t['flow_items_per_s']:.2f} items/s (cpu_workers={t['flow_cpu_workers']}: each batch as "
              f"{t['flow_cpu_workers']} one-thread slices on the same {threads} threads)")
        print(f"    ratio flow / bare   : {t['ratio_flow_over_bare']:.3f} best vs best (goal >= 1.0: "
              f"{'met' if t['meets_goal'] else 'NOT met'}); median vs median "
              f"{t['ratio_median_flow_over_median_bare']:.3f}")
        print(f"    flow, cpu_workers=1 : {t['flow_cpu_workers_1_items_per_s']:.2f} items/s = "
              f"{t['ratio_cpu_workers_1_over_bare']:.3f} x bare (the bare loop's threading: the orchestration's own cost)")
        print(f"    flow end-to-end wall: {', '.join(f'{x:.1f}' for x in t['flow_end_to_end_seconds'])} s (first includes the "
              "Prefect ephemeral-server start; all include model build + weight hashing + MLflow logging)")
        print(f"    embeddings flow vs bare: max |diff| = {t['max_abs_diff_flow_vs_bare_embeddings']:.2e} (same seed, same work)")
    if "memory" in result:
        m = result["memory"]
        lo, hi = m["sizes"][0], m["sizes"][-1]
        print(f"(b) tiny text tower via encoders.extract.extract, fresh subprocess per N, peak = {m['peak_method']}")
        for n in m["sizes"]:
            r = m["runs"][str(n)]
            print(f"    N={n:>7,}: peak RSS {r['peak_rss_mib']:.1f} MiB, {r['items_per_s']:,.0f} items/s")
        print(f"    ratio peak({hi:,}) / peak({lo:,}) = {m['ratio_large_over_small']:.3f} "
              f"(goal <= 1.1: {'met' if m['meets_goal'] else 'NOT met'})")
    print("    phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    loads = [x for pair in LOADS.values() for x in pair if x is not None]
    if loads:
        print(f"    1-min load average during the run: {min(loads):.2f} .. {max(loads):.2f} on {default_threads()} usable CPUs"
              f"{' (other processes competed for the CPUs: timings are noisy)' if max(loads) > default_threads() + 0.5 else ''}")
    print(f"    total {result['total_s']:.1f} s")
    emit_json(result)


def run_fast_paths(args, tmp: Path, threads: int, result: dict, timings: dict) -> None:
    """(c) fp32 vs bf16 through the library, (d) the decode pipeline alone (benchmarks/_extract_fast.py)."""
    if not args.skip_precision:
        import torch

        torch.set_num_threads(threads)
        n = args.precision_images or (32 if args.quick else 128)
        print(f"\n(c) precision: {fast.SPEC} fp32 vs bf16 via encoders.extract.extract, {n} images, {args.rounds} rounds", flush=True)
        with phase(f"generate {n} PNGs for (c)", timings):
            manifest = write_images(tmp / "precision-images", n, seed=1)
        result["precision"] = fast.run_precision(manifest, tmp, bare_pass, args.rounds, timings)
    if not args.skip_decode:
        n = args.decode_images or (96 if args.quick else 1536)  # 48 batches: 480 were 15, edge effects (a worker idle at the end) moved the ratio by 0.1
        print(f"\n(d) decode only: {n} PNGs through encoders.loader, {args.rounds} rounds", flush=True)
        with phase(f"generate {n} PNGs for (d)", timings):
            manifest = write_images(tmp / "decode-images", n, seed=2)
        # In a fresh process, as a user's extraction starts: forking decode workers from a process that
        # has run Prefect flows (their server threads and at-fork state) failed now and then here
        # ("DataLoader worker exited unexpectedly"), which says nothing about the input pipeline.
        with phase("decode-only child", timings):
            proc = subprocess.run([sys.executable, __file__, "--decode-child", str(manifest), "--rounds", str(args.rounds)],
                                  capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"decode-only child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        print("\n".join(l for l in proc.stdout.splitlines()[:-1]), flush=True)
        result["decode"] = json.loads(proc.stdout.splitlines()[-1])
    if "precision" in result and "decode" in result:
        result["gpu_plan"] = fast.gpu_plan(result["precision"], result["decode"])


def _has(md, name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
