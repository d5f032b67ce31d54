"""The Llama-family model (llama, mistral, granite, qwen2, qwen3): ``config`` (what a forward needs from an HF
config.json), ``layers`` and ``llama`` (the torch implementation), ``loader`` (HF folder -> model)."""

from alora.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from alora.models.llama import LlamaModel
from alora.models.loader import (FUSED_PARTS, PROJECTION_OF, QUANTIZE_MODES, QuantizationError, check_quantize,
                                 load_model)

__all__ = ["load_model", "LlamaModel", "ModelConfig", "UnsupportedModelError", "SUPPORTED_ARCHITECTURES",
           "FUSED_PARTS", "PROJECTION_OF", "QUANTIZE_MODES", "QuantizationError", "check_quantize"]
