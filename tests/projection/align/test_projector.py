import pytest
import torch
from pydantic import ValidationError

from projection.align.config import ProjectorConfig
from projection.align.projector import CONFIG_FILE, WEIGHTS_FILE, Projector, load_projector, make_projector, save_projector


@pytest.mark.parametrize(
    "cfg",
    [
        ProjectorConfig(kind="linear", d_in=7, d_out=3),
        ProjectorConfig(kind="mlp", d_in=7, d_out=11, depth=2, hidden=16, activation="silu", dropout=0.1, layernorm=True),
        ProjectorConfig(kind="mlp", d_in=5, d_out=5, depth=1, hidden=8, residual=True),
    ],
)
def test_shapes_and_save_load_roundtrip(cfg, tmp_path):
    model = make_projector(cfg, seed=0).eval()
    x = torch.randn(4, cfg.d_in)
    assert model(x).shape == (4, cfg.d_out)
    save_projector(model, tmp_path)
    assert (tmp_path / WEIGHTS_FILE).exists() and (tmp_path / CONFIG_FILE).exists()
    loaded = load_projector(tmp_path).eval()
    assert loaded.cfg == cfg
    assert torch.equal(loaded(x), model(x))


def test_residual_starts_at_identity():
    model = Projector(ProjectorConfig(kind="mlp", d_in=6, d_out=6, residual=True, hidden=8))
    x = torch.randn(3, 6)
    assert torch.equal(model(x), x)


def test_residual_needs_equal_dims():
    with pytest.raises(ValidationError, match="residual=True needs d_in == d_out, got d_in=4, d_out=5"):
        ProjectorConfig(d_in=4, d_out=5, residual=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(d_in=0, d_out=4),
        dict(d_in=4, d_out=4, depth=0),
        dict(d_in=4, d_out=4, activation="swish"),
        dict(d_in=4, d_out=4, kind="transformer"),
        dict(d_in=4, d_out=4, dropout=1.0),
        dict(d_in=4, d_out=4, hiden=3),  # typo must not be silently ignored
    ],
)
def test_config_errors(kwargs):
    with pytest.raises(ValidationError):
        ProjectorConfig(**kwargs)


def test_make_projector_is_seeded_and_leaves_global_rng_alone():
    cfg = ProjectorConfig(d_in=4, d_out=4, hidden=8)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = make_projector(cfg, 1), make_projector(cfg, 1)
    assert torch.equal(torch.get_rng_state(), before)
    for ta, tb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(ta, tb)
