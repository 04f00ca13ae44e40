"""Prefect flows and MLflow tracking: the only package that imports either.

One module per stage, each a plain flow function beside its ``*Params`` model::

    from flows.extract import ExtractParams, extract_embeddings
    from flows.align import AlignParams, align
    from flows.finetune import FinetuneParams, finetune
    from flows.contrastive import ContrastiveParams, contrastive_train
    from flows.pipeline import PipelineParams, pipeline

``flows/tracking/`` holds everything MLflow (the stage run helper, recovery of killed runs,
reports, the served model, promote, compare, and the sweep flow that runs a grid under one parent run)
and what a run shows in Prefect (its name, its progress lines: ``tracking/runlog.py``); ``flows/cli.py`` and ``flows/demo.py`` drive
the flows from a shell. Importing the package first sets the environment defaults that must be
in place before prefect or mlflow is imported (``flows/_env.py``).
"""

from flows._env import apply_defaults

apply_defaults()
