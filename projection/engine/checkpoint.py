"""Training checkpoints that resume bit-identically, and the one fingerprint that guards them.

The shared loop (``projection.engine.loop``) writes one file per epoch through ``save_checkpoint`` and
resumes through ``load_checkpoint``. The file holds only tensors, dicts, lists, strings and
numbers, so ``torch.load(..., weights_only=True)`` reads it; it is replaced atomically, so a kill -9
leaves the previous epoch's checkpoint or the new one, never half of one.

Why one fingerprint over everything: a hand-written list of "fields that matter" drifts (stage 1's
covered five fields, so a rerun with another weight decay, warmup or dropout silently resumed the
old run). ``fingerprint`` instead takes the WHOLE config (every pydantic field, minus the few a
trainer names as not changing the result), every module's architecture (``repr``: dropout p,
widths, norms), which parameters train, a digest of the initial weights and a digest of the data.
A checkpoint whose fingerprint differs is set aside (never resumed), with the differing fields named.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, Mapping) and value:
        for k in sorted(value, key=str):
            _flatten(f"{prefix}.{k}" if prefix else str(k), value[k], out)
    else:
        out[prefix] = json.dumps(value, sort_keys=True, default=str)


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 over dtype, shape and bytes of each tensor (the data a loop trains on)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        # the buffer itself, not .tobytes(): that copied the whole train split (358 MB at 70k x 1280) to hash it
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def _state_digest(parts: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(parts):
        for key, t in sorted(parts[name].state_dict().items()):
            h.update(f"{name}.{key}".encode())
            h.update(tensor_digest(t).encode())
    return h.hexdigest()


def fingerprint(settings: Mapping[str, Any], parts: Mapping[str, Any], data_digest: str) -> dict[str, str]:
    """Everything that decides a run's result, as flat ``name -> JSON value`` strings.

    ``settings``: section -> pydantic config or dict (flattened to ``section.field``); ``parts``: the
    loop's stateful parts at their INITIAL state (modules contribute their repr and which of their
    parameters train; all contribute their state); ``data_digest``: the training and validation data.
    """
    out: dict[str, str] = {}
    _flatten("", dict(settings), out)
    for name, part in sorted(parts.items()):
        if isinstance(part, nn.Module):
            out[f"{name}.architecture"] = hashlib.sha256(repr(part).encode()).hexdigest()[:16]
            trainable = [n for n, p in part.named_parameters() if p.requires_grad]
            out[f"{name}.trainable"] = hashlib.sha256("\n".join(trainable).encode()).hexdigest()[:16]
    out["initial weights"] = _state_digest(parts)[:16]
    out["data"] = hashlib.sha256(data_digest.encode()).hexdigest()[:16]
    return out


def differences(saved: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """``field: old -> new`` for every field that differs (or exists on one side only)."""
    keys = sorted(set(saved) | set(now))
    return [f"{k}: {saved.get(k, '(absent)')} -> {now.get(k, '(absent)')}" for k in keys if saved.get(k) != now.get(k)]


def save_checkpoint(path: Path, device: torch.device, print_: Mapping[str, str], parts: Mapping[str, Any]) -> None:
    ck = {"fingerprint": dict(print_), "rng_cpu": torch.get_rng_state(), **parts}
    if device.type == "cuda":
        ck["rng_cuda"] = torch.cuda.get_rng_state(device)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(ck, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old or the new checkpoint, never half of one


def load_checkpoint(path: Path | None, device: torch.device, print_: Mapping[str, str]) -> dict | None:
    """The saved parts with the RNG restored, or None when there is nothing to resume.

    A checkpoint made with other settings (or data, or code that builds other modules) is NOT
    resumed: it is renamed to ``<name>.stale`` (kept, not deleted) and the run starts fresh, with a
    warning naming every differing field. Starting fresh rather than refusing keeps a flow rerun
    working after an upgrade; the flows key their folders by settings, so there this only happens
    when the code or the data changed.
    """
    if path is None or not path.exists():
        return None
    ck = torch.load(path, map_location=device, weights_only=True)
    saved = ck.get("fingerprint", {})
    diff = differences(saved if isinstance(saved, Mapping) else {"(old format)": str(saved)}, print_)
    if diff:
        stale = path.with_name(path.name + ".stale")
        os.replace(path, stale)
        log.warning("checkpoint %s was made with other settings, so it is not resumed (kept as %s):\n  %s",
                    path, stale.name, "\n  ".join(diff))
        return None
    torch.set_rng_state(ck["rng_cpu"].cpu())
    if device.type == "cuda" and "rng_cuda" in ck:
        torch.cuda.set_rng_state(ck["rng_cuda"].cpu(), device)
    return ck
