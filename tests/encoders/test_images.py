"""Image decoding: every mode reaches the encoder as the right 8-bit RGB, or is refused for that item."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from encoders.extract import extract
from encoders.factory import load_encoder
from encoders.frozen import BadInput
from encoders.images import load_rgb
from encoders.manifest import Manifest


@pytest.fixture(scope="module")
def image_encoder(tiny_clip_files):
    return load_encoder(f"open_clip:image:{tiny_clip_files['json']}@{tiny_clip_files['safetensors']}?batch_size=8")


def _grey(seed: int = 0, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A small real PNG whose header claims width x height: what a decompression bomb looks like before decoding."""
    Image.fromarray(_grey()).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def test_sixteen_bit_png_gives_the_same_embedding_input_as_its_8_bit_original(tmp_path, image_encoder):
    g8 = _grey()
    Image.fromarray(g8, "L").save(tmp_path / "g8.png")
    Image.fromarray(g8.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # the same picture, 16 bits
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # really stored as 16-bit
        naive = np.asarray(im.convert("RGB"))
    assert set(np.unique(naive)) <= {0, 255} and not np.array_equal(naive[..., 0], g8)  # PIL alone: a mask
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "g16.png")), np.asarray(load_rgb(tmp_path / "g8.png")))
    x8, x16 = (image_encoder.load_item(str(tmp_path / n)) for n in ("g8.png", "g16.png"))
    assert torch.equal(x8, x16)


def test_transparency_is_composited_on_white_and_other_modes_convert_exactly(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)  # transparent black everywhere ...
    rgba[2:4, 2:4] = (200, 10, 10, 255)  # ... except an opaque red square
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = np.asarray(load_rgb(tmp_path / "rgba.png"))
    assert (out[0, 0] == 255).all() and tuple(out[2, 2]) == (200, 10, 10)

    la = Image.fromarray(np.stack([_grey(1, 8), np.full((8, 8), 255, np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "la.png"))[..., 0], _grey(1, 8))

    rgb = np.random.default_rng(2).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode == "P"
        want = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "p.png")), want)

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    assert load_rgb(tmp_path / "cmyk.jpg").mode == "RGB"


def test_float_images_are_refused_by_name_not_guessed(tmp_path):
    Image.fromarray(np.linspace(0, 3.5, 64, dtype=np.float32).reshape(8, 8), "F").save(tmp_path / "f.tif")
    with pytest.raises(BadInput, match=r"unsupported image mode 'F' in .*f\.tif"):
        load_rgb(tmp_path / "f.tif")


def test_huge_images_are_error_rows_and_the_rest_of_the_run_is_embedded(tmp_path, image_encoder, monkeypatch):
    Image.fromarray(_grey(3, 40)).save(tmp_path / "ok.png")
    Image.fromarray(_grey(4, 80)).save(tmp_path / "big.png")  # 6400 px: over the cap set below
    _png_declaring(tmp_path / "bomb.png", 20000, 20000)  # PIL's own DecompressionBombError territory
    _png_declaring(tmp_path / "wide.png", 12000, 12000)  # under PIL's limit: decoded before (+700 MB)
    m = tmp_path / "manifest.csv"
    pd.DataFrame({"id": ["ok", "big", "bomb", "wide"],
                  "image": ["ok.png", "big.png", "bomb.png", "wide.png"]}).to_csv(m, index=False)

    s = extract(Manifest.read(m), "image", image_encoder, tmp_path / "default.h5")  # default cap, 64 MP
    reasons = dict(s.errors)
    assert s.n == 2 and set(reasons) == {"bomb", "wide"}
    assert "image too large" in reasons["bomb"] and "400000000 pixels" in reasons["bomb"]
    assert "64,000,000 pixels" in reasons["bomb"] and "XMODAL_MAX_IMAGE_PIXELS" in reasons["bomb"]
    assert "12000x12000 = 144,000,000 pixels, over the 64,000,000-pixel cap" in reasons["wide"]

    monkeypatch.setenv("XMODAL_MAX_IMAGE_PIXELS", "5000")
    s = extract(Manifest.read(m), "image", image_encoder, tmp_path / "capped.h5")
    assert s.n == 1 and {i for i, _ in s.errors} == {"big", "bomb", "wide"}
    assert "80x80 = 6,400 pixels, over the 5,000-pixel cap" in dict(s.errors)["big"]
