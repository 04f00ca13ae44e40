"""Tiny models saved to disk exactly as a user's checkpoint or directory would be."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests_support import TINY_VIT


@pytest.fixture(scope="session")
def tiny_clip_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny open_clip CLIP with known weights, as a .safetensors file, a .pt file and a local-dir folder."""
    import open_clip
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tiny_clip")
    open_clip.add_model_config(TINY_VIT)
    torch.manual_seed(1234)
    model = open_clip.create_model(TINY_VIT.stem, pretrained=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, d / "tiny.safetensors")
    torch.save(state, d / "tiny.pt")
    folder = d / "local"
    folder.mkdir()
    cfg = json.loads(TINY_VIT.read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(state, folder / "open_clip_model.safetensors")
    return {"json": TINY_VIT, "safetensors": d / "tiny.safetensors", "pt": d / "tiny.pt", "dir": folder,
            "model": model}


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    words = "a the handwritten digit zero one two three four five six seven eight nine cat dog photo of".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    d = tmp_path_factory.mktemp("tiny_hf_vit")
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64)
    ViTModel(cfg).save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture
def write_images():
    """Random RGB PNGs in a folder; returns their paths relative to the folder's parent."""
    return _write_images


def _write_images(folder: Path, n: int, seed: int = 0, size: int = 32) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        name = f"img_{i:04d}.png"
        Image.fromarray(arr).save(folder / name)
        names.append(f"{folder.name}/{name}")
    return names
