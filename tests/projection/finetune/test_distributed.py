"""Stage 2 on 2 DDP processes (gloo, torchrun): same metrics as one process, and a kill -9 resumes.

Real parts: the tiny random-init open_clip ViT of data/models, real PNGs, the real launcher
(``python -m torch.distributed.run``) and checkpoint files. Tolerances: the DDP step is the
single-process step (same global batch, gradients of the batch mean) up to float summation order,
so the validation loss must agree within 1e-4 relative and the accuracy exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from projection.align.config import ProjectorConfig
from projection.align.projector import make_projector, save_projector
from projection.finetune.config import FinetuneConfig
from projection.finetune.distributed import launch, launch_command, write_spec
from projection.finetune.model import CHECKPOINT_FILE, TaskData, evaluate_task, finetune

REPO = Path(__file__).resolve().parents[3]
SPEC = f"open_clip:image:{REPO / 'data' / 'models' / 'xmodal-tiny-vit.json'}?device=cpu"
EPOCHS = 8

pytestmark = pytest.mark.slow  # two launches of 2 workers, a killed one, and a single-process reference


def _enc():
    from encoders.factory import load_encoder

    return load_encoder(SPEC)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """48 noisy 32x32 images, dark (0) or bright (1); a saved stage-1 projector; the config."""
    from PIL import Image

    d = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(48):
        level = rng.uniform(20, 90) if i % 2 == 0 else rng.uniform(160, 235)
        p = d / f"img_{i:03d}.png"
        Image.fromarray(np.clip(level + rng.normal(0, 15, (32, 32, 3)), 0, 255).astype(np.uint8)).save(p)
        paths.append(str(p))
        labels.append(i % 2)
    proj_dir = save_projector(make_projector(ProjectorConfig(d_in=64, d_out=16, hidden=32), seed=0), d / "proj")
    cfg = FinetuneConfig(task="classification", unfreeze="last_n", epochs=EPOCHS, batch_size=8, encoder_lr=1e-3,
                         head_lr=3e-3, warmup_frac=0.0, patience=None, seed=0, eval_batch_size=64, processes=2)
    y = np.array(labels)
    return {"dir": d, "proj": proj_dir, "cfg": cfg, "train": TaskData(paths[:32], y[:32]), "val": TaskData(paths[32:], y[32:])}


def _resume_in_parent(task, ckpt: Path):
    """What the flow does after the workers: one process resumes their finished checkpoint (no training)."""
    return finetune(_enc(), task["proj"], task["train"], task["val"], task["cfg"], checkpoint_dir=ckpt)


def _single(task, tmp: Path):
    return finetune(_enc(), task["proj"], task["train"], task["val"], task["cfg"].model_copy(update={"processes": 1}),
                    checkpoint_dir=tmp)


def test_two_ddp_processes_match_one_process(task, tmp_path):
    spec = write_spec(tmp_path / "spec", SPEC, task["proj"], task["train"], task["val"], task["cfg"], tmp_path / "ckpt")
    launch(spec, 2)
    ddp = _resume_in_parent(task, tmp_path / "ckpt")
    assert ddp.resumed_from_epoch == EPOCHS and ddp.epochs_run == EPOCHS  # the workers ran every epoch
    one = _single(task, tmp_path / "one")
    m_ddp, m_one = evaluate_task(ddp.model, task["val"]), evaluate_task(one.model, task["val"])
    assert m_ddp["accuracy"] == m_one["accuracy"]
    assert m_ddp["loss"] == pytest.approx(m_one["loss"], rel=1e-4)
    assert [h["train_loss"] for h in ddp.history] != []
    for a, b in zip(ddp.history, one.history):  # every epoch's validation agrees, not only the last
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4), (a, b)
    head_a, head_b = ddp.model.head.state_dict(), one.model.head.state_dict()
    assert max(float((head_a[k] - head_b[k]).abs().max()) for k in head_a) < 1e-4


def test_kill_9_of_the_launcher_group_resumes_to_the_uninterrupted_result(task, tmp_path):
    spec = write_spec(tmp_path / "spec", SPEC, task["proj"], task["train"], task["val"], task["cfg"], tmp_path / "ckpt")
    ck = tmp_path / "ckpt" / CHECKPOINT_FILE
    proc = subprocess.Popen(launch_command(spec, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own group: kill -9 takes the launcher and both workers
    deadline = time.monotonic() + 600
    while not ck.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = torch.load(ck, weights_only=True)["epoch"]
    assert 1 <= done < EPOCHS, f"the kill came after {done} epochs; it must land mid-run"
    launch(spec, 2)  # the rerun resumes from the killed group's checkpoint
    resumed = _resume_in_parent(task, tmp_path / "ckpt")
    assert resumed.epochs_run == EPOCHS and len(resumed.history) == EPOCHS
    clean_spec = write_spec(tmp_path / "clean", SPEC, task["proj"], task["train"], task["val"], task["cfg"],
                            tmp_path / "clean-ckpt")
    launch(clean_spec, 2)
    clean = _resume_in_parent(task, tmp_path / "clean-ckpt")
    a, b = resumed.model.head.state_dict(), clean.model.head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed DDP run differs from an uninterrupted one"
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in clean.history]
