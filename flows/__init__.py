"""Prefect flows and MLflow tracking: the only package that imports either.

    from flows import extract_embeddings, ExtractParams
    extract_embeddings(ExtractParams(manifest="data/generated/digits/manifest.csv", column="image",
                                     encoder="open_clip:image:ViT-B-32@/ckpt/model.safetensors"))

Exports load lazily (PEP 562), so `xmodal search`, which only reads a store, does not pay for
torch, prefect and mlflow (hundreds of MB of RSS) just because the CLI lives in this package.
"""

import sys
import types
from importlib import import_module

from flows import _env  # noqa: F401  (must run before prefect/mlflow import)

_EXPORTS = {
    "AlignParams": "flows.align", "align": "flows.align",
    "ContrastiveParams": "flows.contrastive", "contrastive_train": "flows.contrastive",
    "ExtractParams": "flows.extract", "extract_embeddings": "flows.extract",
    "FinetuneParams": "flows.finetune", "finetune": "flows.finetune",
    "PipelineConfig": "flows.pipeline", "pipeline": "flows.pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flows' has no attribute {name!r}")


class _Flows(types.ModuleType):
    """`flows.align` etc. name both a submodule and the flow it defines. Importing the submodule makes
    Python set the package attribute to the module; keep the flow there instead, as an eager
    `from flows.align import align` in this file would."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Flows
