"""Prefect flows and MLflow tracking: the only package that imports either.

    from flows import extract_embeddings, ExtractParams
    extract_embeddings(ExtractParams(manifest="data/generated/digits/manifest.csv", column="image",
                                     encoder="open_clip:image:ViT-B-32@/ckpt/model.safetensors"))

Exports load lazily (PEP 562), so `xmodal search`, which only reads a store, does not pay for
torch, prefect and mlflow (hundreds of MB of RSS) just because the CLI lives in this package.
"""

from importlib import import_module

from flows import _env  # noqa: F401  (must run before prefect/mlflow import)

_EXPORTS = {
    "AlignParams": "flows.align", "align": "flows.align",
    "ContrastiveParams": "flows.contrastive", "contrastive_train": "flows.contrastive",
    "ExtractParams": "flows.extract", "extract_embeddings": "flows.extract",
    "FinetuneParams": "flows.finetune", "finetune": "flows.finetune",
    "PipelineParams": "flows.pipeline", "PipelineConfig": "flows.pipeline", "pipeline": "flows.pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = import_module(_EXPORTS[name])
        # `align`, `finetune` and `pipeline` name both a module and its flow: the module is
        # callable as the flow (flows/_flow_module.py), so it is what the package exports.
        value = module if module.__name__ == f"flows.{name}" else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flows' has no attribute {name!r}")
