"""Image decoding with per-item errors that say what went wrong, so one bad file never sinks a run.

Every image reaches the encoders as 8-bit RGB, or is refused for this item with a reason:

- Size: the header's width x height is checked against a pixel cap *before* decoding (default
  64 MP, ~190 MB as RGB; ``XMODAL_MAX_IMAGE_PIXELS`` or ``max_pixels`` changes it). Measured
  before the cap: a 12000x12000 PNG decoded and cost +700 MB; a 20000x20000 one raised PIL's
  ``DecompressionBombError``, which aborted the whole run at the same row on every rerun.
- 16-bit grey (``I;16*``, or ``I`` from a PNG): scaled to 8 bits by value/257, rounded (an 8-bit
  image stored as 16 bits, v*257, comes back exactly). PIL's own ``convert("RGB")`` clips at 255,
  which turned a 16-bit image into a 0/255 mask: an embedding of another image.
- Transparency (``RGBA``, ``LA``, ``P`` with a transparent colour): composited over white, the
  usual page a sketch or logo is drawn on. Dropping alpha, as ``convert("RGB")`` does, shows
  whatever colour the transparent pixels happen to hold (often black: black strokes vanish).
- ``CMYK``, ``P``, ``1``, ``L``, ``YCbCr``: PIL's conversion, which is exact for these.
- ``F`` (float) and ``I`` (32-bit int) from other formats: their value range is not known, so
  they are refused rather than guessed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from encoders.frozen import BadInput

DEFAULT_MAX_PIXELS = 64_000_000
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_PIL_CONVERTS = ("RGB", "L", "1", "P", "CMYK", "YCbCr")


def pixel_cap() -> int:
    """The pixel cap: ``XMODAL_MAX_IMAGE_PIXELS`` if set, else 64 MP."""
    raw = os.environ.get("XMODAL_MAX_IMAGE_PIXELS")
    try:
        return int(raw) if raw else DEFAULT_MAX_PIXELS
    except ValueError:
        raise ValueError(f"XMODAL_MAX_IMAGE_PIXELS={raw!r} is not a whole number of pixels") from None


def load_rgb(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Decode fully now (PIL is lazy) so corruption surfaces here, attributed to this item."""
    path = Path(path)
    cap = max_pixels or pixel_cap()
    if not path.is_file():
        raise BadInput(f"missing file {path}")
    if Image.MAX_IMAGE_PIXELS and cap > Image.MAX_IMAGE_PIXELS:  # a user's higher cap must not meet PIL's first
        Image.MAX_IMAGE_PIXELS = cap
    try:
        with warnings.catch_warnings():  # our cap decides; PIL's warning below its own hard limit is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > cap:
                    raise BadInput(_too_large(path, w, h, cap))
                img.load()
                return to_rgb(img, path)
    except Image.DecompressionBombError as exc:  # PIL refuses before we could read the size
        raise BadInput(f"image too large {path}: {exc}; the cap is {cap:,} pixels "
                       "(downscale it, or raise XMODAL_MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"corrupt image {path}: {exc}") from None


def to_rgb(img: Image.Image, path: str | Path = "<image>") -> Image.Image:
    """8-bit RGB from any PIL mode, or BadInput naming the mode that cannot be converted faithfully."""
    mode = img.mode
    if mode in _SIXTEEN_BIT or (mode == "I" and img.format == "PNG"):
        a = np.asarray(img).astype(np.uint32)  # (H, W), 0..65535
        return Image.fromarray(((a + 128) // 257).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA:
        rgba = img.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(page, rgba).convert("RGB")
    if mode in _PIL_CONVERTS:
        return img.convert("RGB")
    raise BadInput(f"unsupported image mode {mode!r} in {path} ({img.format or 'unknown format'}): its value "
                   "range is not known; convert it to 8-bit RGB or greyscale first")


def _too_large(path: Path, w: int, h: int, cap: int) -> str:
    return (f"image too large {path}: {w}x{h} = {w * h:,} pixels, over the {cap:,}-pixel cap "
            "(downscale it, or raise XMODAL_MAX_IMAGE_PIXELS)")
