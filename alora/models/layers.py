"""Building blocks of the Llama family: the adapter-carrying linear layer, RMSNorm, RoPE and attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from alora.context import SeqSpan, get_context
from alora_kernels import add_lora, cpu_attention, cpu_gemv, cpu_layers, mixed_lora_linear

try:  # optional: used on CUDA when installed
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


@dataclass
class LoraStack:
    """The low-rank weights of every loaded adapter for one projection, indexed by adapter slot.

    ``A`` [S, r, in], ``B`` [S, out, r] (smaller ranks zero-padded); each adapter's scaling (``lora_alpha / r``,
    per module with PEFT's alpha and rank patterns) is folded into its B, so the kernel gets no ``scale``.
    """

    A: torch.Tensor
    B: torch.Tensor


class Linear(nn.Module):
    """A projection that mixes base and adapter outputs per token, by the slots in the forward context.

    Fused projections (q|k|v, gate|up) list their parts' output sizes in ``parts`` so adapters trained on
    the separate projections can be stacked into the fused layout.

    On CPU, decode-sized inputs (up to ``cpu_gemv.MAX_ROWS`` rows) go through our GEMV kernel, which streams
    a row-major weight (the loader keeps that layout where the kernel serves the weight's dtype).

    ``quantize_int8`` replaces the weight by int8 ``qweight`` and per-row ``scales`` (CPU only); the bias,
    activations and adapters keep the model's dtype.
    """

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool):
        super().__init__()
        self.parts = list(out_features) if isinstance(out_features, (list, tuple)) else [out_features]
        self.in_features, self.out_features = in_features, sum(self.parts)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        self.register_buffer("qweight", None)
        self.register_buffer("scales", None)
        self.lora: LoraStack | None = None

    def quantize_int8(self) -> None:
        """Hold the weight as int8 with one float32 scale per output row (``cpu_gemv.quantize_int8``) and drop
        the float weight; ``forward`` then computes the base projection with ``cpu_gemv.linear_int8`` (CPU)."""
        self.qweight, self.scales = cpu_gemv.quantize_int8(self.weight)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        adapted = ctx.slots is not None and self.lora is not None
        if self.qweight is not None:
            y = cpu_gemv.linear_int8(x, self.qweight, self.scales, self.bias)
            return add_lora(y, x, self.lora.A, self.lora.B, None, ctx.slots, runs=ctx.slot_runs) if adapted else y
        if not adapted:
            return cpu_gemv.linear(x, self.weight, self.bias)
        lora = self.lora
        return mixed_lora_linear(x, self.weight, self.bias, lora.A, lora.B, None, ctx.slots, runs=ctx.slot_runs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # transformers' formula (F.rms_norm's CPU kernel costs ~70 us per decode row): one op on CPU
        return cpu_layers.rms_norm(x, self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary embeddings from a table of cos/sin per position, grown on demand."""

    def __init__(self, inv_freq: torch.Tensor, max_positions: int):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(max_positions)

    def _build(self, n: int) -> None:
        t = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> None:
        """Gather cos/sin for this forward's positions once; every layer's ``forward`` then reuses them."""
        if int(positions.max()) >= self.cos.shape[0]:
            self._build(2 * int(positions.max()) + 1)
        self._cos = self.cos[positions].unsqueeze(1).to(dtype)
        self._sin = self.sin[positions].unsqueeze(1).to(dtype)

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, head_dim] of the positions given to ``prepare``."""
        return self._cos, self._sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] by the positions given to ``prepare``."""
        return cpu_layers.rotary(x, self._cos, self._sin)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, span: SeqSpan, layer: int,
           scale: float, window: int | None) -> torch.Tensor:
    """Causal attention of one sequence's new tokens over its cached past plus themselves.

    q [n, heads, d], k/v [n, kv_heads, d] (the new tokens); returns [n, heads, d].
    """
    n, past = span.length, span.past
    keys, values = span.cache.write(layer, past, k, v)  # [kv_heads, past+n, d]
    total = past + n
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash_attn_func(q.unsqueeze(0), keys.transpose(0, 1).unsqueeze(0),
                              values.transpose(0, 1).unsqueeze(0), softmax_scale=scale, causal=True,
                              window_size=(window - 1, 0) if window else (-1, -1))
        return out.squeeze(0)
    heads, kv_heads = q.shape[1], keys.shape[0]
    if n == 1:  # one query row needs no mask
        if window is not None and total > window:
            keys, values = keys[:, total - window:], values[:, total - window:]
        if not q.is_cuda:
            return cpu_attention.decode_attention(q[0], keys, values, scale)[None]
        # fold each KV head's query group into rows (no K/V copies): plain matmuls beat SDPA at this size
        qg = q.view(kv_heads, heads // kv_heads, q.shape[-1])
        scores = torch.baddbmm(qg.new_empty(()), qg, keys.transpose(1, 2), beta=0, alpha=scale)
        out = torch.bmm(torch.softmax(scores.float(), dim=-1).to(values.dtype), values)
        return out.reshape(1, heads, q.shape[-1])
    if kv_heads != heads:
        # Explicit repeat: SDPA's enable_gqa falls back to a slower, less accurate path on CPU.
        keys = keys.repeat_interleave(heads // kv_heads, dim=0)
        values = values.repeat_interleave(heads // kv_heads, dim=0)
    mask = None  # a fresh prompt within the window is plain causal attention
    if past > 0 or (window is not None and total > window):
        rows = torch.arange(past, total, device=q.device).unsqueeze(1)
        cols = torch.arange(total, device=q.device).unsqueeze(0)
        mask = cols <= rows
        if window is not None and total > window:
            mask &= cols > rows - window
    # 4-D inputs: 3-D ones take a different, less accurate CPU kernel
    q4, k4, v4 = q.transpose(0, 1)[None], keys[None], values[None]
    if q.is_cuda:
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, is_causal=mask is None, scale=scale)
    else:
        out = cpu_attention.attention(q4, k4, v4, mask, mask is None, scale)
    return out[0].transpose(0, 1)
