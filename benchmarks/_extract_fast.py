"""Parts (c) and (d) of benchmarks/extract.py: reduced precision and the decode pipeline (issue 14).

(c) Precision. ViT-B-32 at random init, batch 32, through ``encoders.extract.extract`` (the
    library, no Prefect) in fp32 and in bf16 (weights and inputs cast once, norms fp32), beside
    two peers: the bare open_clip loop in fp32 and the same loop under bf16 autocast (what a user
    would try first). Every pass of a round runs back to back, rounds are interleaved, and each
    round also times the matmul peak of both dtypes (best over a square 1024³, 2048³ and the
    model's own MLP GEMM), so every rate has its FLOP limit from the same minutes of the machine.
    FLOPs per image: torch.utils.flop_counter.FlopCounterMode over one forward pass, with grad enabled
    (under inference_mode the fused attention hides its projections from the counter: 5.89 vs 8.73 GFLOP). Figures:
    best over rounds (with the spread); cosine = min over items between the bf16 and fp32 stores.
(d) Decode only. ``encoders.loader`` over generated PNGs with the model removed (open_clip's
    preprocess + collate, what a worker does), for a helper thread and 1, 2 and all cores' worth
    of worker processes, interleaved rounds, best-of. The rate counts the batches after the first
    (the steady state of a long run); the time to the first batch (forking the workers) is printed
    beside it. From the per-worker rate and the FLOPs,
    the number of decode workers an H100 at bf16 would need.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks._common import gemm_peak, phase

IMAGE_ARCH = "ViT-B-32"
SPEC = "open_clip:image:ViT-B-32?batch_size=32"
BATCH = 32
H100_BF16_DENSE = 990e12  # FLOP/s, NVIDIA's dense bf16 peak
H100_REALISTIC = 0.4  # fraction a ViT-B/32 forward realistically sustains (MFU of well-tuned inference)


def matmul_peak(dtype, tokens: int) -> float:
    """Best FLOP/s over a few GEMM shapes (the model's MLP shape among them)."""
    return gemm_peak(((1024, 1024, 1024), (2048, 2048, 2048), (tokens, 768, 3072)), dtype, reps=3)


def flops_per_image(model, size: int) -> int:
    """FLOPs of one forward pass, counted with grad enabled ON PURPOSE.

    Under inference_mode/no_grad, nn.MultiheadAttention takes its fused fast path
    (aten._native_multi_head_attention), whose qkv and output projections FlopCounterMode does
    not see: ViT-B-32 then reads 5.89 GFLOP/image instead of 8.73 (addmm 8.49 + patch conv 0.23),
    so every FLOP limit came out 1.48x too high (issue 14 quoted 5.9).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        model.encode_image(torch.zeros(1, 3, size, size))
    return fc.get_total_flops()


def _spread(xs: list[float]) -> str:
    return f"best {max(xs):.2f} (min {min(xs):.2f}, {len(xs)} rounds)"


def run_precision(manifest: Path, tmp: Path, bare_pass, rounds: int, timings: dict) -> dict:
    import numpy as np
    import open_clip
    import torch

    from encoders.extract import extract
    from encoders.factory import load_encoder
    from encoders.manifest import Manifest
    from encoders.store import EmbeddingStore

    m = Manifest.read(manifest)
    paths = m.values("image", "image")
    with phase("precision: build models (random-init, seed 0) + warm-up", timings):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms(IMAGE_ARCH)
        model.eval()
        flops = flops_per_image(model, 224)
        encs = {d: load_encoder(f"{SPEC}&dtype={d}" if d != "fp32" else SPEC) for d in ("fp32", "bf16")}
        for enc in encs.values():
            enc.encode_items(paths[:4])
        bare_pass(model, preprocess, paths[:4])
    rates: dict[str, list[float]] = {}
    peaks: dict[str, list[float]] = {"fp32": [], "bf16": []}
    stores = {}
    for r in range(rounds):
        with phase(f"precision round {r + 1}/{rounds}", timings, quiet=True):
            rates.setdefault("bare fp32", []).append(bare_pass(model, preprocess, paths)[0])
            rates.setdefault("bare bf16 autocast", []).append(bare_pass(model, preprocess, paths, autocast=True)[0])
            for d, enc in encs.items():
                for workers in (None, 1):
                    key = f"xmodal {d}" + (" cpu_workers=1" if workers == 1 else "")
                    store = tmp / "precision" / f"{d}-{workers}.h5"
                    s = extract(m, "image", enc, store, overwrite=True, cpu_workers=workers)
                    rates.setdefault(key, []).append(s.items_per_s)
                    stores[d] = store
            for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                peaks[name].append(matmul_peak(dt, BATCH * 50))
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rates.items())
              + f" items/s; matmul peak fp32 {peaks['fp32'][-1] / 1e9:.0f}, bf16 {peaks['bf16'][-1] / 1e9:.0f} GFLOP/s", flush=True)
    a, b = EmbeddingStore(stores["fp32"]).embeddings(), EmbeddingStore(stores["bf16"]).embeddings()
    cos = float((a * b).sum(1).min() / 1.0)  # stores are L2-normalised
    peak = {k: max(v) for k, v in peaks.items()}
    limit = {k: peak[k] / flops for k in peak}  # items/s at the matmul peak
    best = {k: max(v) for k, v in rates.items()}
    bf16 = max(best["xmodal bf16"], best["xmodal bf16 cpu_workers=1"])
    return {
        "encoder": SPEC, "n_images": len(paths), "rounds": rounds, "flops_per_image": flops,
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peak.items()},
        "flop_limit_items_per_s": {k: round(v, 2) for k, v in limit.items()},
        "items_per_s_rounds": {k: [round(x, 3) for x in v] for k, v in rates.items()},
        "items_per_s": {k: round(v, 3) for k, v in best.items()},
        "of_flop_limit": {k: round(v / limit["bf16" if "bf16" in k else "fp32"], 3) for k, v in best.items()},
        "bf16_over_fp32": round(bf16 / best["xmodal fp32"], 3), "bf16_over_fp32_goal": ">= 2.0",
        "bf16_of_flop_limit": round(bf16 / limit["bf16"], 3), "bf16_of_flop_limit_goal": ">= 0.6",
        "fp32_over_bare": round(best["xmodal fp32"] / best["bare fp32"], 3), "fp32_over_bare_goal": ">= 1.0",
        "min_cosine_bf16_vs_fp32": round(cos, 6), "min_cosine_goal": ">= 0.999",
        "store_compute_dtype": str(EmbeddingStore(stores["bf16"]).attrs["compute_dtype"]),
        "max_abs_diff_fp32_stores_vs_each_other": float(np.abs(a - EmbeddingStore(stores["fp32"]).embeddings()).max()),
    }


def run_decode(manifest: Path, cores: int, rounds: int, timings: dict) -> dict:
    from encoders.factory import load_encoder
    from encoders.loader import RowBatches, iter_batches
    from encoders.manifest import Manifest

    m = Manifest.read(manifest)
    raw, ids = m.values("image", "image"), m.frame["id"].tolist()
    enc = load_encoder(SPEC)  # only its preprocess and collate run: the model is removed from the loop
    bounds = [(lo, min(lo + BATCH, len(ids))) for lo in range(0, len(ids), BATCH)]
    counts = sorted({0, 1, 2, cores})
    ds = RowBatches(enc, raw, ids, {}, bounds)
    c0 = time.process_time()  # CPU time, not wall: what one core pays per item, whatever else runs here
    for k in range(len(ds)):
        ds[k]
    cpu_per_item = (time.process_time() - c0) / len(ids)
    rates: dict[int, list[float]] = {w: [] for w in counts}
    starts: dict[int, list[float]] = {}
    for r in range(rounds):
        with phase(f"decode round {r + 1}/{rounds}", timings, quiet=True):
            for w in counts:
                rate, start = _steady_rate(iter_batches(RowBatches(enc, raw, ids, {}, bounds), w))
                rates[w].append(rate)
                starts.setdefault(w, []).append(start)
        print(f"  round {r + 1}: " + ", ".join(f"{'thread' if w == 0 else f'{w} worker(s)'} {rates[w][-1]:.0f}"
                                            for w in counts) + " items/s", flush=True)
    best = {w: max(v) for w, v in rates.items()}
    return {
        "n_images": len(ids), "rounds": rounds, "cores": cores,
        "items_per_s_rounds": {str(w): [round(x, 1) for x in v] for w, v in rates.items()},
        "items_per_s": {str(w): round(v, 1) for w, v in best.items()},
        "cpu_s_per_item": round(cpu_per_item, 5), "items_per_core_s": round(1 / cpu_per_item, 1),
        "first_batch_s": {str(w): round(min(v), 2) for w, v in starts.items()},
        "two_over_one_worker": round(best[2] / best[1], 3), "goal": ">= 1.7",
        "all_cores_over_one_worker": round(best[cores] / best[1], 3),
    }


def _steady_rate(batches) -> tuple[float, float]:
    """(items/s after the first batch, seconds to the first batch): the rate a long extraction sees,
    without the one-off cost of forking workers (printed beside it)."""
    t0 = time.perf_counter()
    first = next(batches)
    t1 = time.perf_counter()
    n = sum(len(b.ids) for b in batches)
    del first
    return n / (time.perf_counter() - t1), t1 - t0


def gpu_plan(precision: dict, decode: dict) -> dict:
    """On paper: decode workers an H100 at bf16 needs for this model, from the measured per-worker rate."""
    model_rate = H100_BF16_DENSE * H100_REALISTIC / precision["flops_per_image"]
    per_worker = decode["items_per_core_s"]  # CPU time per item: a worker on a core of its own
    return {"h100_bf16_peak_tflops": H100_BF16_DENSE / 1e12, "assumed_fraction": H100_REALISTIC,
            "h100_items_per_s": round(model_rate), "decode_items_per_s_per_worker": per_worker,
            "workers_needed": int(-(-model_rate // per_worker))}


def print_summary(p: dict | None, d: dict | None, g: dict | None) -> None:
    if p:
        lim = p["flop_limit_items_per_s"]
        print(f"(c) {p['encoder']} random-init, {p['n_images']} images, batch {BATCH}; {p['flops_per_image'] / 1e9:.2f} GFLOP/image "
              f"(FlopCounterMode); matmul peak fp32 {p['matmul_peak_gflops']['fp32']:.0f}, bf16 {p['matmul_peak_gflops']['bf16']:.0f} "
              f"GFLOP/s -> FLOP limit fp32 {lim['fp32']:.1f}, bf16 {lim['bf16']:.1f} items/s")
        for k, v in p["items_per_s_rounds"].items():
            print(f"    {k:<28}: {_spread(v)} items/s = {p['of_flop_limit'][k]:.2f} of its FLOP limit")
        print(f"    bf16 / fp32 (xmodal)        : {p['bf16_over_fp32']:.2f}x (goal >= 2.0)")
        print(f"    bf16 of the bf16 FLOP limit : {p['bf16_of_flop_limit']:.2f} (goal >= 0.6)")
        print(f"    xmodal fp32 / bare fp32     : {p['fp32_over_bare']:.3f} (goal >= 1.0)")
        print(f"    min cosine bf16 vs fp32     : {p['min_cosine_bf16_vs_fp32']:.5f} over items (goal >= 0.999); "
              f"store compute_dtype = {p['store_compute_dtype']}")
    if d:
        print(f"(d) decode only (model removed), {d['n_images']} PNGs, {d['cores']} usable cores:")
        for w, v in d["items_per_s_rounds"].items():
            print(f"    {'helper thread' if w == '0' else w + ' worker process(es)':<24}: {_spread(v)} items/s")
        print(f"    decode CPU time per item    : {d['cpu_s_per_item'] * 1e3:.2f} ms = {d['items_per_core_s']:.0f} items/s per "
              "core (load-independent; the wall rates above are what this session's share of a busy machine gives)")
        print(f"    time to the first batch     : " + ", ".join(f"{w}: {v:.2f} s" for w, v in d["first_batch_s"].items()))
        print(f"    2 workers / 1 worker        : {d['two_over_one_worker']:.2f}x (goal >= 1.7); all cores / 1: "
              f"{d['all_cores_over_one_worker']:.2f}x")
    if g:
        print(f"    H100 plan: {g['h100_bf16_peak_tflops']:.0f} TFLOP/s bf16 x {g['assumed_fraction']} / FLOPs per image = "
              f"{g['h100_items_per_s']:,} items/s; at {g['decode_items_per_s_per_worker']:.0f} items/s per decode worker "
              f"that needs {g['workers_needed']} decode workers")
