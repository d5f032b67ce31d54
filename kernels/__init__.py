"""Mixed base + multi-adapter LoRA linear layer: one call serves a batch whose rows use different adapters.

Two backends: a Triton kernel (``triton_mixed``) and a torch path (``torch_ref``). Triton is imported lazily,
only when the Triton backend is first used, so importing this package stays cheap and a CPU process never
loads it (which also lets tests enable the interpreter, ``TRITON_INTERPRET=1``, in a subprocess of their own).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from functools import cache


def _hand_over_the_name_kernels() -> None:
    """Imported as ``kernels``, this folder is shadowing Hugging Face's ``kernels`` package: a checkout's root is
    on ``sys.path`` (``python -m ...`` run there), and transformers imports ``kernels`` whenever that package is
    installed. Put the real package (or its absence) in ``sys.modules["kernels"]``, which is what the import
    statement then returns; this module object is dropped."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the alora checkout's kernels/ folder installs as "
                                  "alora_kernels)", name="kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_the_name_kernels()

import torch

from alora_kernels import cpu_gemv
from alora_kernels.torch_ref import add_lora_torch, mixed_lora_linear_torch, slot_runs

__all__ = ["add_lora", "mixed_lora_linear", "slot_runs"]


def mixed_lora_linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor | None,
                      B: torch.Tensor | None, scale: torch.Tensor | None, slot: torch.Tensor | None,
                      backend: str | None = None,
                      runs: dict[int, list[tuple[int, int]]] | None = None) -> torch.Tensor:
    """A linear layer whose rows each add their own adapter's low-rank update.

    ``y[t] = x[t]·Wᵀ (+ bias) + scale[s]·(x[t]·A[s]ᵀ)·B[s]ᵀ`` where ``s = slot[t]``; nothing is added where
    ``s = -1`` (any negative slot is a base row); a slot with no stacked adapter (``s >= S``) is an error.

    Args:
        x: [T, K] activations.
        W: [N, K] base weight; ``bias``: [N] or None.
        A: [S, r, K] stacked adapter down-projections (smaller ranks zero-padded to r).
        B: [S, N, r] stacked adapter up-projections.
        scale: [S] float32 per-adapter scaling (``lora_alpha / r`` or its rsLoRA form), or None for ones: the
            engine folds each adapter's scaling into its B (PEFT's alpha patterns may scale modules differently).
        slot: [T] int32 (or int64) adapter slot per row, -1 for base rows.
        backend: None picks Triton for CUDA tensors (torch if Triton is not installed) and torch elsewhere;
            "triton" forces the kernel (CPU tensors need ``TRITON_INTERPRET=1`` and float32/float16);
            "torch" forces the torch path.

        runs: optional ``{slot: [(start, stop), ...]}`` runs of rows per adapter slot (``slot_runs``), for
            callers that make many calls with one slot map (the engine: once per forward); without it the
            slots are read here once. A slot >= S raises ``ValueError`` on both backends.

    ``A is None`` or ``slot is None`` means "no adapters": the call is exactly the base projection both backends
    start from, ``cpu_gemv.linear(x, W, bias)`` (``F.linear``, or our GEMV kernel for a few rows on CPU).

    Returns:
        [T, N] in x's dtype.
    """
    if A is None or slot is None:
        return cpu_gemv.linear(x, W, bias)
    _check(x, W, bias, A, B, scale, slot)
    runs = _checked_runs(slot, A.shape[0], runs)
    if backend is None:
        backend = "triton" if x.is_cuda and _triton_installed() else "torch"
    if backend == "torch":
        return mixed_lora_linear_torch(x, W, bias, A, B, scale, slot, runs)
    if backend == "triton":
        from alora_kernels.triton_mixed import mixed_lora_linear_triton

        if scale is None:
            scale = torch.ones(A.shape[0], dtype=torch.float32, device=x.device)
        return mixed_lora_linear_triton(x, W, bias, A, B, scale, slot)
    raise ValueError(f"backend must be None, 'torch' or 'triton', not {backend!r}")


