"""Attention on CPU for the engine's forward: one new token against a KV cache (decode), and prefill.

``decode_attention`` is our kernel (``cpu_ops.cpp``): the cache's positions are split into chunks over the
threads and each chunk's partial softmax merged at the end (flash-decoding), float32 math for float32 or
bfloat16 inputs, read straight from the cache's strided views. torch's path for one query row (three small
batched matmuls and a softmax) costs more in dispatch and thread wake-ups than in arithmetic at decode sizes.
``decode_step`` goes from a decoding token's q|k|v row to its attention output in one op (rotary embedding, the
cache write, decode attention). ``attention`` is torch's ``scaled_dot_product_attention``, split over heads on
the worker pool in a thread that called ``cpu_gemv.use_worker_pool``. Without the extension, ``decode_attention``
and ``attention`` are the torch computations they replace (``decode_step`` is only called where it is served).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alora_kernels import cpu_gemv

__all__ = ["attention", "decode_attention", "decode_step", "serves_decode_step"]


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of one query row per head over ``keys``/``values``.

    q [H, D]; keys, values [Hkv, T, D] with unit stride along D (any other strides: the KV cache's valid prefix
    as a view), H a multiple of Hkv (grouped-query attention: heads ``h·G .. h·G+G-1`` read KV head h), float32
    or bfloat16 throughout, on CPU. Returns [H, D] in q's dtype, ``softmax(scale·q·Kᵀ)·V`` per head, computed in
    float32 (bfloat16: one rounding at the end); within float32 rounding of torch's float32 result.
    """
    if q.is_floating_point() and cpu_gemv.available(q.dtype) and q.shape[0] // max(keys.shape[0], 1) <= 8:
        return torch.ops.alora_cpu.decode_attention(q, keys, values, scale)
    G = q.shape[0] // keys.shape[0]
    qg = q.view(keys.shape[0], G, q.shape[-1])
    scores = torch.baddbmm(qg.new_empty(()), qg, keys.transpose(1, 2), beta=0, alpha=scale)
    out = torch.bmm(torch.softmax(scores.float(), dim=-1).to(values.dtype), values)
    return out.reshape(q.shape)


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
              is_causal: bool, scale: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal, scale=scale)`` for
    q [1, H, n, D] and keys/values [1, H, T, D] (heads already repeated for grouped queries); split over heads
    on the worker pool in a thread that uses it."""
    if cpu_gemv.available():
        return torch.ops.alora_cpu.attention(q, keys, values, mask, is_causal, scale)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal, scale=scale)


def serves_decode_step(dtype: torch.dtype) -> bool:
    """Whether ``decode_step`` runs for activations and caches of ``dtype`` here (float32, or bfloat16 where the
    CPU has AVX512_BF16, with the extension built)."""
    return dtype.is_floating_point and cpu_gemv.available(dtype)


def decode_step(qkv: torch.Tensor, row: int, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, pos: int, start: int, heads: int, scale: float) -> torch.Tensor:
    """One decoding token of one sequence through attention, in one op (where ``serves_decode_step``).

    ``qkv[row]`` is the token's fused q|k|v projection (qkv [T, (heads + 2·Hkv)·D]); cos/sin [T, 1, D] the rotary
    tables of the forward's rows; k_cache/v_cache [Hkv, capacity, D] one layer's KV cache. q and k are rotated,
    k and v stored at position ``pos`` (in place), and the rotated q attends over positions ``start..pos``
    (``start > 0``: a sliding window). Returns [heads, D]; the arithmetic and roundings of the torch ops it
    replaces (``rotary``, the cache write, ``decode_attention``).
    """
    return torch.ops.alora_cpu.decode_step_attention(qkv, row, cos, sin, k_cache, v_cache, pos, start, heads, scale)
