"""The Triton kernel of ``mixed_lora_linear``: base GEMM and per-row adapter update in one launch.

Design. The grid tiles the output, one program per (row tile, column tile). A program

1. runs the base GEMM over K into a float32 accumulator;
2. reads its rows' slots and walks the distinct adapters present in the tile, smallest slot first
   (``tl.min`` over the slots above the previous one). For each: the shrink ``h = x·A[s]ᵀ`` over K for the
   whole tile, zeroed on rows of other slots, then the expand ``acc += scale[s]·h·B[s]ᵀ`` on this tile's
   columns. A tile whose rows are all base never enters the loop, so it costs exactly a GEMM tile;
3. adds the bias and stores in x's dtype.

Why not sort tokens by adapter first (vLLM's approach, separate shrink and expand launches)? Our tiles
hold few distinct slots: a decode step has one row per live conversation, and a prefill adapts contiguous
runs (an aLoRA call adapts the tail after its invocation), so one launch with no permutation is simpler.
The price: each column tile recomputes its rows' shrink, r/BLOCK_N extra work relative to the base GEMM
(r padded to >= 16 because ``tl.dot`` needs it), A's tiles are re-read (mostly from L2), and a tile with d
distinct slots runs d shrinks.

Numerics: float32 accumulation throughout; ``h`` is rounded to x's dtype before the expand (tensor-core
input, and the same rounding as the torch path), the scale is applied to the expand's float32 result.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _mixed_lora_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, scale_ptr, slot_ptr, y_ptr,
    T, N, K, R, S,
    stride_xt, stride_xk, stride_wn, stride_wk,
    stride_as, stride_ar, stride_ak, stride_bs, stride_bn, stride_br,
    stride_yt, stride_yn,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    t_mask, n_mask, r_mask = offs_t < T, offs_n < N, offs_r < R

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_ptr + offs_t[:, None] * stride_xt + k[None, :] * stride_xk,
                    mask=t_mask[:, None] & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=(k[:, None] < K) & n_mask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    # Out-of-range slots count as base rows, so a bad slot can never read outside A and B.
    slots = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1)
    slots = tl.where((slots >= 0) & (slots < S), slots, S)
    current = tl.min(slots, axis=0)
    while current < S:
        a_base = a_ptr + current.to(tl.int64) * stride_as
        h = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            x = tl.load(x_ptr + offs_t[:, None] * stride_xt + k[None, :] * stride_xk,
                        mask=t_mask[:, None] & (k[None, :] < K), other=0.0)
            a = tl.load(a_base + k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                        mask=(k[:, None] < K) & r_mask[None, :], other=0.0)
            h = tl.dot(x, a, h, input_precision=DOT_PRECISION)
        h = tl.where((slots == current)[:, None], h, 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(b_ptr + current.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br
                    + offs_n[None, :] * stride_bn, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.load(scale_ptr + current) * tl.dot(h, b, input_precision=DOT_PRECISION)
        current = tl.min(tl.where(slots > current, slots, S), axis=0)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=t_mask[:, None] & n_mask[None, :])


def _tiles(T: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_N, BLOCK_K, num_warps) by batch size: narrow column tiles for decode so that enough
    programs stream W, square 128-wide tiles for prefill. Untuned guesses, see benchmarks/kernel.py."""
    if T <= 16:
        return 16, 32, 128, 4
    if T <= 64:
        return 64, 64, 64, 4
    return 128, 128, 32, 8


def mixed_lora_linear_triton(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                             B: torch.Tensor, scale: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """Triton backend of ``alora_kernels.mixed_lora_linear`` (shapes already checked there).

    Slots outside ``[0, S)`` are treated as base rows (this path never reads slot values on the host).
    """
    if not x.is_cuda:
        if not isinstance(_mixed_lora_kernel, InterpretedFunction):
            raise RuntimeError("the Triton backend on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 "
                               "before alora_kernels first uses Triton in this process "
                               f"(TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET')!r})")
        if x.dtype not in (torch.float32, torch.float16):
            raise ValueError(f"the Triton interpreter supports float32 and float16 only, got {x.dtype}")
    T, K = x.shape
    N, (S, R) = W.shape[0], A.shape[:2]
    y = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if T == 0 or N == 0:
        return y
    block_t, block_n, block_k, num_warps = _tiles(T)
    # fp32 inputs follow torch's TF32 switch so that both backends round alike
    precision = "tf32" if x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    grid = (triton.cdiv(T, block_t), triton.cdiv(N, block_n))
    _mixed_lora_kernel[grid](
        x, W, bias if bias is not None else y, A, B, scale.contiguous(), slot.contiguous(), y,
        T, N, K, R, S,
        x.stride(0), x.stride(1), W.stride(0), W.stride(1),
        A.stride(0), A.stride(1), A.stride(2), B.stride(0), B.stride(1), B.stride(2),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, DOT_PRECISION=precision,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=max(16, triton.next_power_of_2(R)),
        num_warps=num_warps,
    )
    return y
