"""The stage-1 projector: a small map from source-encoder space to target-encoder space.

Saved as safetensors + a JSON config (no pickle) so a run artifact can be loaded by
anyone without trusting arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from safetensors.torch import load_file, save_file

from projection.config import ProjectorConfig

WEIGHTS_FILE = "projector.safetensors"
CONFIG_FILE = "projector.json"

_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Projector(nn.Module):
    """Linear map or MLP; optional residual path for same-dim spaces.

    For kind='linear', the mlp-only fields (depth, hidden, activation, dropout, layernorm)
    are ignored so a sweep can switch `kind` without touching the rest.
    """

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "linear":
            self.net = nn.Linear(cfg.d_in, cfg.d_out)
        else:
            layers: list[nn.Module] = []
            width = cfg.d_in
            for _ in range(cfg.depth):
                layers.append(nn.Linear(width, cfg.hidden))
                if cfg.layernorm:
                    layers.append(nn.LayerNorm(cfg.hidden))
                layers.append(_ACTIVATIONS[cfg.activation]())
                if cfg.dropout > 0:
                    layers.append(nn.Dropout(cfg.dropout))
                width = cfg.hidden
            layers.append(nn.Linear(width, cfg.d_out))
            self.net = nn.Sequential(*layers)
        # Input standardisation as buffers: saved with the weights, never trained, identity until fitted.
        self.register_buffer("in_mean", torch.zeros(cfg.d_in))
        self.register_buffer("in_std", torch.ones(cfg.d_in))
        self.register_buffer("out_mean", torch.zeros(cfg.d_out))
        self.register_buffer("out_std", torch.ones(cfg.d_out))
        if cfg.residual:
            # Start at y = x: the identity is a strong prior when both spaces share a dim.
            last = self.net if isinstance(self.net, nn.Linear) else self.net[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    @torch.no_grad()
    def fit_stats(self, x, y=None) -> None:
        """Standardise from the training split: inputs (N, D_src) and, unless residual, targets (N, D_tgt).

        With targets standardised the net starts by predicting the target mean and learns only
        the variation around it, which matters when targets differ by a few percent (captions).
        A no-op unless cfg.standardize.
        """
        if not self.cfg.standardize:
            return
        x = torch.as_tensor(x, dtype=torch.float32)
        self.in_mean.copy_(x.mean(0))
        self.in_std.copy_(x.std(0).clamp_min(1e-6))
        if y is not None and not self.cfg.residual:
            y = torch.as_tensor(y, dtype=torch.float32)
            self.out_mean.copy_(y.mean(0))
            self.out_std.copy_(y.std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cfg.standardize:
            y = self.net(x)  # (N, D_src) -> (N, D_tgt)
            return x + y if self.cfg.residual else y
        y = self.net((x - self.in_mean) / self.in_std)  # (N, D_src) -> (N, D_tgt)
        return x + y if self.cfg.residual else y * self.out_std + self.out_mean


def make_projector(cfg: ProjectorConfig, seed: int) -> Projector:
    """Build with a seeded init without disturbing the caller's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Projector(cfg)


def save_projector(model: Projector, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(model.cfg.model_dump(), indent=2))
    return directory


def load_projector(directory: str | Path, device: str | torch.device = "cpu") -> Projector:
    directory = Path(directory)
    cfg = ProjectorConfig.model_validate_json((directory / CONFIG_FILE).read_text())
    model = Projector(cfg)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=str(device)))
    return model.to(device)
