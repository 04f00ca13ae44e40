"""Pydantic config for stage-2 fine-tuning (encoder -> stage-1 projector -> task head).

Torch-free like ``projection.align.config`` so a Prefect flow can use it as a run form and validate
a UI-edited run without importing torch. Every field has a description (Prefect shows it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

UnfreezePolicy = Literal["none", "last_n", "all"]
TaskName = Literal["classification", "regression", "retrieval"]


class FinetuneConfig(BaseModel):
    # A typo in a sweep parameter must fail loudly instead of being silently ignored.
    model_config = ConfigDict(extra="forbid")

    task: TaskName = Field(
        "classification",
        description="'classification': Linear head + cross-entropy, metric accuracy; "
        "'regression': Linear head + MSE on the standardised target, metrics MAE/RMSE/R2 in original units; "
        "'retrieval': symmetric InfoNCE between projected source and fixed target embeddings, metric mean R@1 of both directions.",
    )
    unfreeze: UnfreezePolicy = Field(
        "none",
        description="'none': encoder frozen, features computed once (fast path; the frozen-feature baseline); "
        "'last_n': only the last `last_n` encoder blocks plus the layers after them (final norm, pooling, projection) train; "
        "'all': the whole encoder tower trains.",
    )
    last_n: int = Field(1, ge=1, description="Number of final encoder blocks to unfreeze when unfreeze='last_n'.")
    encoder_lr: float = Field(1e-5, gt=0.0, description="Peak AdamW learning rate of the unfrozen encoder parameters.")
    head_lr: float = Field(1e-3, gt=0.0, description="Peak AdamW learning rate of the projector and task-head parameters.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decoupled weight decay; matrices only, never biases, norms or temperatures.")
    epochs: int = Field(10, ge=1, description="Maximum number of passes over the training split.")
    batch_size: int = Field(32, ge=1, description="Items per optimisation step (also the InfoNCE batch for retrieval).")
    eval_batch_size: int = Field(256, ge=1, description="Items per forward pass when evaluating or precomputing frozen features.")
    warmup_frac: float = Field(0.1, ge=0.0, le=1.0, description="Linear-warmup length as a fraction of all steps; then cosine decay.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine decay ends at lr * min_lr_ratio (both groups).")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Max global grad norm over all trainable parameters; None disables clipping.")
    patience: int | None = Field(3, ge=1, description="Stop after this many epochs without improvement of the early-stopping quantity; None disables early stopping.")
    early_stop_on: Literal["metric", "loss"] = Field(
        "metric",
        description="What selects the best epoch and drives early stopping: the task metric on the validation split "
        "(accuracy / RMSE / mean R@1) or the validation loss.",
    )
    min_delta: float = Field(0.0, ge=0.0, description="Change of the early-stopping quantity that counts as an improvement.")
    seed: int = Field(0, description="Seeds head init, shuffling and dropout; same seed -> same run (on the same device and thread count).")
    bf16: bool = Field(False, description="Run the forward pass under torch.autocast(bfloat16); weights and optimiser stay float32.")
    grad_checkpointing: bool = Field(False, description="Recompute unfrozen encoder blocks in the backward pass: less memory, ~30% more compute.")
    fused_adamw: bool = Field(True, description="Use the fused AdamW kernel (same maths, faster step).")
    temperature: float = Field(0.07, gt=0.0, description="Retrieval only: initial InfoNCE temperature (learned, at head_lr).")
    n_classes: int | None = Field(None, ge=2, description="Classification only: number of classes; None = 1 + the largest training label.")
    label_column: str | None = Field("label", description="Manifest column with integer class labels (classification); read by the flow, not here.")
    target_column: str | None = Field("target", description="Manifest column with the numeric target (regression); read by the flow, not here.")
    processes: int = Field(
        1, ge=1, description="Fine-tuning processes on this host (torch DistributedDataParallel under torchrun: gloo on "
        "CPU, nccl on CUDA, one GPU each). Each step's batch is split over them, so batch_size stays the global batch. "
        "Applies to the fine-tuning run (unfreeze != 'none'); the frozen-feature head trains in one process.")
    device: str = Field("cpu", description="Torch device of the encoder, projector and head, e.g. 'cpu', 'cuda'.")

    @property
    def higher_is_better(self) -> bool:
        """Direction of the early-stopping quantity."""
        return self.early_stop_on == "metric" and self.task != "regression"
