"""Our CPU GEMV kernel (``alora_kernels.cpu_gemv``) against torch's F.linear and a float64 reference.

Shapes: the default model's projections and odd sizes (N and K not multiples of the 16 or 32 lanes a vector
holds, K shorter than one vector); M from 1 to 16 rows (one pass of up to 8 rows, and two); float32 and
bfloat16; with and without bias. Plus what the kernel promises beyond the numbers: a row's result does not
depend on the other rows or the thread count, inputs it does not serve go to F.linear unchanged, and a failed
build falls back to F.linear with a warning.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alora_kernels import cpu_gemv

pytestmark = pytest.mark.skipif(not cpu_gemv.available(torch.float32),
                                reason="the GEMV kernel does not run here (no AVX-512 or no compiler)")
needs_bf16 = pytest.mark.skipif(not cpu_gemv.available(torch.bfloat16), reason="this CPU lacks AVX512_BF16")

MODEL_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K): qkv, o, gate_up, down
ODD_SHAPES = [(1, 1), (5, 17), (37, 45), (100, 33), (7, 1000), (23, 8), (49, 63)]
ROWS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16]


def inputs(M: int, N: int, K: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, W, b


def reference(x, W, b):
    """The exact result of the (rounded) inputs, in float64, and the scale of its rounding errors."""
    ref = F.linear(x.double(), W.double(), None if b is None else b.double())
    mag = F.linear(x.double().abs(), W.double().abs(), None if b is None else b.double().abs())
    return ref, mag


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,K", MODEL_SHAPES + ODD_SHAPES)
def test_float32_matches_float64_and_f_linear(N, K, bias):
    for M in ROWS:
        x, W, b = inputs(M, N, K, torch.float32, bias, seed=M)
        y = cpu_gemv.linear(x, W, b)
        assert y.shape == (M, N) and y.dtype == torch.float32 and y.is_contiguous()
        ref, mag = reference(x, W, b)
        # a float32 sum of K products is within K·2⁻²⁴ of the sum of magnitudes (the textbook bound)
        assert ((y.double() - ref).abs() <= (K + 1) * 2.0**-24 * mag).all(), (M, N, K)
        torch.testing.assert_close(y, F.linear(x, W, b), rtol=0, atol=1e-4)


@needs_bf16
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("N,K", MODEL_SHAPES + ODD_SHAPES)
def test_bfloat16_matches_float64_and_f_linear(N, K, bias):
    """bf16 products are exact in float32, so the result is one rounding to bf16 of a float32 sum: within
    half a bf16 step (2⁻⁸ relative) of the exact value, and at most one step from torch's bf16 F.linear."""
    for M in ROWS:
        x, W, b = inputs(M, N, K, torch.bfloat16, bias, seed=M)
        y = cpu_gemv.linear(x, W, b)
        assert y.shape == (M, N) and y.dtype == torch.bfloat16
        ref, mag = reference(x, W, b)
        err = (y.double() - ref).abs()
        assert (err <= 2.0**-8 * ref.abs() + (K + 1) * 2.0**-24 * mag).all(), (M, N, K)
        theirs = F.linear(x, W, b).double()
        step = 2.0**-7 * torch.maximum(y.double().abs(), theirs.abs())
        assert ((y.double() - theirs).abs() <= step + 2 * (K + 1) * 2.0**-24 * mag).all(), (M, N, K)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
def test_a_rows_result_does_not_depend_on_its_batch_or_the_thread_count(dtype):
    x, W, b = inputs(16, 3072, 576, dtype, bias=True)
    full = cpu_gemv.linear(x, W, b)
    for M in (1, 4, 7, 8, 13):
        assert torch.equal(cpu_gemv.linear(x[:M], W, b), full[:M]), M
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_gemv.linear(x, W, b), full)
    finally:
        torch.set_num_threads(threads)


def test_strided_activations():
    """Rows of x that are slices of a wider tensor are read in place; a transposed x is copied first."""
    wide = torch.randn(8, 700)
    W = torch.randn(300, 576)
    x = wide[:, 50:626]
    assert x.stride() == (700, 1)
    torch.testing.assert_close(cpu_gemv.linear(x, W), F.linear(x, W), rtol=0, atol=1e-4)
    xt = torch.randn(576, 8).t()
    torch.testing.assert_close(cpu_gemv.linear(xt, W), F.linear(xt, W), rtol=0, atol=1e-4)


