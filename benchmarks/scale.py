"""Stage 1 at a million pairs: the align flow with its defaults against a bare torch loop, and its memory.

(a) writes two stores of N pairs through ``encoders.store.StoreWriter`` (source D_src = 1280,
    target D_tgt = 384, the dims of EfficientNet-B0 and a MiniLM sentence encoder), related by a
    known nonlinear map, y = tanh(x W1) W2 + 0.1 x V + noise, so the MLP has something to learn
    beyond ridge;
(b) runs ``flows.align.align`` with its defaults (MLP projector, 2000-step budget rounded up to whole
    epochs, in_memory_max_gb 4: at 1M x (1280 + 384) float32 = 6.2 GiB the pairs are streamed) in a
    fresh process, sampling its RSS every 0.1 s per phase (data, baselines, training, evaluation);
(c) steps/s of the flow's training loop against a bare torch loop over the SAME stream, INTERLEAVED in
    one process so that a shared machine's load hits both alike (two separate runs once saw the load
    move 10x between them): a second align flow, on --speed-pairs stores streamed under
    --speed-budget-gb, runs its own loop (chunk reads, shuffles, callbacks and all), and after its
    warm-up every --block steps of it are followed by --block steps of a bare loop (the same stores
    read with h5py in the same contiguous 65,536-row chunks, rows shuffled within a chunk, the same
    split, batch size, network: frozen standardised affine path + trainable MLP branch, fused AdamW,
    clipping, warmup-cosine schedule). Each block is timed from the end of the one before (so a flow
    block holds whatever the flow does between steps); rates are pooled over all blocks, and the
    median of the per-pair ratios is given beside it. The FLOP limit: FLOPs of one step
    (FlopCounterMode) over the best fp32 GEMM rate measured between the blocks;
(d) runs a LINEAR align of M (70,000) pairs of the same dims, in memory, and states its peak RSS.

The test split is cut to --test-frac (default 0.01: 10,000 pairs at 1M), since ranking 100,000
queries against 100,000 candidates for each of three methods costs ~20 min on 2 cores; train and
val splits are the defaults' (val 0.1).

Prints figures, then a LAST line holding one JSON object.
usage: python benchmarks/scale.py [--pairs 1000000] [--speed-pairs 200000] [--mem-pairs 70000] [--work /tmp/xmodal-scale]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_json, gemm_peak, last_json_line, loadavg, peak_rss_mib, rss_mib  # noqa: E402

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
    """Run the align flow once; report peak RSS (VmHWM), RSS by phase and the optimizer steps' rate.

    With ``--block`` the flow's loop is interleaved with a bare loop (``Interleave``): its RSS then
    includes the bare loop's chunk and network, so that run gives the speed figures, not the memory ones.
    """
    import torch

    import flows.align as fa
    from projection.engine import loop

    rss = PhaseRss()
    rss.peaks["imports"] = rss_mib()
    rss.thread.start()
    stamps: list[float] = []
    step = loop.optimizer_step
    inter = Interleave(args) if args.block else None

    def timed_step(*a, **k):  # the loop's own step, time-stamped: steps/s includes reading the stream
        out = step(*a, **k)
        stamps.append(time.perf_counter())
        if inter is not None:
            inter.after_flow_step(len(stamps))
        return out

    loop.optimizer_step = timed_step
    if args.flow_steps:  # stop the epoch after this many steps (the default schedule at 1M is one 3,125-step epoch)
        import itertools

        from projection.align.train import Stage1

        batches = Stage1.batches
        Stage1.batches = lambda self, gen: itertools.islice(batches(self, gen), args.flow_steps)
    seen: dict = {}
    datasets = fa._datasets

    def datasets_seen(*a, **k):  # which path the flow took: streamed (ChunkedPairs) or in memory
        out = datasets(*a, **k)
        seen.update(in_memory=out["in_memory"], train_set=type(out["train"]).__name__, n_train=len(out["train"]))
        return out

    fa._datasets = datasets_seen
    for name, phase in (("_datasets", "data (read splits, test + baseline sample)"), ("fit_baselines", "baselines"),
                        ("fit_projector", "projector (fit stats, train, val)"), ("_evaluate", "evaluation (test ranks)")):
        setattr(fa, name, rss.wrap(phase, getattr(fa, name), "other"))
    rss.phase = "join + split"
    # a fresh run folder: the same stores and settings map to one folder, and a finished run's checkpoint there
    # would be resumed with no step left to time
    run_root = Path(tempfile.mkdtemp(prefix="runs-", dir=args.work))
    t0 = time.perf_counter()
    out = fa.align(fa.AlignParams(
        source_store=args.src, target_store=args.tgt, projector={"kind": args.kind}, split={"test_frac": args.test_frac},
        # a cut epoch: one epoch, which is what the default 2000-step budget resolves to from 512k train pairs up
        train={"steps": args.train_steps} if args.train_steps else {"epochs": 1} if args.flow_steps else {},
        in_memory_max_gb=args.budget_gb, out_dir=str(run_root),
        tracking_uri=f"sqlite:///{Path(args.work) / 'mlflow.db'}", experiment="scale"))
    wall = time.perf_counter() - t0
    rss._stop.set()
    shutil.rmtree(run_root, ignore_errors=True)
    # steady rate: the first 10 steps hold the first chunk's read and the warm-up of the kernels
    n = len(stamps)
    rate = (n - 11) / (stamps[-1] - stamps[10]) if n > 20 else float("nan")
    peak, how = peak_rss_mib()
    m = out["metrics"]
    return {"wall_s": round(wall, 1), "steps": n, "steps_per_s": round(rate, 3), "train_s": round(stamps[-1] - stamps[0], 1) if n else 0,
            "peak_rss_mib": round(peak), "peak_rss_how": how, "rss_by_phase_mib": {k: round(v) for k, v in rss.peaks.items()},
            "test_p2t_r1": {k: round(v.get("p2t_r1", float("nan")), 4) for k, v in m.items() if "p2t_r1" in v},
            "kept_ridge_start": out["kept_ridge_start"], "torch_threads": torch.get_num_threads(), "code": fa.__file__,
            **seen, **({"interleaved": inter.summary()} if inter is not None else {})}


# ---------------------------------------------------------------- (c) the bare loop, interleaved with the flow's


def bare_stream(src: str, tgt: str, test_frac: float, total: int, counted: dict):
    """What one would write by hand over the same stores: h5py chunks, in-chunk shuffle, the same net and optimiser.

    A generator that yields after every optimizer step (passes over the stream for as long as it is
    asked); ``counted["flops"]`` gets one step's FLOPs (forward + backward, FlopCounterMode).
    """
    import h5py
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    from projection.align.data import make_split

    with h5py.File(src, "r") as f:
        ids = f["ids"].asstr()[:].tolist()
    train = make_split(ids, 0.1, test_frac, 0)["train"]
    mask = np.zeros(len(ids), bool)
    del ids
    mask[train] = True
    fs, ft = h5py.File(src, "r"), h5py.File(tgt, "r")
    d_src, d_tgt = fs["embeddings"].shape[1], ft["embeddings"].shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(d_src, 1024), nn.GELU(), nn.Linear(1024, d_tgt))  # the default MLP branch
        skip = nn.Linear(d_src, d_tgt).requires_grad_(False)  # the affine path, frozen at ridge in the flow
    mu, sd, omu, osd = torch.zeros(d_src), torch.ones(d_src), torch.zeros(d_tgt), torch.ones(d_tgt)
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.05 * total)) * 0.5 * (1 + math.cos(math.pi * s / total)))
    gen = torch.Generator().manual_seed(0)
    n_chunks = -(-len(mask) // CHUNK)

    def step(xb, yb):
        z = (xb - mu) / sd
        loss = nn.functional.mse_loss((net(z) + skip(z)) * osd + omu, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()

    while True:  # passes over the stream, chunks in a fresh random order each pass
        for c in torch.randperm(n_chunks, generator=gen).tolist():
            s = c * CHUNK
            x = torch.from_numpy(fs["embeddings"][s : s + CHUNK][mask[s : s + CHUNK]])  # (chunk, D_src)
            y = torch.from_numpy(ft["embeddings"][s : s + CHUNK][mask[s : s + CHUNK]])  # (chunk, D_tgt)
            perm = torch.randperm(x.shape[0], generator=gen)
            x, y = x[perm], y[perm]
            for b in range(0, x.shape[0] - 255, 256):
                if "flops" not in counted:
                    with FlopCounterMode(display=False) as fc:
                        step(x[b : b + 256], y[b : b + 256])
                    counted["flops"] = fc.get_total_flops()
                else:
                    step(x[b : b + 256], y[b : b + 256])
                yield


class Interleave:
    """Inside the flow's loop: after its ``warm`` steps, warm the bare loop up as long, then alternate
    ``block`` steps of each. A block's clock runs from the end of the block before, so the flow's blocks
    hold everything its loop does between steps (next batch, chunk reads, shuffles, callbacks, logging)."""

    def __init__(self, args):
        self.block, self.warm, self.counted = args.block, args.warm, {}
        self.bare = bare_stream(args.src, args.tgt, args.test_frac, args.flow_steps, self.counted)
        self.flow_s: list[float] = []
        self.bare_s: list[float] = []
        self.peaks: list[float] = []
        self.t = 0.0

    def _bare_block(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            next(self.bare)
        return time.perf_counter() - t0

    def after_flow_step(self, n: int) -> None:
        if n == self.warm:
            self._bare_block(self.warm)  # its first chunk read, kernels warmed: neither side is timed yet
            self.peaks.append(gemm_peak())
        elif n > self.warm and (n - self.warm) % self.block == 0:
            self.flow_s.append(time.perf_counter() - self.t)
            self.bare_s.append(self._bare_block(self.block))
            self.peaks.append(gemm_peak())  # between the blocks, in neither's time
        else:
            return
        self.t = time.perf_counter()

    def summary(self) -> dict:
        import statistics

        k, b = len(self.flow_s), self.block
        flow, bare = k * b / sum(self.flow_s), k * b / sum(self.bare_s)
        pair_ratios = [bs / fs for fs, bs in zip(self.flow_s, self.bare_s)]  # (b / fs) / (b / bs)
        flops, peak = self.counted["flops"], max(self.peaks)
        return {"block": b, "blocks_each": k, "flow_steps_per_s": round(flow, 3), "bare_steps_per_s": round(bare, 3),
                "ratio_flow_over_bare": round(flow / bare, 3), "ratio_median_of_pairs": round(statistics.median(pair_ratios), 3),
                "ratio_pairs": [round(r, 3) for r in pair_ratios], "flow_block_s": [round(t, 4) for t in self.flow_s],
                "bare_block_s": [round(t, 4) for t in self.bare_s], "flops_per_step": flops,
                "gemm_peak_gflops": round(peak / 1e9, 1), "flop_limit_steps_per_s": round(peak / flops, 2)}


# ---------------------------------------------------------------- driver


def _child(args, **over) -> dict:
    """The align child (a fresh process: its peak RSS is its own); ``over`` replaces the driver's arguments."""
    given = {"work": args.work, "test_frac": args.test_frac, "budget_gb": args.budget_gb, "flow_steps": args.flow_steps,
             "block": 0, "warm": args.warm} | over
    cmd = [sys.executable, __file__, "--child"]
    for k, v in given.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"align child failed:\n{proc.stderr[-4000:]}")
    return last_json_line(proc.stdout)


