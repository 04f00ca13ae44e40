"""Which encoder parameters stage 2 trains, their train/eval modes, and gradient checkpointing.

Policies (the layout comes from the encoder's backend, ``FrozenEncoder.layout()``):
- ``none``: nothing; the encoder stays frozen (features can be computed once).
- ``last_n``: the last ``last_n`` blocks plus the layers after them (final norm, pooling, projection).
- ``all``: the encoder's tower in use (open_clip image: ``visual.*``; text: everything but
  ``visual.*`` and the logit scale/bias; HF: the whole model), except parts its forward never uses
  (an HF pooler under cls/mean pooling), so "trainable" means "can change".

Frozen parts always stay in eval mode (dropout off, norm statistics fixed) and are bit-identical
after training; trainable modules are in train mode during training steps only.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from encoders.frozen import FrozenEncoder
from encoders.layout import module_at


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def trainable_prefixes(encoder: FrozenEncoder, policy: str, last_n: int = 1) -> list[str]:
    """Names (relative to encoder.module) of what a policy unfreezes; validates last_n."""
    if policy == "none":
        return []
    layout = encoder.layout()
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


def encoder_blocks(encoder: FrozenEncoder) -> list[nn.Module]:
    """The encoder's repeated blocks in forward order (what ``last_n`` counts)."""
    return [encoder.module.get_submodule(n) for n in encoder.layout().blocks]


def apply_unfreeze(encoder: FrozenEncoder, policy: str, last_n: int = 1) -> list[str]:
    """Set requires_grad per policy (everything else False) and return the trainable parameter names.

    The whole module is left in eval mode; ``EncoderPart.train_mode`` switches trainable modules on.
    """
    prefixes = trainable_prefixes(encoder, policy, last_n)
    exclude = encoder.layout().exclude if prefixes else []
    names = []
    encoder.module.eval()
    for name, p in encoder.module.named_parameters():
        on = bool(prefixes) and _under(name, prefixes) and not _under(name, exclude)
        p.requires_grad_(on)
        if on:
            names.append(name)
    return names


class EncoderPart:
    """The encoder tensors a policy lets change (parameters and buffers such as BatchNorm statistics).

    It has ``state_dict`` / ``load_state_dict`` like a module, so the training loop checkpoints it and
    keeps it at the best epoch; artifacts save exactly these keys.
    """

    def __init__(self, encoder: FrozenEncoder, policy: str, last_n: int):
        self.encoder = encoder
        self.prefixes = trainable_prefixes(encoder, policy, last_n)  # validates last_n before any work
        self.exclude = encoder.layout().exclude if self.prefixes else []
        self.keys = [k for k in encoder.module.state_dict() if _under(k, self.prefixes) and not _under(k, self.exclude)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = self.encoder.module.state_dict()
        return {k: sd[k].detach().clone() for k in self.keys}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            missing = set(self.keys) - set(state)
            if missing:
                raise ValueError(f"checkpoint lacks encoder tensors {sorted(missing)[:5]}")
            self.encoder.module.load_state_dict(state, strict=False)

    def train_mode(self, training: bool) -> None:
        """Frozen parts always eval; unfrozen modules train() during training steps."""
        module = self.encoder.module
        module.eval()
        if not training:
            return
        for name in self.prefixes:
            obj = module_at(module, name)  # None for a bare parameter such as visual.proj
            if obj is not None:
                obj.train()
        for name in self.exclude:
            module.get_submodule(name).eval()
        if self.encoder.freeze_bn_stats:  # BatchNorm keeps its pretrained statistics; its scale and shift still train
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


class GradCheckpointing:
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
