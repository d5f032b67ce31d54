"""The decoder's small per-token layers on CPU, each one op of ``cpu_ops.cpp`` instead of five to eight torch
ops: RMSNorm and rotary position embeddings. A decode step runs them 90 times on one row each, where torch's
per-op dispatch, not arithmetic, is the cost. Only decode-sized inputs (up to ``cpu_gemv.MAX_ROWS`` tokens) take
them: a prompt's forward is long enough to make dispatch negligible, and torch's own ops there keep bfloat16
prefill bitwise equal to transformers' (a different float32 reduction order in the norm flips bfloat16 roundings).
Without the extension, and for other dtypes and devices, both are the torch computations they replace.
"""

from __future__ import annotations

import torch

from alora_kernels import cpu_gemv

__all__ = ["rms_norm", "rotary"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x·rsqrt(mean(x², -1) + eps))`` as transformers computes it: normalized in float32, rounded to
    x's dtype, then multiplied by the weight in x's dtype. x [..., D], weight [D]."""
    if (not x.is_cuda and x.is_floating_point() and weight.dtype == x.dtype and x.stride(-1) == 1
            and x.numel() <= cpu_gemv.MAX_ROWS * x.shape[-1] and cpu_gemv.available(x.dtype)):
        return torch.ops.alora_cpu.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` for x [T, heads, D] and cos/sin [T, 1, D] of x's dtype, where
    ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``, rounded as torch's ops round (bfloat16 included)."""
    if (not x.is_cuda and x.is_floating_point() and cos.dtype == x.dtype and x.stride(-1) == 1
            and x.shape[0] <= cpu_gemv.MAX_ROWS and cpu_gemv.available(x.dtype)):
        return torch.ops.alora_cpu.rotary(x, cos, sin)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
