"""Prefect flow-run names that say what a run does, for sub-flows and scheduled runs too.

Without ``flow_run_name`` Prefect names each run at random ("gleeful-squid"): a pipeline's sub-flows and a
nightly run were indistinguishable in the UI. Each function reads the run's parameters (a validated model, or
the plain dict a deployment submits) and names the stage, dataset and setting; a ``run_name`` the user gave
wins. Names are computed before the flow's first line, so nothing here opens a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
