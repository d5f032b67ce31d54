"""Decode-sized linear layers on CPU: ``y = x·Wᵀ (+ bias)`` for a few rows of x, at the memory's bandwidth.

With one to a few rows of activations a projection is bound by the bytes of W it reads. torch's CPU GEMV
streams float32 weights at about half the bandwidth this machine kind has, and its GEMM for 4-8 rows is
slower still than for one; ``cpu_ops.cpp`` reads each weight byte once for all rows (float32 with FMA,
bfloat16 with AVX512_BF16 dot products and float32 accumulation), on torch's intra-op threads, or on the
extension's own worker threads in a thread that called ``use_worker_pool`` (the engine's scheduler thread).

Weight-only int8 (``quantize_int8``, ``linear_int8``) reads a quarter of float32's bytes: int8 weights with one
float32 scale per output row, widened to float32 in registers and multiplied with float32 activations.

The extension (``cpu_ops.cpp``, also ``cpu_attention``'s and ``cpu_layers``' kernels) is compiled on first use
with ``torch.utils.cpp_extension`` into ``$ALORA_CACHE/ext`` (default ``~/.cache/alora/ext``; once, about 20 s,
reused afterwards while the source is unchanged). Where it cannot run (no AVX-512, no bfloat16 dot products for
bf16, no compiler, a build error) ``linear`` is ``F.linear``, after a one-line warning, and ``linear_int8``
dequantizes the weight on every call.
"""

from __future__ import annotations

import os
import shutil
import warnings
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["MAX_ROWS", "available", "dequantize_int8", "linear", "linear_int8", "quantize_int8", "use_worker_pool"]

MAX_ROWS = 16
"""Most rows of x the GEMV takes; more rows (prefill) go to torch's GEMM, which is compute-bound there."""

_SOURCE = Path(__file__).with_name("cpu_ops.cpp")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def build_dir() -> Path:
    """Where the compiled extension is cached: ``$ALORA_CACHE/ext`` (default ``~/.cache/alora/ext``)."""
    return Path(os.environ.get("ALORA_CACHE", Path.home() / ".cache" / "alora")) / "ext"


def _put_ninja_on_path() -> None:
    """torch builds extensions with the ``ninja`` found on PATH; where there is none (a fresh machine without the
    ninja-build package, a venv's python run without activating the venv), use the binary of the ``ninja`` wheel
    this package depends on."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@cache
def _dtypes() -> frozenset[torch.dtype]:
    """The dtypes the kernel serves on this machine; builds and loads the extension on first call."""
    flags = _cpu_flags()
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        warnings.warn("alora: this CPU lacks AVX-512; decode projections use torch's F.linear", stacklevel=3)
        return frozenset()
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        folder = build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        load(name="alora_cpu", sources=[str(_SOURCE)], build_directory=str(folder), is_python_module=False,
             extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp",
                           "-ffp-contract=off"],  # products and sums rounded where written, as torch rounds them
             extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, missing headers, a failed build: torch's path still works
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        first = next((ln for ln in lines if "error:" in ln), lines[0])[:300]  # the compiler's own complaint
        warnings.warn(f"alora: could not build the CPU GEMV kernel ({first}); decode projections use torch's "
                      f"F.linear", stacklevel=3)
        return frozenset()
    return frozenset({torch.float32, torch.int8} | ({torch.bfloat16} if "avx512_bf16" in flags else set()))


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``linear`` runs the kernel for ``dtype`` on this machine (``torch.int8``: whether ``linear_int8``
    does); builds the extension on first call."""
    return dtype in _dtypes()


def linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)``, through the kernel for 1 to ``MAX_ROWS`` rows of x on CPU.

    The kernel runs where x is [M, K] with M <= ``MAX_ROWS``, W a contiguous [N, K] of x's dtype (float32, or
    bfloat16 on CPUs with AVX512_BF16), bias None or [N] of that dtype, and no gradient is wanted; everything
    else is ``F.linear``'s (the compiled op decides, in C++, so the choice costs nothing per call); in a thread
    that called ``use_worker_pool``, more rows are split over the pool, one GEMM per thread. Results
    match ``F.linear`` to float32 rounding (bfloat16: one rounding of a float32 sum, as torch's), and each row's
    result does not depend on the other rows of x or on the thread count.
    """
    return _impl(x, W, bias)


def use_worker_pool(threads: int | None = None) -> bool:
    """Run the calling thread's CPU kernels on the extension's worker threads, and its torch ops on itself alone.

    For a thread that runs a model's forward while other threads may use torch too (the engine's scheduler):
    OpenMP lets the threads of a parallel loop spin while they wait for the next one only as long as no more
    threads use OpenMP than there are CPUs, so a second thread that has used torch (the program's main thread,
    say) made every small parallel loop of a decode step wait for sleeping threads (a step took 2x as long).
    After this call, in this thread only: ``linear``/``linear_int8`` and ``cpu_attention``'s kernels split their
    work over ``threads`` threads of the pool (default ``torch.get_num_threads()``: GEMMs of prefill-sized
    inputs too, one single-threaded piece per thread), and every other torch op (OpenMP, MKL) runs
    single-threaded. Returns False, changing nothing, when the extension is not available.
    """
    if not _dtypes():
        return False
    torch.ops.alora_cpu.use_worker_pool(threads or torch.get_num_threads())
    return True


def quantize_int8(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8 weights for ``linear_int8``: ``scale[n] = max|W[n, :]| / 127`` and
    ``q = round(W / scale)``, so ``|W - q·scale| <= scale / 2`` elementwise.

    Returns ``(q, scales)``: q int8 [N, K] contiguous, scales float32 [N], on W's device (a row of zeros gets
    scale 0 and q 0).
    """
    w = W.detach().float()
    scales = w.abs().amax(dim=1) / 127
    q = torch.round(w / torch.where(scales > 0, scales, 1.0).unsqueeze(1)).clamp_(-127, 127)
    return q.to(torch.int8).contiguous(), scales.contiguous()


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``q·scale`` [N, K] that ``linear_int8`` multiplies by, in ``dtype``."""
    return (qweight.float() * scales.unsqueeze(1)).to(dtype)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize_int8(qweight, scales), bias)`` for int8 weights from ``quantize_int8``.

    x [M, K] on CPU (float32; bfloat16 or float16 are widened), bias None or [N] of x's dtype; y [M, N] in x's
    dtype. The kernel computes in float32 (one rounding to x's dtype at the end) and reads
    each weight byte once for up to ``MAX_ROWS`` rows; more rows dequantize W tile by tile for a float32 GEMM.
    Results match the dequantized ``F.linear`` to float32 rounding. Inference only: no gradients. Without the
    extension: the dequantized ``F.linear`` itself (a float copy of W per call).
    """
    return _impl_int8(x, qweight, scales, bias)


def _dequantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    y = F.linear(x.float(), dequantize_int8(qweight, scales), None if bias is None else bias.float())
    return y.to(x.dtype)


def _first_call(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    global _impl
    _impl = torch.ops.alora_cpu.linear.default if _dtypes() else F.linear
    return _impl(x, W, bias)


def _first_call_int8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    global _impl_int8
    _impl_int8 = torch.ops.alora_cpu.linear_int8.default if torch.int8 in _dtypes() else _dequantized_linear
    return _impl_int8(x, qweight, scales, bias)


_impl = _first_call
_impl_int8 = _first_call_int8
