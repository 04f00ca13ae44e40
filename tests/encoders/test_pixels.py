"""uint8 transport: decoding stops at uint8 pixels, the model side scales and normalises them, bit for bit."""

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.factory import load_encoder
from encoders.pixels import split_transform


def _photo(seed: int = 0, size=(61, 47)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.mark.parametrize("make", ["open_clip", "timm"])
def test_split_transform_is_bit_identical_to_the_fused_one(make):
    if make == "open_clip":
        import open_clip
        full = open_clip.image_transform(224, is_train=False)
    else:
        from timm.data import create_transform
        full = create_transform(input_size=(3, 64, 64), crop_pct=0.875, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    head, norm = split_transform(full)
    img = _photo()
    pixels = head(img)
    assert pixels.dtype == torch.uint8 and norm is not None
    torch.testing.assert_close(norm(pixels[None], torch.float32)[0], full(img), rtol=0, atol=0)
    float_input = full(img)
    assert norm(float_input, torch.float32) is float_input  # an already normalised tensor passes through


def test_a_transform_of_another_shape_is_kept_whole():
    from torchvision import transforms as T

    odd = T.Compose([T.Resize(8), T.ToTensor()])
    assert split_transform(odd) == (odd, None)


def test_encoder_on_uint8_items_equals_encoder_on_the_fused_transform(tmp_path, tiny_clip_files):
    import open_clip

    enc = load_encoder(f"open_clip:image:{tiny_clip_files['json']}@{tiny_clip_files['safetensors']}")
    full = open_clip.image_transform(enc.module.visual.image_size, is_train=False)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        _photo(i).save(paths[-1])
    from encoders.images import load_rgb

    fused = enc.encode(torch.stack([full(load_rgb(p)) for p in paths]))
    torch.testing.assert_close(enc.encode_items(paths), fused, rtol=0, atol=0)
