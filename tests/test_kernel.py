"""mixed_lora_linear: the torch path against a per-row float64 reference, the Triton kernel against the torch path.

The Triton cases (``test_interp_*``) need the interpreter, which Triton picks when our kernel is decorated, so
``test_triton_interpreter`` runs them in a pytest subprocess with ``TRITON_INTERPRET=1``: this process (and
the engine tests beside it) never see an interpreted kernel.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alora_kernels import cpu_gemv, mixed_lora_linear

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
interpreter_only = pytest.mark.skipif(not (HAS_TRITON and INTERPRETED),
                                      reason="runs in test_triton_interpreter's TRITON_INTERPRET=1 subprocess")

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def make_slots(mix: str, T: int, S: int) -> torch.Tensor:
    """Adapter slot per row for a named mix of base and adapted rows."""
    t = torch.arange(T)
    if mix == "base":
        s = torch.full((T,), -1)
    elif mix == "one":  # every row on the last adapter
        s = torch.full((T,), S - 1)
    elif mix == "interleaved":  # -1, 0, 1, ..., S-1, -1, 0, ...
        s = t % (S + 1) - 1
    elif mix == "tail":  # an aLoRA call: base history, adapted from a boundary inside a 16-row tile
        s = torch.where(t >= (2 * T) // 3 + 1, S - 1, -1)
    elif mix == "split":  # one adapter in two separate runs around another one
        s = torch.where((t >= T // 3) & (t < (2 * T) // 3), S - 1, 0)
    elif mix == "random":
        s = torch.randint(-1, S, (T,), generator=torch.Generator().manual_seed(T))
    else:
        raise ValueError(mix)
    return s.to(torch.int32)


def make_inputs(T: int, K: int, N: int, r: int, S: int, dtype: torch.dtype, bias: bool, mix: str, seed: int = 0):
    """Inputs scaled so that base and low-rank parts are both O(1); ranks below r zero-padded like the engine's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g)
    W = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    A = torch.randn(S, r, K, generator=g) / K**0.5
    B = torch.randn(S, N, r, generator=g) / r**0.5
    for s in range(S):  # adapters of smaller ranks, stacked at the largest
        used = max(1, r >> s)
        A[s, used:], B[s, :, used:] = 0, 0
    scale = torch.rand(S, generator=g) + 0.5
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(x), cast(W), cast(b), cast(A), cast(B), scale, make_slots(mix, T, S)


def naive(x, W, b, A, B, scale, slot) -> torch.Tensor:
    """The contract, one row at a time, in float64."""
    x, W, A, B, scale = x.double(), W.double(), A.double(), B.double(), scale.double()
    rows = []
    for t in range(x.shape[0]):
        y = W @ x[t] + (b.double() if b is not None else 0)
        s = int(slot[t])
        if s >= 0:
            y = y + scale[s] * (B[s] @ (A[s] @ x[t]))
        rows.append(y)
    return torch.stack(rows) if rows else torch.empty(0, W.shape[0], dtype=torch.float64)


def assert_close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.double() - ref.double()).abs().max().item() if y.numel() else 0.0
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), f"max error {err}"


# ---- torch path ------------------------------------------------------------------------------------------

SHAPES = [(1, 16, 24), (7, 33, 50), (64, 96, 80), (130, 64, 40)]
MIXES = ["base", "one", "interleaved", "tail", "split", "random"]


