"""Structured outputs and intrinsics as IBM's clients call them: JSON-schema decoding in the engine and the server,
io.yaml intrinsics run on a conversation, checked against transformers + PEFT logits and against IBM's own
``granite-common`` rewriter and result processor driving ``alora serve`` through the official ``openai`` client."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jsonschema
import openai
import pytest
import torch

import alora
from alora.intrinsics import TOP_LOGPROBS
from alora.serve.openai_api import create_app
from peft_helpers import make_adapter, peft_logits
from test_server import client, serving

COLOR = {"type": "object", "properties": {"color": {"type": "string", "maxLength": 12}, "warm": {"type": "boolean"}},
         "required": ["color", "warm"], "additionalProperties": False}
HISTORY = [{"role": "user", "content": "What is the capital of France?"},
           {"role": "assistant", "content": "The capital of France is Paris."}]
# the invocation "<check>" is followed by "." in the instruction, and this tokenizer merges ">." into one token,
# so the instruction's ids never contain the invocation's ids (the shape of IBM's granite-4.1 requirement-check
# adapter, whose tokenizer merges ">:"): activation must still start at the invocation
INVOCATION = "<check>"
INSTRUCTION = "<check>. Is the last answer correct? Consider {aspect}."


@pytest.fixture(scope="module")
def eng(default_dir):
    engine = alora.Engine.from_pretrained(default_dir, device="cpu", dtype="float32")
    yield engine
    engine.shutdown()


def test_the_tokenizer_hides_the_invocation_in_the_instruction(eng):
    tok = eng.tokenizer
    inv = tok(INVOCATION, add_special_tokens=False)["input_ids"]
    ids = tok.apply_chat_template(HISTORY + [{"role": "user", "content": INSTRUCTION}], tokenize=True,
                                  add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert alora.adapters.last_occurrence(ids, inv) is None and INVOCATION in tok.decode(ids)


# ---- structured outputs ---------------------------------------------------------------------------------------

def test_send_follows_a_json_schema_and_joins_the_history(eng):
    conv = eng.conversation()
    text = "".join(conv.send("Describe a color as JSON.", max_new_tokens=40, json_schema=COLOR))
    jsonschema.validate(json.loads(text), COLOR)
    assert conv.stats.finish_reason == "stop" and conv.messages[-1]["content"] == text


def test_sampling_under_a_schema_and_choices(eng):
    conv = eng.conversation()
    for seed in range(3):
        text = "".join(conv.send("Pick one.", max_new_tokens=8, temperature=1.0, seed=seed,
                                 json_schema={"type": "string", "enum": ["red", "green", "blue"]}))
        assert json.loads(text) in ("red", "green", "blue")


def test_constrained_and_free_calls_share_steps_and_free_ones_are_unchanged(eng):
    prompt = list(eng.tokenizer("Tell me about the sea.")["input_ids"])
    alone = "".join(ev.text for ev in eng.submit(prompt, params=alora.SamplingParams(max_new_tokens=12)))
    steps = eng.scheduler.steps
    free = eng.submit(prompt, params=alora.SamplingParams(max_new_tokens=12))
    constrained = [eng.submit(prompt, params=alora.SamplingParams(max_new_tokens=30, json_schema=COLOR))
                   for _ in range(3)]
    texts = eng.run_batch([free, *constrained])
    assert texts[0] == alone
    for t in texts[1:]:
        jsonschema.validate(json.loads(t), COLOR)
    assert eng.scheduler.steps - steps < 12 + 3 * 30  # they ran in shared steps


def test_a_schema_that_does_not_compile_is_refused_before_anything_changes(eng):
    conv = eng.conversation()
    with pytest.raises(alora.InvalidSchemaError, match="strin"):
        conv.send("hi", json_schema={"type": "strin"})
    with pytest.raises(alora.InvalidSchemaError, match="not valid JSON"):
        conv.send("hi", json_schema="{nope")
    assert conv.messages == []


# ---- intrinsics: a PEFT-made aLoRA with an io.yaml ---------------------------------------------------------

def _io_yaml(folder: Path, categories: list[str], kind: str = "check") -> None:
    schema = json.dumps({"type": "string", "enum": categories})
    values = {c: float(i) for i, c in enumerate(categories)}
    folder.joinpath("io.yaml").write_text(
        f"model: {kind}\n"
        f"response_format: '{schema}'\n"
        "transformations:\n"
        f"  - {{type: likelihood, categories_to_values: {json.dumps(values)}, input_path: []}}\n"
        "  - {type: nest, input_path: [], field_name: score}\n"
        f"instruction: {json.dumps(INSTRUCTION)}\n"
        "parameters:\n  max_completion_tokens: 6\n"
        "sentence_boundaries: ~\n", encoding="utf-8")


@pytest.fixture(scope="module")
def intrinsic(tmp_path_factory, default_dir, eng):
    """A PEFT aLoRA (random weights) invoked by "<check>", and an io.yaml whose two categories are the words the
    adapted model finds likeliest after the opening quote, so that the likelihood is not trivially 0 or 1."""
    tmp = tmp_path_factory.mktemp("intrinsic")
    inv = eng.tokenizer(INVOCATION, add_special_tokens=False)["input_ids"]
    peft_model = make_adapter(default_dir, tmp / "check", seed=11, invocation=inv, lora_alpha=64)
    eng.load_adapter("probe", tmp / "check")
    conv_ids = _prompt_ids(eng, "answers")
    logits = eng.forward_logits(conv_ids + eng.tokenizer('"', add_special_tokens=False)["input_ids"], "probe")[-1]
    eng.unload_adapter("probe")
    words = [eng.token_text(i) for i in torch.topk(logits, 200).indices.tolist()]
    words = [w for w in words if w.isalpha() and len(w) > 1 and w.lower() == w]
    categories = []
    for w in words:  # no category may be a prefix of another
        if all(not a.startswith(w) and not w.startswith(a) for a in categories):
            categories.append(w)
        if len(categories) == 2:
            break
    _io_yaml(tmp / "check", categories)
    spec = eng.load_intrinsic(tmp / "check")
    return spec, peft_model, categories


def _prompt_ids(eng, aspect: str) -> list[int]:
    """The prompt an intrinsic call sends, built here independently: the template's rendering, then the
    invocation's ids spliced where its text is."""
    tok = eng.tokenizer
    text = tok.apply_chat_template(HISTORY + [{"role": "user", "content": INSTRUCTION.format(aspect=aspect)}],
                                   tokenize=False, add_generation_prompt=True)
    at = text.rindex(INVOCATION)
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(text[:at]) + enc(INVOCATION) + enc(text[at + len(INVOCATION):])


