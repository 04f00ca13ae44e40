import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from pydantic import ValidationError

from projection.align.config import LossConfig
from projection.losses.core import CosineLoss, InfoNCELoss, MSELoss, SigLIPLoss, build_weighted
from projection.losses.registry import LOSS_NAMES, LossName, build_loss, loss_class


def test_mse_and_cosine_hand_values():
    pred = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    # squared errors: 0,1,0,9 -> mean 2.5
    assert MSELoss()(pred, target).item() == pytest.approx(2.5)
    # cosines: 1/sqrt(2), -1 -> mean (0.7071 - 1)/2; loss = 1 - that
    expected = 1 - (2**-0.5 - 1) / 2
    assert CosineLoss()(pred, target).item() == pytest.approx(expected)


def test_infonce_equals_open_clip():
    torch.manual_seed(0)
    p, t = torch.randn(16, 8), torch.randn(16, 8)
    loss = InfoNCELoss(temperature=0.05)
    ref = ClipLoss()(F.normalize(p, dim=-1), F.normalize(t, dim=-1), torch.tensor(1 / 0.05))
    assert torch.allclose(loss(p, t), ref, rtol=1e-5)
    assert loss.logit_scale.requires_grad
    fixed = InfoNCELoss(temperature=0.05, learnable=False)
    assert list(fixed.parameters()) == [] and torch.allclose(fixed(p, t), ref, rtol=1e-5)


def test_infonce_scale_clamped_at_100():
    p, t = torch.randn(4, 3), torch.randn(4, 3)
    a, b = InfoNCELoss(temperature=1e-4), InfoNCELoss(temperature=0.01)
    assert torch.allclose(a(p, t), b(p, t))


def test_siglip_equals_open_clip():
    torch.manual_seed(1)
    p, t = torch.randn(16, 8), torch.randn(16, 8)
    loss = SigLIPLoss(logit_scale=10.0, bias=-10.0)
    ref = SigLipLoss()(F.normalize(p, dim=-1), F.normalize(t, dim=-1), torch.tensor(10.0), torch.tensor(-10.0))
    assert torch.allclose(loss(p, t), ref, rtol=1e-5)
    assert {n for n, _ in loss.named_parameters()} == {"logit_scale", "logit_bias"}
    assert list(SigLIPLoss(learnable=False).parameters()) == []


def test_weighted_sum_equals_sum_and_has_params():
    torch.manual_seed(2)
    p, t = torch.randn(8, 4), torch.randn(8, 4)
    cfg = LossConfig(terms={"mse": 0.5, "cosine": 2.0, "infonce": 1.0, "siglip": 0.25})
    loss = build_weighted(cfg)
    expected = (
        0.5 * build_loss("mse", **cfg.kwargs_for("mse"))(p, t)
        + 2.0 * build_loss("cosine", **cfg.kwargs_for("cosine"))(p, t)
        + build_loss("infonce", **cfg.kwargs_for("infonce"))(p, t)
        + 0.25 * build_loss("siglip", **cfg.kwargs_for("siglip"))(p, t)
    )
    assert torch.allclose(loss(p, t), expected)
    assert len(list(loss.parameters())) == 3  # infonce scale, siglip scale + bias
    assert set(loss.components(p, t)) == {"mse", "cosine", "infonce", "siglip"}


def test_one_registry_names_every_loss_and_refuses_unknown_ones():
    from typing import get_args

    assert LOSS_NAMES == get_args(LossName) and len(LOSS_NAMES) == 10
    assert all(isinstance(loss_class(n), type) for n in LOSS_NAMES)  # each name builds a class
    with pytest.raises(ValidationError, match="msee"):  # the config's schema refuses a typo by name
        LossConfig(terms={"mse": 1.0, "msee": 1.0})
    with pytest.raises(ValidationError, match="queue_infonce"):
        LossConfig(terms={"queue_infonce": 1.0})
    assert LossConfig(terms={"mse": 1.0, "triplet": 0.5}).terms == {"mse": 1.0, "triplet": 0.5}  # pair losses fit stage 1
    with pytest.raises(ValueError, match="unknown loss 'msee'"):
        build_loss("msee")
    schema = LossConfig.model_json_schema()
    assert schema["properties"]["terms"]["propertyNames"]["enum"] == list(LOSS_NAMES)  # the UI form's choices


def test_infonce_and_siglip_hand_values_on_two_orthonormal_pairs():
    """a = b = I (2x2), so cos(a_i, b_j) = 1 if i == j else 0."""
    import math

    a = torch.eye(2)
    # InfoNCE, temperature 1 (scale 1): logits [[1, 0], [0, 1]] both ways;
    # each row's cross-entropy = -log(e / (e + 1)) = log(1 + 1/e), and the symmetric mean is the same.
    expected = math.log(1 + math.exp(-1))
    assert InfoNCELoss(temperature=1.0, learnable=False)(a, a).item() == pytest.approx(expected, rel=1e-6)
    # SigLIP, scale 10, bias -10: logits = 10*cos - 10 -> 0 on the diagonal, -10 off it; labels +1 / -1.
    # loss = -(sum over the 4 pairs of log sigmoid(label * logit)) / batch
    #      = -(2 * log sigmoid(0) + 2 * log sigmoid(10)) / 2 = log 2 + log(1 + e^-10)
    expected = math.log(2) + math.log(1 + math.exp(-10))
    assert SigLIPLoss(10.0, -10.0, learnable=False)(a, a).item() == pytest.approx(expected, rel=1e-6)
