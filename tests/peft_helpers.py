"""Real PEFT adapters made in tests: PEFT builds, randomizes and saves them; its model is the oracle."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def make_adapter(base: Path, out: Path, seed: int = 0, invocation: list[int] | None = None, **config):
    """Save a PEFT adapter with random (non-zero) lora_B to ``out``; return the PEFT model, ready to compare."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0,
               task_type="CAUSAL_LM")
    cfg.update(config)
    if invocation is not None:
        cfg["alora_invocation_tokens"] = list(invocation)
    peft_model = get_peft_model(model, LoraConfig(**cfg))
    with torch.no_grad():  # PEFT initializes B to zero; give it trained-like magnitudes (A keeps PEFT's init)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(out)
    return peft_model.eval()


def peft_logits(peft_model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return peft_model(torch.tensor([list(ids)])).logits[0].float()