def _granite_result(io_yaml: Path, content: str, logprobs: list[dict]) -> dict:
    from granite_common.intrinsics.output import IntrinsicsResultProcessor

    response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": {"content": logprobs}, "finish_reason": "stop"}]}
    out = IntrinsicsResultProcessor(config_file=io_yaml).transform(response)
    return json.loads(out.choices[0].message.content)


def test_run_intrinsic_equals_transformers_peft_and_granite_common(eng, intrinsic):
    spec, peft_model, categories = intrinsic
    conv = eng.conversation(messages=HISTORY, cache_salt="oracle")
    first = conv.run_intrinsic("check", aspect="answers")
    result = conv.run_intrinsic("check", aspect="tone")  # a second call reuses the history's base KV
    assert conv.stats.reused_tokens >= len(conv.history_ids)
    assert conv.messages == HISTORY  # the history is unchanged
    result = conv.run_intrinsic("check", aspect="answers")
    assert result == first

    # the oracle: PEFT's logits on the independently built prompt, teacher-forced on the engine's output tokens
    call_prompt = _prompt_ids(eng, "answers")
    call = eng.submit(call_prompt, "check", alora.SamplingParams(6, json_schema=spec.response_format,
                                                                 logprobs=TOP_LOGPROBS))
    call.wait()
    out_ids = call.output_ids
    text = "".join(eng.token_text(i) for i in out_ids)
    assert json.loads(text) in categories
    logp = torch.log_softmax(peft_logits(peft_model, call_prompt + out_ids)[len(call_prompt) - 1:-1], -1)
    entries = []
    for pos, tid in enumerate(out_ids):
        top = torch.topk(logp[pos], TOP_LOGPROBS)
        entries.append({"token": eng.token_text(tid), "logprob": float(logp[pos, tid]),
                        "top_logprobs": [{"token": eng.token_text(i), "logprob": float(v)}
                                         for i, v in zip(top.indices.tolist(), top.values.tolist())]})
    expected = _granite_result(spec.path / "io.yaml", text, entries)
    assert 0.0 < expected["score"] < 1.0, "the oracle's likelihood should be non-trivial"
    assert set(result) == {"score"} and abs(result["score"] - expected["score"]) < 1e-3
    # the engine's own logprobs are PEFT's
    for ours, ref in zip(call.logprobs, entries):
        assert abs(ours.logprob - ref["logprob"]) < 1e-3


