"""Pydantic configs for stage-1 alignment.

They live in one torch-free module so that the Prefect flows can use them as flow
parameters (and validate a UI-edited run) without importing torch. Every field has a
description because Prefect shows it in the run form.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The ONE list of stage-1 loss names: the parameter schema (so Prefect's server refuses a typo at submission),
# the CLI's help and the loss registry all derive from it.
LossName = Literal["mse", "cosine", "infonce", "siglip"]
LOSS_NAMES: tuple[str, ...] = get_args(LossName)


class _Strict(BaseModel):
    # A typo in a sweep parameter must fail loudly instead of being silently ignored.
    model_config = ConfigDict(extra="forbid")


class ProjectorConfig(_Strict):
    kind: Literal["linear", "mlp"] = Field("mlp", description="'linear': one affine map; 'mlp': hidden layers + output layer.")
    d_in: int = Field(..., gt=0, description="Source embedding dimension D_src.")
    d_out: int = Field(..., gt=0, description="Target embedding dimension D_tgt.")
    depth: int = Field(1, ge=1, description="Number of hidden layers (mlp only).")
    hidden: int = Field(1024, gt=0, description="Width of each hidden layer (mlp only).")
    activation: Literal["gelu", "relu", "silu", "tanh"] = Field("gelu", description="Hidden-layer non-linearity (mlp only).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout after each hidden activation (mlp only).")
    layernorm: bool = Field(False, description="LayerNorm after each hidden linear layer, before the activation (mlp only).")
    standardize: bool = Field(
        True,
        description="z-score inputs with train-split mean/std stored in the projector. Frozen encoders, random-init "
        "ones especially, often give nearly collapsed features whose variation an optimiser cannot see unscaled.",
    )
    linear_path: bool = Field(
        True,
        description="mlp: y = A x + b + f(x), an affine path beside the hidden layers (f's last layer starts at zero), so "
        "the MLP can only add to what a linear map explains. Ignored when residual=True (the identity is the path).",
    )
    train_linear_path: bool = Field(
        False,
        description="Also train the affine path once it starts at ridge. Off by default: the path stays at the ridge solution and the MLP learns "
        "only the residual. Adam takes lr-sized steps even on the near-zero gradients of a path that already sits at "
        "the least-squares optimum, so a trained path first drifts away from ridge (see benchmarks/defaults.py).",
    )
    init: Literal["ridge", "random"] = Field(
        "ridge",
        description="'ridge': start the affine path (or the linear map) at the validation-tuned ridge solution, so "
        "training starts where ridge ends; 'random': PyTorch's default init.",
    )
    residual: bool = Field(
        False,
        description="Predict y = x + f(x); only valid when d_in == d_out. The last layer is zero-initialised so training starts at the identity.",
    )

    @model_validator(mode="after")
    def _check_residual(self) -> "ProjectorConfig":
        if self.residual and self.d_in != self.d_out:
            raise ValueError(
                f"residual=True needs d_in == d_out, got d_in={self.d_in}, d_out={self.d_out}; "
                "set residual=False or project to the same dimension"
            )
        return self


class LossConfig(_Strict):
    terms: dict[LossName, float] = Field(
        # a plain default (pydantic copies it per instance), so the JSON schema and the UI form show it
        default={"mse": 1.0},
        description=f"Loss name -> weight; the total loss is the weighted sum. Names: {', '.join(LOSS_NAMES)}.",
    )
    temperature: float = Field(0.07, gt=0.0, description="InfoNCE initial (or fixed) temperature; logit scale = 1/temperature.")
    learn_temperature: bool = Field(True, description="Learn the InfoNCE temperature (log-parameterised, like CLIP).")
    max_logit_scale: float = Field(100.0, gt=0.0, description="Clamp for exp(logit_scale), as in CLIP, for InfoNCE and SigLIP.")
    siglip_logit_scale: float = Field(10.0, gt=0.0, description="SigLIP initial (or fixed) logit scale t (SigLIP paper: 10).")
    siglip_bias: float = Field(-10.0, description="SigLIP initial (or fixed) logit bias b (SigLIP paper: -10).")
    learn_siglip: bool = Field(True, description="Learn the SigLIP logit scale and bias.")

    @model_validator(mode="after")
    def _check_terms(self) -> "LossConfig":
        if not self.terms:
            raise ValueError("LossConfig.terms is empty; give at least one loss, e.g. {'mse': 1.0}")
        unknown = sorted(set(self.terms) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"unknown loss name(s) {unknown}; choose from {list(LOSS_NAMES)}")
        return self


class TrainConfig(_Strict):
    epochs: int | None = Field(
        None, ge=1, description="Passes over the training split; None: as many as make `steps` optimizer steps.")
    steps: int = Field(
        2000, ge=1, description="Optimizer-step budget when epochs is None: small and large sets get the same number of "
        "updates (a fixed 20 epochs at batch 256 were 60 steps on 640 pairs, the val loss still falling). 600 were "
        "too few for maps the MLP learns slowly: a sine map read R@1 0.33 (= ridge) at 600 steps, 0.91 at 2000.")
    batch_size: int = Field(256, ge=1, description="Pairs per optimisation step (also the contrastive-loss batch).")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate of AdamW (reached after warmup).")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decoupled weight decay; applied to matrices only, not biases/norms/logit scales.")
    warmup_steps: int | None = Field(None, ge=0, description="Linear-warmup steps; overrides warmup_frac when set.")
    warmup_frac: float = Field(0.05, ge=0.0, le=1.0, description="Linear-warmup length as a fraction of all steps (used when warmup_steps is None).")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine decay ends at lr * min_lr_ratio.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Max global grad norm; None disables clipping.")
    patience: int | None = Field(5, ge=1, description="Stop after this many epochs without val-loss improvement; None disables early stopping.")
    patience_frac: float = Field(
        0.1, ge=0.0, le=1.0, description="With a step budget (epochs=None) patience is at least this fraction of the "
        "epochs, so a tiny set (a few steps an epoch) is not stopped by val noise within a few dozen steps "
        "(0.25 gave the same test R@1 on every set of benchmarks/defaults.py, in twice the time).")
    min_delta: float = Field(0.0, ge=0.0, description="Val-loss decrease that counts as an improvement.")
    fused_adamw: bool = Field(
        True, description="Use the fused AdamW kernel (CPU and CUDA): same maths, several x faster step than the default per-tensor loop."
    )
    seed: int = Field(0, description="Seeds shuffling and dropout; same seed -> bit-identical run (on the same device/threads).")
    device: str = Field("cpu", description="Torch device, e.g. 'cpu', 'cuda', 'cuda:1'.")
    eval_batch_size: int = Field(4096, ge=1, description="Batch size for the validation pass (MSE/cosine are batch-independent; contrastive val losses use this batch).")


class SplitConfig(_Strict):
    val_frac: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of ids in the validation split.")
    test_frac: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of ids in the test split.")
    seed: int = Field(0, description="Salt for the id hash that orders the split.")
    file: str | None = Field(
        None,
        description="An id,split CSV to use instead of the hash split (fractions and seed are then ignored), "
        "e.g. data/generated/stereo/split.csv, whose spatial blocks keep overlapping patches out of the test split.",
    )

    @model_validator(mode="after")
    def _check_fracs(self) -> "SplitConfig":
        if self.val_frac + self.test_frac >= 1.0:
            raise ValueError(f"val_frac + test_frac must be < 1, got {self.val_frac} + {self.test_frac}")
        return self


class BaselineConfig(_Strict):
    standardize: bool = Field(True, description="z-score inputs for ridge (as the projector does), so alpha means the same for any encoder scale.")
    ridge_alphas: list[float] = Field(
        default=[1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5], min_length=1,
        description="Ridge L2 strengths to try; the one with the lowest validation MSE is kept (RidgeCV's leave-one-out "
        "without a validation split). One value fixes alpha.")
    fit_intercept: bool = Field(True, description="Fit a bias for the ridge map.")
    procrustes_scale: bool = Field(True, description="Also fit one global scale factor s for Procrustes (y ~ s * x R).")


def resolve_epochs(cfg: TrainConfig, n_train: int) -> TrainConfig:
    """cfg with epochs set: cfg.epochs when given, else ceil(steps / steps per epoch), patience scaled to match."""
    if cfg.epochs is not None:
        return cfg
    per_epoch = -(-n_train // cfg.batch_size)
    epochs = max(1, -(-cfg.steps // per_epoch))
    patience = None if cfg.patience is None else max(cfg.patience, math.ceil(cfg.patience_frac * epochs))
    return cfg.model_copy(update={"epochs": epochs, "patience": patience})
