"""Stage 1 at a million pairs: the align flow with its defaults against a bare torch loop, and its memory.

(a) writes two stores of N pairs through ``encoders.store.StoreWriter`` (source D_src = 1280,
    target D_tgt = 384, the dims of EfficientNet-B0 and a MiniLM sentence encoder), related by a
    known nonlinear map, y = tanh(x W1) W2 + 0.1 x V + noise, so the MLP has something to learn
    beyond ridge;
(b) runs ``flows.align.align`` with its defaults (MLP projector, 2000-step budget rounded up to whole
    epochs, in_memory_max_gb 4: at 1M x (1280 + 384) float32 = 6.2 GiB the pairs are streamed) in a
    fresh process, sampling its RSS every 0.1 s per phase (data, baselines, training, evaluation),
    and timing its optimizer steps;
(c) runs a bare torch loop in a fresh process over the same stream: the same stores read with h5py
    in the same contiguous 65,536-row chunks, rows shuffled within a chunk, the same split, batch
    size, network (frozen standardised affine path + trainable MLP branch), fused AdamW, clipping
    and warmup-cosine schedule; before and after (b), so background load hits both alike;
(d) runs a LINEAR align of M (70,000) pairs of the same dims, in memory, and states its peak RSS.

The test split is cut to --test-frac (default 0.01: 10,000 pairs at 1M), since ranking 100,000
queries against 100,000 candidates for each of three methods costs ~20 min on 2 cores; train and
val splits are the defaults' (val 0.1).

Prints figures, then a LAST line holding one JSON object.
usage: python benchmarks/scale.py [--pairs 1000000] [--mem-pairs 70000] [--work /tmp/xmodal-scale] [--bare-steps 768]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_json, last_json_line, loadavg, peak_rss_mib, rss_mib  # noqa: E402

import numpy as np  # noqa: E402

CHUNK = 65536  # the flow's streaming chunk (flows/align.py ChunkedPairs)


# ---------------------------------------------------------------- (a) stores


def write_stores(work: Path, n: int, d_src: int, d_tgt: int, seed: int = 0) -> tuple[Path, Path, float]:
    """Two stores of n pairs; reused when both exist complete with n rows (a rerun skips 5 GB of writing)."""
    from encoders.store import EmbeddingStore, StoreError, StoreWriter

    src, tgt = work / f"src-{n}.h5", work / f"tgt-{n}.h5"
    try:
        if len(EmbeddingStore(src)) == n and len(EmbeddingStore(tgt)) == n:
            return src, tgt, 0.0
    except StoreError:
        pass
    rng = np.random.default_rng(seed)
    h = 256
    w1 = rng.standard_normal((d_src, h)).astype(np.float32) / math.sqrt(d_src)
    w2 = rng.standard_normal((h, d_tgt)).astype(np.float32) / math.sqrt(h)
    v = rng.standard_normal((d_src, d_tgt)).astype(np.float32) / math.sqrt(d_src)
    t0 = time.perf_counter()
    common = {"dataset": f"synthetic{n}", "manifest_sha256": f"synthetic-{n}-{seed}"}
    with StoreWriter(src, dim=d_src, attrs=common | {"modality": "image", "encoder_spec": "synthetic:x"},
                     chunk_rows=1024, overwrite=True) as ws, \
         StoreWriter(tgt, dim=d_tgt, attrs=common | {"modality": "text", "encoder_spec": "synthetic:map"},
                     chunk_rows=1024, overwrite=True) as wt:
        for s in range(0, n, CHUNK):
            e = min(s + CHUNK, n)
            x = rng.standard_normal((e - s, d_src), dtype=np.float32)  # (B, D_src)
            y = np.tanh(x @ w1) @ w2 + 0.1 * (x @ v) + 0.02 * rng.standard_normal((e - s, d_tgt), dtype=np.float32)
            ids = [f"p{i}" for i in range(s, e)]
            ws.append(ids, x, rows_done=e)
            wt.append(ids, y, rows_done=e)
        ws.finish()
        wt.finish()
    return src, tgt, time.perf_counter() - t0


# ---------------------------------------------------------------- (b) the flow, in a child


class PhaseRss:
    """Samples VmRSS every 0.1 s into the phase that is running: where the memory goes."""

    def __init__(self):
        self.phase, self.peaks, self._stop = "imports", {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.1):
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss_mib())

    def wrap(self, name: str, fn, then: str | None = None):
        def wrapped(*a, **k):
            self.phase = name
            try:
                return fn(*a, **k)
            finally:
                self.peaks[name] = max(self.peaks.get(name, 0.0), rss_mib())
                if then:
                    self.phase = then
        return wrapped


def child_align(args) -> dict:
    """Run the align flow once; report peak RSS (VmHWM), RSS by phase and the optimizer steps' rate."""
    import torch

    import flows.align as fa
    from projection.engine import loop

    rss = PhaseRss()
    rss.peaks["imports"] = rss_mib()
    rss.thread.start()
    stamps: list[float] = []
    step = loop.optimizer_step

    def timed_step(*a, **k):  # the loop's own step, time-stamped: steps/s includes reading the stream
        out = step(*a, **k)
        stamps.append(time.perf_counter())
        return out

    loop.optimizer_step = timed_step
    if args.flow_steps:  # stop the epoch after this many steps (the default schedule at 1M is one 3,125-step epoch)
        import itertools

        from projection.align.train import Stage1

        batches = Stage1.batches
        Stage1.batches = lambda self, gen: itertools.islice(batches(self, gen), args.flow_steps)
    for name, phase in (("_datasets", "data (read splits, test + baseline sample)"), ("fit_baselines", "baselines"),
                        ("fit_projector", "projector (fit stats, train, val)"), ("_evaluate", "evaluation (test ranks)")):
        setattr(fa, name, rss.wrap(phase, getattr(fa, name), "other"))
    rss.phase = "join + split"
    t0 = time.perf_counter()
    out = fa.align(fa.AlignParams(
        source_store=args.src, target_store=args.tgt, projector={"kind": args.kind}, split={"test_frac": args.test_frac},
        # a cut epoch: one epoch, which is what the default 2000-step budget resolves to from 512k train pairs up
        train={"steps": args.train_steps} if args.train_steps else {"epochs": 1} if args.flow_steps else {},
        in_memory_max_gb=args.budget_gb, out_dir=str(Path(args.work) / "runs"),
        tracking_uri=f"sqlite:///{Path(args.work) / 'mlflow.db'}", experiment="scale"))
    wall = time.perf_counter() - t0
    rss._stop.set()
    # steady rate: the first 10 steps hold the first chunk's read and the warm-up of the kernels
    n = len(stamps)
    rate = (n - 11) / (stamps[-1] - stamps[10]) if n > 20 else float("nan")
    peak, how = peak_rss_mib()
    m = out["metrics"]
    return {"wall_s": round(wall, 1), "steps": n, "steps_per_s": round(rate, 3), "train_s": round(stamps[-1] - stamps[0], 1) if n else 0,
            "peak_rss_mib": round(peak), "peak_rss_how": how, "rss_by_phase_mib": {k: round(v) for k, v in rss.peaks.items()},
            "test_p2t_r1": {k: round(v.get("p2t_r1", float("nan")), 4) for k, v in m.items() if "p2t_r1" in v},
            "kept_ridge_start": out["kept_ridge_start"], "torch_threads": torch.get_num_threads(), "code": fa.__file__}


