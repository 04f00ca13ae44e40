"""The four trainers of the shared loop (tests/projection/engine/test_loop.py), each one tiny deterministic run; also the kill -9 worker.

usage (the worker): python tests/loop_cases.py CASE CKPT_DIR OUT_FILE SLEEP_PER_EPOCH
Each case takes ``changes``: section -> {field: value} applied to its configs, so one test can
change any setting of any trainer.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = REPO / "data" / "models" / "xmodal-tiny-vit.json"
EPOCHS = 3


def stage1(ckpt, callback=None, changes=None):
    from projection.align.config import LossConfig, ProjectorConfig, TrainConfig
    from projection.align.data import InMemoryPairs
    from projection.losses.core import build_weighted as build_loss
    from projection.align.projector import make_projector
    from projection.align.train import train_projector

    ch = changes or {}
    rng = np.random.default_rng(ch.get("data", {}).get("seed", 0))
    x = rng.normal(size=(120, 8)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(8, 6))).astype(np.float32)
    # dropout exercises the saved RNG state; a learnable temperature the loss's own state
    pcfg = ProjectorConfig(**({"d_in": 8, "d_out": 6, "hidden": 16, "dropout": 0.1} | ch.get("projector", {})))
    lcfg = LossConfig(**({"terms": {"mse": 1.0, "infonce": 0.1}} | ch.get("loss", {})))
    cfg = TrainConfig(**({"epochs": EPOCHS, "batch_size": 16, "lr": 3e-3, "warmup_steps": 3, "patience": None, "seed": 7}
                         | ch.get("train", {})))
    model, loss = make_projector(pcfg, 0), build_loss(lcfg)
    res = train_projector(model, loss, InMemoryPairs(x[:100], y[:100]), InMemoryPairs(x[100:], y[100:]), cfg, ckpt, callback)
    return res, {f"model.{k}": v for k, v in model.state_dict().items()} | {f"loss.{k}": v for k, v in loss.state_dict().items()}


def finetune(ckpt, callback=None, changes=None):
    from encoders.factory import load_encoder
    from projection.align.config import ProjectorConfig
    from projection.finetune.model import TaskData
    from projection.finetune.model import finetune as run
    from projection.finetune.config import FinetuneConfig
    from projection.align.projector import make_projector

    nums = ["one", "two", "three"]
    texts = [f"a {['small', 'big'][i % 3 == 0]} photo of the {['cat', 'dog'][i % 2]} {nums[i % 3]}" for i in range(24)]
    labels = np.arange(24) % 2
    cfg = FinetuneConfig(**({"unfreeze": "last_n", "epochs": EPOCHS, "batch_size": 8, "encoder_lr": 1e-3, "head_lr": 3e-3,
                             "warmup_frac": 0.2, "patience": None, "eval_batch_size": 64} | (changes or {}).get("finetune", {})))
    enc = load_encoder(f"open_clip:text:{TINY_VIT}?device=cpu")  # seeded random init: the same weights every call
    proj = make_projector(ProjectorConfig(d_in=64, d_out=16, hidden=32), seed=0)
    res = run(enc, proj, TaskData(texts[:16], labels[:16]), TaskData(texts[16:], labels[16:]), cfg, ckpt, callback)
    names = set(res.encoder_state_keys)
    state = {f"encoder.{k}": v for k, v in enc.module.state_dict().items() if k in names}
    return res, state | {f"model.{k}": v for k, v in res.model.state_dict().items()}


def contrastive(ckpt, callback=None, changes=None):
    from projection.contrastive.config import ContrastiveConfig
    from projection.contrastive.trainer import train_contrastive

    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 3, 32, 32, generator=g)
    b = torch.tanh(2.0 * a.flip(1)) + 0.1 * torch.randn(40, 3, 32, 32, generator=g)
    # augmentation draws from the RNG that the checkpoint must restore
    cfg = ContrastiveConfig(**({"epochs": EPOCHS, "batch_size": 16, "lr": 2e-3, "warmup_frac": 0.0, "threads": 1,
                                "augment": True} | (changes or {}).get("contrastive", {})))
    res = train_contrastive(a[:32], b[:32], cfg, a[32:], b[32:], checkpoint_dir=ckpt, callback=callback)
    return res, {f"model.{k}": v for k, v in res.model.state_dict().items()} | {
        f"loss.{k}": v for k, v in res.loss_fn.state_dict().items()}


def semi(ckpt, callback=None, changes=None):
    from projection.align.config import ProjectorConfig, TrainConfig
    from projection.semi.objective import SemiConfig
    from projection.semi.trainer import train_semi

    ch = changes or {}
    rng = np.random.default_rng(ch.get("data", {}).get("seed", 0))
    x = rng.normal(size=(160, 8)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(8, 6))).astype(np.float32)
    # 12 pairs, unpaired rows on both sides (target side shuffled), pseudo-pairs, val pairs; dropout draws from the RNG
    pcfg = ProjectorConfig(**({"d_in": 8, "d_out": 6, "hidden": 16, "dropout": 0.1} | ch.get("projector", {})))
    train = TrainConfig(**({"batch_size": 16, "lr": 3e-3, "warmup_steps": 3, "patience": None, "seed": 7} | ch.get("train", {})))
    cfg = SemiConfig(**({"steps": 4 * EPOCHS, "epoch_steps": 4, "unpaired_batch": 16} | ch.get("semi", {})))
    res = train_semi(x[:12], y[:12], x[12:120], y[12:120][rng.permutation(108)], pcfg, train, cfg,
                     (x[12:40], y[12:40]), callback, val=(x[120:], y[120:]), checkpoint_dir=ckpt)
    return res.train, {f"f.{k}": v for k, v in res.model.state_dict().items()} | {
        f"g.{k}": v for k, v in res.reverse.state_dict().items()}


CASES = {"stage1": (stage1, "checkpoint.pt"), "finetune": (finetune, "finetune_checkpoint.pt"),
         "contrastive": (contrastive, "checkpoint.pt"), "semi": (semi, "semi_checkpoint.pt")}


def _worker(case: str, ckpt: str, out: str, sleep: float) -> None:
    torch.set_num_threads(1)
    res, state = CASES[case][0](ckpt, lambda *a: time.sleep(sleep))
    torch.save(state, out)
    print(f"resumed_from={res.resumed_from_epoch} epochs_run={res.epochs_run}", flush=True)


if __name__ == "__main__":
    for _p in (REPO, REPO / "tests"):
        if str(_p) not in sys.path:
            sys.path.insert(0, str(_p))
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
