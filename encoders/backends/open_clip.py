"""open_clip towers (image or text) as frozen encoders: any architecture, any weights source.

Weights: a pretrained tag (must already be in the local Hugging Face cache unless the spec allows
downloads), a local checkpoint file (.safetensors or a torch file loaded with weights_only=True),
an open_clip ``local-dir:`` folder, or nothing (random init from ``spec.seed``). The model name may
also be a path to an open_clip model-config JSON, which is how small custom towers are named.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoders.frozen import BadInput, EncoderUnavailable, FrozenEncoder, WeightsOrigin, pick_device
from encoders.images import load_rgb
from encoders.pixels import split_transform
from encoders.layout import EncoderLayout, children, first_present, hf_layout, module_at, timm_layout
from encoders.spec import EncoderSpec


def _resolve_arch(model: str) -> str:
    """A path to a model-config JSON registers that config under its file stem."""
    import open_clip

    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise EncoderUnavailable(f"open_clip model config {model!r} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if not model.startswith(("local-dir:", "hf-hub:")) and model not in open_clip.list_models():
        raise EncoderUnavailable(
            f"open_clip has no architecture {model!r}; pass a built-in name (e.g. ViT-B-32), "
            "'local-dir:/path/to/folder', or a path to a model-config .json"
        )
    return model


def _resolve_weights(arch: str, weights: str | None, allow_download: bool) -> tuple[str | None, WeightsOrigin]:
    """Turn a tag into a local file before open_clip sees it, so an offline machine never waits on the network."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    if arch.startswith("local-dir:"):
        folder = Path(arch.split(":", 1)[1])
        if not folder.is_dir():
            raise EncoderUnavailable(f"open_clip local-dir {folder} does not exist")
        has_weights = any(folder.glob("open_clip_model.safetensors")) or any(folder.glob("open_clip_pytorch_model.bin"))
        return None, "checkpoint" if has_weights else "random-init"
    if weights is None:
        return None, "random-init"
    if Path(weights).is_file():
        return weights, "checkpoint"
    cfg = open_clip.get_pretrained_cfg(arch, weights)
    if not cfg:
        if "/" in weights or weights.endswith((".pt", ".bin", ".safetensors")):
            raise EncoderUnavailable(f"open_clip checkpoint file {weights!r} does not exist")
        raise EncoderUnavailable(
            f"open_clip has no pretrained tag {weights!r} for {arch}; known tags: "
            f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}"
        )
    if allow_download:
        return weights, "pretrained"
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)  # open_clip's 'org/repo/file' or 'org/repo/' convention
        filename = filename or "open_clip_pytorch_model.bin"
        stem = filename.rsplit(".", 1)[0]
        for candidate in ("open_clip_model.safetensors", f"{stem}.safetensors", filename):
            cached = try_to_load_from_cache(repo, candidate)
            if isinstance(cached, str):
                return cached, "pretrained"
    raise EncoderUnavailable(
        f"open_clip weights '{arch}@{weights}' are not on this machine and downloads are off. "
        f"Pass a local file instead: 'open_clip:<tower>:{arch}@/path/to/open_clip_model.safetensors', "
        "or allow the download with '?allow_download=true' on a machine with network access."
    )


