"""`alora train`: the JSONL reader, the token layout (both row forms; the instruction form as granite-common's
rewriter renders it), the aLoRA's cached-history loss against PEFT's full forward, a tiny training round trip
(PEFT and engine agree), io.yaml checks, and the shipped demo adapters."""

from __future__ import annotations

import json
import re

import pytest
import torch

from alora.adapters import last_occurrence
from alora.train import DataError, Example, alora_row_nll, encode, prompt_ids, read_jsonl, train

GOOD = {"messages": [{"role": "user", "content": "How do tides work?"},
                     {"role": "assistant", "content": "The moon's gravity pulls the oceans."}],
        "invocation": "<|im_start|>title\n", "target": "How Tides Work"}
INSTRUCTION = "<answerability> Can my last question be answered from the documents above?"
INSTR = {"messages": [{"role": "user", "content": "Documents: Ada Berg was born in Oslo.\n\nWhere was Ada born?"}],
         "instruction": INSTRUCTION, "invocation": "<|im_start|>user\n<answerability>", "target": '"answerable"'}
IO_YAML = """model: answerability
response_format: |
  {"type": "string", "enum": ["answerable", "unanswerable"]}
transformations:
  - type: likelihood
    categories_to_values: {"answerable": 1.0, "unanswerable": 0.0}
    input_path: []
  - type: nest
    input_path: []
    field_name: answerability_likelihood
instruction: "%s"
parameters:
  max_completion_tokens: 6
sentence_boundaries: ~
""" % INSTRUCTION


def _examples(rows):
    return [Example(r["messages"], r.get("invocation"), r["target"], r.get("instruction")) for r in rows]


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


def test_reader_instruction_form(tmp_path):
    """An instruction row needs no invocation (a LoRA twin); a present instruction must be a non-empty string."""
    no_inv = {k: v for k, v in INSTR.items() if k != "invocation"}
    rows = read_jsonl(_write(tmp_path / "d.jsonl", [INSTR, no_inv]))
    assert [(r.instruction, r.invocation) for r in rows] == [(INSTRUCTION, INSTR["invocation"]), (INSTRUCTION, None)]
    with pytest.raises(DataError, match="'instruction' must be a non-empty string"):
        read_jsonl(_write(tmp_path / "bad.jsonl", [{**INSTR, "instruction": " "}]))


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


