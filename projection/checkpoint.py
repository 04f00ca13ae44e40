"""Training checkpoints that resume bit-identically: state dicts, counters and the RNG, nothing pickled.

Every loop (stage 1, stage 2, contrastive) writes one file per epoch through ``save_checkpoint``
and resumes through ``load_checkpoint``. The file holds only tensors, dicts, lists and numbers,
so ``torch.load(..., weights_only=True)`` reads it; it is replaced atomically, so a kill -9 leaves
the previous epoch's checkpoint or the new one, never half of one. A fingerprint of the run's
settings guards against resuming a different run by accident.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(path: Path, device: torch.device, fingerprint: dict, **parts: Any) -> None:
    ck = {"fingerprint": fingerprint, "rng_cpu": torch.get_rng_state(), **parts}
    if device.type == "cuda":
        ck["rng_cuda"] = torch.cuda.get_rng_state(device)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(ck, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old or the new checkpoint, never half of one


def load_checkpoint(path: Path | None, device: torch.device, fingerprint: dict) -> dict | None:
    """The saved parts with the RNG restored, or None when there is nothing to resume."""
    if path is None or not path.exists():
        return None
    ck = torch.load(path, map_location=device, weights_only=True)
    if ck["fingerprint"] != fingerprint:
        raise ValueError(f"checkpoint {path} was made with other settings:\n{ck['fingerprint']}\n"
                         f"this run: {fingerprint}\n(delete its folder to start over)")
    torch.set_rng_state(ck["rng_cpu"].cpu())
    if device.type == "cuda" and "rng_cuda" in ck:
        torch.cuda.set_rng_state(ck["rng_cuda"].cpu(), device)
    return ck


def resume(path: Path | None, device: torch.device, fingerprint: dict, state: dict,
           restore: dict[str, Callable[[Any], Any]]) -> tuple[dict, int | None]:
    """Pick a loop up where its last checkpoint left it.

    ``state``: the loop's fresh counters (returned unchanged when there is nothing to resume, else
    replaced by the saved values of the same keys); ``restore``: checkpoint key -> the function that
    loads that part (usually a module's, optimizer's or scheduler's ``load_state_dict``). Returns
    (state, the epoch resumed from or None).
    """
    ck = load_checkpoint(path, device, fingerprint)
    if ck is None:
        return state, None
    for key, load in restore.items():
        load(ck[key])
    state = {k: ck[k] for k in state}
    return state, state["epoch"]


def commit_epoch(state: dict, epoch: int, metrics: dict, path: Path | None, device: torch.device, fingerprint: dict,
                 parts: Callable[[], dict[str, Any]], callback: Callable[[str, int, dict], Any] | None) -> None:
    """Close an epoch the same way in every loop: record it, checkpoint it, then report it.

    The counters move before the save, so a checkpoint always says which epoch comes next; the
    callback runs last, so what a tracker sees has already survived a kill -9. ``parts`` is called
    only when there is a checkpoint to write.
    """
    state["history"].append(metrics)
    state["epoch"] = epoch + 1
    if path is not None:
        save_checkpoint(path, device, fingerprint, **parts(), **state)
    if callback is not None:
        callback("epoch", state["step"], metrics)
