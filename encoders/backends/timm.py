"""timm image models as frozen encoders: ``timm:image:<architecture>[.<tag>][@<weights>]``.

Weights, in this order:
- ``@/path/file.safetensors`` (or a torch file, read with ``weights_only=True``): a local
  checkpoint in timm's names; origin ``checkpoint``. A classifier in the file is kept at its own
  size, a file without one gives a features-only model.
- ``<architecture>.<tag>`` with no ``@``: pretrained. From the local Hugging Face cache when timm's
  hub repo for that tag is there; else from a packaged copy (``encoders/backends/timm_packaged.py``:
  ``tf_efficientnet_lite0.in1k``, ``mobilenetv2_100.deepsort_in1k``); else it fails at once,
  without touching the network, unless ``allow_download=true``. Origin ``pretrained``.
- ``<architecture>`` alone: RANDOM init from ``spec.seed`` (labelled so everywhere).

Preprocessing is timm's own (``resolve_data_config`` + ``create_transform``: resize, centre crop,
the model's mean/std; EfficientNet-Lite0: 224, mean = std = 0.5). ``image_size=N`` resizes the
whole image to N x N instead (no crop), for small inputs. The embedding is the pooled pre-logits
feature, ``forward_head(forward_features(x), pre_logits=True)``: 1280-d for Lite0 and MobileNetV2.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoders.frozen import EncoderUnavailable, FrozenEncoder, WeightsOrigin, pick_device
from encoders.images import load_rgb
from encoders.pixels import split_transform
from encoders.layout import EncoderLayout
from encoders.spec import EncoderSpec
from encoders.backends.timm_packaged import PACKAGED, packaged_weights

_STACKS = ("blocks", "stages", "layers")  # timm's names for the repeated-block container


def _hub_cached(name: str) -> Path | None:
    """timm's hub file for ``arch.tag`` when it is already in the local Hugging Face cache."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    hub = (timm.models.get_pretrained_cfg(name) or {}) and timm.models.get_pretrained_cfg(name).hf_hub_id
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(hub, filename) if hub else None
        if isinstance(cached, str):
            return Path(cached)
    return None


def resolve_weights(spec: EncoderSpec) -> tuple[str, Path | None, WeightsOrigin, str]:
    """(timm name to build, weights file or None, origin, provenance); never touches the network."""
    import timm

    arch, _, tag = spec.model.partition(".")
    if not timm.is_model(arch):
        raise EncoderUnavailable(f"timm has no architecture {arch!r} (spec {spec}); see timm.list_models()")
    known = spec.model in timm.list_pretrained(f"{arch}.*")
    build = spec.model if known else arch
    if spec.weights:
        path = Path(spec.weights).expanduser()
        if not path.is_file():
            raise EncoderUnavailable(f"timm checkpoint file {spec.weights!r} does not exist")
        return build, path, "checkpoint", f"file {path}"
    if not tag:
        return arch, None, "random-init", ""
    if not known and spec.model not in PACKAGED:
        raise EncoderUnavailable(f"timm has no pretrained tag {tag!r} for {arch}; known: "
                                 f"{', '.join(timm.list_pretrained(f'{arch}.*')) or 'none'}, packaged: {', '.join(PACKAGED)}")
    cached = _hub_cached(spec.model) if known else None
    if cached is not None:
        return build, cached, "pretrained", f"hub cache {cached}"
    packaged = packaged_weights(spec.model)
    if packaged is not None:
        return build, packaged[0], "pretrained", packaged[1]
    if spec.allow_download:
        return build, None, "pretrained", f"downloaded by timm ({spec.model})"
    raise EncoderUnavailable(
        f"timm weights {spec.model!r} are not on this machine and downloads are off. Pass a local file "
        f"instead: 'timm:image:{arch}@/path/to/model.safetensors', or add '?allow_download=true' where the "
        "network is reachable."
    )


