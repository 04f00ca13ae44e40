"""Progress lines in the Prefect run log while a training loop runs: epoch, batch, running loss, ETA.

The loop (projection/engine/loop.py) emits a "progress" event after the first batch and then at most every
``LoopConfig.progress_s`` seconds (default 60, ``$XMODAL_PROGRESS_S``); this turns each one into a log line and
passes every other event on to the stage's own callback (its MLflow metrics), so progress never lands in MLflow
as a metric. Measured before: the default pipeline deployment logged nothing for 14 minutes of stage 2.
"""

from __future__ import annotations

import math
from typing import Callable

Callback = Callable[[str, int, dict[str, float]], None]


def interval_s() -> float:
    """Seconds between progress lines: $XMODAL_PROGRESS_S, default 60 (the loop's LoopConfig.progress_s too)."""
    import os

    return float(os.environ.get("XMODAL_PROGRESS_S", "60"))


def items_line(label: str, done: int, total: int, elapsed: float) -> str:
    """'extract fashion/image: 1,200/6,000 items, 40.0 items/s, 30s elapsed, ETA 2m00s' (extraction's progress)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else math.nan
    return (f"{label}: {done:,}/{total:,} items, {rate:.1f} items/s, {_duration(elapsed)} elapsed, "
            f"ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def progress_line(label: str, m: dict[str, float]) -> str:
    """'stage 2 (after): epoch 2/5, batch 40/120, running loss 0.4312, 3m10s elapsed, ETA 12m05s'."""
    return (f"{label}: epoch {int(m['epoch']) + 1}/{int(m['epochs'])}, batch {int(m['batch'])}/{int(m['batches'])}, "
            f"running loss {m['running_loss']:.4f}, {_duration(m['elapsed_s'])} elapsed, ETA {_duration(m['eta_s'])}")


def reported(callback: Callback | None, label: str) -> Callback:
    """``callback`` with the loop's progress events logged to the current Prefect run (flow or task) instead."""
    from prefect import get_run_logger

    logger = get_run_logger()

    def on_event(event: str, step: int, metrics: dict[str, float]) -> None:
        if event == "progress":
            logger.info(progress_line(label, metrics))
        elif callback is not None:
            callback(event, step, metrics)

    return on_event
