"""Frozen linear layers as oneDNN prepacked matmuls (CPU, bf16/fp16 inference), GELU fused in.

``F.linear`` on a bf16 CPU tensor hands oneDNN the plain weight at every call, and oneDNN
reorders it into its blocked layout each time; a GELU after it is one more pass over the
activations. A frozen encoder's weights never change, so they are reordered once
(``torch.ops.mkldnn._reorder_linear_weight``, what torch.compile's CPU backend does) and a
Linear -> GELU pair in an ``nn.Sequential`` (ViT MLPs: c_fc, gelu, c_proj) becomes one fused
call (``torch.ops.mkldnn._linear_pointwise``). Measured on this project's 2-core EPYC
(AVX-512 BF16), the ViT-B-32 MLP GEMM 1600x768x3072: F.linear 368 GFLOP/s, prepacked 427;
with the GELU, 287 vs 401 (benchmarks/extract.py (c) has the whole-model figures).

Only the forward of each layer changes: its ``weight`` and ``bias`` stay as they are (the
state dict, the weights digest, ``nn.MultiheadAttention`` reading ``out_proj.weight`` directly),
and the GELU module keeps its name as an ``nn.Identity``. Training never sees it: stage 2 refuses
an encoder that computes in reduced precision (projection/finetune.py).
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
    """Prepack every ``nn.Linear`` of a frozen module in place; fuse Linear -> GELU pairs. Returns layers packed."""
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
    n = len(fused)
    for lin in module.modules():
        if isinstance(lin, nn.Linear) and id(lin) not in fused:
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