def add_lora(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor | None,
             slot: torch.Tensor, runs: dict[int, list[tuple[int, int]]] | None = None) -> torch.Tensor:
    """Add each row's adapter update to ``y``, a base projection of ``x`` computed elsewhere (e.g. from int8
    weights): ``y[t] += scale[s]·(x[t]·A[s]ᵀ)·B[s]ᵀ`` where ``s = slot[t]``, in place; returns ``y``.

    ``y`` [T, N] of x's dtype; the other arguments as in ``mixed_lora_linear``, whose torch backend adds its
    updates with this same code, in x's dtype. Runs the torch path on every device.
    """
    if x.dim() != 2 or y.dim() != 2 or y.shape[0] != x.shape[0] or y.dtype != x.dtype:
        raise ValueError(f"expected x [T, K] and y [T, N] of x's dtype, got x {tuple(x.shape)} {x.dtype} and "
                         f"y {tuple(y.shape)} {y.dtype}")
    _check_adapters(x, y.shape[1], A, B, scale, slot)
    return add_lora_torch(y, x, A, B, scale, _checked_runs(slot, A.shape[0], runs))


def _checked_runs(slot: torch.Tensor, num_slots: int,
                  runs: dict[int, list[tuple[int, int]]] | None) -> dict[int, list[tuple[int, int]]]:
    """``runs``, or ``slot_runs(slot, num_slots)`` when None; a slot with no stacked adapter is refused (a base
    row would be silently wrong)."""
    if runs is None:
        return slot_runs(slot, num_slots)  # reads the slots once: a device sync off CPU
    if runs and max(runs) >= num_slots:
        raise ValueError(f"slot {max(runs)} out of range: only {num_slots} adapter slots are stacked")
    return runs


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _check(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor | None,
           scale: torch.Tensor | None, slot: torch.Tensor) -> None:
    """Shape and dtype checks: metadata only, no device reads (this runs on every projection call)."""
    if x.dim() != 2 or W.dim() != 2 or x.shape[1] != W.shape[1]:
        raise ValueError(f"expected x [T, K] and W [N, K], got x {tuple(x.shape)} and W {tuple(W.shape)}")
    N = W.shape[0]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [N={N}], got {tuple(bias.shape)}")
    _check_adapters(x, N, A, B, scale, slot)
    if W.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"x, W, bias, A and B must share one dtype, got x {x.dtype}, W {W.dtype}, "
                         f"A {A.dtype}, B {B.dtype}" + (f", bias {bias.dtype}" if bias is not None else ""))


def _check_adapters(x: torch.Tensor, N: int, A: torch.Tensor, B: torch.Tensor | None, scale: torch.Tensor | None,
                    slot: torch.Tensor) -> None:
    """The adapter half of ``_check``, for an output of N columns."""
    T, K = x.shape
    if B is None:
        raise ValueError("A and B must be given together")
    if A.dim() != 3 or A.shape[2] != K:
        raise ValueError(f"A must be [S, r, K={K}], got {tuple(A.shape)}")
    S, r = A.shape[0], A.shape[1]
    if B.shape != (S, N, r):
        raise ValueError(f"B must be [S={S}, N={N}, r={r}], got {tuple(B.shape)}")
    if scale is not None and scale.shape != (S,):
        raise ValueError(f"scale must be [S={S}], got {tuple(scale.shape)}")
    if slot.shape != (T,):
        raise ValueError(f"slot must be [T={T}], got {tuple(slot.shape)}")
    if slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot must be int32 or int64, got {slot.dtype}")
    if not (A.dtype == B.dtype == x.dtype):
        raise ValueError(f"x, A and B must share one dtype, got x {x.dtype}, A {A.dtype}, B {B.dtype}")
