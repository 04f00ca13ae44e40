"""Stage 2: fine-tune (part of) a frozen encoder together with the stage-1 projector and a task head.

    raw items --encoder (last_n blocks / all / nothing unfrozen)--> (B, D_src)
              --L2 norm if spec.normalize--> --projector (stage 1, trainable)--> (B, D_tgt)
              --task head--> logits (classification) | scalar (regression) | itself (retrieval)

Two paths, one loop:
- ``unfreeze="none"`` (fast path, also the *frozen-feature head baseline*): encoder features are
  computed ONCE with ``encoder.encode`` (inference mode, no grad) and only projector + head train.
- ``unfreeze="last_n"|"all"``: every step runs the encoder from raw items (``load_item`` results
  are cached in memory per item, there is no augmentation) through a TRAINABLE forward
  (``encoder.forward`` outside inference mode), so gradients reach the unfrozen blocks.

``frozen_head_baseline`` is ``finetune`` with ``unfreeze="none"`` and everything else equal (head
init, seed, schedule, epochs, early stopping), so its metric is the honest "before" for the
fine-tuned "after".

Unfreeze policy (``apply_unfreeze``), per backend; names are relative to ``encoder.module``:

  =====================  =====================================  ==============================================
  encoder                blocks (``encoder_blocks``)             extras trained with ``last_n`` (after blocks)
  =====================  =====================================  ==============================================
  open_clip image ViT    visual.transformer.resblocks.*          visual.attn_pool*, visual.ln_post, visual.proj
  open_clip image RN     visual.layer1 .. visual.layer4          visual.attnpool
  open_clip image timm   visual.trunk.blocks|stages.*            trunk norm/fc_norm/head, visual.head
  open_clip text         transformer.resblocks.* (or text.*)     ln_final, text_projection (or text.* same)
  HF (BERT, ViT, ...)    encoder.layer.* / encoder.layers.* /    final norm next to the block stack (ViT
                         transformer.layer.* / layers.* / h.*    ``layernorm``, CLIP ``final_layer_norm``, ...)
                         (first match; else the longest          and ``pooler`` only if spec.pooling=="pooler"
                         ModuleList named like a layer stack;
                         transformers-5 ViT: ``layers.*``)
  =====================  =====================================  ==============================================

``all`` unfreezes the encoder's *tower*: for open_clip the tower in use only (image: ``visual.*``;
text: everything but ``visual.*`` and the logit scale/bias), for HF the whole model except an
unused pooler. Parts the forward never uses (an HF pooler under cls/mean pooling) stay frozen, so
"trainable" means "can change". Frozen parts always stay in eval mode (dropout off, norm statistics fixed) and are
bit-identical after training; trainable parts are in train mode during training steps.

After ``finetune`` returns, the encoder is frozen again (requires_grad False, eval) but HOLDS the
best fine-tuned weights; ``encoder.digest`` is recomputed so provenance shows the change.

Checkpoint: ``<checkpoint_dir>/finetune_checkpoint.pt`` written atomically after every epoch, a
plain dict of tensors/numbers (``torch.load(weights_only=True)``): trainable encoder state (by
name, plus buffers inside unfrozen modules), projector, head, optimiser, scheduler, RNG, epoch,
step, best state, early-stopping counters, history. A rerun with the same config resumes from it;
with the same seed, device and thread count the result is bit-identical to an uninterrupted run.

Artifacts (``save_finetuned`` / ``load_finetuned``, no pickle): ``projector/`` (stage-1 format),
``head.safetensors`` + ``head.json``, ``encoder_trainable.safetensors`` (only the encoder tensors
that could change) and ``finetune.json`` (encoder spec, weights digest, policy, best metric).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.frozen import FrozenEncoder, freeze, weights_digest
from projection.finetune_config import FinetuneConfig
from projection.losses import InfoNCELoss
from projection.metrics import bidirectional_ranks
from projection.projector import load_projector, save_projector
from projection.checkpoint import commit_epoch, resume
from projection.steps import optimizer_step
from projection.train import _epoch_seed, warmup_cosine

CHECKPOINT_FILE = "finetune_checkpoint.pt"
Callback = Callable[[str, int, dict[str, float]], None]
# The validation quantity each task reports as "the" metric (regression: RMSE, lower is better).
TASK_METRIC = {"classification": "accuracy", "regression": "rmse", "retrieval": "r1"}
_HF_BLOCK_PATHS = ("encoder.layer", "encoder.layers", "transformer.layer", "transformer.layers", "layers", "h",
                   "transformer.h", "encoder.block", "text_model.encoder.layers", "vision_model.encoder.layers",
                   "model.layers", "blocks")  # fmt: skip
_HF_POST_NAMES = ("layernorm", "layer_norm", "final_layer_norm", "post_layernorm", "final_layernorm", "ln_f", "norm", "ln_post")
_NO_DECAY_SUFFIXES = ("positional_embedding", "class_embedding", "logit_scale", "logit_bias")


# --------------------------------------------------------------------------- unfreeze policy


@dataclass(frozen=True)
class EncoderLayout:
    """Qualified names (relative to ``encoder.module``) that the unfreeze policy works with."""

    blocks: list[str]  # the repeated blocks, in forward order
    post: list[str]  # modules/parameters applied after the last block (trained with last_n)
    tower: list[str]  # everything of the tower in use (trained with "all")
    exclude: list[str] = field(default_factory=list)  # inside the tower but unused by forward (never trained)


def _has(root: nn.Module, name: str) -> bool:
    obj: Any = root
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return False
    return isinstance(obj, (nn.Module, nn.Parameter)) and (not isinstance(obj, nn.Module) or any(True for _ in obj.parameters()))


def _get(root: nn.Module, name: str) -> Any:
    obj: Any = root
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _children(root: nn.Module, name: str) -> list[str]:
    return [f"{name}.{i}" for i in range(len(_get(root, name)))]


def _hf_layout(root: nn.Module, prefix: str, pooling: str, spec: Any) -> tuple[list[str], list[str], list[str]]:
    """(blocks, post, exclude) of a transformers model living at ``prefix`` ('' = root)."""
    model = _get(root, prefix) if prefix else root
    j = (lambda n: f"{prefix}.{n}" if prefix else n)  # noqa: E731
    stack = next((p for p in _HF_BLOCK_PATHS if isinstance(_getattr_path(model, p), nn.ModuleList)), None)
    if stack is None:  # generic fallback: the longest ModuleList named like a layer stack
        cands = [(len(m), n) for n, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1] in ("layer", "layers", "h", "block", "blocks", "resblocks") and len(m)]  # fmt: skip
        if not cands:
            raise ValueError(
                f"cannot find the transformer blocks of {type(model).__name__} ({spec}); looked for "
                f"{', '.join(_HF_BLOCK_PATHS)} and any ModuleList named layer(s)/h/block(s). "
                "Use unfreeze='none' or 'all' for this encoder."
            )
        stack = max(cands)[1]
    # final norms sit next to the stack, or one level up: ViT 'layernorm', CLIP 'text_model.final_layer_norm', Llama 'model.norm'
    parent = stack.rsplit(".", 1)[0] if "." in stack else ""
    grandparent = parent.rsplit(".", 1)[0] if "." in parent else ""
    post = []
    for base in dict.fromkeys([parent, grandparent, ""]):
        for name in _HF_POST_NAMES:
            full = f"{base}.{name}" if base else name
            if full not in post and _has(model, full):
                post.append(full)
    exclude = []
    if _has(model, "pooler"):
        (post if pooling == "pooler" else exclude).append("pooler")
    return [j(b) for b in _children(model, stack)], [j(p) for p in post], [j(e) for e in exclude]


def _getattr_path(root: Any, name: str) -> Any:
    obj = root
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def encoder_layout(encoder: FrozenEncoder) -> EncoderLayout:
    """Blocks, post-block extras and tower of an encoder, by name; ValueError if unknown."""
    m, spec = encoder.module, encoder.spec
    own = encoder.layout()  # timm: the backend names its own blocks (encoders/timm_backend.py)
    if own is not None:
        return EncoderLayout(**own)
    if spec.backend == "hf":
        blocks, post, exclude = _hf_layout(m, "", spec.pooling, spec)
        return EncoderLayout(blocks, post, [""], exclude)
    if spec.tower == "image":
        v = m.visual
        if isinstance(_getattr_path(v, "transformer.resblocks"), nn.ModuleList):  # open_clip VisionTransformer
            blocks = _children(m, "visual.transformer.resblocks")
            post = [n for n in ("visual.attn_pool", "visual.attn_pool_contrastive", "visual.ln_post", "visual.proj") if _has(m, n)]
        elif all(hasattr(v, f"layer{i}") for i in range(1, 5)):  # ModifiedResNet
            blocks = [f"visual.layer{i}" for i in range(1, 5)]
            post = [n for n in ("visual.attnpool",) if _has(m, n)]
        elif hasattr(v, "trunk"):  # TimmModel
            stack = next((s for s in ("blocks", "stages", "layers") if isinstance(getattr(v.trunk, s, None), (nn.Sequential, nn.ModuleList))), None)
            if stack is None:
                raise ValueError(f"cannot find the blocks of the timm trunk {type(v.trunk).__name__} ({spec})")
            blocks = _children(m, f"visual.trunk.{stack}")
            post = [n for n in ("visual.trunk.norm", "visual.trunk.fc_norm", "visual.trunk.head", "visual.head") if _has(m, n)]
        else:
            raise ValueError(f"cannot find the blocks of open_clip visual tower {type(v).__name__} ({spec})")
        return EncoderLayout(blocks, post, ["visual"])
    if hasattr(m, "text"):  # CustomTextCLIP / CoCa: the text tower is a submodule
        t = m.text
        if isinstance(_getattr_path(t, "transformer.resblocks"), nn.ModuleList):
            blocks = _children(m, "text.transformer.resblocks")
            post = [n for n in ("text.ln_final", "text.text_projection") if _has(m, n)]
            return EncoderLayout(blocks, post, ["text"])
        if isinstance(getattr(t, "transformer", None), nn.Module):  # open_clip HFTextEncoder
            blocks, post, exclude = _hf_layout(m, "text.transformer", "cls", spec)
            post += [n for n in ("text.proj", "text.pooler") if _has(m, n)]
            return EncoderLayout(blocks, post, ["text"], exclude)
        raise ValueError(f"cannot find the blocks of open_clip text tower {type(t).__name__} ({spec})")
    blocks = _children(m, "transformer.resblocks")  # classic CLIP: text tower params live at the top level
    post = [n for n in ("ln_final", "text_projection") if _has(m, n)]
    tower = [n for n, _ in m.named_children() if n != "visual"]
    tower += [n for n, _ in m.named_parameters(recurse=False) if n not in ("logit_scale", "logit_bias")]
    return EncoderLayout(blocks, post, tower)


def encoder_blocks(encoder: FrozenEncoder) -> list[nn.Module]:
    """The encoder's repeated blocks in forward order (what ``last_n`` counts)."""
    return [_get(encoder.module, n) for n in encoder_layout(encoder).blocks]


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def trainable_prefixes(encoder: FrozenEncoder, policy: str, last_n: int = 1) -> list[str]:
    """Names (relative to encoder.module) of what a policy unfreezes; validates last_n."""
    if policy == "none":
        return []
    layout = encoder_layout(encoder)
    if policy == "all":
        return list(layout.tower)
    if policy != "last_n":
        raise ValueError(f"unknown unfreeze policy {policy!r}; choose 'none', 'last_n' or 'all'")
    n_blocks = len(layout.blocks)
    if not 1 <= last_n <= n_blocks:
        raise ValueError(
            f"last_n={last_n} but encoder {encoder.spec} has {n_blocks} blocks; choose 1 <= last_n <= {n_blocks} "
            "or unfreeze='all'"
        )
    return layout.blocks[n_blocks - last_n :] + layout.post