def test_inputs_it_does_not_serve_go_to_f_linear():
    """Exactly F.linear's result (same op) for: more than MAX_ROWS rows, a non-contiguous W, mixed dtypes,
    3-D x, and a call that wants gradients; no rows gives an empty result."""
    x, W, b = inputs(cpu_gemv.MAX_ROWS + 1, 64, 48, torch.float32, bias=True)
    assert torch.equal(cpu_gemv.linear(x, W, b), F.linear(x, W, b))
    Wt = W.t().contiguous().t()
    assert torch.equal(cpu_gemv.linear(x[:2], Wt, b), F.linear(x[:2], Wt, b))
    assert torch.equal(cpu_gemv.linear(x[:2].double(), W.double()), F.linear(x[:2].double(), W.double()))
    assert torch.equal(cpu_gemv.linear(x[None, :2], W, b), F.linear(x[None, :2], W, b))
    xg = x[:2].clone().requires_grad_()
    cpu_gemv.linear(xg, W, b).sum().backward()
    torch.testing.assert_close(xg.grad, W.sum(0).expand(2, -1))
    assert cpu_gemv.linear(x[:0], W, b).shape == (0, 64)


def test_bad_shapes_raise_f_linears_errors():
    W = torch.randn(8, 16)
    for x, b in [(torch.randn(2, 15), None), (torch.randn(2, 16), torch.randn(7))]:
        with pytest.raises(RuntimeError) as theirs:
            F.linear(x, W, b)
        with pytest.raises(RuntimeError, match=re.escape(str(theirs.value).splitlines()[0][:40])):
            cpu_gemv.linear(x, W, b)


def test_a_failed_build_falls_back_to_f_linear_with_one_warning(tmp_path):
    """A real failed build (a compiler that does not exist, an empty cache folder), in a fresh process."""
    code = ("import warnings, torch, torch.nn.functional as F\n"
            "from alora_kernels import cpu_gemv\n"
            "x, W = torch.randn(2, 32), torch.randn(8, 32)\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    y1, y2 = cpu_gemv.linear(x, W), cpu_gemv.linear(x, W)\n"
            "assert torch.equal(y1, F.linear(x, W)) and not cpu_gemv.available()\n"
            "print(len(caught)); print(caught[0].message)\n")
    env = {**os.environ, "ALORA_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, message = proc.stdout.splitlines()[:2]
    assert count == "1" and "could not build the CPU GEMV kernel" in message and "F.linear" in message


def test_the_kernel_builds_without_a_ninja_on_path(tmp_path):
    """A fresh machine may lack the ninja-build package torch's extension builder looks for on PATH: the build
    then uses the ninja wheel this package depends on (a fresh build, in a fresh process, on a PATH with every
    program but ninja)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        for program in Path(folder).glob("*") if Path(folder).is_dir() else ():
            if program.name != "ninja" and not (bin_dir / program.name).exists():
                (bin_dir / program.name).symlink_to(program)
    code = ("import shutil, warnings\n"
            "assert shutil.which('ninja') is None\n"
            "warnings.simplefilter('error')\n"
            "from alora_kernels import cpu_gemv\n"
            "assert cpu_gemv.available()\n")
    env = {**os.environ, "ALORA_CACHE": str(tmp_path / "cache"), "PATH": str(bin_dir)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_loader_keeps_the_projections_the_kernel_streams_row_major(tiny_dirs):
    """Projections, the vocabulary projection included, stay [out, in] row-major where the kernel serves them
    (its layout: no copy at the first forward), and [in, out] storage for torch's GEMV elsewhere."""
    from alora.models import load_model

    model = load_model(tiny_dirs["llama"])
    weights = [m.weight for m in model.projections().values()] + [model.lm_head_weight]
    assert all(w.is_contiguous() == cpu_gemv.available(w.dtype) for w in weights)
