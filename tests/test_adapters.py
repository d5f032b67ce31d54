"""aLoRA / LoRA logits against PEFT (the oracle), activation rules, and bad adapters."""

import json
import re

import pytest
import torch

import alora
from peft_helpers import make_adapter, peft_logits

INVOCATION_TEXT = "<|im_start|>judge\n"


def _ids(engine, text):
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat(engine):
    msgs = [{"role": "user", "content": "Is the Earth round?"}, {"role": "assistant", "content": "Yes, roughly."}]
    return list(engine.tokenizer.apply_chat_template(msgs, tokenize=True)["input_ids"])


@pytest.fixture()
def fresh(engine):
    """The session engine, with every adapter a test loaded unloaded afterwards."""
    yield engine
    for name in list(engine.adapters):
        engine.unload_adapter(name)


CASES = {
    "alora_attn": dict(alora=True),
    "alora_all_rslora": dict(alora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], use_rslora=True, r=4, lora_alpha=8),
    "alora_patterns": dict(alora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                           rank_pattern={"v_proj": 4, "layers.3.self_attn.q_proj": 2},
                           alpha_pattern={"down_proj": 3}, layers_to_transform=[0, 3, 7, 29]),
    "lora_regex": dict(alora=False, target_modules=r".*\.(up|gate)_proj", r=6, lora_alpha=7),
    "lora_mlp": dict(alora=False, target_modules=["down_proj"], r=16, lora_alpha=32),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_peft(case, fresh, default_dir, tmp_path):
    cfg = dict(CASES[case])
    is_alora = cfg.pop("alora")
    inv = _ids(fresh, INVOCATION_TEXT)
    peft_model = make_adapter(default_dir, tmp_path, seed=3, invocation=inv if is_alora else None, **cfg)
    info = fresh.load_adapter(case, tmp_path)
    assert info.kind == ("alora" if is_alora else "lora") and info["kind"] == info.kind
    ids = _chat(fresh) + (inv + _ids(fresh, "Yes") if is_alora else [])
    ours = fresh.forward_logits(ids, adapter=case)
    ref = peft_logits(peft_model, ids)
    assert (ours - ref).abs().max().item() <= 1e-4
    base = fresh.forward_logits(ids)
    assert (ours - base).abs().max().item() > 1e-3  # the adapter really changed something
    if is_alora:  # tokens before the invocation are exactly the base model's
        start = len(_chat(fresh))
        assert torch.equal(ours[:start], base[:start])


def test_alora_uses_last_occurrence_and_is_off_without_invocation(fresh, default_dir, tmp_path):
    inv = _ids(fresh, INVOCATION_TEXT)
    peft_model = make_adapter(default_dir, tmp_path, seed=4, invocation=inv)
    fresh.load_adapter("j", tmp_path)
    hist = _chat(fresh)
    tail = _ids(fresh, "Yes")
    twice = hist + inv + _ids(fresh, "No.") + hist[:10] + inv + tail
    ours = fresh.forward_logits(twice, adapter="j")
    assert (ours - peft_logits(peft_model, twice)).abs().max().item() <= 1e-4
    start = len(twice) - len(tail) - len(inv)  # the last occurrence: everything before it is base
    assert torch.equal(ours[:start], fresh.forward_logits(twice)[:start])
    absent = hist + _ids(fresh, "Just text")
    assert torch.equal(fresh.forward_logits(absent, adapter="j"), fresh.forward_logits(absent))


