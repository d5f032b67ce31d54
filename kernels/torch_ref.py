"""The torch path of ``mixed_lora_linear``: the CPU production path and the reference for the Triton kernel.

One base GEMM for all rows, then, per adapter slot present, two small GEMMs on that slot's rows (``add_lora_torch``,
which also adds the adapters to a base computed elsewhere, e.g. from int8 weights):

- rows of a slot that form one contiguous run (decode of one sequence, an aLoRA's tail after its invocation,
  a batch where every row shares one adapter) are updated in place through row slices: no gather, no scatter
  (float32 on CPU: one op of the CPU extension, its two products through the GEMV);
- rows of a slot scattered across the batch are gathered, updated and scattered back with ``index_add_``.

Numerics: everything runs in x's dtype, as PEFT does: the low-rank intermediate ``x·Aᵀ`` is rounded to it, the
GEMMs accumulate as torch's do (float32 on CPU for half dtypes), and the expand adds ``scale·h·Bᵀ`` into the
base output inside one ``addmm_`` (scale as its ``alpha``; float32 on CPU: ``h·Bᵀ`` by the GEMV, then one add). The Triton kernel rounds the intermediate the same
way but keeps base and update in one float32 accumulator, so the two agree to the dtype's rounding.
"""

from __future__ import annotations

from itertools import groupby

import torch
import torch.nn.functional as F

from alora_kernels import cpu_gemv


def slot_runs(slot: torch.Tensor | list[int], num_slots: int) -> dict[int, list[tuple[int, int]]]:
    """Map each adapter slot present in ``slot`` to its runs of consecutive rows ``[(start, stop), ...]``.

    Negative slots are base rows and are left out. Reads the slots once (a device sync off CPU).
    """
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for s, group in groupby(slot.tolist() if isinstance(slot, torch.Tensor) else slot):
        stop = start + sum(1 for _ in group)
        if s >= 0:
            if s >= num_slots:
                raise ValueError(f"slot {s} out of range: only {num_slots} adapter slots are stacked")
            runs.setdefault(s, []).append((start, stop))
        start = stop
    return runs


def mixed_lora_linear_torch(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                            B: torch.Tensor, scale: torch.Tensor | None, slot: torch.Tensor,
                            runs: dict[int, list[tuple[int, int]]]) -> torch.Tensor:
    """``y[t] = x[t]·Wᵀ (+ bias) + scale[s]·(x[t]·A[s]ᵀ)·B[s]ᵀ`` with ``s = slot[t]`` (nothing added where s < 0).

    Shapes, slots and ``runs`` (``slot_runs(slot, S)``) are assumed valid: ``alora_kernels.mixed_lora_linear``
    checks them.
    """
    y = cpu_gemv.linear(x, W, bias)  # F.linear, or our GEMV kernel for a few rows on CPU
    return add_lora_torch(y, x, A, B, scale, runs)


def add_lora_torch(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor | None,
                   runs: dict[int, list[tuple[int, int]]]) -> torch.Tensor:
    """``y[t] += scale[s]·(x[t]·A[s]ᵀ)·B[s]ᵀ`` for the rows of every slot in ``runs``, in place; returns ``y``.

    ``y`` [T, N] is a base projection of ``x`` [T, K], however it was computed (``mixed_lora_linear_torch``'s
    own, or one from int8 weights). Shapes and ``runs`` are assumed valid (``alora_kernels.add_lora`` checks).
    """
    if not runs:
        return y
    scales = scale.tolist() if scale is not None else [1.0] * A.shape[0]
    one_op = _one_op_runs(y, x, A, B)
    for s, spans in runs.items():
        if len(spans) == 1 and one_op:
            torch.ops.alora_cpu.add_lora_rows_(y, x, A, B, s, spans[0][0], spans[0][1], scales[s])
        elif len(spans) == 1:
            start, stop = spans[0]
            xs, ys = (x, y) if stop - start == len(x) else (x[start:stop], y[start:stop])
            ys.addmm_(F.linear(xs, A[s]), B[s].t(), alpha=scales[s])
        else:
            rows = torch.tensor([i for a, b in spans for i in range(a, b)], device=x.device)
            y.index_add_(0, rows, F.linear(F.linear(x[rows], A[s]), B[s]), alpha=scales[s])
    return y


def _one_op_runs(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether a contiguous run's update is one op of the CPU extension (``add_lora_rows_``): float32 on CPU
    (other dtypes keep ``addmm_``'s single rounding of base plus update, as PEFT rounds it), no gradients."""
    return (x.dtype == y.dtype == A.dtype == B.dtype == torch.float32 and not x.is_cuda and A.is_contiguous()
            and B.is_contiguous() and not (torch.is_grad_enabled() and (x.requires_grad or A.requires_grad))
            and cpu_gemv.available(torch.float32))
