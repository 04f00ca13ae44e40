"""Frozen linear layers as oneDNN prepacked matmuls (CPU, bf16/fp16 inference), GELU fused in.

``F.linear`` on a bf16 CPU tensor hands oneDNN the plain weight at every call, and oneDNN
reorders it into its blocked layout each time; a GELU after it is one more pass over the
activations. A frozen encoder's weights never change, so they are reordered once
(``torch.ops.mkldnn._reorder_linear_weight``, what torch.compile's CPU backend does) and a
Linear -> GELU pair in an ``nn.Sequential`` (ViT MLPs: c_fc, gelu, c_proj) becomes one fused
call (``torch.ops.mkldnn._linear_pointwise``). Measured on this project's 2-core EPYC
(AVX-512 BF16), the ViT-B-32 MLP GEMM 1600x768x3072: F.linear 368 GFLOP/s, prepacked 427;
with the GELU, 287 vs 401 (benchmarks/extract.py (c) has the whole-model figures).

``nn.MultiheadAttention`` (self-attention, batch-first) gets the same treatment: its input and
output projections prepacked, the attention itself a plain matmul + softmax instead of the fused
``_native_multi_head_attention`` path (its qkv split/rescale alone cost 28 ms of a ~760 ms ViT-B-32
bf16 batch here); the whole encode went from 41.8 to 43.1 items/s. torch's CPU flash attention
(``scaled_dot_product_attention``) was slower at ViT-B-32's 50 tokens: 78 ms against 27, 41.4 items/s. Anything else (cross-attention, a key padding
mask, a boolean mask, weights asked for) takes the module's own forward.

Only the forward of each layer changes: its ``weight`` and ``bias`` stay as they are (the
state dict, the weights digest, ``nn.MultiheadAttention`` reading ``out_proj.weight`` directly),
and the GELU module keeps its name as an ``nn.Identity``. Training never sees it: stage 2 refuses
an encoder that computes in reduced precision (projection/finetune/model.py).
"""

from __future__ import annotations

import types

import torch
from torch import nn

_GELU_ALGORITHM = {"none": "none", "tanh": "tanh"}


def cpu_has_fast(dtype: torch.dtype) -> bool:
    """This CPU has native ``dtype`` matmul in oneDNN (AVX-512 BF16 / AMX / AVX-512 FP16)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    ops = torch.ops.mkldnn
    check = ops._is_mkldnn_bf16_supported if dtype == torch.bfloat16 else ops._is_mkldnn_fp16_supported
    try:
        return bool(torch.backends.mkldnn.is_available() and check())
    except (AttributeError, RuntimeError):
        return False


def pack_linears(module: nn.Module) -> int:
    """Prepack every ``nn.Linear`` and self-attention of a frozen module in place; fuse Linear -> GELU pairs.

    Returns the number of layers packed.
    """
    attention = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention)]
    n = sum(_pack_attention(mha) for mha in attention)
    skip = {id(m.out_proj) for m in attention}  # read as weights by the attention, never called
    fused = set()
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            lin, act = seq._modules[a], seq._modules[b]
            if isinstance(lin, nn.Linear) and type(act) is nn.GELU and id(lin) not in fused:
                _pack(lin, "gelu", [], _GELU_ALGORITHM[act.approximate])
                seq._modules[b] = nn.Identity()
                fused.add(id(lin))
    n += len(fused)
    for lin in module.modules():
        if isinstance(lin, nn.Linear) and id(lin) not in fused | skip:
            _pack(lin, "none", [], "")
            n += 1
    return n


def _pack(lin: nn.Linear, attr: str, scalars: list, algorithm: str) -> None:
    packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), None)
    bias = None if lin.bias is None else lin.bias.detach()

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != packed.dtype or x.device.type != "cpu":  # anything else: the layer's own path
            out = nn.functional.linear(x, self.weight, self.bias)
            return nn.functional.gelu(out, approximate=algorithm) if attr == "gelu" else out
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, scalars, algorithm)

    lin.forward = types.MethodType(forward, lin)


def _pack_attention(mha: nn.MultiheadAttention) -> bool:
    if not (mha.batch_first and mha._qkv_same_embed_dim and mha.in_proj_bias is not None and mha.bias_k is None
            and not mha.add_zero_attn):
        return False
    w_in = torch.ops.mkldnn._reorder_linear_weight(mha.in_proj_weight.detach(), None)
    w_out = torch.ops.mkldnn._reorder_linear_weight(mha.out_proj.weight.detach(), None)
    b_in, b_out = mha.in_proj_bias.detach(), mha.out_proj.bias.detach()
    heads, own = mha.num_heads, mha.forward

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        plain = (query is not key or key is not value or key_padding_mask is not None or need_weights or is_causal
                 or query.dim() != 3 or query.dtype != w_in.dtype or query.device.type != "cpu"
                 or (attn_mask is not None and (attn_mask.dtype == torch.bool or attn_mask.dim() != 2)))
        if plain:
            return own(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                       attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        b, length, dim = query.shape
        qkv = torch.ops.mkldnn._linear_pointwise(query, w_in, b_in, "none", [], "")  # (B, L, 3 D)
        q, k, v = qkv.view(b, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, L, D/H)
        scores = torch.matmul(q * (dim // heads) ** -0.5, k.transpose(-2, -1))  # (B, H, L, L)
        if attn_mask is not None:
            scores = scores + attn_mask.to(scores.dtype)  # additive, (L, L)
        out = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(b, length, dim)
        return torch.ops.mkldnn._linear_pointwise(out, w_out, b_out, "none", [], ""), None

    mha.forward = types.MethodType(forward, mha)
    return True
