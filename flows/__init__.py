"""Prefect flows and MLflow tracking: the only package that imports either.

    from flows import extract_embeddings, ExtractParams
    extract_embeddings(ExtractParams(manifest="data/generated/digits/manifest.csv", column="image",
                                     encoder="open_clip:image:ViT-B-32@/ckpt/model.safetensors"))
"""

from flows import _env  # noqa: F401  (must run before prefect/mlflow import)
from flows.align import AlignParams, align
from flows.contrastive import ContrastiveParams, contrastive_train
from flows.extract import ExtractParams, extract_embeddings
from flows.finetune import FinetuneParams, finetune
from flows.pipeline import PipelineConfig, pipeline

__all__ = ["AlignParams", "ContrastiveParams", "ExtractParams", "FinetuneParams", "PipelineConfig", "align",
           "contrastive_train", "extract_embeddings", "finetune", "pipeline"]
