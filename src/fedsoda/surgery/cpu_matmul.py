"""Float32 matmuls for bf16 weights on CPUs without native bf16 (AVX2 and older).

Clients hold their weights in bf16 (and NF4, dequantized to bf16 for every matmul), as on a
GPU. On a CPU without AVX512-BF16 or AMX, PyTorch has no fast bf16 GEMM for some layouts: the
input gradient ``grad @ W`` of a bf16 linear falls back to a scalar loop. Measured here
(torch 2.13, AVX2, ``[1024, 49152] @ [49152, 576]``): 72.7 s in bf16 against 0.68 s in
float32; the forward ``x @ W.T`` 5.7 s against 1.0 s. Pre-alignment, which backpropagates
through the 49,152-word LM head, spent 87% of its time there.

``use_fp32_matmuls`` keeps every weight as stored (bf16, NF4: the memory a client holds does
not change) and computes each frozen bf16 linear in float32 from a float32 copy of at most
``CHUNK_BYTES`` of its rows at a time; 4-bit layers dequantize to float32 instead of bf16.
Outputs are rounded back to the input's dtype, as the bf16 kernels round theirs, so
activations keep their dtype and size.

Attention has the same problem: the backward of PyTorch's CPU flash attention is several
times slower in bf16 than in float32 there. ``use_fp32_matmuls`` therefore also switches the
model to ``ATTENTION`` (registered with transformers' AttentionInterface): transformers' own
SDPA attention, given float32 queries, keys and values, its output rounded back.
"""

from __future__ import annotations

import os
import types

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CHUNK_BYTES = 16 * 2**20  # float32 rows of a weight materialised at once (LM head: 8 chunks)
ATTENTION = "fedsoda_fp32_sdpa"


def native_bf16_matmul(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls on ``device`` run on native kernels (any GPU; CPUs with oneDNN's
    bf16 support, i.e. AVX512-BF16 or AMX)."""
    if torch.device(device).type != "cpu":
        return True
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _row_chunks(weight: torch.Tensor) -> list[slice]:
    rows = max(1, CHUNK_BYTES // (4 * weight.shape[1]))
    return [slice(i, i + rows) for i in range(0, weight.shape[0], rows)]


class _Fp32Linear(torch.autograd.Function):
    """``x @ W.T + b`` for a frozen 16-bit ``W``, in float32, chunked over W's rows; saves
    the 16-bit ``W`` (not a float32 copy) for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(weight)
        ctx.dtype = x.dtype
        x32 = x.float()
        out = torch.cat([F.linear(x32, weight[rows].float()) for rows in _row_chunks(weight)],
                        dim=-1)
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad32 = grad.float()
        grad_x = None
        for rows in _row_chunks(weight):
            part = grad32[..., rows] @ weight[rows].float()
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x.to(ctx.dtype), None, None


def _fp32_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
    return _Fp32Linear.apply(x, self.weight, self.bias)


def _fp32_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs):
    """transformers' SDPA attention in float32 (see the module docstring)."""
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                          attention_mask, **kwargs)
    return out.to(query.dtype), weights


AttentionInterface.register(ATTENTION, _fp32_sdpa)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # masks as SDPA takes them


def _use_fp32_attention(model: nn.Module) -> None:
    """Every transformers model inside ``model`` that computes attention with SDPA."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation == "sdpa":
            module.set_attn_implementation(ATTENTION)


def use_fp32_matmuls(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Compute ``model``'s 16-bit and 4-bit linears in float32 where ``device`` lacks native
    bf16 matmuls (see the module docstring); a no-op elsewhere, or where the environment sets
    ``FEDSODA_FP32_MATMULS=0`` (to compare). Idempotent; returns ``model``."""
    if native_bf16_matmul(device) or os.environ.get("FEDSODA_FP32_MATMULS", "1").strip() == "0":
        return model
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.float32
            module.compute_type_is_set = True
        elif isinstance(module, nn.Linear) and module.weight.dtype in (torch.bfloat16,
                                                                      torch.float16):
            module.forward = types.MethodType(_fp32_forward, module)
    _use_fp32_attention(model)
    return model
