"""Model configuration: the Llama-family facts our forward pass needs, read from an HF config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from alora.errors import AloraError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "granite", "granitemoehybrid", "qwen2", "qwen3")
GRANITE_FAMILY = ("granite", "granitemoehybrid")  # granitemoehybrid: Granite 4; its dense, attention-only form


class UnsupportedModelError(AloraError, ValueError):
    """The folder holds a model this runtime does not implement."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_scaling: dict | None  # rope_type plus its parameters; None for plain RoPE
    sliding_window: int | None
    # granite's multipliers (1.0 elsewhere); attention_scale None means 1/sqrt(head_dim)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_scale: float | None = None
    logits_scaling: float = 1.0
    rope: bool = True  # False: no position embedding at all (Granite 4's "nope")
    fused_gate_up: bool = False  # Granite 4: gate|up is one trained projection (input_linear), adapted as one

    @classmethod
    def from_dict(cls, cfg: dict) -> "ModelConfig":
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if model_type == "granitemoehybrid":
            layers = cfg.get("layer_types") or cfg.get("layers_block_type") or []
            if cfg.get("num_local_experts", 0) or any(t not in ("attention", "full_attention") for t in layers):
                raise UnsupportedModelError(
                    "granitemoehybrid: only dense, attention-only Granite 4 models are supported (this config has "
                    f"{cfg.get('num_local_experts', 0)} experts and layer types {sorted(set(layers))})")
            if cfg.get("position_embedding_type") not in ("rope", "nope", None):
                raise UnsupportedModelError(f"granitemoehybrid: unsupported position_embedding_type "
                                            f"{cfg.get('position_embedding_type')!r}")
            cfg = {**cfg, "intermediate_size": cfg["shared_intermediate_size"]}
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(f"unsupported RoPE scaling {rope_type!r} in {model_type} config")
        sliding = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding = None
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=True if model_type == "qwen2" else bool(cfg.get("attention_bias", False)),
            o_bias=False if model_type == "qwen2" else bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
            sliding_window=sliding,
            embedding_multiplier=cfg.get("embedding_multiplier", 1.0),
            residual_multiplier=cfg.get("residual_multiplier", 1.0),
            attention_scale=cfg.get("attention_multiplier") if model_type in GRANITE_FAMILY else None,
            logits_scaling=cfg.get("logits_scaling", 1.0),
            rope=model_type != "granitemoehybrid" or cfg.get("position_embedding_type") == "rope",
            fused_gate_up=model_type == "granitemoehybrid",
        )

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json, not a Hugging Face model folder")
        return cls.from_dict(json.loads(path.read_text()))

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies, float32, with the config's scaling applied."""
        d = self.head_dim
        # float32 in the same order of operations as transformers, so angles agree bit for bit
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        s = self.rope_scaling
        if s is None:
            return inv
        if s["rope_type"] == "linear":
            return inv / s["factor"]
        # llama3: low frequencies scaled by `factor`, high ones kept, a smooth blend between
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, blended, scaled)
