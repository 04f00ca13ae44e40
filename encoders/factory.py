"""Spec -> frozen encoder. Every caller (extraction, search, stage 2) comes through here."""

from __future__ import annotations

from encoders.frozen import FrozenEncoder
from encoders.spec import EncoderSpec


def load_encoder(spec: str | EncoderSpec) -> FrozenEncoder:
    spec = EncoderSpec.parse(spec)
    if spec.backend == "open_clip":
        from encoders.backends.open_clip import OpenClipEncoder

        return OpenClipEncoder(spec)
    if spec.backend == "timm":
        from encoders.backends.timm import TimmEncoder

        return TimmEncoder(spec)
    from encoders.backends.hf import HFEncoder

    return HFEncoder(spec)
