"""Stage-1 alignment benchmark.

(a) samples/s (training pairs per second) of `train_projector` vs a bare
    torch loop doing the same maths (same MLP, batch, in-memory tensor, AdamW kernel, grad
    clipping, number of steps, torch threads). The trainer adds warmup+cosine LR, early-stop
    bookkeeping and loss accumulation; goal: ratio >= 0.95. Also vs a bare loop with the
    default (non-fused) AdamW, to show what the trainer's fused default buys.
    Runs alternate (bare, trainer, trainer, bare, ...) so background load hits both alike; best
    of R. On a shared machine load swings wildly: trust the best-of ratio, not single runs.
(b) wall time to fit each closed-form baseline at N=50k, D=512.
(0) first, that the comparison is fair: with a constant LR, no weight decay and no clipping the
    trainer ends with exactly the bare loop's weights (same steps, same maths).

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

from projection.align.baselines import ProcrustesBaseline, RidgeBaseline
from projection.align.config import LossConfig, ProjectorConfig, TrainConfig
from projection.align.data import InMemoryPairs
from projection.losses.core import build_weighted as build_loss
from projection.engine.loop import epoch_seed
from projection.align.projector import make_projector
from projection.align.train import train_projector


def bare_loop(model, x, y, batch_size: int, epochs: int, lr: float, seed: int, fused: bool, clip: float | None,
              weight_decay: float = 0.01) -> None:
    """The reference: what one would write by hand, nothing else (shuffled with the trainer's seeds)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused, weight_decay=weight_decay)
    params = list(model.parameters())
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
        for s in range(0, x.shape[0], batch_size):
            idx = perm[s : s + batch_size]
            loss = F.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def same_maths(n: int = 2048, d: int = 64, batch: int = 64) -> dict:
    """Does the ratio compare equal work? With a constant LR, no weight decay and no clipping, the
    trainer must end with exactly the bare loop's weights after the same number of steps."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    y = torch.tanh(x @ torch.randn(d, d, generator=g) / d**0.5)
    pcfg = ProjectorConfig(kind="mlp", d_in=d, d_out=d, hidden=2 * d)
    cfg = TrainConfig(epochs=2, batch_size=batch, lr=1e-3, weight_decay=0.0, warmup_steps=0, min_lr_ratio=1.0,
                      grad_clip=None, patience=None, seed=0)
    ours, bare = make_projector(pcfg, 0), make_projector(pcfg, 0)
    res = train_projector(ours, build_loss(LossConfig()), InMemoryPairs(x, y), None, cfg)
    bare_loop(bare, x, y, batch, cfg.epochs, cfg.lr, cfg.seed, True, None, weight_decay=0.0)
    same = all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), bare.state_dict().values()))
    return {"same_weights_as_bare_loop": same, "trainer_steps": res.steps, "bare_steps": cfg.epochs * (n // batch)}


def bench_training(n: int, d_src: int, d_tgt: int, hidden: int, batch: int, epochs: int, repeats: int, budget_s: float) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_src, generator=g)
    y = torch.tanh(x @ torch.randn(d_src, d_tgt, generator=g) / d_src**0.5)
    pairs = InMemoryPairs(x, y)
    pcfg = ProjectorConfig(kind="mlp", d_in=d_src, d_out=d_tgt, hidden=hidden)
    tcfg = TrainConfig(epochs=epochs, batch_size=batch, lr=1e-3, patience=None)  # defaults: fused AdamW, clip 1.0, warmup+cosine
    noclip = tcfg.model_copy(update={"grad_clip": None})

    def bare(fused, clip):
        return lambda xx=x, yy=y: bare_loop(make_projector(pcfg, 0), xx, yy, batch, epochs, tcfg.lr, 0, fused, clip)

    def ours(cfg):
        return lambda p=pairs: train_projector(make_projector(pcfg, 0), build_loss(LossConfig()), p, None, cfg)

    # Pairs compared: same optimizer kernel and same clipping on both sides, so the ratio is
    # the trainer's loop overhead (schedule, bookkeeping, batching); "default_adamw" shows
    # what the trainer's fused-AdamW default buys over a naive loop.
    variants = {
        "bare_fused_clip": bare(True, tcfg.grad_clip),
        "train_default": ours(tcfg),
        "bare_fused": bare(True, None),
        "train_noclip": ours(noclip),
        "bare_default_adamw": bare(False, None),
    }
    small = InMemoryPairs(x[: batch * 4], y[: batch * 4])
    for name, fn in variants.items():  # warm-up: allocator, kernels, first-touch
        fn(small) if name.startswith("train") else fn(x[: batch * 4], y[: batch * 4])
    times: dict[str, list[float]] = {k: [] for k in variants}
    start = time.perf_counter()
    for r in range(repeats):
        if r >= 3 and time.perf_counter() - start > budget_s:
            break  # a busy shared machine can be 10x slower; keep the benchmark bounded
        names = list(variants) if r % 2 == 0 else list(variants)[::-1]  # neither side always first
        for name in names:
            times[name].append(timed(variants[name]))
        print("  repeat %d: " % r + " | ".join(f"{k} {n * epochs / v[-1]:7.0f}" for k, v in times.items()))
    sps = {k: n * epochs / min(v) for k, v in times.items()}  # best of repeats
    out = {f"{k}_samples_per_s": round(v, 1) for k, v in sps.items()}
    out["train_vs_bare_ratio"] = round(sps["train_default"] / sps["bare_fused_clip"], 4)
    out["train_vs_bare_ratio_noclip"] = round(sps["train_noclip"] / sps["bare_fused"], 4)
    out["train_vs_bare_default_adamw_ratio"] = round(sps["train_noclip"] / sps["bare_default_adamw"], 4)
    # literal reading: trainer with all defaults (incl. clipping) vs the plainest AdamW loop
    out["train_default_vs_bare_default_adamw_ratio"] = round(sps["train_default"] / sps["bare_default_adamw"], 4)
    out["steps_per_run"] = epochs * -(-n // batch)
    out["config"] = {"n": n, "d_src": d_src, "d_tgt": d_tgt, "hidden": hidden, "batch": batch, "epochs": epochs, "repeats_run": len(times["train_default"])}
    return out


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
    check = same_maths()
    print(f"(0) same maths as the bare loop (constant LR, no decay, no clipping): identical weights "
          f"{check['same_weights_as_bare_loop']} after {check['trainer_steps']} vs {check['bare_steps']} steps")
    print("(a) stage-1 training throughput, MLP 512->1024->512, batch 256")
    train = bench_training(args.n, 512, 512, 1024, 256, args.epochs, args.repeats, args.budget_s)
    print(
        f"  best-of ratios (goal >= 0.95): train_projector/bare, both fused AdamW + clip 1.0: {train['train_vs_bare_ratio']:.3f}; "
        f"both without clip: {train['train_vs_bare_ratio_noclip']:.3f}; "
        f"vs a bare loop with default (non-fused) AdamW: {train['train_vs_bare_default_adamw_ratio']:.3f}"
    )
    print("(b) closed-form baselines")
    base = bench_baselines(50_000, 512)
    print(json.dumps({"torch_threads": threads, **check, **train, **base}))


if __name__ == "__main__":
    main()
