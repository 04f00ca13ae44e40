"""Fine-tuned models on disk, without pickle: what ``save_finetuned`` writes and ``load_finetuned`` reads.

``projector/`` (the stage-1 format), ``head.safetensors`` + ``head.json`` (the task's own config),
``encoder_trainable.safetensors`` (only the encoder tensors that could change, by name relative to
``encoder.module``; empty for unfreeze='none') and ``finetune.json`` (encoder spec, weights digest
after fine-tuning, policy, best metric). Loading checks the base encoder's identity and digest.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from encoders.frozen import FrozenEncoder, freeze, weights_digest
from projection.finetune.model import FinetuneModel, FinetuneResult
from projection.align.projector import load_projector, save_projector
from projection.finetune.tasks import make_head

HEAD_FILE, HEAD_CONFIG_FILE = "head.safetensors", "head.json"
ENCODER_FILE, FINETUNE_FILE, PROJECTOR_DIR = "encoder_trainable.safetensors", "finetune.json", "projector"


def save_finetuned(result: FinetuneResult, directory: str | Path) -> Path:
    """Write a fine-tuned model without pickle: ``projector/`` (save_projector), ``head.safetensors``
    + ``head.json``, ``encoder_trainable.safetensors`` (only the encoder tensors that could change,
    by name relative to encoder.module; empty for unfreeze='none') and ``finetune.json`` (encoder
    spec, weights digest after fine-tuning, policy, best metric)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    model = result.model
    save_projector(model.projector, d / PROJECTOR_DIR)
    head = model.head
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(d / HEAD_FILE))
    head_cfg = head.config() | {"dim": model.projector.cfg.d_out}
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
    head = make_head(head_cfg.pop("task"), head_cfg.pop("dim"), **{k: v for k, v in head_cfg.items() if v is not None})
    head.load_state_dict(load_file(str(d / HEAD_FILE)))
    return FinetuneModel(encoder, projector, head.to(encoder.device)).eval()
