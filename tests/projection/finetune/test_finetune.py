"""Stage-2 fine-tuning: unfreeze policies, discriminative LRs, tasks, kill -9 resume, HF blocks.

Tiny random-init encoders only (the open_clip config in data/models, a 2-layer HF BERT built
here), so nothing is downloaded. kill -9 and resume: tests/projection/engine/test_loop.py (all three loops).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
TINY_VIT = REPO / "data" / "models" / "xmodal-tiny-vit.json"
from projection.align.config import ProjectorConfig  # noqa: E402
from projection.finetune.model import (  # noqa: E402
    TaskData,
    evaluate_task,
    finetune,
    frozen_head_baseline,
    predict_task,
)
from projection.finetune.io import load_finetuned, save_finetuned  # noqa: E402
from projection.engine.loop import ParamSet, param_groups  # noqa: E402
from projection.finetune.tasks import make_head  # noqa: E402
from projection.finetune.unfreeze import apply_unfreeze, encoder_blocks  # noqa: E402
from projection.finetune.config import FinetuneConfig  # noqa: E402
from projection.align.metrics import bidirectional_ranks  # noqa: E402
from projection.align.projector import make_projector, save_projector  # noqa: E402

D_TGT = 16
WORKER_EPOCHS = 4


def _enc(tower: str = "image"):
    from encoders.factory import load_encoder

    return load_encoder(f"open_clip:{tower}:{TINY_VIT}?device=cpu")  # seeded random init: same weights every call


def _proj(d_in: int = 64, seed: int = 0):
    return make_projector(ProjectorConfig(d_in=d_in, d_out=D_TGT, hidden=32), seed=seed)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    after = module.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def _cfg(**kw) -> FinetuneConfig:
    base = dict(task="classification", epochs=2, batch_size=8, encoder_lr=1e-3, head_lr=3e-3, warmup_frac=0.0,
                patience=None, seed=0, eval_batch_size=64)  # fmt: skip
    return FinetuneConfig(**(base | kw))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """48 noisy 32x32 images, half dark (label 0) and half bright (label 1); brightness in 0..255."""
    from PIL import Image

    d = tmp_path_factory.mktemp("ft_images")
    rng = np.random.default_rng(0)
    paths, labels, bright = [], [], []
    for i in range(48):
        label = i % 2
        level = rng.uniform(20, 90) if label == 0 else rng.uniform(160, 235)
        arr = np.clip(level + rng.normal(0, 15, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        p = d / f"img_{i:03d}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
        labels.append(label)
        bright.append(float(arr.mean()))
    return {"paths": paths, "labels": np.array(labels), "brightness": np.array(bright)}


def _cls_data(images, n_train=32):
    p, y = images["paths"], images["labels"]
    return TaskData(p[:n_train], y[:n_train]), TaskData(p[n_train:], y[n_train:])


# ------------------------------------------------------------------ unfreeze policies


def test_none_keeps_encoder_bit_identical_and_trains_projector_and_head(images):
    enc, proj = _enc(), _proj()
    enc_before, proj_before, digest = _snapshot(enc.module), _snapshot(proj), enc.digest
    cfg = _cfg(unfreeze="none")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # the head is built first thing under the run's seed
        head0 = make_head("classification", D_TGT, n_classes=2)
    res = finetune(enc, proj, *_cls_data(images), cfg)

    assert _changed(enc_before, enc.module) == set()
    assert res.trainable_encoder_params == [] and res.n_trainable_encoder == 0
    assert enc.digest == digest and not any(p.requires_grad for p in enc.module.parameters())
    assert _changed(proj_before, proj) >= {n for n, _ in proj.named_parameters()}  # every projector weight moved
    assert _changed(_snapshot(head0), res.model.head) == set(head0.state_dict())
    assert res.epochs_run == 2 and res.steps == 8 and len(res.history) == 2


def test_last_n_1_changes_exactly_last_block_plus_final_norm_and_projection(images):
    enc, proj = _enc(), _proj()
    before = _snapshot(enc.module)
    layout = enc.layout()
    assert layout.blocks == ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1"]
    assert layout.post == ["visual.ln_post", "visual.proj"]
    modes = {0: set(), 1: set()}  # frozen block must run in eval mode, the unfrozen one in train mode
    blocks = encoder_blocks(enc)
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: modes[i].add(m.training)) for i, b in enumerate(blocks)]
    res = finetune(enc, proj, *_cls_data(images), _cfg(unfreeze="last_n", last_n=1))
    for h in hooks:
        h.remove()

    expected = {k for k in before if k.startswith(("visual.transformer.resblocks.1.", "visual.ln_post.")) or k == "visual.proj"}
    assert len(expected) == 15  # 12 in the block + ln_post weight/bias + proj
    assert _changed(before, enc.module) == expected  # everything else (block 0, embeddings, text tower) bit-identical
    assert set(res.trainable_encoder_params) == expected
    assert modes[0] == {False} and modes[1] == {True, False}  # train steps + eval passes
    assert enc.digest != "" and not any(p.requires_grad for p in enc.module.parameters())  # frozen again after


def test_all_changes_every_param_of_the_tower_and_nothing_else(images):
    enc, proj = _enc(), _proj()
    before = _snapshot(enc.module)
    res = finetune(enc, proj, *_cls_data(images), _cfg(unfreeze="all", epochs=1))
    visual = {k for k, _ in enc.module.named_parameters() if k.startswith("visual.")}
    assert _changed(before, enc.module) == visual  # all image-tower params; text tower + logit_scale untouched
    assert set(res.trainable_encoder_params) == visual


def test_modified_resnet_last_n_trains_layer4_and_attnpool_only(images):
    from encoders.factory import load_encoder

    enc = load_encoder(f"open_clip:image:{REPO / 'data/models/xmodal-tiny-rn.json'}?device=cpu")
    layout = enc.layout()
    assert layout.blocks == [f"visual.layer{i}" for i in range(1, 5)] and layout.post == ["visual.attnpool"]
    before = _snapshot(enc.module)
    res = finetune(enc, _proj(), *_cls_data(images), _cfg(unfreeze="last_n", last_n=1, epochs=1))
    changed = _changed(before, enc.module)
    assert changed and all(k.startswith(("visual.layer4.", "visual.attnpool.")) for k in changed)
    # BatchNorm inside the unfrozen block is in train mode: its running stats move and are checkpointed
    assert any(k.endswith("running_mean") for k in changed)
    assert set(res.encoder_state_keys) >= changed


def test_text_tower_layout_and_all_excludes_image_tower():
    enc = _enc("text")
    layout = enc.layout()
    assert layout.blocks == ["transformer.resblocks.0", "transformer.resblocks.1"]
    assert layout.post == ["ln_final", "text_projection"]
    names = apply_unfreeze(enc, "all")
    assert names and not any(n.startswith("visual.") or n == "logit_scale" for n in names)
    assert "token_embedding.weight" in names and "positional_embedding" in names
    assert apply_unfreeze(enc, "none") == [] and not any(p.requires_grad for p in enc.module.parameters())


def test_param_groups_have_discriminative_lrs_and_no_decay_on_biases_norms():
    enc, proj = _enc(), _proj()
    cfg = _cfg(unfreeze="last_n", encoder_lr=2e-5, head_lr=7e-4, weight_decay=0.05)
    apply_unfreeze(enc, "last_n", 1)
    head = make_head("classification", D_TGT, n_classes=3)
    sets = [ParamSet("encoder", [enc.module], cfg.encoder_lr), ParamSet("head", [proj, head], cfg.head_lr)]
    groups = {g["name"]: g for g in param_groups(sets, cfg.weight_decay)}
    assert set(groups) == {"encoder", "encoder_no_decay", "head", "head_no_decay"}
    assert groups["encoder"]["lr"] == groups["encoder_no_decay"]["lr"] == 2e-5
    assert groups["head"]["lr"] == groups["head_no_decay"]["lr"] == 7e-4
    assert groups["encoder"]["weight_decay"] == groups["head"]["weight_decay"] == 0.05
    assert groups["encoder_no_decay"]["weight_decay"] == groups["head_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim < 2 for g in ("encoder_no_decay", "head_no_decay") for p in groups[g]["params"])
    assert all(p.ndim >= 2 for g in ("encoder", "head") for p in groups[g]["params"])
    n_enc = sum(p.numel() for p in enc.module.parameters() if p.requires_grad)
    assert sum(p.numel() for g in ("encoder", "encoder_no_decay") for p in groups[g]["params"]) == n_enc


def test_last_n_too_large_and_unknown_policy_are_rejected(images):
    enc = _enc()
    with pytest.raises(ValueError, match=r"last_n=5 but encoder open_clip:image:.*xmodal-tiny-vit.* has 2 blocks"):
        finetune(enc, _proj(), *_cls_data(images), _cfg(unfreeze="last_n", last_n=5))
    assert not any(p.requires_grad for p in enc.module.parameters())
    with pytest.raises(ValueError, match="last_n=3 .* has 2 blocks"):
        apply_unfreeze(enc, "last_n", 3)
    with pytest.raises(ValueError, match="unknown unfreeze policy"):
        apply_unfreeze(enc, "some")
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        FinetuneConfig(unfreeze="some")
    with pytest.raises(ValidationError):
        FinetuneConfig(task="ranking")
    with pytest.raises(ValidationError):
        FinetuneConfig(unfreez="all")  # typo'd field


# ------------------------------------------------------------------ tasks


def test_classification_learns_a_separable_task_and_baseline_is_comparable(images, tmp_path):
    train, val = _cls_data(images)
    events = []
    cfg = _cfg(unfreeze="last_n", epochs=6, head_lr=1e-2, encoder_lr=1e-3, warmup_frac=0.1)
    res = finetune(_enc(), _proj(), train, val, cfg, callback=lambda e, s, m: events.append((e, s, m)))
    assert res.metric_name == "accuracy" and res.best_val_metric >= 0.8  # chance is 0.5
    assert res.val_metrics["accuracy"] == res.best_val_metric
    # the model holds the best epoch's weights: evaluating it again gives the recorded number
    assert evaluate_task(res.model, val)["accuracy"] == pytest.approx(res.best_val_metric)
    epoch_events = [m for e, _, m in events if e == "epoch"]
    assert len(epoch_events) == 6 and events[-1][0] == "end"
    assert {"train_loss", "val_loss", "val_accuracy", "lr_encoder", "lr_head"} <= set(epoch_events[0])
    assert epoch_events[0]["lr_head"] / epoch_events[0]["lr_encoder"] == pytest.approx(10.0)
    assert epoch_events[0]["val_metric"] == epoch_events[0]["val_accuracy"]

    # artifacts round-trip onto a freshly loaded (un-tuned) encoder
    save_finetuned(res, tmp_path / "ft")
    fresh = _enc()
    assert fresh.digest != res.model.encoder.digest
    loaded = load_finetuned(tmp_path / "ft", fresh)
    assert fresh.digest == res.model.encoder.digest
    np.testing.assert_array_equal(predict_task(loaded, val.items), predict_task(res.model, val.items))

    base = frozen_head_baseline(_enc(), _proj(), train, val, cfg)
    assert base.unfreeze == "none" and base.metric_name == res.metric_name
    assert base.steps == res.steps and base.best_val_metric >= 0.8


def test_regression_reports_metrics_in_original_units(images, tmp_path):
    y = 1000.0 + images["brightness"]  # original units: ~1020..1235
    p = images["paths"]
    train, val = TaskData(p[:36], y[:36]), TaskData(p[36:], y[36:])
    proj_dir = save_projector(_proj(), tmp_path / "proj")  # also: load the stage-1 projector from its dir
    res = finetune(_enc(), proj_dir, train, val, _cfg(task="regression", unfreeze="none", epochs=40, head_lr=1e-2))
    head = res.model.head
    assert float(head.target_mean) == pytest.approx(y[:36].mean(), rel=1e-5)
    pred = predict_task(res.model, val.items)
    assert pred.shape == (12,) and 900 < pred.mean() < 1300  # back in original units
    m = evaluate_task(res.model, val)
    err = pred.astype(np.float64) - y[36:]
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean(err**2)), rel=1e-4)
    assert m["mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-4)
    assert m["r2"] == pytest.approx(1 - np.sum(err**2) / np.sum((y[36:] - y[36:].mean()) ** 2), rel=1e-4, abs=1e-6)
    assert m["rmse"] < y[36:].std() and m["r2"] > 0.0  # beats predicting the mean
    assert res.metric_name == "rmse" and res.best_val_metric == pytest.approx(m["rmse"], rel=1e-5)


def test_retrieval_infonce_reports_r1_both_directions(images):
    p = images["paths"]
    # fixed "target-encoder" embeddings: a random linear view of the source features, so learnable
    feats = _enc().encode_items(p)
    tgt = (feats @ torch.from_numpy(np.random.default_rng(0).normal(size=(64, D_TGT)).astype(np.float32))).numpy()
    train, val = TaskData(p[:32], tgt[:32]), TaskData(p[32:], tgt[32:])
    cfg = _cfg(task="retrieval", unfreeze="last_n", epochs=4, batch_size=16, head_lr=1e-2)
    res = finetune(_enc(), _proj(), train, val, cfg)
    m = res.val_metrics
    assert res.metric_name == "r1" and res.best_val_metric == m["r1"]
    assert {"p2t_r1", "t2p_r1", "p2t_mrr", "t2p_mrr", "loss"} <= set(m)
    assert m["r1"] == pytest.approx((m["p2t_r1"] + m["t2p_r1"]) / 2)
    # the same numbers from the stage-1 metric code on the model's projected embeddings
    p2t, t2p = bidirectional_ranks(predict_task(res.model, val.items), tgt[32:])
    assert m["p2t_r1"] == pytest.approx((p2t == 1).mean()) and m["t2p_r1"] == pytest.approx((t2p == 1).mean())
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    # (random-init towers on near-uniform images give nearly collinear features, so no R@1 bar here)
    assert any(n == "infonce.logit_scale" for n, _ in res.model.head.named_parameters())


def test_bf16_and_grad_checkpointing_run_and_keep_frozen_parts(images):
    enc = _enc()
    before = _snapshot(enc.module)
    res = finetune(enc, _proj(), *_cls_data(images), _cfg(unfreeze="last_n", epochs=1, bf16=True, grad_checkpointing=True))
    assert np.isfinite(res.history[0]["train_loss"])
    changed = _changed(before, enc.module)
    assert changed and all(k.startswith(("visual.transformer.resblocks.1.", "visual.ln_post.", "visual.proj")) for k in changed)
    assert enc.module.visual.transformer.grad_checkpointing is False  # restored


# ------------------------------------------------------------------ HF


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("ft_tiny_bert")
    words = "a the photo of cat dog red blue small big one two three".split()
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _texts(n: int) -> tuple[list[str], np.ndarray]:
    nums = ["one", "two", "three"]
    texts = [f"a {['small', 'big'][i % 3 == 0]} photo of the {['cat', 'dog'][i % 2]} {nums[i % 3]}" for i in range(n)]
    return texts, np.arange(n) % 2


def test_hf_bert_last_n_finds_blocks_generically(tiny_bert_dir):
    from encoders.factory import load_encoder

    enc = load_encoder(f"hf:text:{tiny_bert_dir}?device=cpu")
    layout = enc.layout()
    assert layout.blocks == ["encoder.layer.0", "encoder.layer.1"]
    assert layout.post == [] and layout.exclude == ["pooler"]  # cls pooling never touches the pooler
    assert len(encoder_blocks(enc)) == 2
    before = _snapshot(enc.module)
    texts, labels = _texts(24)
    res = finetune(enc, _proj(32), TaskData(texts[:16], labels[:16]), TaskData(texts[16:], labels[16:]),
                   _cfg(unfreeze="last_n", last_n=1, grad_checkpointing=True))  # fmt: skip
    layer1 = {k for k, _ in enc.module.named_parameters() if k.startswith("encoder.layer.1.")}
    assert _changed(before, enc.module) == layer1
    assert set(res.trainable_encoder_params) == layer1
    with pytest.raises(ValueError, match="last_n=3 but encoder hf:text:.* has 2 blocks"):
        apply_unfreeze(enc, "last_n", 3)


def test_hf_vit_layout_includes_final_layernorm(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from encoders.factory import load_encoder

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=64)).save_pretrained(tmp_path)  # fmt: skip
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    enc = load_encoder(f"hf:image:{tmp_path}?device=cpu")
    layout = enc.layout()
    stack = "layers" if hasattr(enc.module, "layers") else "encoder.layer"  # transformers 5 / 4 naming
    assert layout.blocks == [f"{stack}.{i}" for i in range(3)] and layout.post == ["layernorm"]
    names = apply_unfreeze(enc, "last_n", 2)
    assert names and all(n.startswith((f"{stack}.1.", f"{stack}.2.", "layernorm.")) for n in names)
    assert any(n.startswith("layernorm.") for n in names)


def test_task_data_from_a_pandas_column_owns_its_labels_without_a_numpy_warning():
    """pandas 3 returns read-only views; torch warned "The given NumPy array is not writable" on every stage-2 run."""
    import warnings

    import pandas as pd

    labels = pd.Series([0, 1, 2, 1]).astype(np.int64).to_numpy()
    assert not labels.flags.writeable  # what stage 2's label column gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = TaskData(["a", "b", "c", "d"], labels)
    data.y[0] = 5  # a tensor of its own: writing it leaves the frame's array alone
    assert labels[0] == 0 and data.y.tolist() == [5, 1, 2, 1]
