"""CPU attention kernels (``alora_kernels.cpu_attention``) and the worker pool (``cpu_gemv.use_worker_pool``).

decode_attention against a float64 reference: grouped and plain heads, head sizes that are not a multiple of the
16 lanes a vector holds, one position to a few thousand (one chunk and several), the strided views of a KV
cache, float32 and bfloat16. attention against torch's SDPA. In a thread that uses the pool: the same results
as on torch's threads (bitwise for the GEMV), torch ops in its pieces under the caller's inference mode, other
threads' calls meanwhile unaffected.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from alora_kernels import cpu_attention, cpu_gemv

pytestmark = pytest.mark.skipif(not cpu_gemv.available(torch.float32),
                                reason="the CPU kernels do not run here (no AVX-512 or no compiler)")

SHAPES = [(9, 3, 64, 1), (9, 3, 64, 17), (9, 3, 64, 300), (8, 8, 64, 130), (32, 8, 128, 2049), (4, 1, 80, 77),
          (6, 2, 24, 5), (2, 1, 8, 3)]  # (heads, kv heads, head size, positions)


def reference(q, k, v, scale):
    G = q.shape[0] // k.shape[0]
    kk, vv = k.double().repeat_interleave(G, 0), v.double().repeat_interleave(G, 0)
    scores = torch.einsum("hd,htd->ht", q.double(), kk) * scale
    return torch.einsum("ht,htd->hd", scores.softmax(-1), vv)


def cache_views(H, Hkv, D, T, dtype, seed=0):
    """q and the first T positions of a [Hkv, capacity, D] cache, as the engine passes them."""
    g = torch.Generator().manual_seed(seed)
    K = (torch.randn(Hkv, T + 9, D, generator=g) * 2).to(dtype)
    V = torch.randn(Hkv, T + 9, D, generator=g).to(dtype)
    return torch.randn(H, D, generator=g).to(dtype), K[:, :T], V[:, :T]


@pytest.mark.parametrize("H,Hkv,D,T", SHAPES)
def test_decode_attention_float32_matches_float64(H, Hkv, D, T):
    q, k, v = cache_views(H, Hkv, D, T, torch.float32)
    out = cpu_attention.decode_attention(q, k, v, D**-0.5)
    assert out.shape == (H, D) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, k, v, D**-0.5), rtol=0, atol=2e-6)


@pytest.mark.skipif(not cpu_gemv.available(torch.bfloat16), reason="this CPU lacks AVX512_BF16")
@pytest.mark.parametrize("H,Hkv,D,T", SHAPES)
def test_decode_attention_bfloat16_is_one_rounding_of_the_exact_result(H, Hkv, D, T):
    q, k, v = cache_views(H, Hkv, D, T, torch.bfloat16)
    out = cpu_attention.decode_attention(q, k, v, D**-0.5)
    ref = reference(q, k, v, D**-0.5)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()  # half an ulp of bfloat16, and float32 error


def test_decode_attention_is_torch_math_for_what_it_does_not_serve():
    q, k, v = cache_views(16, 1, 8, 5, torch.float64)  # float64; 16 query heads per KV head
    torch.testing.assert_close(cpu_attention.decode_attention(q, k, v, 0.3), reference(q, k, v, 0.3))
    q, k, v = cache_views(16, 1, 8, 5, torch.float32)
    torch.testing.assert_close(cpu_attention.decode_attention(q, k, v, 0.3).double(), reference(q, k, v, 0.3),
                               rtol=0, atol=2e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_is_sdpa(causal):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 9, n, 64, generator=g) for n in (40, 50, 50))
    mask = None if causal else torch.ones(40, 50, dtype=torch.bool).tril(10)
    keys, values = (q, q) if causal else (k, v)
    ours = cpu_attention.attention(q, keys, values, mask, causal, 0.125)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                                    is_causal=causal, scale=0.125))


def in_pool_thread(fn):
    """fn() in a fresh thread that called use_worker_pool, under inference mode as the engine runs it."""
    out = {}

    def run():
        try:
            assert cpu_gemv.use_worker_pool(2)
            with torch.inference_mode():
                out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the pool thread hung"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_the_pool_gives_the_results_of_torchs_threads():
    g = torch.Generator().manual_seed(2)
    x, W, b = torch.randn(40, 576, generator=g), torch.randn(1536, 576, generator=g), torch.randn(1536, generator=g)
    qw, scales = cpu_gemv.quantize_int8(W)
    q, k, v = cache_views(9, 3, 64, 700, torch.float32)
    t4 = torch.randn(1, 9, 30, 64, generator=g)

    def compute():
        return (cpu_gemv.linear(x[:3], W, b), cpu_gemv.linear(x, W, b), cpu_gemv.linear_int8(x, qw, scales, b),
                cpu_gemv.linear_int8(x[:5], qw, scales, b), cpu_attention.decode_attention(q, k, v, 0.125),
                cpu_attention.attention(t4, t4, t4, None, True, 0.125))

    pooled = in_pool_thread(compute)
    with torch.inference_mode():
        here = compute()
    assert torch.equal(pooled[0], here[0]) and torch.equal(pooled[3], here[3])  # the GEMV: bitwise
    for ours, theirs in zip(pooled, here):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    assert all(t.is_inference() for t in pooled)  # the pieces' torch ops ran under the caller's inference mode


def test_other_threads_run_beside_a_pool_thread():
    """A thread without the pool computes while the pool thread runs loops: both get their own results."""
    g = torch.Generator().manual_seed(3)
    x, W = torch.randn(64, 576, generator=g), torch.randn(3072, 576, generator=g)
    expected = F.linear(x, W)
    stop, errors = threading.Event(), []

    def other():
        while not stop.is_set():
            for rows in (1, 4, 64):
                if not torch.allclose(cpu_gemv.linear(x[:rows], W), expected[:rows], rtol=1e-5, atol=1e-4):
                    errors.append(rows)

    t = threading.Thread(target=other)
    t.start()
    try:
        results = in_pool_thread(lambda: [cpu_gemv.linear(x[:rows], W) for rows in (1, 4, 64) for _ in range(50)])
    finally:
        stop.set()
        t.join()
    assert not errors
    for i, y in enumerate(results):
        torch.testing.assert_close(y, expected[:y.shape[0]], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if cpu_gemv.available(torch.bfloat16) else []))
@pytest.mark.parametrize("H,Hkv,D,pos,start", [(9, 3, 64, 0, 0), (9, 3, 64, 130, 0), (8, 2, 128, 40, 25),
                                               (4, 4, 32, 7, 7)])
def test_decode_step_is_rotary_cache_write_and_decode_attention(dtype, H, Hkv, D, pos, start):
    """The one-op decode step against the ops it replaces, on a row in the middle of a 3-row batch."""
    from alora_kernels import cpu_layers

    g = torch.Generator().manual_seed(pos + H)
    qkv = torch.randn(3, (H + 2 * Hkv) * D, generator=g).to(dtype)
    cos, sin = (torch.randn(3, 1, D, generator=g).to(dtype) for _ in range(2))
    cache_k, cache_v = (torch.randn(Hkv, pos + 5, D, generator=g).to(dtype) for _ in range(2))
    k2, v2 = cache_k.clone(), cache_v.clone()
    out = cpu_attention.decode_step(qkv, 1, cos, sin, cache_k, cache_v, pos, start, H, D**-0.5)

    heads = qkv[1].view(H + 2 * Hkv, D)
    rotated = cpu_layers.rotary(heads[None, :H + Hkv], cos[1:2], sin[1:2])[0]
    k2[:, pos], v2[:, pos] = rotated[H:], heads[H + Hkv:]
    ref = cpu_attention.decode_attention(rotated[:H].contiguous(), k2[:, start:pos + 1], v2[:, start:pos + 1], D**-0.5)
    assert torch.equal(cache_k, k2) and torch.equal(cache_v, v2)  # written in place, nothing else touched
    assert torch.equal(out, ref)


def test_decode_step_refuses_a_position_past_the_cache():
    qkv, cos = torch.randn(1, 5 * 8), torch.randn(1, 1, 8)
    cache = torch.zeros(1, 4, 8)
    with pytest.raises(RuntimeError, match="pos < capacity"):
        cpu_attention.decode_step(qkv, 0, cos, cos, cache, cache.clone(), 4, 0, 3, 0.5)
