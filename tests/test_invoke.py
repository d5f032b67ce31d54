"""Invoking adapters on a live conversation: KV reuse, rollback, keep, LoRA recompute, mixed batches."""

import pytest
import torch

from peft_helpers import make_adapter

INV_A = "<|im_start|>judge\n"
INV_B = "<|im_start|>title\n"


@pytest.fixture(scope="module")
def setup(engine, default_dir, tmp_path_factory):
    """The engine with two aLoRAs and a LoRA made by PEFT, plus the PEFT models (oracles)."""
    tok = engine.tokenizer
    inv_a = tok(INV_A, add_special_tokens=False)["input_ids"]
    inv_b = tok(INV_B, add_special_tokens=False)["input_ids"]
    folders = {n: tmp_path_factory.mktemp(n) for n in ("judge", "title", "plain")}
    oracles = {
        "judge": make_adapter(default_dir, folders["judge"], seed=11, invocation=inv_a),
        "title": make_adapter(default_dir, folders["title"], seed=12, invocation=inv_b, r=4,
                              target_modules=["q_proj", "v_proj", "up_proj"]),
        "plain": make_adapter(default_dir, folders["plain"], seed=13),
    }
    for name, folder in folders.items():
        engine.load_adapter(name, folder)
    yield engine, oracles, {"judge": inv_a, "title": inv_b}
    for name in folders:
        engine.unload_adapter(name)


def _chatted(engine, turns=2, cache_salt=None):
    conv = engine.conversation(system="You are a helpful assistant.", cache_salt=cache_salt)
    for q in ["What is the tallest mountain?", "How high is it?", "Who climbed it first?"][:turns]:
        "".join(conv.send(q, max_new_tokens=20))
    return conv


def _peft_greedy(model, ids, n, eos):
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    return out[:out.index(eos)] if eos in out else out


def test_alora_invoke_reuses_history_and_matches_peft(setup):
    engine, oracles, invs = setup
    conv = _chatted(engine)
    hist, msgs, cached = conv.history_ids, conv.messages, conv.cached_tokens
    assert cached == len(hist)  # the closed turn is fully cached
    text = "".join(conv.invoke("judge", max_new_tokens=12))
    s = conv.stats
    assert s.reused_tokens == len(hist) and s.prefill_tokens == len(invs["judge"]) and s.recomputed_tokens == 0
    ref = _peft_greedy(oracles["judge"], hist + invs["judge"], 12, engine.tokenizer.eos_token_id)
    assert text == engine.tokenizer.decode(ref, skip_special_tokens=True)
    # history and its base cache are untouched
    assert conv.history_ids == hist and conv.messages == msgs and conv.cached_tokens == len(hist)


def test_next_send_after_invokes_equals_never_invoked(setup):
    engine, _, _ = setup
    a, b = _chatted(engine), _chatted(engine)
    "".join(a.invoke("judge", max_new_tokens=6))
    "".join(a.invoke("title", max_new_tokens=6))
    "".join(a.invoke("plain", max_new_tokens=6))
    out_a = "".join(a.send("Thanks! Anything else?", max_new_tokens=16))
    out_b = "".join(b.send("Thanks! Anything else?", max_new_tokens=16))
    assert out_a == out_b and a.history_ids == b.history_ids
    assert a.stats.recomputed_tokens == 0


def test_back_to_back_invocations_match_peft(setup):
    engine, oracles, invs = setup
    conv = _chatted(engine, turns=1)
    hist = conv.history_ids
    eos = engine.tokenizer.eos_token_id
    for name in ("title", "judge", "title"):
        text = "".join(conv.invoke(name, max_new_tokens=8))
        assert text == engine.tokenizer.decode(_peft_greedy(oracles[name], hist + invs[name], 8, eos),
                                               skip_special_tokens=True)
        assert conv.stats.prefill_tokens == len(invs[name])


def test_lora_invoke_recomputes_the_history(setup):
    engine, oracles, _ = setup
    conv = _chatted(engine, cache_salt="lora-recompute")  # no earlier test's LoRA prefix to find
    hist = conv.history_ids
    text = "".join(conv.invoke("plain", max_new_tokens=10))
    s = conv.stats
    gen_prompt = engine.tokenizer.apply_chat_template(conv.messages, tokenize=True,
                                                      add_generation_prompt=True)["input_ids"][len(hist):]
    assert s.reused_tokens == 0 and s.recomputed_tokens == len(hist)
    assert s.prefill_tokens == len(hist) + len(gen_prompt)
    ref = _peft_greedy(oracles["plain"], hist + list(gen_prompt), 10, engine.tokenizer.eos_token_id)
    assert text == engine.tokenizer.decode(ref, skip_special_tokens=True)
    assert conv.history_ids == hist and conv.cached_tokens == len(hist)


