"""One way to name a frozen encoder: a spec string or the equivalent typed config.

Grammar (round-trips through ``str(spec)``)::

    <backend>:<tower>:<model>[@<weights>][?key=value&key=value]

    open_clip:image:ViT-B-32@laion2b_s34b_b79k      pretrained tag
    open_clip:image:ViT-B-32@/ckpt/model.safetensors local checkpoint file
    open_clip:image:ViT-B-32                        random init (labelled as such everywhere)
    open_clip:text:local-dir:/models/my-clip         open_clip folder (open_clip_config.json + weights)
    hf:text:sentence-transformers/all-MiniLM-L6-v2?pooling=mean
    hf:image:/models/my-vit?pooling=cls
    timm:image:tf_efficientnet_lite0.in1k?image_size=96   timm name.tag (hub cache or packaged copy)
    timm:image:resnet18@/ckpt/resnet18.safetensors        timm architecture + local checkpoint

A string is what people paste into a CLI or the Prefect UI; the pydantic model is what code and
forms validate. Both carry the same fields, so a run can always be reproduced from its spec.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qsl, urlencode

from pydantic import BaseModel, ConfigDict, Field

Backend = Literal["open_clip", "hf", "timm"]
# Options that go into the query string; everything else is positional.
_QUERY = ("pooling", "normalize", "dtype", "device", "batch_size", "seed", "trust_remote_code", "allow_download",
          "image_size")
Tower = Literal["image", "text"]


class EncoderSpec(BaseModel):
    """A frozen encoder: which model, which tower, which weights, and how to run it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Backend = Field(description="'open_clip', 'hf' (Hugging Face transformers AutoModel) or 'timm'.")
    tower: Tower = Field(description="Which modality this encoder embeds: 'image' or 'text'.")
    model: str = Field(
        description="open_clip architecture name (e.g. ViT-B-32) or 'local-dir:/path'; "
        "for hf a hub id or a local directory; for timm '<architecture>[.<pretrained tag>]'."
    )
    weights: str | None = Field(
        default=None,
        description="open_clip: a pretrained tag, a local checkpoint file, or empty for random init; "
        "timm: a local checkpoint file (the pretrained tag goes in the model name).",
    )
    pooling: Literal["cls", "mean", "pooler"] = Field(
        default="cls", description="hf only: how token states become one vector."
    )
    normalize: bool = Field(default=True, description="L2-normalise embeddings (cosine geometry).")
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="Compute dtype: weights and inputs cast once, norms and the final L2 normalisation in fp32. "
        "bf16 on a GPU without bf16 computes in fp16 (recorded as the store's compute_dtype).",
    )
    device: str = Field(default="auto", description="'auto' picks cuda, then mps, then cpu.")
    batch_size: int = Field(default=64, ge=1, description="Items per forward pass.")
    seed: int = Field(default=0, description="Seed for random-init weights, so reruns are identical.")
    trust_remote_code: bool = Field(
        default=False, description="hf only: run model code from the hub repo. Off unless you trust it."
    )
    allow_download: bool = Field(
        default=False,
        description="Let a missing hub model be downloaded. Off: offline machines fail fast instead.",
    )

    image_size: int | None = Field(
        default=None, ge=8,
        description="timm only: resize the whole image to this square size instead of the model's own "
        "resize-and-crop (small inputs such as 28x28 Fashion-MNIST lose nothing at 96 and cost ~1/5 of 224).",
    )

    @classmethod
    def parse(cls, text: str | EncoderSpec) -> EncoderSpec:
        if isinstance(text, EncoderSpec):
            return text
        body, _, query = text.strip().partition("?")
        parts = body.split(":", 2)
        if len(parts) != 3 or not parts[2]:
            raise ValueError(
                f"encoder spec {text!r} is not '<backend>:<tower>:<model>[@weights][?opts]', "
                "e.g. 'open_clip:image:ViT-B-32@laion2b_s34b_b79k' or 'hf:text:/models/minilm?pooling=mean'"
            )
        backend, tower, model = parts
        weights = None
        # '@' separates open_clip weights; hf ids and paths do not contain '@'.
        if "@" in model:
            model, weights = model.split("@", 1)
        fields: dict = {"backend": backend, "tower": tower, "model": model, "weights": weights or None}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key not in _QUERY:
                raise ValueError(f"encoder spec {text!r}: unknown option {key!r} (known: {', '.join(_QUERY)})")
            fields[key] = value  # pydantic coerces "true"/"64" to the field type
        return cls(**fields)

    def __str__(self) -> str:
        text = f"{self.backend}:{self.tower}:{self.model}"
        if self.weights:
            text += f"@{self.weights}"
        defaults = EncoderSpec.model_construct()
        opts = {}
        for key in _QUERY:
            if key == "pooling" and self.backend != "hf":
                continue
            value = getattr(self, key)
            if value != getattr(defaults, key, EncoderSpec.model_fields[key].default):
                opts[key] = str(value).lower() if isinstance(value, bool) else value
        return text + (f"?{urlencode(opts)}" if opts else "")

    @property
    def identity(self) -> str:
        """What determines the embeddings (not how fast they are made): store reuse keys on this."""
        return str(self.model_copy(update={"device": "auto", "batch_size": 64, "allow_download": False}))

    @property
    def slug(self) -> str:
        """A filesystem-safe short name for store files."""
        import hashlib

        base = f"{self.backend}-{self.tower}-{self.model.rstrip('/').split('/')[-1]}"
        base = "".join(c if c.isalnum() or c in "-_." else "-" for c in base)
        return f"{base}-{hashlib.sha256(self.identity.encode()).hexdigest()[:8]}"
