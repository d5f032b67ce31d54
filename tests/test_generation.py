"""Generation, multi-turn cache reuse and streaming on the default model, checked against transformers."""

import asyncio

import torch

import alora


def _hf_greedy(hf_model, ids, n):
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def _chat_ids(engine, messages):
    return list(engine.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])


def test_greedy_generation_equals_transformers(engine, hf_model):
    conv = engine.conversation(cache_salt="greedy")  # nothing cached by other tests: the whole prompt is prefilled
    text = "".join(conv.send("Name three colors of the rainbow.", max_new_tokens=24))
    ids = _chat_ids(engine, [{"role": "user", "content": "Name three colors of the rainbow."}])
    ref = _hf_greedy(hf_model, ids, 24)
    eos = engine.tokenizer.eos_token_id
    ref = ref[:ref.index(eos)] if eos in ref else ref
    assert text == engine.tokenizer.decode(ref, skip_special_tokens=True)
    assert conv.stats.prefill_tokens == len(ids) and conv.stats.reused_tokens == 0


def test_second_turn_reuses_cache_and_matches_scratch_run(engine):
    conv = engine.conversation(system="You are terse.")
    first = "".join(conv.send("What is 2 + 2?", max_new_tokens=16))
    cached_after_first = conv.cached_tokens
    second = "".join(conv.send("And 3 + 3?", max_new_tokens=16))
    s = conv.stats
    assert s.reused_tokens >= cached_after_first - 1 > 0
    assert s.prefill_tokens < 20 and s.recomputed_tokens <= 3
    # A fresh conversation fed the same history from scratch must produce the same reply (its own cache
    # salt keeps it off the prefix cache the first conversation filled).
    scratch = engine.conversation(messages=conv.messages[:3], cache_salt="scratch")
    again = "".join(scratch.send("And 3 + 3?", max_new_tokens=16))
    assert scratch.stats.reused_tokens == 0
    assert again == second and first


def test_streaming_deltas_concatenate_to_full_decode(engine):
    conv = engine.conversation()
    deltas = list(conv.send("Write a short sentence with the word café and an emoji.", max_new_tokens=40))
    assert len(deltas) > 3 and all(isinstance(d, str) and d for d in deltas)
    text = "".join(deltas)
    assert conv.messages[-1]["content"] == text
    assert "\ufffd" not in text


def test_non_ascii_round_trips_through_history(engine):
    conv = engine.conversation()
    msg = "Répondez en français : où est la Tour Eiffel ? 東京 🗼"
    "".join(conv.send(msg, max_new_tokens=8))
    assert conv.messages[0]["content"] == msg
    assert msg in engine.tokenizer.decode(conv.history_ids)


def test_sampling_is_reproducible_with_seed(engine):
    outs = ["".join(engine.conversation().send("Tell me a story.", max_new_tokens=12, temperature=1.0,
                                               top_k=50, top_p=0.9, seed=7)) for _ in range(2)]
    assert outs[0] == outs[1] and outs[0]


def test_stop_string_and_max_tokens(engine):
    conv = engine.conversation()
    text = "".join(conv.send("Count from 1 to 20 separated by commas.", max_new_tokens=60, stop=["5"]))
    assert "5" not in text and conv.stats.finish_reason == "stop"
    conv2 = engine.conversation()
    "".join(conv2.send("Tell me about the sea.", max_new_tokens=5))
    assert conv2.stats.decode_tokens == 5 and conv2.stats.finish_reason == "length"


def test_async_send(engine):
    async def run():
        conv = engine.conversation()
        return [d async for d in conv.asend("Hi!", max_new_tokens=8)], conv

    deltas, conv = asyncio.run(run())
    assert "".join(deltas) == conv.messages[-1]["content"]


def test_conversations_interleave_across_threads(engine):
    import threading

    prompts = ["What is the sun?", "What is the moon?", "What is a star?"]
    solo = ["".join(engine.conversation().send(p, max_new_tokens=12)) for p in prompts]
    results = [None] * 3

    def worker(i):
        results[i] = "".join(engine.conversation().send(prompts[i], max_new_tokens=12))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo


def test_run_batch_equals_separate_runs(engine):
    prompts = ["Say hello.", "List two fruits.", "What is rain?"]
    solo = ["".join(engine.conversation().send(p, max_new_tokens=10)) for p in prompts]
    convs = [engine.conversation() for _ in prompts]
    calls = [c.start_send(p, max_new_tokens=10) for c, p in zip(convs, prompts)]
    assert engine.run_batch(calls) == solo
    assert [c.messages[-1]["content"] for c in convs] == solo