# ---------------------------------------------------------------- (c) the bare loop, in a child


def child_bare(args) -> dict:
    """What one would write by hand over the same stores: h5py chunks, in-chunk shuffle, the same net and optimiser."""
    import h5py
    import torch
    from torch import nn

    from projection.align.data import make_split

    with h5py.File(args.src, "r") as f:
        ids = f["ids"].asstr()[:].tolist()
    train = make_split(ids, 0.1, args.test_frac, 0)["train"]
    mask = np.zeros(len(ids), bool)
    del ids
    mask[train] = True
    d_src, d_tgt = (h5py.File(p, "r")["embeddings"].shape[1] for p in (args.src, args.tgt))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(d_src, 1024), nn.GELU(), nn.Linear(1024, d_tgt))  # the default MLP branch
    skip = nn.Linear(d_src, d_tgt).requires_grad_(False)  # the affine path, frozen at ridge in the flow
    mu, sd, omu, osd = torch.zeros(d_src), torch.ones(d_src), torch.zeros(d_tgt), torch.ones(d_tgt)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    total = args.bare_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.05 * total)) * 0.5 * (1 + math.cos(math.pi * s / total)))
    gen = torch.Generator().manual_seed(0)
    stamps: list[float] = []
    fs, ft = h5py.File(args.src, "r"), h5py.File(args.tgt, "r")
    n_chunks = -(-len(mask) // CHUNK)
    starts = [c for _ in range(-(-total // max(1, len(train) // 256)) + 1) for c in torch.randperm(n_chunks, generator=gen).tolist()]
    for c in starts:  # passes over the stream until `total` steps
        s = c * CHUNK
        x = torch.from_numpy(fs["embeddings"][s : s + CHUNK][mask[s : s + CHUNK]])  # (chunk, D_src)
        y = torch.from_numpy(ft["embeddings"][s : s + CHUNK][mask[s : s + CHUNK]])  # (chunk, D_tgt)
        perm = torch.randperm(x.shape[0], generator=gen)
        x, y = x[perm], y[perm]
        for b in range(0, x.shape[0] - 255, 256):
            z = (x[b : b + 256] - mu) / sd
            loss = nn.functional.mse_loss((net(z) + skip(z)) * osd + omu, y[b : b + 256])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            stamps.append(time.perf_counter())
            if len(stamps) >= total:
                break
        if len(stamps) >= total:
            break
    n = len(stamps)
    return {"steps": n, "steps_per_s": round((n - 11) / (stamps[-1] - stamps[10]), 3), "peak_rss_mib": round(peak_rss_mib()[0]),
            "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------- driver


def _child(role: str, args, **over) -> dict:
    cmd = [sys.executable, __file__, "--child", role, "--work", str(args.work), "--test-frac", str(args.test_frac),
           "--budget-gb", str(args.budget_gb), "--bare-steps", str(args.bare_steps), "--flow-steps", str(args.flow_steps)]
    for k, v in over.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {role} failed:\n{proc.stderr[-4000:]}")
    return last_json_line(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1_000_000, help="pairs of the streamed MLP align (0: skip)")
    ap.add_argument("--mem-pairs", type=int, default=70_000, help="pairs of the in-memory linear align (0: skip)")
    ap.add_argument("--d-src", type=int, default=1280)
    ap.add_argument("--d-tgt", type=int, default=384)
    ap.add_argument("--work", type=Path, default=Path("/tmp/xmodal-scale"))
    ap.add_argument("--bare-steps", type=int, default=300, help="steps of each bare-loop run")
    ap.add_argument("--test-frac", type=float, default=0.01)
    ap.add_argument("--budget-gb", type=float, default=4.0, help="AlignParams.in_memory_max_gb (the default 4)")
    ap.add_argument("--flow-steps", type=int, default=500,
                    help="steps the 1M align runs before its epoch is cut short (0: the whole default schedule)")
    ap.add_argument("--mem-steps", type=int, default=200,
                    help="step budget of the in-memory linear align (0: the default 2000; memory does not depend on it)")
    ap.add_argument("--child", choices=["align", "bare"])
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--src")
    ap.add_argument("--tgt")
    ap.add_argument("--kind", default="mlp")
    args = ap.parse_args()
    if args.child:
        emit_json((child_align if args.child == "align" else child_bare)(args))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    out: dict = {"pairs": args.pairs, "d_src": args.d_src, "d_tgt": args.d_tgt, "budget_gb": args.budget_gb,
                 "test_frac": args.test_frac, "load_start": loadavg()}
    if args.pairs:  # 0: only the in-memory linear align (d)
        src, tgt, write_s = write_stores(args.work, args.pairs, args.d_src, args.d_tgt)
        out["write_s"] = round(write_s, 1)
        print(f"(a) stores: {src} ({os.path.getsize(src) / 2**30:.2f} GiB), {tgt} ({os.path.getsize(tgt) / 2**30:.2f} GiB), "
              f"written in {write_s:.0f} s (0 = reused)", flush=True)
        bare = [_child("bare", args, src=src, tgt=tgt)]
        print(f"(c) bare loop before: {bare[0]['steps_per_s']} steps/s", flush=True)
        flow = _child("align", args, src=src, tgt=tgt, kind="mlp")
        print(f"(b) align flow: {flow['steps']} steps at {flow['steps_per_s']} steps/s, peak RSS {flow['peak_rss_mib']} MiB, "
              f"wall {flow['wall_s']} s", flush=True)
        bare.append(_child("bare", args, src=src, tgt=tgt))
        print(f"(c) bare loop after: {bare[1]['steps_per_s']} steps/s", flush=True)
        bare_rate = sum(b["steps_per_s"] for b in bare) / len(bare)
        ratio = flow["steps_per_s"] / bare_rate
        budget_mib = args.budget_gb * 1024
        out |= {"flow": flow, "bare": bare, "bare_steps_per_s_mean": round(bare_rate, 3), "ratio_flow_over_bare": round(ratio, 3),
                "peak_rss_over_budget": round(flow["peak_rss_mib"] / budget_mib, 3),
                "meets_goal": {"rss_le_2x_budget": flow["peak_rss_mib"] <= 2 * budget_mib, "steps_ge_0.9x_bare": ratio >= 0.9}}
        print(f"\nalign at {args.pairs:,} pairs ({args.d_src} -> {args.d_tgt}), in_memory_max_gb {args.budget_gb} (streamed: "
              f"{args.pairs * (args.d_src + args.d_tgt) * 4 / 2**30:.2f} GiB of pairs)")
        print(f"  peak RSS {flow['peak_rss_mib']} MiB = {out['peak_rss_over_budget']:.2f} x the budget (goal <= 2)")
        print(f"  steps/s: flow {flow['steps_per_s']}, bare {bare_rate:.3f} (runs {[b['steps_per_s'] for b in bare]}), "
              f"ratio {ratio:.3f} (goal >= 0.9)")
        print("  RSS by phase (peak MiB while it ran):")
        for k, v in flow["rss_by_phase_mib"].items():
            print(f"    {k:<45} {v:>7}")
        print(f"  test R@1 (p2t, {round(args.test_frac * args.pairs):,} test pairs): {flow['test_p2t_r1']}; baselines fit on "
              f"the first 200,000 train / 50,000 val pairs (a sample; flows/align.py BASELINE_TRAIN_ROWS)")
    if args.mem_pairs:
        msrc, mtgt, _ = write_stores(args.work, args.mem_pairs, args.d_src, args.d_tgt)
        lin = _child("align", args, src=msrc, tgt=mtgt, kind="linear", test_frac=0.1, flow_steps=0, train_steps=args.mem_steps)
        out["linear_in_memory"] = {"pairs": args.mem_pairs, **lin}
        print(f"\n(d) linear align, {args.mem_pairs:,} pairs in memory "
              f"({args.mem_pairs * (args.d_src + args.d_tgt) * 4 / 2**30:.2f} GiB of pairs): peak RSS {lin['peak_rss_mib']} MiB, "
              f"wall {lin['wall_s']} s; by phase {lin['rss_by_phase_mib']}")
    out["load_end"] = loadavg()
    emit_json(out)


if __name__ == "__main__":
    main()