def test_activation_starts_at_the_invocation_hidden_by_a_merge(eng, intrinsic):
    prompt = _prompt_ids(eng, "tone")
    history = eng.conversation(messages=HISTORY).history_ids
    rendered = eng.tokenizer.apply_chat_template(
        HISTORY + [{"role": "user", "content": INSTRUCTION.format(aspect="tone")}], tokenize=True,
        add_generation_prompt=True)
    rendered = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    assert eng.activation_prompt("check", rendered) == prompt
    slots = eng.slots_for("check", prompt)
    inv = eng.tokenizer(INVOCATION, add_special_tokens=False)["input_ids"]
    first = alora.adapters.last_occurrence(prompt, inv)
    assert slots[:first] == [-1] * first and min(slots[first:]) >= 0
    assert prompt[:len(history)] == history  # the cached history's tokens are untouched


def test_a_missing_instruction_field_is_named(eng, intrinsic):
    conv = eng.conversation(messages=HISTORY)
    with pytest.raises(alora.IntrinsicError, match="aspect"):
        conv.run_intrinsic("check")
    with pytest.raises(alora.UnknownAdapterError):
        conv.run_intrinsic("nope")


@pytest.mark.parametrize("text, error", [
    ("response_format: ~\ntransformations: ~\n", "missing required field"),
    ("model: x\nresponse_format: ~\ntransformations: ~\nbogus: 1\n", "unknown field"),
    ("model: x\nresponse_format: '{nope'\ntransformations: ~\n", "not valid JSON"),
    ("model: x\nresponse_format: ~\ntransformations: [{type: explode, input_path: []}]\n", "not supported"),
    ("model: x\nresponse_format: ~\ntransformations: ~\nsentence_boundaries: {documents: c}\n", "not supported"),
])
def test_a_bad_io_yaml_names_the_file(tmp_path, text, error):
    (tmp_path / "io.yaml").write_text(text)
    with pytest.raises(alora.IntrinsicError, match=error) as e:
        alora.Intrinsic.from_folder(tmp_path)
    assert str(tmp_path / "io.yaml") in str(e.value)


def test_a_lora_intrinsic_recomputes_the_history(tmp_path, default_dir, eng, intrinsic):
    _, _, categories = intrinsic
    make_adapter(default_dir, tmp_path / "lora_check", seed=12)
    _io_yaml(tmp_path / "lora_check", categories, kind="lora_check")
    eng.load_intrinsic(tmp_path / "lora_check")
    conv = eng.conversation(messages=HISTORY)
    result = conv.run_intrinsic("lora_check", aspect="style")
    assert 0.0 <= result["score"] <= 1.0
    assert conv.stats.reused_tokens == 0 and conv.stats.prefill_tokens > len(conv.history_ids)


# ---- the server: structured outputs and IBM's client ------------------------------------------------------

