"""Shared helpers for the benchmarks: repo on sys.path, phase timing, peak memory, JSON output.

Peak RSS note: on Linux ``getrusage(RUSAGE_SELF).ru_maxrss`` of a freshly spawned child is
*not* per-process. ``exec`` folds the pre-exec memory image's high-water mark into it, and
``subprocess`` forks/vforks from the parent, so a small child started by a big parent reports
the parent's peak. ``/proc/self/status`` VmHWM belongs to the child's own address space, so
``peak_rss_mib`` reads that and falls back to ru_maxrss only where there is no /proc.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # kB
    except OSError:
        pass
    return None


def ru_maxrss_mib() -> float:
    """getrusage's peak; KiB on Linux, bytes on macOS. See the module note before trusting it in a child."""
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v / (1024 * 1024) if sys.platform == "darwin" else v / 1024


def peak_rss_mib() -> tuple[float, str]:
    """(peak resident set size of this process in MiB, how it was measured)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024, "/proc/self/status VmHWM"
    return ru_maxrss_mib(), "getrusage ru_maxrss"


def rss_mib() -> float:
    """Current resident set size in MiB."""
    v = _status_kib("VmRSS")
    if v is not None:
        return v / 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss / (1024 * 1024)
    except ImportError:
        return float("nan")


def loadavg() -> float | None:
    """1-minute load average: on a shared machine, how much else wanted the CPUs."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# Phase name -> (1-min load average at start, at end), filled by ``phase``.
LOADS: dict[str, tuple[float | None, float | None]] = {}


@contextmanager
def phase(name: str, timings: dict[str, float], *, quiet: bool = False):
    """Time a block into ``timings[name]``, print how long it took and the machine's load around it."""
    start_load = loadavg()
    if not quiet:
        print(f"[{name}] ... (load avg {start_load})", flush=True)
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t0, 2)
        LOADS[name] = (start_load, loadavg())
        if not quiet:
            print(f"[{name}] took {timings[name]:.1f} s (load avg {LOADS[name][1]})", flush=True)


def emit_json(obj: dict) -> None:
    """The machine-readable result: one JSON object, the last line on stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    print(json.dumps(obj, sort_keys=False, default=str), flush=True)


def last_json_line(text: str) -> dict:
    """Parse the last stdout line of a child that ends with ``emit_json``."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in child output:\n{text[-2000:]}")


def default_threads() -> int:
    """The cores this process may use (its affinity), which is what a thread count should follow."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gemm_peak(shapes=((1024, 1024, 1024), (256, 1280, 1024), (256, 1024, 1280)), dtype=None, reps: int = 4) -> float:
    """Best FLOP/s of a few GEMMs (m, k, n) in ``dtype`` (default fp32): what this CPU could do just now.

    The defaults include the stage-1 MLP step's shapes; callers pass their model's."""
    import torch

    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, reps * 2 * m * k * n / (time.perf_counter() - t0))
    return best
