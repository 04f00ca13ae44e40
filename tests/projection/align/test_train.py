
import numpy as np
import pytest
import torch

from projection.align.baselines import RidgeBaseline
from projection.align.config import LossConfig, ProjectorConfig, TrainConfig
from projection.align.data import InMemoryPairs, make_split
from projection.losses.core import build_weighted as build_loss
from projection.align.projector import make_projector
from projection.engine.loop import warmup_cosine
from projection.align.train import CHECKPOINT_FILE, predict, train_projector



def _splits(x, y, seed=0):
    s = make_split(range(len(x)), 0.1, 0.1, seed)
    return [InMemoryPairs(x[s[k]], y[s[k]]) for k in ("train", "val", "test")]


def _test_mse(model, test):
    return float(np.mean((predict(model, test.x) - test.y.numpy()) ** 2))


def test_mlp_learns_nonlinear_map_and_beats_ridge():
    # Y = tanh(X A) B + noise. Threshold: test MSE < 2% of Var(Y) (ridge sits near 15%).
    rng = np.random.default_rng(0)
    n, d_src, d_hid, d_tgt = 4000, 8, 16, 8
    x = rng.normal(size=(n, d_src)).astype(np.float32)
    a = rng.normal(size=(d_src, d_hid)) * 1.5 / np.sqrt(d_src)
    b = rng.normal(size=(d_hid, d_tgt)) / np.sqrt(d_hid)
    y = (np.tanh(x @ a) @ b + 0.01 * rng.normal(size=(n, d_tgt))).astype(np.float32)
    train, val, test = _splits(x, y)
    model = make_projector(ProjectorConfig(d_in=d_src, d_out=d_tgt, hidden=128, activation="tanh"), seed=0)
    cfg = TrainConfig(epochs=20, batch_size=128, lr=1e-2, weight_decay=0.0, patience=None)
    train_projector(model, build_loss(LossConfig()), train, val, cfg)
    var = float(y.var())
    mlp = _test_mse(model, test)
    ridge = RidgeBaseline(alpha=1e-3).fit(train.x.numpy(), train.y.numpy())
    ridge_mse = float(np.mean((ridge.predict(test.x.numpy()) - test.y.numpy()) ** 2))
    assert mlp < 0.02 * var, (mlp, var)
    assert mlp < 0.25 * ridge_mse, (mlp, ridge_mse)


def test_linear_map_recovered_by_ridge_and_mlp():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 4))).astype(np.float32)
    train, val, test = _splits(x, y)
    var = float(y.var())
    ridge = RidgeBaseline(alpha=1e-6).fit(train.x.numpy(), train.y.numpy())
    assert np.mean((ridge.predict(test.x.numpy()) - test.y.numpy()) ** 2) < 1e-8 * var
    model = make_projector(ProjectorConfig(d_in=6, d_out=4, hidden=64), seed=0)
    cfg = TrainConfig(epochs=12, batch_size=128, lr=1e-2, weight_decay=0.0, patience=None)
    train_projector(model, build_loss(LossConfig()), train, val, cfg)
    assert _test_mse(model, test) < 0.01 * var
    lin = make_projector(ProjectorConfig(kind="linear", d_in=6, d_out=4), seed=0)
    train_projector(lin, build_loss(LossConfig()), train, val, cfg.model_copy(update={"lr": 0.1}))
    assert _test_mse(lin, test) < 1e-4 * var