@pytest.mark.parametrize("T,K,N", SHAPES)
@pytest.mark.parametrize("r", [1, 8, 64])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("bias", [True, False])
def test_torch_path_float32(T, K, N, r, mix, bias):
    args = make_inputs(T, K, N, r, 3, torch.float32, bias, mix)
    assert_close(mixed_lora_linear(*args, backend="torch"), naive(*args), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,K,N", SHAPES)
@pytest.mark.parametrize("mix", ["one", "tail", "interleaved", "split"])
def test_torch_path_half(dtype, T, K, N, mix):
    args = make_inputs(T, K, N, 16, 4, dtype, T % 2 == 1, mix)
    assert_close(mixed_lora_linear(*args, backend="torch"), naive(*args), dtype)


def test_no_adapters_is_exactly_linear():
    """Exactly the base projection (on CPU our GEMV kernel for a few rows: F.linear to float32 rounding)."""
    x, W, b, A, B, scale, slot = make_inputs(5, 32, 48, 8, 2, torch.float32, True, "base")
    base = cpu_gemv.linear(x, W, b)
    torch.testing.assert_close(base, F.linear(x, W, b), rtol=0, atol=1e-5)
    assert torch.equal(mixed_lora_linear(x, W, b, None, None, None, None), base)
    assert torch.equal(mixed_lora_linear(x, W, b, A, B, scale, None), base)
    assert torch.equal(mixed_lora_linear(x, W, b, A, B, scale, slot), base)  # all -1


def test_no_scale_means_ones_on_the_torch_path():
    """scale=None (the engine's call: scalings folded into B) is the same as a scale of ones."""
    x, W, b, A, B, _, slot = make_inputs(19, 48, 40, 8, 3, torch.float32, True, "random")
    ones = torch.ones(3)
    assert_close(mixed_lora_linear(x, W, b, A, B, None, slot), naive(x, W, b, A, B, ones, slot), torch.float32)


def test_empty_batch():
    args = make_inputs(0, 16, 24, 8, 2, torch.float32, True, "base")
    assert mixed_lora_linear(*args).shape == (0, 24)


def test_default_backend_on_cpu_is_torch_path():
    args = make_inputs(9, 32, 40, 8, 3, torch.float32, True, "random")
    assert torch.equal(mixed_lora_linear(*args), mixed_lora_linear(*args, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_of_range_slot_raises_on_both_backends(backend):
    """A slot with no stacked adapter is refused by both backends (the Triton kernel alone would treat it as a
    base row), with or without precomputed runs; nothing reaches the kernel, so no interpreter is needed."""
    x, W, b, A, B, scale, _ = make_inputs(3, 16, 16, 8, 2, torch.float32, False, "base")
    slot = torch.tensor([0, 2, -1], dtype=torch.int32)
    with pytest.raises(ValueError, match="slot 2 out of range"):
        mixed_lora_linear(x, W, b, A, B, scale, slot, backend=backend)
    with pytest.raises(ValueError, match="slot 2 out of range"):
        mixed_lora_linear(x, W, b, A, B, scale, slot, backend=backend, runs={0: [(0, 1)], 2: [(1, 2)]})


BAD_INPUTS = {  # name: (argument index, replacement, message fragment)
    "x rank": (0, torch.zeros(3, 16, 1), r"x \[T, K\]"),
    "W columns": (1, torch.zeros(24, 17), r"x \[T, K\]"),
    "bias": (2, torch.zeros(23), r"bias must be \[N=24\]"),
    "A columns": (3, torch.zeros(2, 8, 15), r"A must be \[S, r, K=16\]"),
    "B rank": (4, torch.zeros(2, 24, 4), r"B must be \[S=2, N=24, r=8\]"),
    "scale": (5, torch.zeros(3), r"scale must be \[S=2\]"),
    "slot length": (6, torch.zeros(4, dtype=torch.int32), r"slot must be \[T=3\]"),
    "slot dtype": (6, torch.zeros(3), "slot must be int32 or int64"),
    "dtype mix": (3, torch.zeros(2, 8, 16, dtype=torch.float16), "share one dtype"),
    "missing B": (4, None, "given together"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_shape_validation(name):
    args = list(make_inputs(3, 16, 24, 8, 2, torch.float32, True, "one"))
    index, value, message = BAD_INPUTS[name]
    args[index] = value
    with pytest.raises(ValueError, match=message):
        mixed_lora_linear(*args)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend must be"):
        mixed_lora_linear(*make_inputs(2, 16, 16, 8, 1, torch.float32, False, "one"), backend="cuda")


# ---- Triton kernel -----------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="needs triton; already inside the interpreter run")
def test_triton_interpreter():
    """Run this file's ``test_interp_*`` cases under TRITON_INTERPRET=1 in a fresh process."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "test_interp_"],
        cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0 and "skipped" not in summary, proc.stdout[-6000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED or HAS_CUDA, reason="needs triton, a CPU-only process")
def test_triton_on_cpu_without_interpreter_raises():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        mixed_lora_linear(*make_inputs(2, 16, 16, 8, 1, torch.float32, False, "one"), backend="triton")


RANK_SLOTS = [(1, 1), (8, 2), (16, 3), (64, 4)]  # (r, S): ranks below 16 are padded inside the kernel
INTERP_CASES = [  # (T, K, N, r, S, mix): ragged T, K and N off the block sizes; ranks rotate across the mixes
    (T, K, N, *RANK_SLOTS[(i + m) % 4], mix)
    for i, (T, (K, N)) in enumerate(itertools.product((1, 7, 33), ((16, 16), (40, 96), (96, 56))))
    for m, mix in enumerate(("base", "one", "interleaved", "tail"))
]


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,K,N,r,S,mix", INTERP_CASES)
def test_interp_matches_torch_path(dtype, T, K, N, r, S, mix):
    args = make_inputs(T, K, N, r, S, dtype, (T + K) % 2 == 0, mix)
    assert_close(mixed_lora_linear(*args, backend="triton"), mixed_lora_linear(*args, backend="torch"), dtype)


@interpreter_only
def test_interp_strided_inputs_and_bad_slots():
    """Non-contiguous x and W views; and the kernel itself, called past the wrapper's slot check, treats slots
    outside [0, S) as base rows instead of reading out of bounds."""
    from alora_kernels.triton_mixed import mixed_lora_linear_triton

    x, W, b, A, B, scale, _ = make_inputs(20, 48, 64, 8, 2, torch.float32, True, "base")
    x, W = x[:, ::2], W.t().contiguous().t()[:, ::2]
    slot = torch.tensor([0, 1, -1, 5, -7] * 4, dtype=torch.int32)
    valid = torch.where(slot < 2, slot, -1)
    expected = mixed_lora_linear(x, W, b, A[:, :, ::2], B, scale, valid, "torch")
    assert_close(mixed_lora_linear(x, W, b, A[:, :, ::2], B, scale, valid, backend="triton"), expected,
                 torch.float32)
    assert_close(mixed_lora_linear_triton(x, W, b, A[:, :, ::2], B, scale, slot), expected, torch.float32)


@interpreter_only
def test_interp_no_scale_means_ones():
    x, W, b, A, B, _, slot = make_inputs(21, 32, 48, 8, 2, torch.float32, False, "interleaved")
    assert_close(mixed_lora_linear(x, W, b, A, B, None, slot, backend="triton"),
                 mixed_lora_linear(x, W, b, A, B, torch.ones(2), slot, backend="torch"), torch.float32)


@interpreter_only
def test_interp_rejects_bfloat16():
    with pytest.raises(ValueError, match="float32 and float16 only"):
        mixed_lora_linear(*make_inputs(2, 16, 16, 8, 1, torch.bfloat16, False, "one"), backend="triton")


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON and not INTERPRETED), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,K,N,r,S,mix", [(1, 576, 1536, 8, 2, "one"), (37, 512, 300, 64, 4, "random"),
                                           (300, 1024, 1024, 16, 3, "tail"), (129, 96, 200, 1, 2, "split")])
def test_cuda_triton_matches_torch_path(dtype, T, K, N, r, S, mix):
    args = [t.cuda() if t is not None else None for t in make_inputs(T, K, N, r, S, dtype, True, mix)]
    assert_close(mixed_lora_linear(*args), mixed_lora_linear(*args, backend="torch"), dtype)
