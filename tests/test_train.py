"""`alora train`: the JSONL reader, the token layout, a tiny training round trip (PEFT and engine agree),
and the shipped demo adapters."""

from __future__ import annotations

import json

import pytest
import torch

from alora.train import DataError, Example, encode, read_jsonl, train

GOOD = {"messages": [{"role": "user", "content": "How do tides work?"},
                     {"role": "assistant", "content": "The moon's gravity pulls the oceans."}],
        "invocation": "<|im_start|>title\n", "target": "How Tides Work"}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({**GOOD, "messages": []}), "'messages' must be a non-empty list"),
    (json.dumps({**GOOD, "messages": [{"role": "robot", "content": "hi"}]}), "messages[0]"),
    (json.dumps({**GOOD, "messages": [{"role": "user", "content": 3}]}), "messages[0]"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "invocation"}), "'invocation' must be"),
    (json.dumps({**GOOD, "target": "  "}), "'target' must be"),
])
def test_reader_rejects_malformed_rows_with_line_number(tmp_path, bad, message):
    path = _write(tmp_path / "d.jsonl", [GOOD, "", bad, GOOD])  # the blank line still counts: bad is line 3
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_reader_reads_good_rows(tmp_path):
    rows = read_jsonl(_write(tmp_path / "d.jsonl", [GOOD, {**GOOD, "target": "Tides"}]))
    assert [r.target for r in rows] == ["How Tides Work", "Tides"] and rows[0].messages == GOOD["messages"]
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(_write(tmp_path / "empty.jsonl", [""]))


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    import alora

    return tiny_dirs["llama"], alora.Engine.from_pretrained(tiny_dirs["llama"], device="cpu", dtype="float32")


def test_example_tokens_are_what_invoke_feeds(tiny):
    """input = engine history + invocation ids + target + eos; labels only on target + eos."""
    _, engine = tiny
    tok = engine.tokenizer
    ex = Example(GOOD["messages"], GOOD["invocation"], GOOD["target"])
    ids, labels = encode(tok, ex)
    history = engine.conversation(messages=ex.messages).history_ids
    inv = tok(ex.invocation, add_special_tokens=False)["input_ids"]
    tgt = tok(ex.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == history + inv + tgt
    assert labels == [-100] * (len(history) + len(inv)) + tgt
    assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids  # stable when re-tokenized


@pytest.mark.parametrize("lora", [False, True], ids=["alora", "lora"])
def test_tiny_training_round_trip(tmp_path, tiny, lora):
    """A few steps on a tiny random model: the folder loads in PEFT and in the engine with equal logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, engine = tiny
    rows = [{**GOOD, "target": f"Tides and the moon {i}"} for i in range(6)]
    data = _write(tmp_path / "d.jsonl", rows)
    out = tmp_path / "adapter"
    r = train(data, out, model=folder, val_fraction=0.34, lora=lora, rank=4, epochs=2, lr=2e-2, batch_size=2,
              top_layers=None if lora else 1, progress=False)
    assert (r.kind, r.steps, r.train_examples, r.val_examples) == ("lora" if lora else "alora", 4, 4, 2)
    assert r.val_loss is not None and 0 <= r.val_exact_match <= 1
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and (cfg.get("alora_invocation_tokens") is None) == lora
    if lora:
        assert json.loads((out / "alora_runtime.json").read_text()) == {"invocation": GOOD["invocation"]}

    info = engine.load_adapter("t", out)
    try:
        assert info.kind == ("lora" if lora else "alora")
        assert info.invocation_tokens == tuple(r.invocation_tokens)
        ids, labels = encode(engine.tokenizer, Example(GOOD["messages"], GOOD["invocation"], "Moon tides"))
        ours = engine.forward_logits(ids, adapter="t")
        base_ours = engine.forward_logits(ids)
    finally:
        engine.unload_adapter("t")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                           out).eval()
    with torch.inference_mode():
        theirs = peft_model(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    start = len(ids) - len([x for x in labels if x != -100]) - len(r.invocation_tokens)
    assert (ours[start:] - base_ours[start:]).abs().max() > 1e-3  # training moved the adapted positions
    if not lora:  # the history stays base
        torch.testing.assert_close(ours[:start], base_ours[:start], atol=1e-5, rtol=0)


def test_all_examples_share_one_invocation(tmp_path, tiny):
    data = _write(tmp_path / "d.jsonl", [GOOD, {**GOOD, "invocation": "<|im_start|>summary\n"}])
    with pytest.raises(DataError, match="one invocation"):
        train(data, tmp_path / "a", model=tiny[0], progress=False)


def test_demo_adapters_listed():
    from alora.demo import demo_adapters

    found = demo_adapters()
    kinds = {n: bool(json.loads((p / "adapter_config.json").read_text()).get("alora_invocation_tokens"))
             for n, p in found.items()}
    assert sum(kinds.values()) >= 2 and sum(not k for k in kinds.values()) >= 1, kinds
    for p in found.values():
        assert (p / "adapter_model.safetensors").stat().st_size < 4_000_000


@pytest.mark.slow
def test_demo_adapters_work_in_engine_and_peft(engine, default_dir):
    """Every shipped adapter loads in the engine and PEFT with equal logits, and invokes to non-empty text."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alora.demo import demo_adapters, load_demo_adapters

    folders = demo_adapters()
    infos = load_demo_adapters(engine)
    try:
        conv = engine.conversation()
        list(conv.send("How do bees make honey?", max_new_tokens=24, temperature=0.0))
        history = conv.history_ids
        base = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32)
        peft_model = None
        for name, folder in folders.items():
            out = "".join(conv.invoke(name, max_new_tokens=16, temperature=0.0)).strip()
            assert out, f"{name} produced nothing"
            assert conv.history_ids == history  # invoke leaves the history alone
            ids = history + list(infos[name].invocation_tokens) + engine.tokenizer(out)["input_ids"][:8]
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(base, folder, adapter_name=name).eval()
            else:
                peft_model.load_adapter(folder, adapter_name=name)
            peft_model.set_adapter(name)
            with torch.inference_mode():
                theirs = peft_model(torch.tensor([ids])).logits[0].float()
            torch.testing.assert_close(engine.forward_logits(ids, adapter=name), theirs, atol=2e-3, rtol=1e-3)
    finally:
        for name in infos:
            engine.unload_adapter(name)
