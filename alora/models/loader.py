"""Model loading: an HF folder (config.json + *.safetensors) into our Llama-family implementation, and the
map from HF projection names to our fused projections."""

from __future__ import annotations

from pathlib import Path

import torch

from alora.errors import AloraError
from alora.models.config import ModelConfig
from alora.models.llama import LlamaModel
from alora.safetensors_io import SafetensorsIndex
from alora_kernels import cpu_gemv

# Our fused projections and the HF projections they hold, in order.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# HF projection name -> (our module name, index of the part inside it)
PROJECTION_OF = {part: (fused, i) for fused, parts in FUSED_PARTS.items() for i, part in enumerate(parts)}
PROJECTION_OF.update({"o_proj": ("o_proj", 0), "down_proj": ("down_proj", 0)})


# Granite 4 names its MLP differently: gate|up is one trained tensor there, as it is here.
GRANITE4_MLP = {"mlp.gate_up_proj": "shared_mlp.input_linear", "mlp.down_proj": "shared_mlp.output_linear"}
PROJECTION_OF.update({"input_linear": ("gate_up_proj", 0), "output_linear": ("down_proj", 0)})

QUANTIZE_MODES = ("int8",)
"""What ``load_model(quantize=...)`` accepts besides None: weight-only int8 of the decoder's projections."""


class QuantizationError(AloraError, ValueError):
    """A ``quantize`` mode that is unknown, or that cannot run on the requested device."""


def _hf_sources(name: str, cfg: ModelConfig) -> list[str]:
    """HF checkpoint tensor names that make up one of our parameters."""
    if name == "lm_head_weight":
        return ["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    prefix, _, leaf = name.rpartition(".")  # e.g. layers.0.self_attn.qkv_proj / weight
    module_path, _, module = prefix.rpartition(".")
    if cfg.fused_gate_up:
        for ours, theirs in GRANITE4_MLP.items():
            if prefix.endswith(ours):
                return [f"model.{prefix[:-len(ours)]}{theirs}.{leaf}"]
    if module in FUSED_PARTS:
        return [f"model.{module_path}.{part}.{leaf}" for part in FUSED_PARTS[module]]
    return [f"model.{name}"]


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               quantize: str | None = None) -> LlamaModel:
    """Build our model from an HF folder; errors name the file or tensor that is wrong.

    ``quantize="int8"`` (CPU only) stores every decoder projection (q|k|v, o, gate|up, down) and the LM head as
    int8 with one float32 scale per output row, quantized once here from ``dtype`` weights; embeddings (a tied
    LM head's table included), norms and biases stay in ``dtype``. An unknown mode or a non-CPU device raises
    ``QuantizationError``.
    """
    check_quantize(quantize, device)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    cfg = ModelConfig.from_folder(folder)
    index = SafetensorsIndex.of_model_folder(folder)
    model = LlamaModel(cfg)
    for name, param in model.named_parameters(remove_duplicate=True):
        parts = [index.get(src) for src in _hf_sources(name, cfg)]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"{folder}: tensor {_hf_sources(name, cfg)} has shape {tuple(tensor.shape)}, "
                             f"the config implies {tuple(param.shape)}")
        param.data = tensor.to(dtype)
    model = model.to(device)
    if quantize == "int8":
        for module in model.projections().values():
            module.quantize_int8()
        model.quantize_lm_head_int8()
    if torch.device(device).type == "cpu":
        _store_projections_transposed(model)
    return model


def check_quantize(quantize: str | None, device: str | torch.device) -> None:
    """Raise ``QuantizationError`` unless ``quantize`` is None or a mode of ``QUANTIZE_MODES`` on a CPU device."""
    if quantize is None:
        return
    if quantize not in QUANTIZE_MODES:
        raise QuantizationError(f"quantize must be None or one of {list(QUANTIZE_MODES)}, got {quantize!r}")
    if torch.device(device).type != "cpu":
        raise QuantizationError(f"quantize={quantize!r} runs on CPU only (its kernel is a CPU GEMV), not on "
                                f"device {str(device)!r}; use dtype='bfloat16' on a GPU instead")


def _store_projections_transposed(model: LlamaModel) -> None:
    """Keep the [out, in] weights that torch's GEMV multiplies as views of [in, out] storage.

    On CPU, one-token decode is a GEMV bound by memory bandwidth, and MKL streams a row-major [in, out]
    matrix about 1.7x faster than the transposed access the usual layout needs (measured on this project's
    2-core machine: 15.4 vs 8.8 GB/s); prefill GEMMs run at the same speed either way. That is only where our
    GEMV kernel (``cpu_gemv``) does not serve a weight's dtype: it streams row-major [out, in] weights, and int8
    ones, as they are. The vocabulary projection (tied or not) is a fifth of the weights read per token.
    """
    weights = [m.weight for m in model.projections().values()] + [model.lm_head_weight]
    for p in weights:
        if p is not None and not cpu_gemv.available(p.dtype):
            p.data = p.data.t().contiguous().t()
