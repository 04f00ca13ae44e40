"""One batch through a frozen encoder on the CPU as parallel single-threaded slices.

On a few CPU cores, torch's intra-op parallelism splits every op of a forward pass across its
threads and joins them at a barrier after each op: small ops (norms, activations, reshapes) and
Python dispatch leave cores waiting, and anything else that wakes up on the machine (during a flow,
Prefect's ephemeral server, ~100 times a second) stalls every thread at once. Cutting the batch into
``workers`` slices, each encoded on its own thread with one intra-op thread, keeps every core on its
own matrix products, with no barrier between them. Measured on this project's 2-core machine
(ViT-B-32, batch 32, clean processes): 32.2 vs 29.2 items/s for the whole extract loop, with
identical embeddings; inside the flow, 1.02-1.04x a bare open_clip loop where torch's own
threading reaches 0.92-0.95x (benchmarks/extract.py).

The same holds at bf16 (weights cast once, encoders/frozen.py): sliced 5.48 vs 4.60 items/s best
of 3 interleaved rounds on a busy machine (benchmarks/extract.py (c)), so slicing stays the default.

The batch stays the unit of commit: slices are joined in order before the batch is written, so
kill -9 still loses at most the batch in flight and a resumed store is identical. On CUDA/MPS one
worker does everything, as before (the device is the parallel part there).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from encoders.frozen import FrozenEncoder

MIN_SLICE = 8  # below this many items per slice, the per-slice overhead eats the gain

# torch's thread count is process-wide: extractions running at once in one process share one
# saved value, taken by the first to start and put back by the last to finish.
_lock = threading.Lock()
_active = 0
_saved_threads = 0


def _baseline_threads() -> int:
    with _lock:
        return _saved_threads if _active else torch.get_num_threads()


def _lower_threads(n: int) -> None:
    global _active, _saved_threads
    with _lock:
        if _active == 0:
            _saved_threads = torch.get_num_threads()
        _active += 1
        torch.set_num_threads(n)


def _restore_threads() -> None:
    global _active
    with _lock:
        _active -= 1
        if _active == 0:
            torch.set_num_threads(_saved_threads)


def plan_workers(device: torch.device, batch_size: int, threads: int, requested: int | None) -> tuple[int, int]:
    """(workers, intra-op threads per worker) for a batch of ``batch_size`` on ``threads`` CPU threads.

    ``requested`` None = auto: one worker per thread on the CPU, as long as each slice keeps at
    least MIN_SLICE items; one worker on an accelerator. An explicit number is honoured (capped at
    the batch size); 1 gives torch's own intra-op parallelism over all threads.
    """
    if requested is not None and requested < 1:
        raise ValueError(f"cpu_workers must be >= 1, got {requested}")
    if device.type != "cpu":
        return 1, threads
    workers = min(requested, batch_size) if requested else max(1, min(threads, batch_size // MIN_SLICE))
    return workers, max(1, threads // workers)


class BatchEncoder:
    """Callable ``items -> (B, D) float32 array`` for one extraction; a context manager because it
    changes torch's process-wide thread count while it runs and must put it back."""

    def __init__(self, encoder: FrozenEncoder, batch_size: int, workers: int | None = None):
        self.encoder = encoder
        self.threads = _baseline_threads()
        self.workers, self.threads_per_worker = plan_workers(encoder.device, batch_size, self.threads, workers)
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> BatchEncoder:
        if self.workers > 1:
            # Set before the pool's threads exist: each takes the count at its first parallel op.
            _lower_threads(self.threads_per_worker)
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="xmodal-encode")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            _restore_threads()

    def __call__(self, batch: Any) -> np.ndarray:
        """One collated batch (``encoder.collate``'s output, made by encoders/loader.py; None when it
        holds no valid item) -> (B, D)."""
        enc = self.encoder
        n = 0 if batch is None else _rows(batch)
        if n == 0:
            return np.zeros((0, enc.dim), np.float32)
        if self._pool is None or n < 2:
            return enc.encode(batch).cpu().numpy()
        parts = list(self._pool.map(enc.encode, _split(batch, min(self.workers, n))))
        return torch.cat(parts).cpu().numpy()


def _rows(batch: Any) -> int:
    return len(next(iter(batch.values())) if isinstance(batch, dict) else batch)


def _split(batch: Any, n: int) -> list[Any]:
    """``n`` row slices of a collated batch. A padded text batch keeps its padding: the attention
    mask makes pooling ignore it, so slices give the rows the whole batch would."""
    bounds = np.linspace(0, _rows(batch), n + 1).astype(int)
    if isinstance(batch, dict):
        return [{k: v[lo:hi] for k, v in batch.items()} for lo, hi in zip(bounds[:-1], bounds[1:])]
    return [batch[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
