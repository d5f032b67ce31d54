"""RMSNorm and rotary embeddings as one op each on CPU (``alora_kernels.cpu_layers``) against torch's formulas."""

from __future__ import annotations

import pytest
import torch

from alora_kernels import cpu_gemv, cpu_layers

pytestmark = pytest.mark.skipif(not cpu_gemv.available(torch.float32),
                                reason="the CPU kernels do not run here (no AVX-512 or no compiler)")
DTYPES = [torch.float32] + ([torch.bfloat16] if cpu_gemv.available(torch.bfloat16) else [])


def torch_rms_norm(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def torch_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,D", [(1, 576), (3, 64), (16, 2048), (2, 17), (40, 576)])
def test_rms_norm(dtype, rows, D):
    g = torch.Generator().manual_seed(rows * D)
    x, w = (torch.randn(rows, D, generator=g) * 3).to(dtype), torch.randn(D, generator=g).to(dtype)
    ours, theirs = cpu_layers.rms_norm(x, w, 1e-5), torch_rms_norm(x, w, 1e-5)
    assert ours.dtype == dtype and ours.shape == x.shape
    if rows > cpu_gemv.MAX_ROWS:  # a prompt's rows: torch's own ops
        assert torch.equal(ours, theirs)
    elif dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    else:  # a float32 reduction in another order may flip a rounding: at most one bfloat16 step
        assert ((ours.float() - theirs.float()).abs() <= theirs.float().abs() * 2**-7 + 1e-6).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,heads,D", [(1, 12, 64), (5, 3, 128), (16, 4, 24), (20, 2, 64)])
def test_rotary_rounds_as_torch_does(dtype, T, heads, D):
    g = torch.Generator().manual_seed(T * heads)
    qkv = torch.randn(T, heads + 3, D, generator=g).to(dtype)
    x = qkv[:, :heads]  # a strided view, as the attention layer passes it
    cos, sin = (torch.randn(T, 1, D, generator=g).to(dtype) for _ in range(2))
    assert torch.equal(cpu_layers.rotary(x, cos, sin), torch_rotary(x, cos, sin))
