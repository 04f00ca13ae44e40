"""oneDNN-prepacked linears (bf16 CPU inference): same outputs and state as the plain layers."""

import pytest
import torch
from torch import nn

from encoders.packed import cpu_has_fast, pack_linears

pytestmark = pytest.mark.skipif(not cpu_has_fast(torch.bfloat16), reason="this CPU has no native bf16 matmul")


def _mlp(approximate: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(approximate=approximate), nn.Linear(256, 32), nn.Sequential(nn.Linear(32, 16)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_packed_module_matches_the_plain_one_and_keeps_its_state(approximate):
    plain = _mlp(approximate).to(torch.bfloat16).eval()
    packed = _mlp(approximate).to(torch.bfloat16).eval()
    names = list(packed.state_dict())
    assert pack_linears(packed) == 3
    assert isinstance(packed[1], nn.Identity)  # the GELU now runs inside the first matmul
    assert list(packed.state_dict()) == names
    x = torch.randn(5, 7, 64).to(torch.bfloat16)  # 3-D input, as a ViT's tokens
    with torch.inference_mode():
        a, b = plain(x).float(), packed(x).float()
        ref = _mlp(approximate).eval()(x.float())
    torch.testing.assert_close(b, a, atol=0.03, rtol=0.03)  # bf16 rounding of the same maths
    assert torch.nn.functional.cosine_similarity(b.flatten(1), ref.flatten(1)).min() > 0.999
    # a float32 input (not what the layer was packed for) takes the plain path, GELU included
    with torch.inference_mode():
        torch.testing.assert_close(packed.float()(x.float()), plain.float()(x.float()), atol=1e-5, rtol=1e-5)


def test_packed_self_attention_matches_the_module_and_leaves_other_calls_alone():
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(64, 4, batch_first=True).to(torch.bfloat16).eval()
    packed = nn.MultiheadAttention(64, 4, batch_first=True).to(torch.bfloat16).eval()
    packed.load_state_dict(plain.state_dict())
    assert pack_linears(packed) == 1
    x = torch.randn(3, 9, 64).to(torch.bfloat16)
    causal = torch.full((9, 9), float("-inf")).triu(1)  # a text tower's additive causal mask
    with torch.inference_mode():
        for mask in (None, causal):
            a = plain(x, x, x, need_weights=False, attn_mask=mask)[0].float()
            b = packed(x, x, x, need_weights=False, attn_mask=mask)[0].float()
            torch.testing.assert_close(b, a, atol=0.03, rtol=0.03)
        # cross-attention and asked-for weights take the module's own path, exactly
        y = torch.randn(3, 5, 64).to(torch.bfloat16)
        assert torch.equal(packed(x, y, y)[0], plain(x, y, y)[0])
        assert torch.equal(packed(x, x, x, need_weights=True)[1], plain(x, x, x, need_weights=True)[1])