@pytest.fixture(scope="module")
def url(eng, intrinsic):
    with serving(create_app(eng, served_model_name="smol")) as u:
        yield u


@pytest.mark.parametrize("fields, schema", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": COLOR}}), COLOR),
    (dict(response_format={"type": "json_object"}), {"type": "object"}),
    (dict(extra_body={"structured_outputs": {"json": COLOR}}), COLOR),
    (dict(extra_body={"guided_json": COLOR}), COLOR),
    (dict(extra_body={"structured_outputs": {"choice": ["yes", "no"]}}), {"enum": ["yes", "no"]}),
])
def test_server_structured_outputs(url, fields, schema):
    api = client(url)
    for stream in (False, True):
        args = dict(model="smol", messages=[{"role": "user", "content": "A color, as JSON."}], temperature=0,
                    max_tokens=40, **fields)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(stream=True, **args)
                           if c.choices)
        else:
            text = api.chat.completions.create(**args).choices[0].message.content
        value = json.loads(text) if "enum" not in schema else text  # a choice is the string itself, as vLLM's
        jsonschema.validate(value, schema)


def test_server_refuses_a_bad_schema_with_400(url):
    api = client(url)
    with pytest.raises(openai.BadRequestError, match="strin"):
        api.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": {"type": "strin"}}})
    with pytest.raises(openai.BadRequestError, match="not several"):
        api.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                    response_format={"type": "json_object"},
                                    extra_body={"guided_json": {"type": "object"}})
    assert api.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2).choices[0].message.content is not None


def test_granite_common_client_gets_the_result_run_intrinsic_gives(url, eng, intrinsic):
    from granite_common.intrinsics.input import IntrinsicsRewriter
    from granite_common.intrinsics.output import IntrinsicsResultProcessor

    spec, _, _ = intrinsic
    io_yaml = spec.path / "io.yaml"
    ours = eng.conversation(messages=HISTORY).run_intrinsic("check", aspect="answers")
    request = IntrinsicsRewriter(config_file=io_yaml).transform({"messages": HISTORY}, aspect="answers")
    assert request.model == "check"
    response = client(url).chat.completions.create(**request.model_dump())
    history = eng.conversation(messages=HISTORY).history_ids
    assert response.usage.prompt_tokens_details.cached_tokens >= len(history)  # the same KV as run_intrinsic's
    result = IntrinsicsResultProcessor(config_file=io_yaml).transform(response, request)
    parsed = json.loads(result.choices[0].message.content)
    assert set(parsed) == {"score"} and math.isclose(parsed["score"], ours["score"], abs_tol=1e-6)


def test_ibm_layouts_load_without_renaming(tmp_path, eng, intrinsic):
    spec, _, _ = intrinsic
    for leaf in ("my_check/granite-4.0-micro/alora", "old_check/alora/granite-3.3-2b-instruct"):
        folder = tmp_path / leaf
        shutil.copytree(spec.path, folder)
        text = (folder / "io.yaml").read_text().replace("model: check", "model: ~")
        (folder / "io.yaml").write_text(text)
        name = eng.load_intrinsic(folder).name
        assert name == leaf.split("/")[0] and eng.adapters[name].kind == "alora"
        eng.unload_adapter(name)
    assert "my_check" not in eng.intrinsics


def test_a_prompt_without_the_invocation_is_refused_after_one_decode(eng, intrinsic, monkeypatch):
    """No invocation text in a long prompt: ``activation_prompt`` says so from one decode of the prompt, not one
    per tail length (the server asks this before appending an invocation to every aLoRA chat request)."""
    prompt = eng.conversation(messages=HISTORY * 20).history_ids
    calls = []
    decode = eng.tokenizer.decode
    monkeypatch.setattr(eng.tokenizer, "decode", lambda ids, *a, **k: calls.append(len(ids)) or decode(ids, *a, **k))
    assert eng.activation_prompt("check", prompt) is None
    assert len(calls) <= 2, calls  # the invocation's text and the prompt's
