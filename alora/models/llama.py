"""The Llama family (llama, mistral, granite and dense Granite 4, qwen2, qwen3) as one compact torch model.

Activations are flattened to [tokens, hidden]: one forward may carry the new tokens of several sequences,
each attending over its own KV cache (see ``alora.context``). q|k|v and gate|up are fused projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from alora.context import get_context
from alora.models.config import ModelConfig
from alora.models.layers import Linear, RMSNorm, Rotary, attend
from alora_kernels import cpu_attention, cpu_gemv


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: Rotary):
        super().__init__()
        self.layer, self.rotary = layer, rotary if cfg.rope else None
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, [q, kv, kv], bias=cfg.qkv_bias)
        self.o_proj = Linear(q, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.attention_scale if cfg.attention_scale is not None else 1 / math.sqrt(cfg.head_dim)
        self.window = cfg.sliding_window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        T = x.shape[0]
        H, Hkv = self.heads, self.kv_heads
        qkv = self.qkv_proj(x)
        if T == len(ctx.spans) and self._one_op_decode(qkv):  # one new token per sequence, on CPU
            cos, sin = self.rotary.tables()
            out = [cpu_attention.decode_step(qkv, s.start, cos, sin, s.cache.k[self.layer], s.cache.v[self.layer],
                                             s.past, max(0, s.past + 1 - self.window) if self.window else 0, H,
                                             self.scale) for s in ctx.spans]
            return self.o_proj((out[0] if T == 1 else torch.cat(out)).view(T, H * self.head_dim))
        qkv = qkv.view(T, H + 2 * Hkv, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qkv[:, :H]), self.k_norm(qkv[:, H:H + Hkv])], dim=1)
        else:
            qk = qkv[:, :H + Hkv]
        q, k = (self.rotary(qk) if self.rotary is not None else qk).split([H, Hkv], dim=1)  # rotated together
        v = qkv[:, H + Hkv:]
        if len(ctx.spans) == 1:
            out = attend(q, k, v, ctx.spans[0], self.layer, self.scale, self.window)
        else:
            out = torch.cat([
                attend(q[s.start:s.start + s.length], k[s.start:s.start + s.length],
                       v[s.start:s.start + s.length], s, self.layer, self.scale, self.window)
                for s in ctx.spans
            ])
        return self.o_proj(out.reshape(T, self.heads * self.head_dim))

    def _one_op_decode(self, qkv: torch.Tensor) -> bool:
        """Whether decoding tokens take ``cpu_attention.decode_step`` (rotary embedding, cache write and
        attention in one op): on CPU, for rotary models without q/k norms, in the dtypes it serves."""
        return (not qkv.is_cuda and self.rotary is not None and self.q_norm is None
                and cpu_attention.serves_decode_step(qkv.dtype))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        parts = [2 * cfg.intermediate_size] if cfg.fused_gate_up else [cfg.intermediate_size] * 2
        self.gate_up_proj = Linear(cfg.hidden_size, parts, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))  # in place: 3x faster than silu(gate) * up on CPU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: Rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.residual_multiplier = cfg.residual_multiplier

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        m = self.residual_multiplier  # h is this forward's own residual stream: updated in place
        h.add_(self.self_attn(self.input_layernorm(h)), alpha=m)
        return h.add_(self.mlp(self.post_attention_layernorm(h)), alpha=m)


class LlamaModel(nn.Module):
    """Decoder-only transformer. ``forward`` reads positions, caches and adapter slots from the context."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.rotary = Rotary(cfg.inv_freq(), min(cfg.max_position_embeddings, 4096))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(cfg, i, self.rotary) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head_weight = (
            self.embed_tokens.weight if cfg.tie_word_embeddings
            else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
        )
        self.register_buffer("lm_head_qweight", None)
        self.register_buffer("lm_head_scales", None)

    def quantize_lm_head_int8(self) -> None:
        """Compute the vocabulary projection from int8 weights with per-row scales (``cpu_gemv.quantize_int8``;
        CPU only). A tied head keeps the embedding table it shares in the model's dtype; an untied one drops
        its float weight."""
        self.lm_head_qweight, self.lm_head_scales = cpu_gemv.quantize_int8(self.lm_head_weight)
        if not self.config.tie_word_embeddings:
            self.lm_head_weight = None

    def forward(self, token_ids: torch.Tensor, logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """token_ids [T] -> logits [len(logit_rows) or T, vocab] in float32."""
        self.rotary.prepare(get_context().positions, self.embed_tokens.weight.dtype)
        h = self.embed_tokens(token_ids)  # a fresh tensor: the blocks may update it in place
        if self.config.embedding_multiplier != 1.0:
            h = h * self.config.embedding_multiplier
        for block in self.layers:
            h = block(h)
        if logit_rows is not None:
            h = h[logit_rows]
        h = self.norm(h)
        if self.lm_head_qweight is not None:
            logits = cpu_gemv.linear_int8(h, self.lm_head_qweight, self.lm_head_scales).float()
        else:
            logits = cpu_gemv.linear(h, self.lm_head_weight).float()
        if self.config.logits_scaling != 1.0:
            logits = logits / self.config.logits_scaling
        return logits

    def projections(self) -> dict[str, Linear]:
        """Every adapter-capable projection by a stable name, e.g. 'layers.3.self_attn.qkv_proj'."""
        return {name: mod for name, mod in self.named_modules() if isinstance(mod, Linear)}