@pytest.mark.parametrize("arch", ["llama", "mistral", "granite", "granite4", "qwen2", "qwen3"])
def test_tiny_architectures_match_peft(arch, tiny_dirs, tmp_path):
    eng = alora.Engine.from_pretrained(tiny_dirs[arch], device="cpu", dtype="float32")
    inv = [1, 5248, 198]
    mlp = ["input_linear", "output_linear"] if arch == "granite4" else ["gate_proj", "up_proj", "down_proj"]
    peft_model = make_adapter(tiny_dirs[arch], tmp_path, seed=5, invocation=inv,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", *mlp])
    eng.load_adapter("a", tmp_path)
    ids = torch.randint(3, 49152, (40,), generator=torch.Generator().manual_seed(0)).tolist() + inv + [42, 43]
    assert (eng.forward_logits(ids, adapter="a") - peft_logits(peft_model, ids)).abs().max().item() <= 1e-4


def test_ibm_format_activates_one_token_later(fresh, default_dir, tmp_path):
    """IBM's `alora` folders: `invocation_string` in the config; the first invocation token stays base."""
    inv = _ids(fresh, INVOCATION_TEXT)
    make_adapter(default_dir, tmp_path / "peft", seed=6, invocation=inv)
    ibm = tmp_path / "ibm"
    ibm.mkdir()
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg.pop("alora_invocation_tokens")
    cfg["invocation_string"] = INVOCATION_TEXT
    (ibm / "adapter_config.json").write_text(json.dumps(cfg))
    (ibm / "adapter_model.safetensors").write_bytes((tmp_path / "peft" / "adapter_model.safetensors").read_bytes())
    fresh.load_adapter("peft", tmp_path / "peft")
    info = fresh.load_adapter("ibm", ibm)
    assert info.kind == "alora" and info.format == "ibm" and list(info.invocation_tokens) == inv
    ids = _chat(fresh) + inv + _ids(fresh, "Yes")
    start = len(_chat(fresh))
    slots = fresh.slots_for("ibm", ids)
    assert slots.index(max(slots)) == start + 1
    base = fresh.forward_logits(ids)
    ibm_logits = fresh.forward_logits(ids, adapter="ibm")
    peft_style = fresh.forward_logits(ids, adapter="peft")
    assert torch.equal(ibm_logits[:start + 1], base[:start + 1])
    assert not torch.equal(peft_style[start], base[start])
    # from the second invocation token on, both rules adapt; attention to position `start` differs,
    # so only positions that see the same adapted prefix can match: none after start. Check activity instead.
    assert (ibm_logits[start + 1:] - base[start + 1:]).abs().max().item() > 1e-3


def _folder_with(tmp_path, src, name, edit_config=None, edit_tensors=None):
    from safetensors.torch import load_file, save_file

    dst = tmp_path / name
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    if edit_config:
        edit_config(cfg)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(src / "adapter_model.safetensors")
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def test_bad_adapters_get_clear_errors_and_leave_engine_unchanged(fresh, default_dir, tiny_dirs, tmp_path):
    good = tmp_path / "good"
    make_adapter(default_dir, good, seed=7, invocation=_ids(fresh, INVOCATION_TEXT))
    fresh.load_adapter("ok", good)
    ids = _chat(fresh) + _ids(fresh, INVOCATION_TEXT)
    before = fresh.forward_logits(ids, adapter="ok")
    wrong_base = tmp_path / "wrong_base"
    make_adapter(tiny_dirs["llama"], wrong_base, seed=1)

    def rename(t):
        t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 576)

    def dora(c):
        c["use_dora"] = True

    def bias(c):
        c["bias"] = "all"

    def target(c):
        c["target_modules"] = ["q_proj", "c_attn"]

    def shape(t):
        k = next(k for k in t if "lora_B" in k)
        t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])

    pickle_dir = tmp_path / "pickle"
    pickle_dir.mkdir()
    (pickle_dir / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    torch.save({}, pickle_dir / "adapter_model.bin")
    corrupt = _folder_with(tmp_path, good, "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    cases = [
        (wrong_base, r"wrong_base.*layers\.\d+\.self_attn\.[qkvo]_proj.*another base model"),
        (_folder_with(tmp_path, good, "lmhead", edit_tensors=rename), r"lmhead.*lm_head\.lora_A"),
        (_folder_with(tmp_path, good, "dora", edit_config=dora), r"dora.*DoRA"),
        (_folder_with(tmp_path, good, "bias", edit_config=bias), r"bias.*biases"),
        (_folder_with(tmp_path, good, "target", edit_config=target), r"target.*c_attn"),
        (_folder_with(tmp_path, good, "shape", edit_tensors=shape), r"shape.*lora_B"),
        (pickle_dir, r"pickle.*adapter_model\.bin.*refused"),
        (corrupt, r"corrupt.*adapter_model\.safetensors"),
        (tmp_path / "missing", r"not found"),
    ]
    for folder, pattern in cases:
        with pytest.raises(alora.AdapterError, match=re.compile(pattern, re.S)):
            fresh.load_adapter("bad", folder)
        assert list(fresh.adapters) == ["ok"]
    assert torch.equal(fresh.forward_logits(ids, adapter="ok"), before)
    with pytest.raises(ValueError, match="already loaded"):
        fresh.load_adapter("ok", good)


def test_many_adapters_loaded_at_once(fresh, default_dir, tmp_path):
    inv = _ids(fresh, INVOCATION_TEXT)
    ids = _chat(fresh) + inv + [42]
    refs = {}
    for i in range(12):
        folder = tmp_path / f"a{i}"
        pm = make_adapter(default_dir, folder, seed=100 + i, invocation=inv if i % 2 else None, r=2 + i % 5,
                          target_modules=["q_proj", "v_proj"] if i % 3 else ["o_proj", "up_proj"])
        refs[f"a{i}"] = peft_logits(pm, ids)
        fresh.load_adapter(f"a{i}", folder)
    fresh.unload_adapter("a4")
    for name, ref in refs.items():
        if name != "a4":
            assert (fresh.forward_logits(ids, adapter=name) - ref).abs().max().item() <= 1e-4
