"""What a running flow tells its user in Prefect: a name that says what it does, and progress lines.

Names: without ``flow_run_name`` Prefect names each run at random ("gleeful-squid"), so a pipeline's
sub-flows and a nightly run were indistinguishable in the UI. Each ``*_name`` function reads the run's
parameters (a validated model, or the plain dict a deployment submits) and names the stage, dataset and
setting; a ``run_name`` the user gave wins. Names are computed before the flow's first line: no file is opened.

Progress: the training loop (projection/engine/loop.py) emits a "progress" event after the first batch and then
at most every ``LoopConfig.progress_s`` seconds (default 60, ``$XMODAL_PROGRESS_S``); ``reported`` turns each
into a log line and passes every other event on to the stage's own callback (its MLflow metrics), so progress
never lands in MLflow as a metric. Extraction logs ``items_line`` on the same interval. Measured before: the
default pipeline deployment logged nothing for 14 minutes of stage 2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

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



def _params() -> Any:
    from prefect.runtime import flow_run

    return flow_run.parameters.get("params")


def _get(params: Any, dotted: str, default: Any = None) -> Any:
    node = params
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        if node is None:
            return default
    return node


def dataset_of(manifest: str | None) -> str:
    """'data/generated/fashion/manifest.csv' -> 'fashion'; 'digits_200.csv' -> 'digits_200' (as Manifest.name)."""
    p = Path(manifest or "data")
    return p.parent.name if p.stem == "manifest" else p.stem


def _store_side(store: str | None) -> tuple[str, str]:
    """'runs/stores/fashion/image--timm-...-55f9de3b.h5' -> ('fashion', 'image')."""
    p = Path(store or "store")
    return p.parent.name, p.stem.split("--", 1)[0]


def extract_name() -> str:
    p = _params()
    encoder = str(_get(p, "encoder", "")).split("?", 1)[0].split(":")[-1].rsplit("/", 1)[-1]
    return f"extract {dataset_of(_get(p, 'manifest'))}/{_get(p, 'column')} ({encoder})"


def align_name() -> str:
    p = _params()
    if _get(p, "run_name"):
        return str(_get(p, "run_name"))
    dataset, src = _store_side(_get(p, "source_store") or _get(p, "source"))
    _, tgt = _store_side(_get(p, "target_store") or _get(p, "target"))
    return f"align {dataset}: {src} -> {tgt}, {_get(p, 'projector.kind', 'mlp')}"


def finetune_name() -> str:
    p = _params()
    return (f"finetune {dataset_of(_get(p, 'manifest'))}: {_get(p, 'config.task', 'classification')}, "
            f"unfreeze={_get(p, 'config.unfreeze', 'none')}")


def evaluate_name() -> str:
    from prefect.runtime import flow_run

    return f"evaluate {flow_run.parameters.get('experiment', '')}".strip()