def test_schedule_shape():
    f = warmup_cosine(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(14) == pytest.approx(0.1) and f(9) == pytest.approx(0.55)


def _tiny(seed=0, n=400):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = np.tanh(x @ rng.normal(size=(5, 4))).astype(np.float32)
    return InMemoryPairs(x[: n - 80], y[: n - 80]), InMemoryPairs(x[n - 80 :], y[n - 80 :])


def test_callback_checkpoint_and_early_stopping(tmp_path):
    train, val = _tiny()
    model = make_projector(ProjectorConfig(d_in=5, d_out=4, hidden=16), seed=0)
    events = []
    # lr so large that val loss stops improving quickly -> early stop
    cfg = TrainConfig(epochs=50, batch_size=32, lr=0.5, patience=2, grad_clip=None, warmup_steps=0)
    res = train_projector(model, build_loss(LossConfig()), train, val, cfg, tmp_path, lambda *e: events.append(e))
    assert res.stopped_early and res.epochs_run < 50
    assert res.epochs_run == res.best_epoch + 1 + 2
    epochs = [e for e in events if e[0] == "epoch"]
    assert len(epochs) == res.epochs_run and events[-1][0] == "end"
    assert {"train_loss", "val_loss", "lr"} <= set(epochs[0][2])
    assert all(isinstance(v, float) for _, _, m in epochs for v in m.values())
    assert epochs[-1][1] == res.steps == res.epochs_run * 10
    # best weights restored
    from projection.align.train import evaluate_loss

    best = res.history[res.best_epoch]["val_loss"]
    assert evaluate_loss(model, build_loss(LossConfig()), val, 4096, "cpu") == pytest.approx(best, rel=1e-6)
    ck = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert ck["epoch"] == res.epochs_run and ck["stopped"]
    assert not (tmp_path / (CHECKPOINT_FILE + ".tmp")).exists()


def test_dim_check_in_trainer():
    train, val = _tiny()
    model = make_projector(ProjectorConfig(d_in=6, d_out=4), seed=0)
    with pytest.raises(ValueError, match="has dim 5 but the projector expects d_in=6"):
        train_projector(model, build_loss(LossConfig()), train, val, TrainConfig(epochs=1))


class _Interrupt(Exception):
    pass


def test_resume_in_process_with_learnable_temperature(tmp_path):
    """Interrupt after epoch 2 (checkpoint already written), resume with fresh objects."""
    train, val = _tiny(1)
    pcfg = ProjectorConfig(d_in=5, d_out=4, hidden=16, dropout=0.1)
    lcfg = LossConfig(terms={"mse": 1.0, "infonce": 0.1})
    cfg = TrainConfig(epochs=4, batch_size=32, lr=1e-2, patience=None, seed=3)

    ref_model, ref_loss = make_projector(pcfg, 0), build_loss(lcfg)
    ref = train_projector(ref_model, ref_loss, train, val, cfg, tmp_path / "ref")

    def stop_after_2(event, step, metrics):
        if event == "epoch" and metrics["epoch"] == 1.0:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_projector(make_projector(pcfg, 0), build_loss(lcfg), train, val, cfg, tmp_path / "run", stop_after_2)
    model, loss = make_projector(pcfg, 0), build_loss(lcfg)
    res = train_projector(model, loss, train, val, cfg, tmp_path / "run")
    assert res.resumed_from_epoch == 2 and res.history == ref.history
    for a, b in zip(list(model.state_dict().values()) + list(loss.state_dict().values()),
                    list(ref_model.state_dict().values()) + list(ref_loss.state_dict().values())):  # fmt: skip
        assert torch.equal(a, b)
    # changed settings (here the seed, or another init) never resume; test_loop.py covers every setting
    other = train_projector(make_projector(pcfg, 99), build_loss(lcfg), train, val, cfg, tmp_path / "run")
    assert other.resumed_from_epoch is None


def test_chunked_pairs_train_deterministically_and_match_in_memory_quality():
    from projection.align.data import ArrayReader, ChunkedPairs

    rng = np.random.default_rng(5)
    x = rng.normal(size=(1000, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 3))).astype(np.float32)
    split = make_split(range(1000), 0.1, 0.1, 0)
    reader = ArrayReader(x, y)
    train = ChunkedPairs(reader, chunk_rows=128, indices=split["train"], source_name="s", target_name="t")
    val = ChunkedPairs(reader, chunk_rows=128, indices=split["val"])
    cfg = TrainConfig(epochs=10, batch_size=32, lr=0.05, patience=None, seed=1)
    pcfg = ProjectorConfig(kind="linear", d_in=6, d_out=3)
    runs = []
    for _ in range(2):
        m = make_projector(pcfg, 0)
        res = train_projector(m, build_loss(LossConfig()), train, val, cfg)
        runs.append(m)
    assert res.steps == 10 * -(-800 // 32)
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()):
        assert torch.equal(a, b)
    test = InMemoryPairs(x[split["test"]], y[split["test"]])
    assert _test_mse(runs[0], test) < 1e-3 * float(y.var())
