"""Subprocess body for the kill -9 resume test: a deterministic tiny training run.

usage: python resume_worker.py CKPT_DIR OUT_DIR SLEEP_PER_EPOCH
"""

import sys
import time

import numpy as np
import torch

from projection.config import LossConfig, ProjectorConfig, TrainConfig
from projection.data import InMemoryPairs
from projection.losses import build_loss
from projection.projector import make_projector, save_projector
from projection.train import train_projector

EPOCHS = 6


def main(ckpt_dir: str, out_dir: str, sleep: float) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(8, 6))).astype(np.float32)
    train, val = InMemoryPairs(x[:500], y[:500]), InMemoryPairs(x[500:], y[500:])
    # dropout exercises the saved RNG state; two loss terms exercise the weighted loss
    model = make_projector(ProjectorConfig(d_in=8, d_out=6, hidden=32, dropout=0.2, layernorm=True), seed=0)
    loss = build_loss(LossConfig(terms={"mse": 1.0, "cosine": 0.5}))
    cfg = TrainConfig(epochs=EPOCHS, batch_size=32, lr=3e-3, warmup_steps=10, patience=None, seed=7)
    res = train_projector(model, loss, train, val, cfg, checkpoint_dir=ckpt_dir, callback=lambda *a: time.sleep(sleep))
    save_projector(model, out_dir)
    print(f"resumed_from={res.resumed_from_epoch} epochs_run={res.epochs_run}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