def apply_unfreeze(encoder: FrozenEncoder, policy: str, last_n: int = 1) -> list[str]:
    """Set requires_grad per policy (everything else False) and return the trainable parameter names.

    none: nothing; last_n: the last ``last_n`` blocks + ``post`` extras; all: the tower (see module
    doc). The whole module is left in eval mode; training steps switch only trainable modules on.
    """
    prefixes = trainable_prefixes(encoder, policy, last_n)
    exclude = encoder_layout(encoder).exclude if prefixes else []
    names = []
    encoder.module.eval()
    for name, p in encoder.module.named_parameters():
        on = bool(prefixes) and _under(name, prefixes) and not _under(name, exclude)
        p.requires_grad_(on)
        if on:
            names.append(name)
    return names


def _set_encoder_mode(encoder: FrozenEncoder, prefixes: list[str], exclude: list[str], training: bool) -> None:
    """Frozen parts always eval; unfrozen modules train() during training steps."""
    encoder.module.eval()
    if not training:
        return
    for name in prefixes:
        obj = encoder.module if name == "" else _get(encoder.module, name)
        if isinstance(obj, nn.Module):
            obj.train()
    for name in exclude:
        _get(encoder.module, name).eval()
    if encoder.freeze_bn_stats:  # BatchNorm keeps its pretrained statistics; its scale and shift still train
        for m in encoder.module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# --------------------------------------------------------------------------- model