def _stores(args, n: int) -> tuple[Path, Path]:
    src, tgt, write_s = write_stores(args.work, n, args.d_src, args.d_tgt)
    print(f"(a) stores: {src} ({os.path.getsize(src) / 2**30:.2f} GiB), {tgt} ({os.path.getsize(tgt) / 2**30:.2f} GiB), "
          f"written in {write_s:.0f} s (0 = reused)", flush=True)
    return src, tgt


def _gib(n: int, args) -> float:
    return n * (args.d_src + args.d_tgt) * 4 / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1_000_000, help="pairs of the streamed MLP align whose memory is measured (0: skip)")
    ap.add_argument("--speed-pairs", type=int, default=200_000, help="pairs of the interleaved steps/s comparison (0: skip)")
    ap.add_argument("--mem-pairs", type=int, default=70_000, help="pairs of the in-memory linear align (0: skip)")
    ap.add_argument("--d-src", type=int, default=1280)
    ap.add_argument("--d-tgt", type=int, default=384)
    ap.add_argument("--work", type=Path, default=Path("/tmp/xmodal-scale"))
    ap.add_argument("--test-frac", type=float, default=0.01)
    ap.add_argument("--budget-gb", type=float, default=4.0, help="AlignParams.in_memory_max_gb (the default 4)")
    ap.add_argument("--speed-budget-gb", type=float, default=0.5,
                    help="in_memory_max_gb of the steps/s run: below its stores' size, so the flow streams them")
    ap.add_argument("--flow-steps", type=int, default=500,
                    help="steps the 1M align runs before its epoch is cut short (0: the whole default schedule)")
    ap.add_argument("--block", type=int, default=64, help="steps per block of the interleaved comparison")
    ap.add_argument("--blocks", type=int, default=8, help="blocks of each loop in the interleaved comparison")
    ap.add_argument("--warm", type=int, default=10, help="untimed warm-up steps of each loop before the blocks")
    ap.add_argument("--mem-steps", type=int, default=200,
                    help="step budget of the in-memory linear align (0: the default 2000; memory does not depend on it)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--src")
    ap.add_argument("--tgt")
    ap.add_argument("--kind", default="mlp")
    args = ap.parse_args()
    if args.child:
        emit_json(child_align(args))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    out: dict = {"pairs": args.pairs, "speed_pairs": args.speed_pairs, "d_src": args.d_src, "d_tgt": args.d_tgt,
                 "budget_gb": args.budget_gb, "test_frac": args.test_frac, "load_start": loadavg(), "meets_goal": {}}
    if args.pairs:  # (b) the memory of the streamed align
        src, tgt = _stores(args, args.pairs)
        flow = _child(args, src=src, tgt=tgt)
        budget_mib = args.budget_gb * 1024
        out |= {"flow": flow, "peak_rss_over_budget": round(flow["peak_rss_mib"] / budget_mib, 3)}
        out["meets_goal"]["rss_le_2x_budget"] = flow["peak_rss_mib"] <= 2 * budget_mib
        print(f"\n(b) align at {args.pairs:,} pairs ({args.d_src} -> {args.d_tgt}), in_memory_max_gb {args.budget_gb} "
              f"({'in memory' if flow['in_memory'] else 'streamed'}: {_gib(args.pairs, args):.2f} GiB of pairs): "
              f"{flow['steps']} steps, wall {flow['wall_s']} s")
        print(f"  peak RSS {flow['peak_rss_mib']} MiB = {out['peak_rss_over_budget']:.2f} x the budget (goal <= 2)")
        print("  RSS by phase (peak MiB while it ran):")
        for k, v in flow["rss_by_phase_mib"].items():
            print(f"    {k:<45} {v:>7}")
        print(f"  test R@1 (p2t, {round(args.test_frac * args.pairs):,} test pairs): {flow['test_p2t_r1']}; baselines fit on "
              f"the first 200,000 train / 50,000 val pairs (a sample; flows/align.py BASELINE_TRAIN_ROWS)", flush=True)
    if args.speed_pairs:  # (c) steps/s, the flow's loop and the bare loop interleaved over the same stream
        src, tgt = _stores(args, args.speed_pairs)
        run = _child(args, src=src, tgt=tgt, budget_gb=args.speed_budget_gb, block=args.block,
                     flow_steps=args.warm + args.blocks * args.block)
        it = run["interleaved"]
        out["speed"] = {"budget_gb": args.speed_budget_gb, "streamed": not run["in_memory"], "train_set": run["train_set"],
                        "n_train": run["n_train"], **it, "wall_s": run["wall_s"], "torch_threads": run["torch_threads"]}
        out["meets_goal"]["steps_ge_0.9x_bare"] = it["ratio_flow_over_bare"] >= 0.9 and not run["in_memory"]
        print(f"\n(c) steps/s at {args.speed_pairs:,} pairs ({_gib(args.speed_pairs, args):.2f} GiB of pairs, "
              f"in_memory_max_gb {args.speed_budget_gb}: {'in memory' if run['in_memory'] else 'streamed'}, {run['train_set']} "
              f"of {run['n_train']:,} train pairs), {it['blocks_each']} blocks of {it['block']} steps each, alternating")
        print(f"  flow {it['flow_steps_per_s']} steps/s, bare {it['bare_steps_per_s']} steps/s: ratio "
              f"{it['ratio_flow_over_bare']} (goal >= 0.9); median of the {it['blocks_each']} block-pair ratios "
              f"{it['ratio_median_of_pairs']} (each: {it['ratio_pairs']})")
        print(f"  FLOP limit: {it['flops_per_step'] / 1e9:.2f} GFLOP a step (FlopCounterMode) at the best fp32 GEMM rate "
              f"seen between blocks, {it['gemm_peak_gflops']} GFLOP/s = {it['flop_limit_steps_per_s']} steps/s; "
              f"flow at {it['flow_steps_per_s'] / it['flop_limit_steps_per_s']:.2f} of it", flush=True)
    if args.mem_pairs:
        msrc, mtgt, _ = write_stores(args.work, args.mem_pairs, args.d_src, args.d_tgt)
        lin = _child(args, src=msrc, tgt=mtgt, kind="linear", test_frac=0.1, flow_steps=0, train_steps=args.mem_steps)
        out["linear_in_memory"] = {"pairs": args.mem_pairs, **lin}
        print(f"\n(d) linear align, {args.mem_pairs:,} pairs in memory ({_gib(args.mem_pairs, args):.2f} GiB of pairs): "
              f"peak RSS {lin['peak_rss_mib']} MiB, wall {lin['wall_s']} s; by phase {lin['rss_by_phase_mib']}")
    out["load_end"] = loadavg()
    emit_json(out)


if __name__ == "__main__":
    main()