class OpenClipEncoder(FrozenEncoder):
    def __init__(self, spec: EncoderSpec):
        import open_clip

        self.spec = spec
        self.device = pick_device(spec.device)
        arch = _resolve_arch(spec.model)
        weights, origin = _resolve_weights(arch, spec.weights, spec.allow_download)
        torch.manual_seed(spec.seed)  # random-init towers are reproducible, so stores can resume
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch,
                pretrained=weights,
                pretrained_text=False,  # never fetch base text-tower weights behind the user's back
                weights_only=True,
            )
        except RuntimeError as exc:  # open_clip's messages list every model; keep ours short
            raise EncoderUnavailable(f"open_clip could not build {arch!r} with weights {weights!r}: {str(exc)[:300]}") from None
        self.preprocess, self.pixel_norm = split_transform(preprocess) if spec.tower == "image" else (preprocess, None)
        self.tokenizer = open_clip.get_tokenizer(arch) if spec.tower == "text" else None
        if weights is None and origin == "random-init":
            logging.getLogger(__name__).warning("%s has RANDOM weights (no pretrained tag or checkpoint)", spec)
        self._finish(model, origin)

    def load_item(self, raw: Any) -> Any:
        if self.spec.tower == "image":
            return self.preprocess(load_rgb(raw))  # (3, H, W) uint8 (encoders/pixels.py)
        return _check_text(raw)

    def collate(self, items: list[Any]) -> Any:
        if self.spec.tower == "image":
            return torch.stack(items).to(self.device)  # (B, 3, H, W)
        return self.tokenizer(items).to(self.device)  # (B, context_length)

    def forward(self, batch: Any) -> torch.Tensor:
        if self.spec.tower == "image":
            return self.module.encode_image(self.pixels(batch))
        return self.module.encode_text(batch)

    def layout(self) -> EncoderLayout:
        """Image: ViT, ModifiedResNet or a timm trunk under ``visual``; text: CLIP's top-level text tower or
        a ``text`` submodule (CustomTextCLIP / CoCa, incl. an HF text model)."""
        if self.spec.tower == "image":
            return _image_layout(self.module, str(self.spec))
        m = self.module
        if hasattr(m, "text"):  # CustomTextCLIP / CoCa: the text tower is a submodule
            if isinstance(module_at(m, "text.transformer.resblocks"), nn.ModuleList):
                return EncoderLayout(children(m, "text.transformer.resblocks"),
                                     first_present(m, ["text.ln_final", "text.text_projection"]), ["text"])
            if isinstance(getattr(m.text, "transformer", None), nn.Module):  # open_clip HFTextEncoder
                blocks, post, exclude = hf_layout(m, "text.transformer", "cls", str(self.spec))
                return EncoderLayout(blocks, post + first_present(m, ["text.proj", "text.pooler"]), ["text"], exclude)
            raise ValueError(f"cannot find the blocks of open_clip text tower {type(m.text).__name__} ({self.spec})")
        # classic CLIP: the text tower's parameters live at the top level, beside `visual`
        tower = [n for n, _ in m.named_children() if n != "visual"]
        tower += [n for n, _ in m.named_parameters(recurse=False) if n not in ("logit_scale", "logit_bias")]
        return EncoderLayout(children(m, "transformer.resblocks"), first_present(m, ["ln_final", "text_projection"]), tower)

    def _probe_item(self) -> Any:
        if self.spec.tower == "text":
            return "a probe"
        size = self.module.visual.image_size
        size = size if isinstance(size, (tuple, list)) else (size, size)
        return torch.zeros(3, *size)


def _image_layout(m: nn.Module, what: str) -> EncoderLayout:
    v = m.visual
    if isinstance(module_at(v, "transformer.resblocks"), nn.ModuleList):  # open_clip VisionTransformer
        post = first_present(m, ["visual.attn_pool", "visual.attn_pool_contrastive", "visual.ln_post", "visual.proj"])
        return EncoderLayout(children(m, "visual.transformer.resblocks"), post, ["visual"])
    if all(hasattr(v, f"layer{i}") for i in range(1, 5)):  # ModifiedResNet
        return EncoderLayout([f"visual.layer{i}" for i in range(1, 5)], first_present(m, ["visual.attnpool"]), ["visual"])
    if hasattr(v, "trunk"):  # TimmModel
        blocks, post = timm_layout(m, "visual.trunk", what)
        return EncoderLayout(blocks, post + first_present(m, ["visual.head"]), ["visual"])
    raise ValueError(f"cannot find the blocks of open_clip visual tower {type(v).__name__} ({what})")


def _check_text(raw: Any) -> str:
    if raw is None or (isinstance(raw, float) and raw != raw) or not str(raw).strip():
        raise BadInput("empty text")
    return str(raw)
