"""A random-weight model of a realistic size, so that speed conclusions do not rest on a 135M model whose weights
nearly fit in the caches: ``model_folder("1b")`` is a Llama-3.2-1B-shaped folder (config, safetensors, the default
model's tokenizer), made once by transformers and cached under ~/.cache/alora/random-models.

    python benchmarks/random_model.py 1b        # prints the folder (creates it on first use, ~5 GB float32)
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

# Llama-3.2-1B's shapes (its vocabulary replaced by the default model's tokenizer's, so prompts tokenize alike)
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True,
               max_position_embeddings=8192),
}


def model_folder(shape: str) -> Path:
    """The folder of a random-weight model of ``shape`` (see ``SHAPES``), created on first use."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from alora.default_model import cache_root, default_model_dir

    if shape not in SHAPES:
        raise SystemExit(f"unknown model shape {shape!r} (known: {', '.join(SHAPES)})")
    folder = cache_root() / "random-models" / f"llama-{shape}"
    if (folder / "config.json").is_file():
        return folder
    tokenizer_dir = default_model_dir()
    cfg = LlamaConfig(vocab_size=49152, rms_norm_eps=1e-5, **SHAPES[shape])
    print(f"creating a random {shape} model in {folder} (once)...", file=sys.stderr)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(folder)
    return folder


if __name__ == "__main__":
    print(model_folder(sys.argv[1] if len(sys.argv) > 1 else "1b"))