def test_keep_appends_output_and_recomputes_only_new_tokens_in_base(setup):
    engine, _, invs = setup
    conv = _chatted(engine, turns=1)
    hist = conv.history_ids
    text = "".join(conv.invoke("title", keep=True, max_new_tokens=8))
    assert conv.messages[-1] == {"role": "assistant", "content": text, "adapter": "title"}
    new = conv.history_ids
    assert new[:len(hist)] == hist and new[len(hist):len(hist) + len(invs["title"])] == invs["title"]
    # the cache now holds the base-model KV of the extended history, as a from-scratch prefill would: the
    # next reply equals that of a restored copy computed from nothing (its own cache salt)
    assert conv.cached_tokens == len(new)
    copy = engine.conversation_from({**conv.to_dict(), "cache_salt": "from-scratch"})
    assert copy.history_ids == new
    assert "".join(copy.send("Nice title.", max_new_tokens=4)) == "".join(conv.send("Nice title.", max_new_tokens=4))
    assert copy.stats.reused_tokens == 0
    assert conv.stats.reused_tokens == len(new)


def test_send_with_alora_and_lora(setup):
    engine, oracles, invs = setup
    conv = _chatted(engine, turns=1, cache_salt="send-with-adapters")
    hist = conv.history_ids
    "".join(conv.send("Judge that.", adapter="judge", max_new_tokens=6))
    assert conv.messages[-2]["content"] == "Judge that." and conv.messages[-1]["adapter"] == "judge"
    assert conv.stats.reused_tokens == len(hist)
    "".join(conv.send("Now plainly.", adapter="plain", max_new_tokens=6))
    assert conv.stats.reused_tokens == 0 and conv.stats.recomputed_tokens > len(hist)


def test_mixed_batch_equals_separate_runs(setup):
    engine, _, _ = setup
    convs = [_chatted(engine, turns=1) for _ in range(4)]
    solo = []
    for conv, (kind, arg) in zip(convs, [("invoke", "judge"), ("send", "Go on."), ("invoke", "title"),
                                         ("invoke", "plain")]):
        stream = conv.invoke(arg, max_new_tokens=8) if kind == "invoke" else conv.send(arg, max_new_tokens=8)
        solo.append("".join(stream))
    convs = [_chatted(engine, turns=1) for _ in range(4)]
    calls = [convs[0].start_invoke("judge", max_new_tokens=8), convs[1].start_send("Go on.", max_new_tokens=8),
             convs[2].start_invoke("title", max_new_tokens=8), convs[3].start_invoke("plain", max_new_tokens=8)]
    assert engine.run_batch(calls) == solo
    assert convs[1].messages[-1]["content"] == solo[1]
    assert all(c.cached_tokens == len(c.history_ids) for c in convs)


def test_unknown_adapter_leaves_conversation_usable(setup):
    engine, _, _ = setup
    conv = _chatted(engine, turns=1)
    before = conv.messages
    with pytest.raises(KeyError, match="nope"):
        conv.invoke("nope")
    with pytest.raises(KeyError, match="nope"):
        conv.send("hi", adapter="nope")
    assert conv.messages == before
    assert "".join(conv.send("Still there?", max_new_tokens=4))


def test_invoke_keep_as_a_statement_still_appends(setup):
    """The contract's `conv.invoke("summary", keep=True)` without reading the stream: the output still lands."""
    engine, _, invs = setup
    a, b = _chatted(engine, turns=1), _chatted(engine, turns=1)
    a.invoke("title", keep=True, max_new_tokens=6)
    streamed = "".join(b.invoke("title", keep=True, max_new_tokens=6))
    assert a.messages[-1] == b.messages[-1] == {"role": "assistant", "content": streamed, "adapter": "title"}
    assert a.history_ids == b.history_ids and a.stats.prefill_tokens == len(invs["title"])
    late = a.invoke("judge", max_new_tokens=4)
    expected = "".join(b.invoke("judge", max_new_tokens=4))  # b's history is a's
    "".join(a.send("Thanks.", max_new_tokens=4))  # settles the unread judge call first, then sends
    assert a.messages[-2]["content"] == "Thanks." and a.messages[-3]["adapter"] == "title"
    assert "".join(late) == expected and expected  # the settled call's stream still hands over its output
