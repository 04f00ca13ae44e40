"""Manifest rows -> decoded, preprocessed, collated batches, made ahead of the model.

Why worker processes: decoding and resizing images is CPU work that holds the GIL for part of
its time, and one helper thread (the design before issue 14) tops out at one core. That is what
starves GPUs in clip-retrieval (its issue #390: an A100 run is resize-bound). Here each batch is
decoded by a torch DataLoader worker process (``decode_workers`` of them, ``prefetch_factor``
batches each in flight), collated in the worker, pinned on CUDA so the host-to-device copy is
non-blocking. With ``decode_workers=0`` one helper thread decodes the next batch while this one
is encoded, as before: on a small CPU box the model, not decoding, is the bottleneck (ViT-B-32
at 19-42 items/s against ~620 decoded 224² PNGs/s per core here, benchmarks/extract.py). Batches
leave the workers as uint8 and are normalised by the consumer (encoders/pixels.py).

The batch stays the unit of commit: the DataLoader yields batches in order and the caller writes
each before asking for the next, so kill -9 loses at most what is in flight and a rerun resumes
at the store's ``rows_done``. Workers die with their parent (torch's watchdog), and a forked
worker drops its copy of the store's lock (encoders/store/lock.py), so a rerun right after a kill is
not refused as "locked". Per-item errors (``BadInput``) travel back inside the batch.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from encoders.frozen import BadInput, FrozenEncoder

CPU_CORES_PER_WORKER = 8  # on a CPU the model needs the cores: one decode process per 8 (see plan_decode_workers)
MAX_GPU_WORKERS = 32


@dataclass
class LoadedBatch:
    """Rows [lo, rows_done) of the manifest: the valid items collated, the rest as error rows."""

    ids: list[str]
    inputs: Any  # encoder.collate(items) in host memory; None when no item of the batch is valid
    errors: list[tuple[int, str, str]]  # (row, id, reason)
    rows_done: int

    def pin_memory(self) -> LoadedBatch:
        """Called by the DataLoader's pinning thread (pin_memory=True on CUDA)."""
        return replace(self, inputs=_pin(self.inputs))


def _pin(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.pin_memory()
    if isinstance(x, dict):
        return {k: _pin(v) for k, v in x.items()}
    return x


class RowBatches(Dataset):
    """Map-style: index k -> LoadedBatch for ``bounds[k]``. In a worker it decodes with its own copy of the encoder."""

    def __init__(self, encoder: FrozenEncoder, raw: list[Any], ids: list[str], static: dict[int, str],
                 bounds: list[tuple[int, int]]):
        self.encoder, self.raw, self.ids, self.static, self.bounds = encoder, raw, ids, static, bounds

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, k: int) -> LoadedBatch:
        lo, hi = self.bounds[k]
        keep_ids, items, errs = [], [], []
        for row in range(lo, hi):
            if row in self.static:
                errs.append((row, self.ids[row], self.static[row]))
                continue
            try:
                items.append(self.encoder.load_item(self.raw[row]))
                keep_ids.append(self.ids[row])
            except BadInput as exc:
                errs.append((row, self.ids[row], str(exc)))
        return LoadedBatch(keep_ids, self.encoder.collate(items) if items else None, errs, hi)


def _worker_init(_: int) -> None:
    # The worker's encoder is a forked copy: collate into host memory; the parent moves it to the device.
    get_worker_info().dataset.encoder.device = torch.device("cpu")


def can_fork() -> bool:
    """Workers are forked (the encoder is not pickled); a daemonic process (a Dask worker) may not have children."""
    return "fork" in multiprocessing.get_all_start_methods() and not multiprocessing.current_process().daemon


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def plan_decode_workers(device: torch.device, modality: str, requested: int | None, cores: int | None = None) -> int:
    """Decode worker processes for one extraction (0 = one helper thread in this process).

    ``requested`` None = auto. Texts: 0 (tokenising a batch takes ~1 ms; a process buys nothing).
    Images on the CPU: one worker per CPU_CORES_PER_WORKER cores, so 0 up to 7 cores: the model
    computes on every core, and decoding (1.6 ms of CPU per 224² PNG to uint8, ~620 items/s per core,
    against 19-42 items/s of ViT-B-32 on 2 cores) needs a fraction of one. Images on an accelerator: every core
    but the one feeding the device (capped at MAX_GPU_WORKERS): an H100 at bf16 wants tens of
    thousands of ViT-B-32 images/s, far beyond any host's decode rate (README, "Feeding a GPU").
    """
    if requested is not None:
        if requested < 0:
            raise ValueError(f"decode_workers must be >= 0, got {requested}")
        return requested if can_fork() else 0
    if modality != "image" or not can_fork():
        return 0
    cores = cores or usable_cores()
    if device.type == "cpu":
        return cores // CPU_CORES_PER_WORKER
    return max(1, min(cores - 1, MAX_GPU_WORKERS))


def iter_batches(batches: RowBatches, workers: int, prefetch: int = 2) -> Iterator[LoadedBatch]:
    """Yield ``batches`` in order, decoded ``workers`` processes (or one thread) ahead of the caller."""
    if not len(batches):
        return
    if workers == 0:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="xmodal-decode") as pool:
            pending = pool.submit(batches.__getitem__, 0)
            for k in range(len(batches)):
                loaded = pending.result()
                if k + 1 < len(batches):
                    pending = pool.submit(batches.__getitem__, k + 1)
                yield loaded
        return
    loader = DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=prefetch,
                        pin_memory=batches.encoder.device.type == "cuda", worker_init_fn=_worker_init,
                        multiprocessing_context="fork")
    yield from loader
