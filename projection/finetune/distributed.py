"""Stage 2 on several processes: torch DistributedDataParallel under ``torch.distributed.run`` (torchrun).

Why DDP and not a loop of our own: gradient all-reduce overlapped with the backward pass, ``gloo``
on CPU and ``nccl`` on GPUs, and torchrun's rendezvous for several hosts are what a user already
knows; the loop (``projection.engine.loop``) stays the one loop, and each worker runs it as is.

How a step is split: every rank draws the SAME global batch (same seeded generator, so the
last-batch rule and the epoch order are the single-process ones) and computes the loss on its
slice of it (``tensor_split``), scaled by ``len(slice) * world / len(batch)``. DDP averages the
gradients over ranks, so the step's gradient is the gradient of the mean loss over the whole
batch: the same update as one process, up to float summation order. Classification and
regression losses are per-item means, so this holds exactly; retrieval's InfoNCE sees only its
slice's in-batch negatives (as in any data-parallel CLIP without a gathered loss).

Checkpoints: rank 0 writes (``loop`` saves on the main rank only), every rank reads the same file on
resume, so a killed group restarts where the last checkpoint left all of them. Validation runs
whole on every rank (the same numbers everywhere, hence the same early-stopping decisions).

Launch: ``launch(spec, nproc)`` runs ``python -m torch.distributed.run --standalone --nproc-per-node N
-m projection.finetune.distributed SPEC`` (``flows/finetune.py`` calls it from its Prefect task);
several hosts: the README's scale-out section.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from projection.finetune.config import FinetuneConfig
from projection.finetune.model import FinetuneTrainer, TaskData, _autocast

SPEC_FILE = "ddp_spec.json"


class _Whole(nn.Module):
    """The encoder module (not a submodule of FinetuneModel, see there) and the model, as one module for DDP."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder_module, self.model = model.encoder.module, model

    def forward(self, x: Any, raw: bool) -> torch.Tensor:
        return self.model(x, raw=raw)


class DistributedFinetuneTrainer(FinetuneTrainer):
    """FinetuneTrainer whose steps run on this rank's slice of each global batch, gradients averaged by DDP."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(_Whole(self.model), device_ids=ids)

    def batches(self, generator: torch.Generator):
        for idx in super().batches(generator):  # the global batch, identical on every rank
            yield idx, idx.tensor_split(self.world)[self.rank]

    def loss(self, batch) -> torch.Tensor:
        idx, mine = batch
        if len(mine) == 0:  # a last batch smaller than the world: this rank still joins the all-reduce
            return sum(p.sum() for p in self.ddp.parameters() if p.requires_grad) * 0.0
        x = self.train_in.get(mine)
        with _autocast(self.device, self.autocast):
            out = self.ddp(x if self.raw else x.to(self.device), raw=self.raw)
        scale = len(mine) * self.world / len(idx)  # DDP averages over ranks: the mean over the whole batch
        return self.model.head.loss(out, self.y_train[mine.to(self.device)]) * scale


# ---------------------------------------------------------------- spec, launcher and worker


def write_spec(directory: str | Path, encoder_spec: str, projector_dir: str | Path, train: TaskData,
               val: TaskData | None, cfg: FinetuneConfig, checkpoint_dir: str | Path) -> Path:
    """What every worker needs, as JSON + safetensors (no pickle): items, targets, config, checkpoint folder."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {"y_train": train.y.contiguous()} | ({"y_val": val.y.contiguous()} if val is not None else {})
    save_file(tensors, str(d / "ddp_targets.safetensors"))
    spec = {"encoder": encoder_spec, "projector_dir": str(projector_dir), "config": cfg.model_dump(),
            "train_items": [str(i) for i in train.items], "val_items": None if val is None else [str(i) for i in val.items],
            "checkpoint_dir": str(checkpoint_dir), "targets": str(d / "ddp_targets.safetensors")}
    (d / SPEC_FILE).write_text(json.dumps(spec))
    return d / SPEC_FILE


def launch_command(spec: str | Path, nproc: int) -> list[str]:
    """One host; for several, replace --standalone with --nnodes/--node-rank/--rdzv-* (README: scale-out)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "projection.finetune.distributed", str(spec)]


def launch(spec: str | Path, nproc: int) -> None:
    """Run the workers to the end (or to the last epoch a checkpoint already holds); raise with their last lines."""
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
    proc = subprocess.run(launch_command(spec, nproc), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"distributed stage 2 ({nproc} processes) failed with exit code {proc.returncode}:\n"
                           + proc.stderr[-3000:])


def worker(spec_path: str | Path) -> None:
    """One rank: join the group (gloo on CPU, nccl on CUDA), run ``finetune`` with the DDP trainer."""
    from encoders.factory import load_encoder
    from projection.finetune.model import finetune

    spec = json.loads(Path(spec_path).read_text())
    cfg = FinetuneConfig.model_validate(spec["config"])
    cuda = cfg.device.startswith("cuda")
    if cuda:  # "cuda" means this rank's device: the config (and so the checkpoint fingerprint) is the same on all
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        y = load_file(spec["targets"])
        train = TaskData(spec["train_items"], y["y_train"])
        val = TaskData(spec["val_items"], y["y_val"]) if spec["val_items"] is not None else None
        finetune(load_encoder(spec["encoder"]), spec["projector_dir"], train, val, cfg,
                 checkpoint_dir=spec["checkpoint_dir"])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])
