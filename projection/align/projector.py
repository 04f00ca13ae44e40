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

from projection.align.config import ProjectorConfig
from projection.align.moments import column_moments

WEIGHTS_FILE = "projector.safetensors"
CONFIG_FILE = "projector.json"

_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Projector(nn.Module):
    """Linear map, or MLP beside an affine path (or, for same-dim spaces, the identity: residual).

    The affine path exists so that training can START at the closed-form solution
    (`start_at(A, c)`, the val-tuned ridge) with the MLP branch at zero: the MLP then only
    learns what a linear map cannot explain, and a small or noisy set cannot drag it far
    below ridge. Measured on digits image -> caption (640 train pairs): a plain MLP at the
    old defaults read R@1 0.35 vs ridge 0.65; see benchmarks/defaults.py for every set.
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
        self.skip = nn.Linear(cfg.d_in, cfg.d_out) if cfg.kind == "mlp" and cfg.linear_path and not cfg.residual else None
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
        # Block-wise float64 moments (projection.align.moments): a kept ridge start (float64) made a full
        # float64 copy of the train split here, and torch's std() another centred one.
        mean, std = column_moments(x, ddof=1)
        self.in_mean.copy_(torch.from_numpy(mean))
        self.in_std.copy_(torch.from_numpy(std).clamp_min(1e-6))
        if y is not None and not self.cfg.residual:
            mean, std = column_moments(y, ddof=1)
            self.out_mean.copy_(torch.from_numpy(mean))
            self.out_std.copy_(torch.from_numpy(std).clamp_min(1e-6))

    @torch.no_grad()
    def start_at(self, a, c) -> None:
        """Make the affine path compute x @ a + c (raw spaces; a (D_src, D_tgt), c (D_tgt,)), zero the MLP branch,
        and freeze the path unless cfg.train_linear_path.

        Call after `fit_stats`: the map is rewritten in the standardised coordinates the net sees,
        z = (x - in_mean) / in_std and y = h * out_std + out_mean.
        """
        if self.cfg.residual:
            raise ValueError("start_at needs an affine path; a residual projector starts at the identity")
        a = torch.as_tensor(a, dtype=torch.float64)
        c = torch.as_tensor(c, dtype=torch.float64)
        in_mean, in_std = self.in_mean.double(), self.in_std.double()
        out_mean, out_std = self.out_mean.double(), self.out_std.double()
        weight = (in_std[:, None] * a / out_std[None, :]).T  # (D_tgt, D_src)
        bias = (in_mean @ a + c - out_mean) / out_std  # (D_tgt,)
        path = self.skip if self.skip is not None else self.net
        path.weight.copy_(weight)
        path.bias.copy_(bias)
        if self.skip is not None:
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)
            # held at the closed-form map unless asked otherwise: the MLP branch learns the residual
            self.skip.requires_grad_(self.cfg.train_linear_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.in_mean.dtype)  # a no-op but for a float64 projector (a kept ridge start)
        z = (x - self.in_mean) / self.in_std if self.cfg.standardize else x
        y = self.net(z)  # (N, D_src) -> (N, D_tgt)
        if self.skip is not None:
            y = y + self.skip(z)
        if self.cfg.residual:
            return x + y
        return y * self.out_std + self.out_mean if self.cfg.standardize else y


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
    state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    model.to(state["in_mean"].dtype)  # float64 when the run kept the ridge start (projection.align.fit)
    model.load_state_dict(state)
    return model.to(device)
