"""Image decoding with per-item errors that say what went wrong, so one bad file never sinks a run."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from encoders.frozen import BadInput


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully now (PIL is lazy) so corruption surfaces here, attributed to this item."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"missing file {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"corrupt image {path}: {exc}") from None