class TaskHead(nn.Module):
    """classification: Linear(D, K) + CE; regression: Linear(D, 1) + MSE on the standardised
    target (train mean/std kept as buffers, so predictions come back in original units);
    retrieval: no layer, symmetric InfoNCE with a learnable temperature."""

    def __init__(self, task: str, dim: int, n_classes: int | None = None, target_mean: float = 0.0,
                 target_std: float = 1.0, temperature: float = 0.07):  # fmt: skip
        super().__init__()
        self.task = task
        if task == "classification":
            self.linear = nn.Linear(dim, int(n_classes))
        elif task == "regression":
            self.linear = nn.Linear(dim, 1)
            self.register_buffer("target_mean", torch.tensor(float(target_mean)))
            self.register_buffer("target_std", torch.tensor(float(target_std)))
        elif task == "retrieval":
            self.infonce = InfoNCELoss(temperature, learnable=True)
        else:
            raise ValueError(f"unknown task {task!r}")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return self.linear(z)  # (B, K) logits
        if self.task == "regression":
            return self.linear(z).squeeze(-1)  # (B,) standardised prediction
        return z  # (B, D_tgt) projected embedding

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = out.float()
        if self.task == "classification":
            return F.cross_entropy(out, y)
        if self.task == "regression":
            return F.mse_loss(out, (y - self.target_mean) / self.target_std)
        return self.infonce(out, y)

    def to_original_units(self, out: torch.Tensor) -> torch.Tensor:
        if self.task == "regression":
            return out.float() * self.target_std + self.target_mean
        return out.float()


