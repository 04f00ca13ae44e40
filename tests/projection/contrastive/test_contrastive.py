"""Contrastive tower training: it learns, it resumes bit-for-bit, and a saved tower loads through the encoder factory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.factory import load_encoder
from projection.contrastive.config import ContrastiveConfig
from projection.contrastive.towers import DualEncoder, embed, save_tower, tower_spec
from projection.contrastive.trainer import load_images, retrieval_metrics, train_contrastive


def _pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) 'photos' and their 'sketches' (a fixed non-linear view of each photo)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3, 32, 32, generator=g)
    b = torch.tanh(2.0 * a.flip(1)) + 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    return a, b


def _cfg(**kw) -> ContrastiveConfig:
    return ContrastiveConfig(**({"epochs": 3, "batch_size": 16, "lr": 2e-3, "warmup_frac": 0.0, "threads": 1} | kw))


def test_training_lowers_the_loss_and_logs_each_epoch():
    a, b = _pairs(32)
    events = []
    res = train_contrastive(a, b, _cfg(epochs=6), a[:16], b[:16], callback=lambda e, s, m: events.append((e, s, m)))
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0] * 0.9, losses
    assert [e for e, _, _ in events if e != "progress"] == ["epoch"] * 6 + ["end"]
    epochs = [(s, m) for e, s, m in events if e == "epoch"]
    assert {"train_loss", "val_loss", "val_r1", "lr"} <= set(epochs[0][1])
    assert [s for s, _ in epochs] == [2 * (i + 1) for i in range(6)]  # 32 pairs / batch 16 = 2 steps
    # one progress event after the first batch; the next is due only after the default 60 s
    progress = [m for e, _, m in events if e == "progress"]
    assert len(progress) == 1 and (progress[0]["epoch"], progress[0]["batch"], progress[0]["batches"]) == (0, 1, 2)
    assert res.epochs_run == 6 and res.resumed_from_epoch is None


def test_progress_events_come_on_the_interval_with_a_shrinking_eta(monkeypatch):
    monkeypatch.setenv("XMODAL_PROGRESS_S", "0")  # every batch (and after each validation)
    a, b = _pairs(32)
    events = []
    train_contrastive(a, b, _cfg(epochs=3), a[:16], b[:16], callback=lambda e, s, m: events.append((e, s, m)))
    progress = [m for e, _, m in events if e == "progress"]
    assert [(m["epoch"], m["batch"]) for m in progress] == [(e, b) for e in (0, 1, 2) for b in (1, 2, 2)]
    assert all(m["epochs"] == 3 and m["running_loss"] > 0 for m in progress)
    done = [(m["epoch"] + m["batch"] / m["batches"]) / 3 for m in progress]
    assert done == sorted(done) and done[-1] == 1.0 and progress[-1]["eta_s"] == 0.0


def test_saved_tower_loads_through_the_encoder_factory_and_embeds_identically(tmp_path):
    a, b = _pairs(16)
    res = train_contrastive(a, b, _cfg(epochs=1))
    rng = np.random.default_rng(0)
    paths = []
    for k in range(5):
        p = tmp_path / f"img{k}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    for which in ("a", "b"):
        folder = save_tower(res.model, which, tmp_path / f"tower_{which}")
        enc = load_encoder(tower_spec(folder))
        assert enc.origin == "checkpoint" and enc.dim == res.model.embed_dim
        got = enc.encode_items(paths)  # (5, D), through open_clip's preprocess from the folder's config
        want = embed(res.model, load_images(paths, res.model.transform()), which)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the two towers were trained separately, so they differ
    assert not torch.allclose(embed(res.model, a[:4], "a"), embed(res.model, a[:4], "b"))


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    a, b = _pairs(32)
    cfg = _cfg(epochs=4, augment=True)  # augmentation draws from the RNG that the checkpoint must restore
    straight = train_contrastive(a, b, cfg, a[:16], b[:16], checkpoint_dir=tmp_path / "straight")

    class Killed(Exception):
        pass

    def kill_after_two(event, step, metrics):
        if event == "epoch" and metrics["epoch"] == 1.0:
            raise Killed

    with pytest.raises(Killed):
        train_contrastive(a, b, cfg, a[:16], b[:16], checkpoint_dir=tmp_path / "resumed", callback=kill_after_two)
    resumed = train_contrastive(a, b, cfg, a[:16], b[:16], checkpoint_dir=tmp_path / "resumed")
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == 4
    s1, s2 = straight.model.state_dict(), resumed.model.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    for k, v in straight.loss_fn.state_dict().items():
        assert torch.equal(v, resumed.loss_fn.state_dict()[k]), k
    assert straight.history == resumed.history

    # another setting never resumes this checkpoint (tests/projection/engine/test_loop.py covers each one)
    assert train_contrastive(a, b, _cfg(epochs=5), checkpoint_dir=tmp_path / "resumed").resumed_from_epoch is None


def test_same_seed_same_weights_and_callers_rng_untouched():
    a, b = _pairs(16)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    r1 = train_contrastive(a, b, _cfg(epochs=1))
    after = torch.rand(3)
    r2 = train_contrastive(a, b, _cfg(epochs=1))
    assert torch.equal(before, after)
    for k, v in r1.model.state_dict().items():
        assert torch.equal(v, r2.model.state_dict()[k]), k


def test_shared_tower_two_views_and_two_modalities(tmp_path):
    a, b = _pairs(16)
    views = train_contrastive(a, None, _cfg(towers="shared", augment=True, loss="ntxent", epochs=2))
    assert views.model.tower("a") is views.model.tower("b")
    assert not any(k.startswith("tower_b") for k in views.model.state_dict())
    both = train_contrastive(a, b, _cfg(towers="shared", epochs=2))
    folder = save_tower(both.model, "b", tmp_path / "shared")
    enc = load_encoder(tower_spec(folder))
    assert enc.origin == "checkpoint"
    with pytest.raises(ValueError, match="towers='shared' and augment=True"):
        train_contrastive(a, None, _cfg())


@pytest.mark.parametrize("loss,kw", [("siglip", {}), ("triplet", {"mining": "hardest", "distance": "cosine"}),
                                     ("queue_infonce", {"queue_size": 32}), ("lifted", {}), ("npair", {}),
                                     ("contrastive", {"margin": 0.5})])
def test_every_loss_trains(loss, kw):
    a, b = _pairs(16)
    res = train_contrastive(a, b, _cfg(epochs=1, loss=loss, loss_kwargs=kw))
    assert np.isfinite(res.history[-1]["train_loss"])


def test_bad_loss_kwargs_and_missing_model_json_fail_at_validation():
    with pytest.raises(ValueError, match="do not fit loss 'triplet'"):
        ContrastiveConfig(loss="triplet", loss_kwargs={"temperature": 0.1})
    with pytest.raises(ValueError, match="does not exist"):
        ContrastiveConfig(model_json="/nope/model.json")
    assert ContrastiveConfig(loss="ntxent", temperature=0.2).loss_kwargs_resolved(64) == {"temperature": 0.2}


def test_retrieval_metrics_both_directions_and_label_r1():
    z = torch.eye(4)
    m = retrieval_metrics(z, z, labels=np.array([0, 0, 1, 1]))
    assert m["a2b_r1"] == m["b2a_r1"] == 1.0 and m["a2b_label_r1"] == 1.0
    swapped = retrieval_metrics(z, z[[1, 0, 3, 2]], labels=np.array([0, 0, 1, 1]))
    assert swapped["a2b_r1"] == 0.0 and swapped["a2b_label_r1"] == 1.0 and swapped["b2a_label_r1"] == 1.0


def test_random_init_towers_are_the_start_of_training():
    cfg = _cfg()
    x = torch.randn(2, 3, 32, 32)
    m1, m2 = DualEncoder.from_config(cfg), DualEncoder.from_config(cfg)
    torch.testing.assert_close(embed(m1, x, "b"), embed(m2, x, "b"), atol=0, rtol=0)
