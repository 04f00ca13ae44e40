"""Stage-1 alignment benchmark.

(a) samples/s of `train_projector` vs a bare torch loop doing the same work (same MLP,
    batch, in-memory tensor, AdamW, number of steps, torch threads). The trainer also does
    warmup+cosine LR, grad clipping and loss bookkeeping; the goal is ratio >= 0.95.
    Runs alternate (bare, trainer, trainer, bare, ...) so background load hits both alike; best
    of R. On a shared machine load swings wildly: trust the best-of ratio, not single runs.
(b) wall time to fit each closed-form baseline at N=50k, D=512.

Prints figures, then a LAST line holding one JSON object.
usage: python benchmarks/align.py [--repeats 8] [--budget-s 100] [--n 20000] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from projection.baselines import ProcrustesBaseline, RidgeBaseline
from projection.config import LossConfig, ProjectorConfig, TrainConfig
from projection.data import InMemoryPairs
from projection.losses import build_loss
from projection.projector import make_projector
from projection.train import train_projector


def bare_loop(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, epochs: int, lr: float, seed: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed + epoch))
        for s in range(0, x.shape[0], batch_size):
            idx = perm[s : s + batch_size]
            loss = F.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_training(n: int, d_src: int, d_tgt: int, hidden: int, batch: int, epochs: int, repeats: int, budget_s: float) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_src, generator=g)
    y = torch.tanh(x @ torch.randn(d_src, d_tgt, generator=g) / d_src**0.5)
    pairs = InMemoryPairs(x, y)
    pcfg = ProjectorConfig(kind="mlp", d_in=d_src, d_out=d_tgt, hidden=hidden)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch, lr=1e-3, patience=None)  # defaults: clip 1.0, warmup, cosine
    loss_cfg = LossConfig()

    def run_bare():
        bare_loop(make_projector(pcfg, 0), x, y, batch, epochs, tcfg.lr, 0)

    def run_trainer():
        train_projector(make_projector(pcfg, 0), build_loss(loss_cfg), pairs, None, tcfg)

    # warm-up: allocator, kernels, first-touch of the data
    bare_loop(make_projector(pcfg, 0), x[: batch * 4], y[: batch * 4], batch, 1, tcfg.lr, 0)
    train_projector(make_projector(pcfg, 0), build_loss(loss_cfg), InMemoryPairs(x[: batch * 4], y[: batch * 4]), None, tcfg)
    bare, ours = [], []
    start = time.perf_counter()
    for r in range(repeats):
        if r >= 3 and time.perf_counter() - start > budget_s:
            break  # a busy shared machine can be 10x slower; keep the benchmark bounded
        # alternate which goes first so neither systematically gets the quieter slot
        if r % 2 == 0:
            bare.append(timed(run_bare))
            ours.append(timed(run_trainer))
        else:
            ours.append(timed(run_trainer))
            bare.append(timed(run_bare))
        print(f"  repeat {r}: bare {n * epochs / bare[-1]:9.0f} samples/s | train_projector {n * epochs / ours[-1]:9.0f} samples/s")
    bare_sps, ours_sps = n * epochs / min(bare), n * epochs / min(ours)
    # Paired ratio per round (adjacent runs see similar background load); median over rounds.
    paired = float(np.median([b / o for b, o in zip(bare, ours)]))
    return {
        "train_samples_per_s": round(ours_sps, 1),
        "bare_samples_per_s": round(bare_sps, 1),
        "train_vs_bare_ratio": round(ours_sps / bare_sps, 4),
        "train_vs_bare_ratio_median_paired": round(paired, 4),
        "steps_per_run": epochs * -(-n // batch),
        "config": {"n": n, "d_src": d_src, "d_tgt": d_tgt, "hidden": hidden, "batch": batch, "epochs": epochs, "repeats_run": len(bare)},
    }


def bench_baselines(n: int, d: int) -> dict:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    y = (x @ rng.standard_normal((d, d), dtype=np.float32) / d**0.5 + 0.1 * rng.standard_normal((n, d), dtype=np.float32)).astype(np.float32)
    out = {}
    for name, make in (("ridge", lambda: RidgeBaseline(1.0)), ("procrustes", lambda: ProcrustesBaseline())):
        make().fit(x[:2000], y[:2000])  # warm-up: lazy imports, BLAS init
        out[f"{name}_fit_s"] = round(min(timed(lambda: make().fit(x, y)) for _ in range(2)), 3)
        print(f"  {name:10s} fit at N={n}, D={d}: {out[f'{name}_fit_s']:.3f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=100.0, help="stop repeating (after 3) once (a) has run this long")
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, threads={threads}")
    print("(a) stage-1 training throughput, MLP 512->1024->512, batch 256")
    train = bench_training(args.n, 512, 512, 1024, 256, args.epochs, args.repeats, args.budget_s)
    print(f"  best: bare {train['bare_samples_per_s']:.0f}/s, train_projector {train['train_samples_per_s']:.0f}/s, ratio {train['train_vs_bare_ratio']:.3f}, median paired ratio {train['train_vs_bare_ratio_median_paired']:.3f} (goal >= 0.95)")
    print("(b) closed-form baselines")
    base = bench_baselines(50_000, 512)
    print(json.dumps({"torch_threads": threads, **train, **base}))


if __name__ == "__main__":
    main()