class FinetuneModel(nn.Module):
    """encoder -> (normalise) -> projector -> head. The encoder is a FrozenEncoder, deliberately
    NOT a registered submodule: ``state_dict()`` is projector + head only; trainable encoder
    tensors are saved separately by name."""

    def __init__(self, encoder: FrozenEncoder, projector: nn.Module, head: TaskHead):
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.head = head

    def embed(self, batch: Any) -> torch.Tensor:
        """Trainable encoder forward (no inference_mode): collated batch -> (B, D_src) float32."""
        feats = self.encoder.forward(batch).float()
        return F.normalize(feats, dim=-1) if self.encoder.spec.normalize else feats

    def forward(self, x: Any, raw: bool) -> torch.Tensor:
        feats = self.embed(x) if raw else x
        return self.head(self.projector(feats))


# --------------------------------------------------------------------------- optimiser


def configure_optimizers(encoder_params: Iterable[tuple[str, nn.Parameter]], head_params: Iterable[tuple[str, nn.Parameter]],
                         cfg: FinetuneConfig) -> torch.optim.AdamW:  # fmt: skip
    """AdamW with discriminative LRs, nanoGPT style: up to four groups named
    encoder / encoder_no_decay (lr=encoder_lr) and head / head_no_decay (lr=head_lr; projector +
    task head). Matrices decay; biases, norm gains, temperatures and open_clip's positional/class
    embeddings do not. Only parameters with requires_grad are included; empty groups are dropped."""
    groups = []
    for group, named, lr in (("encoder", encoder_params, cfg.encoder_lr), ("head", head_params, cfg.head_lr)):
        named = [(n, p) for n, p in named if p.requires_grad]
        decay = [p for n, p in named if p.ndim >= 2 and not n.endswith(_NO_DECAY_SUFFIXES)]
        keep = [p for n, p in named if not (p.ndim >= 2 and not n.endswith(_NO_DECAY_SUFFIXES))]
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay, "name": group})
        if keep:
            groups.append({"params": keep, "lr": lr, "weight_decay": 0.0, "name": f"{group}_no_decay"})
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    fused = cfg.fused_adamw and all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=fused)


# --------------------------------------------------------------------------- data


@dataclass
class TaskData:
    """Raw items plus what the task learns from them, row-aligned.

    items: image paths (image encoders) or texts (text encoders).
    y: classification: (N,) int labels; regression: (N,) numbers; retrieval: (N, D_tgt) fixed
    target embeddings (e.g. rows of a target-encoder store).
    """

    items: Sequence[Any]
    y: Any

    def __post_init__(self) -> None:
        self.items = list(self.items)
        y = self.y.detach().cpu() if torch.is_tensor(self.y) else torch.as_tensor(np.asarray(self.y))
        if y.shape[0] != len(self.items):
            raise ValueError(f"{len(self.items)} items but {y.shape[0]} labels/targets")
        self.y = y

    def __len__(self) -> int:
        return len(self.items)


def _prepare_y(task: str, data: TaskData, d_out: int) -> torch.Tensor:
    y = data.y
    if task == "classification":
        if y.ndim != 1 or y.is_floating_point() and not torch.equal(y, y.round()):
            raise ValueError(f"classification needs (N,) integer labels, got {tuple(y.shape)} {y.dtype}")
        return y.long()
    if task == "regression":
        if y.ndim != 1:
            raise ValueError(f"regression needs a (N,) numeric target, got shape {tuple(y.shape)}")
        y = y.to(torch.float32)
        if not torch.isfinite(y).all():
            raise ValueError("regression target has NaN/inf values; drop or impute them first")
        return y
    if y.ndim != 2 or y.shape[1] != d_out:
        raise ValueError(f"retrieval needs (N, {d_out}) target embeddings (projector d_out), got {tuple(y.shape)}")
    return y.to(torch.float32)


class _Inputs:
    """Batches of model input for one split: precomputed features (fast path) or raw items
    loaded once (``encoder.load_item``, cached) and collated per batch."""

    def __init__(self, encoder: FrozenEncoder, items: list, raw: bool, batch_size: int):
        self.encoder, self.items, self.raw = encoder, items, raw
        self.cache: list[Any] = [None] * len(items)
        self.feats = None if raw else self._precompute(batch_size)

    def _load(self, i: int) -> Any:
        if self.cache[i] is None:
            self.cache[i] = self.encoder.load_item(self.items[i])
        return self.cache[i]

    def _precompute(self, batch_size: int) -> torch.Tensor:
        out = []
        for s in range(0, len(self.items), batch_size):
            batch = self.encoder.collate([self._load(i) for i in range(s, min(s + batch_size, len(self.items)))])
            out.append(self.encoder.encode(batch).clone())  # clone: inference tensors cannot join autograd
        self.cache = [None] * len(self.items)  # the features are all we need now
        return torch.cat(out).float()  # (N, D_src)

    def get(self, idx: torch.Tensor) -> Any:
        if not self.raw:
            return self.feats[idx]
        return self.encoder.collate([self._load(int(i)) for i in idx])


