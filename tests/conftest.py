"""Shared fixtures: the default model (ours and transformers'), and tiny random models of every architecture."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def tiny_configs():
    """One random-weight config per supported architecture, with the features each one adds."""
    from transformers import (GraniteConfig, GraniteMoeHybridConfig, LlamaConfig, MistralConfig, Qwen2Config,
                              Qwen3Config)

    granite4 = dict(TINY, shared_intermediate_size=TINY["intermediate_size"], num_local_experts=0,
                    layer_types=["attention"] * TINY["num_hidden_layers"], embedding_multiplier=12.0,
                    attention_multiplier=0.05, residual_multiplier=0.22, logits_scaling=8.0)

    return {
        "llama": LlamaConfig(**TINY, tie_word_embeddings=False,
                             rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0,
                                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=64)),
        "llama_linear": LlamaConfig(**TINY, tie_word_embeddings=True,
                                    rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
        "mistral": MistralConfig(**TINY, sliding_window=24),
        "granite": GraniteConfig(**TINY, embedding_multiplier=12.0, attention_multiplier=0.05,
                                 residual_multiplier=0.22, logits_scaling=8.0),
        "granite4": GraniteMoeHybridConfig(**granite4, position_embedding_type="rope", tie_word_embeddings=True),
        "granite4_nope": GraniteMoeHybridConfig(**granite4, position_embedding_type="nope"),
        "qwen2": Qwen2Config(**TINY, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**{**TINY, "head_dim": 32}, tie_word_embeddings=False),
    }


@pytest.fixture(scope="session")
def default_dir() -> Path:
    from alora.default_model import default_model_dir

    return default_model_dir()


@pytest.fixture(scope="session")
def engine(default_dir):
    import alora

    return alora.Engine.from_pretrained(default_dir, device="cpu", dtype="float32")  # parity runs on CPU in float32, GPU or not


@pytest.fixture(scope="session")
def hf_model(default_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, default_dir) -> dict[str, Path]:
    """Folders with a random-weight model of each architecture plus the default model's tokenizer."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name, cfg in tiny_configs().items():
        torch.manual_seed(hash(name) % 1000)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        folder = tmp_path_factory.mktemp(f"tiny-{name}")
        model.save_pretrained(folder)
        for f in default_dir.iterdir():
            if f.name.startswith(("tokenizer", "chat_template")):
                shutil.copy(f, folder / f.name)
        out[name] = folder
    return out


@pytest.fixture(scope="session")
def template_opening(default_dir) -> int:
    """Tokens every chat of the default model begins with (the template's default system prompt and the
    user turn's header): the prefix cache shares them between unrelated conversations."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_dir)
    a, b = (tok.apply_chat_template([{"role": "user", "content": t}], tokenize=True, return_dict=True)["input_ids"]
            for t in ("Hi again.", "Bye."))
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
