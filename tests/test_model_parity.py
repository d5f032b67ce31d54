"""Our forward pass against transformers (the oracle) on the default model and every architecture."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import alora

ARCHS = ["llama", "llama_linear", "mistral", "granite", "qwen2", "qwen3"]


def test_default_model_logits_match_transformers(engine, hf_model):
    ids = torch.randint(0, engine.config.vocab_size, (200,), generator=torch.Generator().manual_seed(0))
    ours = engine.forward_logits(ids)
    with torch.inference_mode():
        ref = hf_model(ids[None]).logits[0]
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_architecture_logits_match_transformers(arch, tiny_dirs):
    folder = tiny_dirs[arch]
    eng = alora.Engine.from_pretrained(folder)
    ref_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (90,), generator=torch.Generator().manual_seed(1))  # > mistral's window
    ours = eng.forward_logits(ids)
    with torch.inference_mode():
        ref = ref_model(ids[None]).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "granite"])
def test_incremental_decode_equals_full_forward(arch, tiny_dirs):
    eng = alora.Engine.from_pretrained(tiny_dirs[arch])
    ids = torch.randint(0, 49152, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    full = eng.forward_logits(ids)
    cache = eng.new_cache()
    rows = [eng._forward([(cache, ids[:40], [-1] * 40)], all_rows=True)[0]]
    for i in range(40, 60):  # token by token, past the sliding window
        rows.append(eng._forward([(cache, ids[i:i + 1], [-1])], all_rows=True)[0])
    assert (torch.cat(rows) - full).abs().max().item() <= 1e-4


def test_incremental_decode_default_model(engine):
    ids = torch.randint(0, 49152, (80,), generator=torch.Generator().manual_seed(3)).tolist()
    full = engine.forward_logits(ids)
    cache = engine.new_cache()
    rows = [engine._forward([(cache, ids[:50], [-1] * 50)], all_rows=True)[0],
            engine._forward([(cache, ids[50:70], [-1] * 20)], all_rows=True)[0]]
    for i in range(70, 80):
        rows.append(engine._forward([(cache, ids[i:i + 1], [-1])], all_rows=True)[0])
    assert (torch.cat(rows) - full).abs().max().item() <= 5e-4