# --------------------------------------------------------------------------- evaluation


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def _outputs(model: FinetuneModel, inputs: _Inputs, batch_size: int, bf16: bool) -> torch.Tensor:
    device = model.encoder.device
    outs = []
    for s in range(0, len(inputs.items), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(inputs.items)))
        x = inputs.get(idx)
        with _autocast(device, bf16):
            outs.append(model(x.to(device) if not inputs.raw else x, raw=inputs.raw).float())
    return torch.cat(outs)


def task_metrics(head: TaskHead, out: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """All metrics of a task from head outputs (whole split) and prepared labels/targets.

    classification: loss (CE), accuracy. regression: loss (MSE, standardised units), mae, rmse, r2
    (original units). retrieval: loss (InfoNCE over the whole split as one batch), p2t_r1, t2p_r1,
    r1 = their mean, p2t_mrr, t2p_mrr. "metric" repeats the task's TASK_METRIC entry.
    """
    dev = next(iter(list(head.parameters()) + list(head.buffers())), torch.empty(0)).device
    with torch.no_grad():
        res = {"loss": float(head.loss(out.to(dev), y.to(dev)))}
        out = head.to_original_units(out.to(dev)).cpu()
    y = y.cpu()
    if head.task == "classification":
        res["accuracy"] = float((out.argmax(1) == y).double().mean())
    elif head.task == "regression":
        pred, yd = out.double(), y.double()
        err = pred - yd
        sst = float(((yd - yd.mean()) ** 2).sum())
        res |= {"mae": float(err.abs().mean()), "rmse": float(err.pow(2).mean().sqrt()),
                "r2": 1.0 - float(err.pow(2).sum()) / sst if sst > 0 else float("nan")}  # fmt: skip
    else:
        p2t, t2p = bidirectional_ranks(out, y)
        res |= {"p2t_r1": float((p2t == 1).mean()), "t2p_r1": float((t2p == 1).mean()),
                "p2t_mrr": float((1.0 / p2t).mean()), "t2p_mrr": float((1.0 / t2p).mean())}  # fmt: skip
        res["r1"] = 0.5 * (res["p2t_r1"] + res["t2p_r1"])
    res["metric"] = res[TASK_METRIC[head.task]]
    return res


def evaluate_task(model: FinetuneModel, data: TaskData, batch_size: int = 256, bf16: bool = False) -> dict[str, float]:
    """Task metrics of ``model`` on ``data`` (eval mode, no grad), always from raw items through
    the model's current encoder weights. Keys: see ``task_metrics``."""
    was = model.training
    model.eval()
    model.encoder.module.eval()
    try:
        inputs = _Inputs(model.encoder, data.items, raw=True, batch_size=batch_size)
        out = _outputs(model, inputs, batch_size, bf16)
        d_out = model.projector.cfg.d_out if hasattr(model.projector, "cfg") else out.shape[-1]
        return task_metrics(model.head, out, _prepare_y(model.head.task, data, d_out))
    finally:
        model.train(was)


def predict_task(model: FinetuneModel, items: Sequence[Any], batch_size: int = 256, bf16: bool = False) -> np.ndarray:
    """Predictions in original units: class logits (N, K) | values (N,) | projected embeddings (N, D_tgt)."""
    model.eval()
    model.encoder.module.eval()
    out = _outputs(model, _Inputs(model.encoder, list(items), raw=True, batch_size=batch_size), batch_size, bf16)
    dev = next(iter(list(model.head.parameters()) + list(model.head.buffers()))).device
    return model.head.to_original_units(out.to(dev)).cpu().numpy()


# --------------------------------------------------------------------------- training


@dataclass
class FinetuneResult:
    model: FinetuneModel  # holds the best weights (encoder in place, projector, head)
    task: str
    metric_name: str  # TASK_METRIC[task]
    best_val_metric: float | None  # task metric of the best epoch on val (None without val data)
    best_val_loss: float | None
    best_epoch: int  # 0-based epoch whose weights the model now holds
    epochs_run: int  # epochs completed, including ones done before a resume
    steps: int
    stopped_early: bool
    resumed_from_epoch: int | None  # epochs already done in the checkpoint we resumed from
    unfreeze: str
    trainable_encoder_params: list[str]  # names relative to encoder.module
    n_trainable_encoder: int  # number of scalars
    n_trainable_head: int  # projector + task head scalars
    val_metrics: dict[str, float] = field(default_factory=dict)  # all val metrics of the best epoch
    encoder_state_keys: list[str] = field(default_factory=list)  # encoder state_dict keys that may have changed
    history: list[dict[str, float]] = field(default_factory=list)


def _fingerprint(cfg: FinetuneConfig, encoder: FrozenEncoder, n_train: int) -> dict:
    keys = ("task", "unfreeze", "last_n", "encoder_lr", "head_lr", "weight_decay", "epochs", "batch_size", "warmup_frac",
            "min_lr_ratio", "seed", "bf16", "n_classes", "early_stop_on")  # fmt: skip
    return {**{k: getattr(cfg, k) for k in keys}, "encoder": encoder.spec.identity, "n_train": n_train}


def finetune(
    encoder: FrozenEncoder,
    projector: nn.Module | str | Path,
    train_data: TaskData,
    val_data: TaskData | None,
    cfg: FinetuneConfig,
    checkpoint_dir: str | Path | None = None,
    callback: Callback | None = None,
) -> FinetuneResult:
    """Train encoder (per ``cfg.unfreeze``) + projector + a new task head; see the module doc.

    ``projector``: a Projector (trained in place) or the directory of a saved one. The best
    epoch's weights (by ``cfg.early_stop_on`` on val) are in ``result.model`` and, for the
    encoder, in ``encoder.module`` itself. Resumes from ``checkpoint_dir/finetune_checkpoint.pt``.
    The caller's global torch RNG is left untouched (the run uses a forked RNG seeded by cfg.seed).
    """
    device = torch.device(cfg.device)
    if encoder.device.type != device.type:
        raise ValueError(f"encoder {encoder.spec} lives on {encoder.device} but cfg.device is {cfg.device!r}; build it with ?device={cfg.device}")
    if isinstance(projector, (str, Path)):
        projector = load_projector(projector, device)
    projector.to(device)
    d_in = getattr(getattr(projector, "cfg", None), "d_in", encoder.dim)
    d_out = getattr(getattr(projector, "cfg", None), "d_out", None)
    if d_in != encoder.dim:
        raise ValueError(f"projector expects D_src={d_in} but encoder {encoder.spec} gives {encoder.dim}")
    if len(train_data) == 0:
        raise ValueError("training split is empty")
    if val_data is not None and len(val_data) == 0:
        val_data = None
    y_train = _prepare_y(cfg.task, train_data, d_out).to(device)
    y_val = _prepare_y(cfg.task, val_data, d_out).to(device) if val_data is not None else None
    if cfg.task == "classification":
        n_classes = cfg.n_classes or int(y_train.max()) + 1
        for y, split in ((y_train, "train"), (y_val, "val")):
            if y is not None and (int(y.min()) < 0 or int(y.max()) >= n_classes):
                raise ValueError(f"{split} labels must be in [0, {n_classes}); got [{int(y.min())}, {int(y.max())}]")
    dim_head = d_out if d_out is not None else int(projector(torch.zeros(1, d_in, device=device)).shape[-1])

    layout_exclude = encoder_layout(encoder).exclude if cfg.unfreeze != "none" else []
    prefixes = trainable_prefixes(encoder, cfg.unfreeze, cfg.last_n)  # validates last_n before any work
    raw = cfg.unfreeze != "none"
    n_train = len(train_data)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    fingerprint = _fingerprint(cfg, encoder, n_train)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    higher = cfg.higher_is_better
    autocast_on = cfg.bf16 or encoder.spec.dtype == "bf16"
    if raw and encoder.compute_dtype != torch.float32:  # its weights were cast for inference (encoders/frozen.py)
        raise ValueError(f"stage 2 trains float32 weights but {encoder.spec} computes in {encoder.compute_dtype}: "
                         "load the encoder with dtype=fp32 and set bf16=true in the fine-tune config")

    fork_devices = [device] if device.type == "cuda" else []
    grad_ckpt = _GradCheckpointing(encoder, cfg.grad_checkpointing and raw)
    with torch.random.fork_rng(devices=fork_devices, device_type=device.type if device.type != "cpu" else "cuda"), grad_ckpt:
        torch.manual_seed(cfg.seed)
        tgt = y_train.float()
        head = TaskHead(cfg.task, dim_head, n_classes=n_classes if cfg.task == "classification" else None,
                        target_mean=float(tgt.mean()) if cfg.task == "regression" else 0.0,
                        target_std=float(tgt.std().clamp_min(1e-12)) if cfg.task == "regression" and n_train > 1 else 1.0,
                        temperature=cfg.temperature).to(device)  # fmt: skip
        model = FinetuneModel(encoder, projector, head)
        trainable_names = apply_unfreeze(encoder, cfg.unfreeze, cfg.last_n)
        enc_named = [(n, p) for n, p in encoder.module.named_parameters() if p.requires_grad]
        head_named = list(model.named_parameters())
        opt = configure_optimizers(enc_named, head_named, cfg)
        params = [p for g in opt.param_groups for p in g["params"]]
        warmup = int(cfg.warmup_frac * total_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, total_steps, cfg.min_lr_ratio))
        enc_state_keys = [k for k in encoder.module.state_dict() if _under(k, prefixes) and not _under(k, layout_exclude)]

        def enc_state() -> dict[str, torch.Tensor]:
            sd = encoder.module.state_dict()
            return {k: sd[k].detach().clone() for k in enc_state_keys}

        def load_enc_state(state: dict[str, torch.Tensor]) -> None:
            if state:
                missing = set(enc_state_keys) - set(state)
                if missing:
                    raise ValueError(f"checkpoint lacks encoder tensors {sorted(missing)[:5]}")
                encoder.module.load_state_dict(state, strict=False)

        s = {"epoch": 0, "step": 0, "best_value": -math.inf if higher else math.inf, "best_epoch": -1, "bad_epochs": 0,
             "stopped": False, "best_state": None, "best_metrics": {}, "history": []}  # fmt: skip
        s, resumed_from = resume(ckpt_path, device, fingerprint, s, {
            "encoder": load_enc_state, "projector": projector.load_state_dict, "head": head.load_state_dict,
            "optimizer": opt.load_state_dict, "scheduler": sched.load_state_dict})

        train_in = _Inputs(encoder, train_data.items, raw, cfg.eval_batch_size)
        val_in = _Inputs(encoder, val_data.items, raw, cfg.eval_batch_size) if val_data is not None else None
        try:
            total = torch.zeros((), device=device)
            while s["epoch"] < cfg.epochs and not s["stopped"]:
                epoch = s["epoch"]
                gen = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch))
                perm = torch.randperm(n_train, generator=gen)
                model.train()
                _set_encoder_mode(encoder, prefixes, layout_exclude, training=True)
                total.zero_()
                n_batches = 0
                for start in range(0, n_train, cfg.batch_size):
                    idx = perm[start : start + cfg.batch_size]
                    x = train_in.get(idx)
                    x = x.to(device) if not raw else x
                    with _autocast(device, autocast_on):
                        out = model(x, raw=raw)
                    loss = head.loss(out, y_train[idx.to(device)])
                    optimizer_step(loss, opt, sched, params, cfg.grad_clip)
                    total.add_(loss.detach())
                    n_batches += 1
                s["step"] += n_batches

                metrics = {"epoch": float(epoch), "train_loss": float(total) / max(n_batches, 1)}
                for g, lr in zip(opt.param_groups, sched.get_last_lr()):
                    metrics[f"lr_{g['name'].removesuffix('_no_decay')}"] = lr
                if val_in is not None:
                    model.eval()
                    _set_encoder_mode(encoder, prefixes, layout_exclude, training=False)
                    val = task_metrics(head, _outputs(model, val_in, cfg.eval_batch_size, autocast_on), y_val)
                    metrics |= {f"val_{k}": v for k, v in val.items()}  # val_loss, val_<metric name>, val_metric, ...
                    value = val["metric"] if cfg.early_stop_on == "metric" else val["loss"]
                    better = value > s["best_value"] + cfg.min_delta if higher else value < s["best_value"] - cfg.min_delta
                    if better:
                        s.update(best_value=value, best_epoch=epoch, bad_epochs=0, best_metrics=val)
                        s["best_state"] = {"encoder": enc_state(), "projector": _clone(projector), "head": _clone(head)}
                    else:
                        s["bad_epochs"] += 1
                        s["stopped"] = cfg.patience is not None and s["bad_epochs"] >= cfg.patience
                else:
                    s["best_epoch"] = epoch
                commit_epoch(s, epoch, metrics, ckpt_path, device, fingerprint, lambda: {
                    "encoder": enc_state(), "projector": projector.state_dict(), "head": head.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, callback)

            if s["best_state"] is not None:
                load_enc_state(s["best_state"]["encoder"])
                projector.load_state_dict(s["best_state"]["projector"])
                head.load_state_dict(s["best_state"]["head"])
        finally:
            # Back to the frozen-encoder contract, with whatever weights it now holds.
            model.eval()
            freeze(encoder.module)
            if raw:
                encoder.digest = weights_digest(encoder.module)

    result = FinetuneResult(
        model=model, task=cfg.task, metric_name=TASK_METRIC[cfg.task],
        best_val_metric=s["best_metrics"].get("metric") if val_data is not None else None,
        best_val_loss=s["best_metrics"].get("loss") if val_data is not None else None,
        best_epoch=s["best_epoch"], epochs_run=s["epoch"], steps=s["step"], stopped_early=s["stopped"],
        resumed_from_epoch=resumed_from, unfreeze=cfg.unfreeze, trainable_encoder_params=trainable_names,
        n_trainable_encoder=sum(p.numel() for _, p in enc_named), n_trainable_head=sum(p.numel() for _, p in head_named),
        val_metrics=dict(s["best_metrics"]), history=s["history"], encoder_state_keys=enc_state_keys,
    )  # fmt: skip
    if callback is not None:
        end = {"epochs_run": float(result.epochs_run), "best_epoch": float(result.best_epoch)}
        if result.best_val_metric is not None:
            end[f"best_val_{result.metric_name}"] = result.best_val_metric
            end["best_val_loss"] = result.best_val_loss
        callback("end", result.steps, end)
    return result


def frozen_head_baseline(
    encoder: FrozenEncoder,
    projector: nn.Module | str | Path,
    train_data: TaskData,
    val_data: TaskData | None,
    cfg: FinetuneConfig,
    checkpoint_dir: str | Path | None = None,
    callback: Callback | None = None,
) -> FinetuneResult:
    """The "before" number: ``finetune`` with ``unfreeze='none'`` and everything else equal (same
    head init from cfg.seed, same head_lr schedule, epochs, batches, early stopping), i.e. a
    projector + head trained on frozen encoder features. Pass a FRESH projector (or its directory):
    the one given is trained in place. Use a different checkpoint_dir than the fine-tuning run."""
    return finetune(encoder, projector, train_data, val_data, cfg.model_copy(update={"unfreeze": "none"}), checkpoint_dir, callback)


# --------------------------------------------------------------------------- artifacts

HEAD_FILE, HEAD_CONFIG_FILE = "head.safetensors", "head.json"
ENCODER_FILE, FINETUNE_FILE, PROJECTOR_DIR = "encoder_trainable.safetensors", "finetune.json", "projector"


def save_finetuned(result: FinetuneResult, directory: str | Path) -> Path:
    """Write a fine-tuned model without pickle: ``projector/`` (save_projector), ``head.safetensors``
    + ``head.json``, ``encoder_trainable.safetensors`` (only the encoder tensors that could change,
    by name relative to encoder.module; empty for unfreeze='none') and ``finetune.json`` (encoder
    spec, weights digest after fine-tuning, policy, best metric)."""
    import json

    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model = result.model
    save_projector(model.projector, d / PROJECTOR_DIR)
    head = model.head
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(d / HEAD_FILE))
    head_cfg = {"task": head.task, "dim": model.projector.cfg.d_out,
                "n_classes": head.linear.out_features if head.task == "classification" else None}  # fmt: skip
    (d / HEAD_CONFIG_FILE).write_text(json.dumps(head_cfg, indent=2))
    sd = model.encoder.module.state_dict()
    save_file({k: sd[k].detach().cpu().contiguous() for k in result.encoder_state_keys}, str(d / ENCODER_FILE))
    meta = {"encoder_spec": model.encoder.spec.identity, "weights_digest": model.encoder.digest, "unfreeze": result.unfreeze,
            "metric_name": result.metric_name, "best_val_metric": result.best_val_metric, "best_epoch": result.best_epoch,
            "encoder_state_keys": result.encoder_state_keys}  # fmt: skip
    (d / FINETUNE_FILE).write_text(json.dumps(meta, indent=2))
    return d


