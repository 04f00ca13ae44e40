"""open_clip image towers for contrastive training: a pair of towers (or one shared), saved as encoders.

A saved tower is an open_clip ``local-dir`` folder, so the rest of xmodal loads it like any other
encoder: ``load_encoder(tower_spec(folder))``. Its ``preprocess_cfg`` is written with it, so the
loader rebuilds the identical eval transform and the saved tower reproduces the trained embeddings.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from projection.contrastive.config import ContrastiveConfig

WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"


def _create_clip(model_cfg: dict, name: str, seed: int) -> nn.Module:
    """A full open_clip CLIP from a model-config dict, seeded, built the way the encoder loader builds it.

    The caller's global RNG is left untouched.
    """
    import open_clip

    with tempfile.TemporaryDirectory() as d:  # open_clip registers configs by file stem
        path = Path(d) / f"{name}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(name, pretrained=None, pretrained_text=False)


class DualEncoder(nn.Module):
    """Two open_clip image towers (or one shared), each followed by L2 normalisation.

    tower a embeds modality A (e.g. photos), tower b modality B (e.g. sketches); with
    towers='shared' both names refer to the same module.
    """

    def __init__(self, model_cfg: dict, towers: Literal["two", "shared"] = "two", seed: int = 0,
                 tie_init: bool = False, name: str = "xmodal-contrastive"):
        super().__init__()
        self.model_cfg = dict(model_cfg)
        self.name = name
        self.shared = towers == "shared"
        self.seeds = {"a": seed, "b": seed if (self.shared or tie_init) else seed + 1}
        clip_a = _create_clip(self.model_cfg, name, self.seeds["a"])
        self.preprocess_cfg = dict(clip_a.visual.preprocess_cfg)  # size, mean, std, interpolation, ...
        self.tower_a = clip_a.visual
        if not self.shared:
            self.tower_b = _create_clip(self.model_cfg, name, self.seeds["b"]).visual
        self.embed_dim = int(self.model_cfg["embed_dim"])

    @classmethod
    def from_config(cls, cfg: ContrastiveConfig) -> "DualEncoder":
        return cls(cfg.model_cfg(), cfg.towers, cfg.seed, cfg.tie_init, Path(cfg.model_json).stem)

    def tower(self, which: Literal["a", "b"]) -> nn.Module:
        if which not in ("a", "b"):
            raise ValueError(f"tower must be 'a' or 'b', got {which!r}")
        return self.tower_a if (which == "a" or self.shared) else self.tower_b

    def encode(self, x: torch.Tensor, which: Literal["a", "b"]) -> torch.Tensor:
        return F.normalize(self.tower(which)(x), dim=-1)  # (B, 3, H, W) -> (B, D)

    def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared:  # one pass, so BatchNorm sees both modalities together
            z = self.encode(torch.cat([xa, xb]), "a")  # (2B, D)
            return z[: xa.shape[0]], z[xa.shape[0]:]
        return self.encode(xa, "a"), self.encode(xb, "b")

    def transform(self):
        """open_clip's eval transform for this model's preprocess_cfg: what the encoder loader will use."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)


def save_tower(dual: DualEncoder, which: Literal["a", "b"], out_dir: str | Path) -> Path:
    """Write tower `which` as an open_clip local-dir folder: open_clip_config.json + open_clip_model.safetensors.

    The weights file holds a full CLIP state dict (the loader loads strictly): `visual.*` is the trained
    tower, the text tower is the same seeded random init (unused, but required by the format).
    Load it with ``encoders.factory.load_encoder(f"open_clip:image:local-dir:{out_dir}")``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clip = _create_clip(dual.model_cfg, dual.name, dual.seeds[which])
    clip.visual.load_state_dict(dual.tower(which).state_dict())
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in clip.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "xmodal.tower": which})
    os.replace(tmp, out / WEIGHTS_FILE)
    cfg = {"model_cfg": dual.model_cfg, "preprocess_cfg": _jsonable(dual.preprocess_cfg)}
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2))
    os.replace(tmp, out / CONFIG_FILE)
    return out


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def tower_spec(out_dir: str | Path) -> str:
    """The encoder spec that loads a saved tower."""
    return f"open_clip:image:local-dir:{Path(out_dir).resolve()}"


@torch.no_grad()
def embed(model: DualEncoder, images: torch.Tensor, which: Literal["a", "b"], batch_size: int = 512,
          device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, 3, H, W) -> (N, D) L2-normalised embeddings on the CPU, eval mode."""
    model.eval().to(device)
    if len(images) == 0:
        return torch.empty(0, model.embed_dim)
    return torch.cat([model.encode(images[s:s + batch_size].to(device), which).cpu()
                      for s in range(0, len(images), batch_size)])
