"""The training side, in plain torch/numpy/scipy/scikit-learn (no Prefect, no MLflow: flows/ wraps it).

    engine/       the one training loop and its bit-identical checkpoints
    losses/       every loss, one registry (name -> module)
    align/        stage 1: projector, closed-form baselines, fit recipe, metrics, transfer, pair data
    semi/         stage 1 from few pairs: partly paired stores, closed-form refinement, semi trainer
    finetune/     stage 2: unfreeze policy, encoder + projector + task head, tasks, saved models
    contrastive/  contrastive tower training (photo <-> sketch)
    search/       query -> encoder -> projector -> nearest gallery rows
"""