def _classifier_names(model: nn.Module) -> list[str]:
    names = model.pretrained_cfg.get("classifier") or []
    return [names] if isinstance(names, str) else list(names)


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    """timm's own reader (safetensors or weights_only torch); the classifier follows the file."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear line
        raise EncoderUnavailable(f"cannot read timm checkpoint {path}: {str(exc)[:200]}") from None
    heads = [state[f"{c}.weight"] for c in _classifier_names(model) if f"{c}.weight" in state]
    if not heads:
        model.reset_classifier(0)
    elif heads[0].shape[0] != model.num_classes:
        model.reset_classifier(heads[0].shape[0])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EncoderUnavailable(f"{path} does not fit timm {type(model).__name__}: {str(exc)[:300]}") from None


class TimmEncoder(FrozenEncoder):
    # Measured on the demo's stage 2 (Lite0 at 64 px, last block unfrozen, 400 Fashion-MNIST train
    # images, 2 epochs, batch 32, 49 test images): BatchNorm in train mode 0.47 test accuracy, below
    # the frozen-feature head's 0.63; with the pretrained statistics kept, 0.78.
    freeze_bn_stats = True
    def __init__(self, spec: EncoderSpec):
        import timm
        from timm.data import create_transform, resolve_data_config

        if spec.tower != "image":
            raise EncoderUnavailable(f"timm models are image encoders; got tower {spec.tower!r} in {spec}")
        self.spec = spec
        self.device = pick_device(spec.device)
        build, path, origin, self.source = resolve_weights(spec)
        torch.manual_seed(spec.seed)  # random-init towers are reproducible, so stores can resume
        download = origin == "pretrained" and path is None
        model = timm.create_model(build, pretrained=download)
        if path is not None:
            _load_checkpoint(model, path)
        if origin == "random-init":
            logging.getLogger(__name__).warning("%s has RANDOM weights (no pretrained tag or checkpoint)", spec)
        cfg = resolve_data_config({}, model=model)
        if spec.image_size:
            cfg |= {"input_size": (3, spec.image_size, spec.image_size), "crop_pct": 1.0}
        self.data_config = cfg
        self.preprocess, self.pixel_norm = split_transform(create_transform(**cfg))
        self._finish(model, origin)

    def load_item(self, raw: Any) -> Any:
        return self.preprocess(load_rgb(raw))  # (3, H, W) uint8 (encoders/pixels.py)

    def collate(self, items: list[Any]) -> Any:
        return torch.stack(items).to(self.device)  # (B, 3, H, W)

    def forward(self, batch: Any) -> torch.Tensor:
        m = self.module
        return m.forward_head(m.forward_features(self.pixels(batch)), pre_logits=True)  # (B, num_features)

    def _probe_item(self) -> Any:
        return torch.zeros(self.data_config["input_size"])

    def layout(self) -> EncoderLayout:
        """What stage 2 unfreezes, by name: the block stack (``blocks``/``stages``/``layers``, or
        ResNet's ``layer1..4``), the parts after it (head conv, final norm), and the classifier,
        which the pre-logits embedding never uses (kept out of training)."""
        m = self.module
        children = [n for n, _ in m.named_children()]
        stack = next((s for s in _STACKS if isinstance(getattr(m, s, None), (nn.Sequential, nn.ModuleList))), None)
        if stack is not None:
            blocks, last = [f"{stack}.{i}" for i in range(len(getattr(m, stack)))], stack
        else:
            blocks = [n for n in children if n.startswith("layer") and n[5:].isdigit()]
            if not blocks:
                raise ValueError(f"cannot find the blocks of timm {type(m).__name__} ({self.spec})")
            last = blocks[-1]
        after = children[children.index(last) + 1:]
        post = [n for n in after if any(True for _ in getattr(m, n).parameters())]
        exclude = [c for c in _classifier_names(m) if any(True for _ in m.get_submodule(c).parameters())]
        return EncoderLayout(blocks, post, [""], exclude)