def load_finetuned(directory: str | Path, encoder: FrozenEncoder) -> FinetuneModel:
    """Rebuild a FinetuneModel from ``save_finetuned`` output on a freshly loaded ``encoder`` (same
    spec): its fine-tuned tensors are copied into ``encoder.module`` and the digest is checked."""
    import json

    from safetensors.torch import load_file

    d = Path(directory)
    meta = json.loads((d / FINETUNE_FILE).read_text())
    if meta["encoder_spec"] != encoder.spec.identity:
        raise ValueError(f"{d} was fine-tuned from {meta['encoder_spec']}, not {encoder.spec.identity}")
    state = load_file(str(d / ENCODER_FILE), device=str(encoder.device))
    if state:
        unknown = set(state) - set(encoder.module.state_dict())
        if unknown:
            raise ValueError(f"{d} holds encoder tensors this encoder lacks: {sorted(unknown)[:5]}")
        encoder.module.load_state_dict(state, strict=False)
        freeze(encoder.module)
        encoder.digest = weights_digest(encoder.module)
    if encoder.digest != meta["weights_digest"]:
        raise ValueError(f"encoder weights digest {encoder.digest[:12]} != saved {meta['weights_digest'][:12]}: different base weights?")
    projector = load_projector(d / PROJECTOR_DIR, encoder.device)
    head_cfg = json.loads((d / HEAD_CONFIG_FILE).read_text())
    head = TaskHead(head_cfg["task"], head_cfg["dim"], n_classes=head_cfg["n_classes"])
    head.load_state_dict(load_file(str(d / HEAD_FILE)))
    return FinetuneModel(encoder, projector, head.to(encoder.device)).eval()


def _clone(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _GradCheckpointing:
    """Context: gradient checkpointing on for the encoder while training, restored after.

    open_clip: ``module.set_grad_checkpointing`` (its Transformer wraps every block in
    torch.utils.checkpoint, use_reentrant=False; frozen blocks build no graph, so only unfrozen
    ones are recomputed). HF: ``gradient_checkpointing_enable`` (applies to layers in train mode,
    i.e. exactly the unfrozen ones)."""

    def __init__(self, encoder: FrozenEncoder, enabled: bool):
        self.encoder, self.enabled = encoder, enabled

    def __enter__(self):
        if not self.enabled:
            return self
        m = self.encoder.module
        if hasattr(m, "gradient_checkpointing_enable"):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(m, "set_grad_checkpointing"):
            m.set_grad_checkpointing(True)
        else:
            raise ValueError(f"encoder {self.encoder.spec} does not support gradient checkpointing")
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        m = self.encoder.module
        if hasattr(m, "gradient_checkpointing_disable"):
            m.gradient_checkpointing_disable()
        elif hasattr(m, "set_grad_checkpointing"):
            try:
                m.set_grad_checkpointing(False)
            except Exception:  # some towers only implement enabling
                pass
        return False