def test_instruction_tokens_are_the_intrinsic_call(tiny):
    """Instruction form: the prompt is what granite-common's IntrinsicsRewriter sends (its io.yaml instruction
    appended as a user message), rendered with the generation prompt; then the target and eos. The invocation
    occurs in the instruction's turn."""
    import yaml
    from granite_common.base.types import ChatCompletion
    from granite_common.intrinsics import IntrinsicsRewriter

    tok = tiny[1].tokenizer
    rewriter = IntrinsicsRewriter(config_dict=yaml.safe_load(IO_YAML))
    request = rewriter.transform(ChatCompletion.model_validate({"messages": INSTR["messages"], "model": "x"}))
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    expected = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    ex = _examples([INSTR])[0]
    ids, labels = encode(tok, ex)
    tgt = tok(INSTR["target"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == expected + tgt and labels == [-100] * len(expected) + tgt
    assert prompt_ids(tok, ex) == expected
    history = tok.apply_chat_template(INSTR["messages"], tokenize=True)
    history = list(history["input_ids"] if hasattr(history, "keys") else history)
    inv = tok(INSTR["invocation"], add_special_tokens=False)["input_ids"]
    assert last_occurrence(expected, inv) == len(history) and expected[:len(history)] == history


@pytest.mark.parametrize("row, message", [
    ({**INSTR, "invocation": "<|im_start|>user\n<certainty>"}, "do not occur in the tokenized prompt"),
    ({**INSTR, "instruction": "Can my last question be answered?",
      "messages": [{"role": "user", "content": "<answerability> hi"}]}, "before the instruction's turn"),
])
def test_activation_must_be_in_the_instruction_turn(tmp_path, tiny, row, message):
    with pytest.raises(DataError, match=message):
        train(_write(tmp_path / "d.jsonl", [row, row]), tmp_path / "a", model=tiny[0], progress=False)


def test_alora_cached_history_loss_equals_peft_full_forward(tmp_path, tiny):
    """The aLoRA's training loss (history in base weights as a KV cache, only the invocation on adapted) and
    its gradients equal those of PEFT's own forward over the whole sequence."""
    from peft_helpers import make_adapter

    folder, engine = tiny
    tok = engine.tokenizer
    ids, labels = encode(tok, _examples([INSTR])[0])
    inv = tok(INSTR["invocation"], add_special_tokens=False)["input_ids"]
    model = make_adapter(folder, tmp_path / "a", invocation=inv)
    params = [p for p in model.parameters() if p.requires_grad]

    x, y = torch.tensor([ids]), torch.tensor([labels])
    logits = model(input_ids=x).logits[0, :-1]
    full = torch.nn.functional.cross_entropy(logits, y[0, 1:], ignore_index=-100, reduction="sum")
    full_grads = torch.autograd.grad(full, params)
    ours = alora_row_nll(model, ids, labels, last_occurrence(ids, inv))
    our_grads = torch.autograd.grad(ours, params)
    torch.testing.assert_close(ours, full, atol=1e-4, rtol=1e-5)
    assert sum(g.abs().sum() for g in full_grads) > 0
    for a, b in zip(our_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("form", ["invocation", "instruction"])
@pytest.mark.parametrize("lora", [False, True], ids=["alora", "lora"])
def test_tiny_training_round_trip(tmp_path, tiny, lora, form):
    """A few steps on a tiny random model: the folder loads in PEFT and in the engine with equal logits; the
    instruction form also carries its io.yaml (named for the adapter, readable by granite-common)."""
    from granite_common.intrinsics.util import make_config_dict
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, engine = tiny
    row = GOOD if form == "invocation" else INSTR
    rows = [{**row, "target": f"Tides and the moon {i}"} for i in range(6)]
    data = _write(tmp_path / "d.jsonl", rows)
    out = tmp_path / "adapter"
    io_yaml = None
    if form == "instruction":
        io_yaml = tmp_path / "io.yaml"
        io_yaml.write_text(IO_YAML)
    r = train(data, out, model=folder, val_fraction=0.34, lora=lora, rank=4, epochs=2, lr=2e-2, batch_size=2,
              top_layers=None if lora else 1, io_yaml=io_yaml, name="ans", progress=False)
    assert (r.kind, r.steps, r.train_examples, r.val_examples) == ("lora" if lora else "alora", 4, 4, 2)
    assert r.val_loss is not None and 0 <= r.val_exact_match <= 1
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and (cfg.get("alora_invocation_tokens") is None) == lora
    assert (out / "alora_runtime.json").exists() == (lora and form == "invocation")
    if lora and form == "invocation":
        assert json.loads((out / "alora_runtime.json").read_text()) == {"invocation": GOOD["invocation"]}
    assert (out / "io.yaml").exists() == (form == "instruction")
    if form == "instruction":
        spec = make_config_dict(config_file=out / "io.yaml")
        assert spec["model"] == "ans" and spec["instruction"] == INSTRUCTION
        assert (out / "io.yaml").read_text() == IO_YAML.replace("model: answerability", "model: ans")

    info = engine.load_adapter("t", out)
    try:
        assert info.kind == ("lora" if lora else "alora")
        assert (info.invocation_tokens or ()) == (() if lora and form == "instruction" else tuple(r.invocation_tokens))
        ids, labels = encode(engine.tokenizer, _examples([{**row, "target": "Moon tides"}])[0])
        ours = engine.forward_logits(ids, adapter="t")
        base_ours = engine.forward_logits(ids)
    finally:
        engine.unload_adapter("t")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                           out).eval()
    with torch.inference_mode():
        theirs = peft_model(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    start = 0 if lora else last_occurrence(ids, r.invocation_tokens)
    assert (ours[start:] - base_ours[start:]).abs().max() > 1e-3  # training moved the adapted positions
    if not lora:  # the history stays base
        torch.testing.assert_close(ours[:start], base_ours[:start], atol=1e-5, rtol=0)


@pytest.mark.parametrize("text, message", [
    (IO_YAML.replace("transformations:", "transforms:"), "missing required field(s) ['transformations']"),
    (IO_YAML + "extra: 1\n", "unknown field(s) ['extra']"),
    (IO_YAML.replace('{"type": "string"', '{"type": string'), "response_format is not valid JSON"),
    (IO_YAML.replace("documents above?", "documents?"), "differs from a row's"),
])
def test_io_yaml_checked_before_training(tmp_path, tiny, text, message):
    (tmp_path / "io.yaml").write_text(text)
    with pytest.raises(DataError, match=re.escape(message)) as e:
        train(_write(tmp_path / "d.jsonl", [INSTR, INSTR]), tmp_path / "a", model=tiny[0],
              io_yaml=tmp_path / "io.yaml", progress=False)
    assert str(tmp_path / "io.yaml") in str(e.value) and not (tmp_path / "a").exists()


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
    """Every shipped adapter loads in the engine and PEFT with equal logits, and invokes to non-empty text; an
    intrinsic (an io.yaml beside it) is called as its clients call it and returns a result of its schema's shape."""
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
            spec = engine.intrinsics.get(name)
            if spec is None:
                out = "".join(conv.invoke(name, max_new_tokens=16, temperature=0.0)).strip()
                assert out, f"{name} produced nothing"
                ids = history + list(infos[name].invocation_tokens) + engine.tokenizer(out)["input_ids"][:8]
            else:
                result = conv.run_intrinsic(name)
                assert isinstance(result, dict) and len(result) == 1, (name, result)  # the nest rule's field
                value = next(iter(result.values()))
                assert (0.0 <= value <= 1.0) if spec.needs_logprobs else (isinstance(value, str) and value), result
                prompt = engine.tokenizer.apply_chat_template(
                    conv.messages + [{"role": "user", "content": spec.instruction}], add_generation_prompt=True,
                    tokenize=True, return_dict=True)["input_ids"]
                ids = list(prompt) + engine.tokenizer('"', add_special_tokens=False)["input_ids"]
            assert conv.history_ids == history  # invoke and intrinsics leave the history alone
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
