"""Our forward pass against transformers (the oracle) on the default model and every architecture."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import alora

ARCHS = ["llama", "llama_linear", "mistral", "granite", "granite4", "granite4_nope", "qwen2", "qwen3"]


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
    eng = alora.Engine.from_pretrained(folder, device="cpu", dtype="float32")
    ref_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (90,), generator=torch.Generator().manual_seed(1))  # > mistral's window
    ours = eng.forward_logits(ids)
    with torch.inference_mode():
        ref = ref_model(ids[None]).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-4


def _teacher_forced(eng, ids, start, salt):
    """Decode ``ids[start:]`` one token at a time after a prompt of ``ids[:start]`` through the scheduler,
    forcing each next token with a logits processor that records the logits the model gave first."""
    rows = []

    def force(generated, logits):
        rows.append(logits.clone())
        forced = torch.full_like(logits, float("-inf"))
        forced[ids[start + len(generated)]] = 0.0
        return forced

    params = alora.SamplingParams(max_new_tokens=len(ids) - start, logits_processors=(force,), ignore_eos=True)
    call = eng.submit(ids[:start], params=params, cache_salt=salt)
    assert [ev.finish_reason for ev in call][-1] == "length" and call.output_ids == ids[start:]
    return torch.stack(rows), call


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "granite"])
def test_incremental_decode_equals_full_forward(arch, tiny_dirs):
    eng = alora.Engine.from_pretrained(tiny_dirs[arch], device="cpu", dtype="float32")
    ids = torch.randint(0, 49152, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    full = eng.forward_logits(ids)
    rows, _ = _teacher_forced(eng, ids, 40, salt=None)  # token by token, past the sliding window
    assert (rows - full[39:59]).abs().max().item() <= 1e-4
    eng.shutdown()


def test_incremental_decode_default_model(engine):
    """A prefix computed by one call and reused by the next (copied from the prefix cache), the rest
    prefilled, then decoded token by token: the logits of a single full forward."""
    ids = torch.randint(0, 49152, (80,), generator=torch.Generator().manual_seed(3)).tolist()
    full = engine.forward_logits(ids)
    for _ in engine.submit(ids[:50], params=alora.SamplingParams(max_new_tokens=0), cache_salt="incremental"):
        pass
    rows, call = _teacher_forced(engine, ids, 70, salt="incremental")
    assert call.stats.reused_tokens == 50 and call.stats.prefill_tokens == 20
    assert (rows - full[69:79]).abs().max().item() <= 5e-4


def test_bfloat16_engine_matches_transformers_bfloat16(default_dir, hf_model):
    """The dtype CUDA runs, checked on CPU (this CPU has AVX512_BF16): one pass equals transformers' bf16 logits
    to 0.05 (same kernels and rounding; measured 0.0). Decoding with the KV cache (other kernels: GEMVs and our
    decode attention), teacher-forced along transformers' greedy tokens, is as close to the float32 truth as
    transformers' bf16 forward is: its max and mean error within 1.5x of transformers' (measured 0.85-1.3x;
    bf16 steps are 0.125 at logits of magnitude ~30). Free-running greedy texts may part where two tokens are
    closer than that error: on "Why is the sky blue?" ours and transformers' bf16 ``generate`` part at the
    second token, while both other prompts tried agree for 16 tokens."""
    eng = alora.Engine.from_pretrained(default_dir, device="cpu", dtype="bfloat16")
    hf = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.bfloat16).eval()
    try:
        ids = torch.randint(0, eng.config.vocab_size, (100,), generator=torch.Generator().manual_seed(5))
        with torch.inference_mode():
            ref = hf(ids[None]).logits[0].float()
        assert (eng.forward_logits(ids) - ref).abs().max().item() <= 0.05
        for text in ["What is the capital of France?", "Why is the sky blue?"]:
            prompt = list(eng.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                            add_generation_prompt=True, return_dict=True)["input_ids"])
            with torch.inference_mode():
                greedy = hf.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                     max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
                full = hf(torch.tensor([prompt + greedy])).logits[0, len(prompt) - 1:-1].float()
                truth = hf_model(torch.tensor([prompt + greedy])).logits[0, len(prompt) - 1:-1]
            rows, _ = _teacher_forced(eng, prompt + greedy, len(prompt), salt="bf16")
            ours, theirs = (rows - truth).abs(), (full - truth).abs()
            assert ours.max() <= 1.5 * theirs.max() and ours.mean() <= 1.5 * theirs.mean()
    finally:
        eng.shutdown()
