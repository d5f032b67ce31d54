"""The scheduler and the KV pool: batched calls equal single runs, cancellation, the prefix cache's keys
(base, aLoRA, LoRA uid, cache salt), memory bounds with eviction and preemption, fan-out, adapter lifecycle."""

import json
import subprocess
import sys
import threading

import pytest
import torch

import alora
from alora import SamplingParams
from peft_helpers import make_adapter

PROMPTS = ["What is the capital of France?", "Name three colors.", "Why is the sky blue?", "Say hi.",
           "Count to five.", "What is 2 + 2?"]


def _chat_ids(engine, text, system="You are terse."):
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": text}]
    return list(engine.tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                                     return_dict=True)["input_ids"])


def _recording(rows):
    def record(generated, logits):
        rows.append(logits.clone())
        return logits
    return record


def _run(engine, ids, n=8, salt=None, adapter=None, **kw):
    rows = []
    call = engine.submit(ids, adapter, SamplingParams(max_new_tokens=n, logits_processors=(_recording(rows),), **kw),
                         cache_salt=salt)
    for _ in call:
        pass
    return call, rows


@pytest.fixture(scope="module")
def adapters(engine, default_dir, tmp_path_factory):
    tok = engine.tokenizer
    inv = {n: tok(f"<|im_start|>{n}\n", add_special_tokens=False)["input_ids"] for n in ("judge", "rate", "tag")}
    folders = {}
    for seed, name in enumerate(("judge", "rate", "tag")):
        folders[name] = tmp_path_factory.mktemp(name)
        make_adapter(default_dir, folders[name], seed=30 + seed, invocation=inv[name])
        engine.load_adapter(f"s-{name}", folders[name])
    folders["plain"] = tmp_path_factory.mktemp("plain")
    make_adapter(default_dir, folders["plain"], seed=40)
    engine.load_adapter("s-plain", folders["plain"])
    yield folders, inv
    for name in ("judge", "rate", "tag", "plain"):
        engine.unload_adapter(f"s-{name}")


def test_batched_calls_equal_single_runs(engine, adapters):
    """Calls of different users, base and adapters mixed, run in the same forwards: equal greedy outputs and
    logits within 1e-5 of each call run alone, relative to the logits' scale (MKL's float32 GEMM sums in
    another order for 4-row tiles than for one row: ~1e-6 relative per projection, ~5e-5 absolute on logits
    of magnitude ~30 after 30 layers; bit-equality would need un-batching). The number of forwards does not
    grow with the calls."""
    jobs = [(_chat_ids(engine, p), a) for p, a in zip(PROMPTS, [None, "s-judge", None, "s-plain", "s-rate", None])]
    jobs = [(engine.invocation_prompt(a, ids) if a and a != "s-plain" else ids, a) for ids, a in jobs]
    solo = [_run(engine, ids, salt=f"solo-{i}", adapter=a) for i, (ids, a) in enumerate(jobs)]
    before = engine.scheduler.steps
    rows = [[] for _ in jobs]
    calls = [engine.submit(ids, a, SamplingParams(max_new_tokens=8, logits_processors=(_recording(rows[i]),)),
                           cache_salt=f"batch-{i}") for i, (ids, a) in enumerate(jobs)]
    engine.run_batch(calls)
    steps = engine.scheduler.steps - before
    for (s_call, s_rows), call, b_rows in zip(solo, calls, rows):
        assert call.output_ids == s_call.output_ids
        assert len(b_rows) == len(s_rows)
        assert max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(b_rows, s_rows)) <= 1e-5
    assert steps <= 8 + 2  # one prefill step, then one step per token for every call at once


def test_threads_and_conversations_share_steps(engine):
    prompts = PROMPTS[:4]
    solo = ["".join(engine.conversation(cache_salt=f"t-solo-{i}").send(p, max_new_tokens=12))
            for i, p in enumerate(prompts)]
    out = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def worker(i):
        conv = engine.conversation(cache_salt=f"t-{i}")
        barrier.wait()
        out[i] = "".join(conv.send(prompts[i], max_new_tokens=12))

    before = engine.scheduler.steps
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert out == solo
    assert engine.scheduler.steps - before < 2 * 13  # batched, not serialized (4 x 13 steps)


def test_cancel_frees_everything_and_keeps_others_intact(engine):
    ids = _chat_ids(engine, "Tell me a long story about dragons.")
    other_ids = _chat_ids(engine, "Name three colors.")
    expected, _ = _run(engine, other_ids, n=20, salt="cancel-ref")
    victim = engine.submit(ids, params=SamplingParams(max_new_tokens=200), cache_salt="cancel")
    other = engine.submit(other_ids, params=SamplingParams(max_new_tokens=20), cache_salt="cancel-other")
    for i, ev in enumerate(victim):
        if i == 3:
            victim.cancel()
    assert victim.stats.finish_reason == "cancelled" and 3 <= victim.stats.decode_tokens < 200
    assert victim.stats.ttft_s > 0 and victim.text
    for _ in other:
        pass
    assert other.output_ids == expected.output_ids
    assert engine.scheduler.counts() == (0, 0) and not engine.pool._live


def test_alora_reuses_base_prefix_and_leaves_it_clean(engine, adapters):
    """An aLoRA call reuses the base KV of its history and stores only base positions: afterwards a base call,
    and a call that carries the aLoRA's output back as a turn, give the logits of a fresh engine."""
    _, inv = adapters
    hist = _chat_ids(engine, "Is water wet?")
    base, _ = _run(engine, hist, salt="clean")
    history = hist + base.output_ids  # ends with the end-of-turn token
    alora_call, _ = _run(engine, history + inv["judge"], salt="clean", adapter="s-judge")
    assert alora_call.stats.reused_tokens == len(history) - 1  # all but the last token, fed by the base call
    carried = history + inv["judge"] + alora_call.output_ids + _chat_ids(engine, "Thanks.")[-6:]
    warm = [_run(engine, ids, n=4, salt="clean")[1] for ids in (history + _chat_ids(engine, "More?")[-6:], carried)]
    fresh = alora.Engine.from_pretrained(engine.model_path, device="cpu", dtype="float32", kv_cache_gb=0.5)
    try:
        cold = [_run(fresh, ids, n=4)[1] for ids in (history + _chat_ids(engine, "More?")[-6:], carried)]
    finally:
        fresh.shutdown()
    for w, c in zip(warm, cold):
        assert max((a - b).abs().max().item() for a, b in zip(w, c)) <= 1e-4


def test_lora_prefix_keyed_by_load_not_name(engine, adapters, default_dir, tmp_path):
    """A name loaded again with other weights never finds the KV its previous weights computed."""
    ids = _chat_ids(engine, "Describe a cat.")
    first, _ = _run(engine, ids, adapter="s-plain", salt="uid")
    again, _ = _run(engine, ids, adapter="s-plain", salt="uid")
    assert again.stats.reused_tokens == len(ids) - 1  # the LoRA's own prefix is cached under its weights
    other = tmp_path / "other"
    make_adapter(default_dir, other, seed=99)
    folders, _ = adapters
    engine.unload_adapter("s-plain")
    engine.load_adapter("s-plain", other)
    try:
        swapped, rows = _run(engine, ids, adapter="s-plain", salt="uid")
        assert swapped.stats.reused_tokens == 0
        ref = engine.forward_logits(ids, adapter="s-plain")[-1]
        assert (rows[0] - ref).abs().max().item() <= 1e-4
    finally:
        engine.unload_adapter("s-plain")
        engine.load_adapter("s-plain", folders["plain"])


def test_cache_salt_separates_tenants(engine):
    ids = _chat_ids(engine, "A secret prompt about pumpkins.")
    _run(engine, ids, salt="tenant-a")
    assert _run(engine, ids, salt="tenant-a")[0].stats.reused_tokens == len(ids) - 1
    assert _run(engine, ids, salt="tenant-b")[0].stats.reused_tokens == 0
    assert engine.cached_prefix(ids, "tenant-c") == 0


def test_fan_out_equals_separate_invokes(engine, adapters):
    conv = engine.conversation(system="You are terse.", cache_salt="fan-out")
    "".join(conv.send("Is the earth round?", max_new_tokens=12))
    names = ["s-judge", "s-rate", "s-tag"]
    separate = ["".join(conv.invoke(n, max_new_tokens=6)) for n in names]
    before = engine.scheduler.steps
    assert conv.invoke_many(names, max_new_tokens=6) == separate
    assert engine.scheduler.steps - before <= 6 + 1  # the three calls share every step
    assert conv.stats.reused_tokens == len(conv.history_ids)


def test_tiny_budget_evicts_and_preempts_but_every_call_completes(default_dir):
    """A pool that holds two or three calls: all complete with their unconstrained outputs; capacity never
    exceeds the budget; idle entries were evicted and running calls preempted (recomputed)."""
    big = alora.Engine.from_pretrained(default_dir, device="cpu", dtype="float32")
    small = alora.Engine.from_pretrained(default_dir, device="cpu", dtype="float32", kv_cache_gb=200 * 46080 / 2**30)  # 200 positions
    try:
        prompts = [_chat_ids(big, p) for p in PROMPTS]
        expected = [_run(big, ids, n=30)[0].output_ids for ids in prompts]
        peak = []

        def watch(generated, logits):
            peak.append(small.pool.capacity_bytes)
            return logits

        calls = [small.submit(ids, params=SamplingParams(max_new_tokens=30, logits_processors=(watch,)))
                 for ids in prompts]
        small.run_batch(calls)
        assert [c.output_ids for c in calls] == expected
        assert max(peak) <= small.pool.budget_bytes
        m = small.metrics()
        assert m["kv_evictions"] > 0 or m["preemptions"] > 0
        assert m["kv_cache_capacity_bytes"] <= m["kv_cache_budget_bytes"]
        with pytest.raises(alora.ContextOverflowError, match="KV cache budget"):
            small.submit(list(range(300)))
    finally:
        big.shutdown()
        small.shutdown()


def test_queue_limit(default_dir):
    eng = alora.Engine.from_pretrained(default_dir, device="cpu", dtype="float32", max_queue=1)
    try:
        ids = _chat_ids(eng, "Hello.")
        calls = []
        with pytest.raises(alora.QueueFullError):
            for _ in range(50):
                calls.append(eng.submit(ids, params=SamplingParams(max_new_tokens=50)))
        for c in calls:
            c.cancel()
        assert all(c.wait(60) for c in calls)
    finally:
        eng.shutdown()


def test_unloading_an_adapter_in_use_is_refused(engine, adapters, default_dir, tmp_path):
    folder = tmp_path / "busy"
    make_adapter(default_dir, folder, seed=7)
    engine.load_adapter("busy", folder)
    call = engine.submit(_chat_ids(engine, "Write a poem."), "busy", SamplingParams(max_new_tokens=64))
    next(iter(call))
    with pytest.raises(alora.AdapterInUseError, match="busy"):
        engine.unload_adapter("busy")
    call.cancel()
    call.wait()
    engine.unload_adapter("busy")
    assert "busy" not in engine.adapters


def test_a_failing_call_leaves_the_others_intact(engine):
    """An exception while serving one call (here its logits processor) ends that call with the error; the
    calls batched with it and later calls carry on."""
    def boom(generated, logits):
        raise RuntimeError("processor failed")

    ids = _chat_ids(engine, "Name three colors.")
    expected, _ = _run(engine, ids, n=10, salt="fail-ref")
    other = engine.submit(ids, params=SamplingParams(max_new_tokens=10), cache_salt="fail-other")
    call = engine.submit(_chat_ids(engine, "Hi."), params=SamplingParams(max_new_tokens=4, logits_processors=(boom,)))
    with pytest.raises(RuntimeError, match="processor failed"):
        for _ in call:
            pass
    assert call.stats.finish_reason == "error"
    for _ in other:
        pass
    assert other.output_ids == expected.output_ids


def test_logprobs_are_the_sampling_distribution(engine):
    ids = _chat_ids(engine, "Name a fruit.")
    call = engine.submit(ids, params=SamplingParams(max_new_tokens=3, logprobs=5), cache_salt="lp")
    events = [ev for ev in call if ev.token_ids]
    full = torch.log_softmax(engine.forward_logits(ids + call.output_ids[:-1]), dim=-1)
    for k, lp in enumerate(lp for ev in events for lp in ev.logprobs):
        row = full[len(ids) - 1 + k]
        assert lp.token_id == call.output_ids[k] == lp.top[0][0]
        assert abs(lp.logprob - row[lp.token_id].item()) <= 1e-4
        assert [t for t, _ in lp.top] == row.topk(5).indices.tolist()


def test_save_and_restore_is_token_exact(engine, adapters):
    conv = engine.conversation(system="You are terse.", cache_salt="save")
    "".join(conv.send("Is fire hot?", max_new_tokens=8))
    "".join(conv.invoke("s-judge", keep=True, max_new_tokens=5))
    "".join(conv.send("Why?", max_new_tokens=8))
    state = json.loads(json.dumps(conv.to_dict()))
    restored = engine.conversation_from(state)
    assert restored.history_ids == conv.history_ids and restored.messages == conv.messages
    assert restored.messages[3]["adapter"] == "s-judge"
    assert "".join(restored.send("Sure?", max_new_tokens=6)) == "".join(conv.send("Sure?", max_new_tokens=6))
    with pytest.raises(ValueError, match="saved conversation"):
        engine.conversation_from({"turns": []})


# Templates that rewrite earlier turns when a message is added (written for the default tokenizer).
MOVING_SYSTEM = (  # Mistral v0.3 style: the system prompt goes into the last user turn
    "{% set sys = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | list %}"
    "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}"
    "{% for m in messages if m.role != 'system' %}"
    "{% if m.role == 'user' %}<|im_start|>user\n{% if m is sameas users[-1] and sys %}{{ sys[0] }}\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% else %}<|im_start|>assistant\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DROPPED_THINKING = (  # Qwen3 style: earlier assistant turns lose their reasoning block
    "{% for m in messages %}{% set c = m.content %}"
    "{% if m.role == 'assistant' and not loop.last %}{% set c = c.split('</think>')[-1] | trim %}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ c }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", [MOVING_SYSTEM, DROPPED_THINKING], ids=["moving-system", "dropped-thinking"])
def test_templates_that_rewrite_earlier_turns(engine, adapters, template, monkeypatch):
    monkeypatch.setattr(engine.tokenizer, "chat_template", template)
    conv = engine.conversation(system="Answer briefly.", cache_salt=f"tpl-{len(template)}")

    def rendering():
        return list(engine.tokenizer.apply_chat_template(conv.messages, tokenize=True,
                                                         return_dict=True)["input_ids"])

    for text in ["<think>hmm</think>Hello!", "What is 1 + 1?", "And 2 + 2?"]:
        "".join(conv.send(text, max_new_tokens=6))
        assert conv.history_ids == rendering()
        "".join(conv.invoke("s-judge", max_new_tokens=3))
        assert conv.history_ids == rendering()
    assert conv.stats.recomputed_tokens >= 0 and conv.stats.reused_tokens > 0


def test_partly_read_stream_at_exit_is_clean(default_dir):
    """Leaving a stream after ten deltas and ending the script exits cleanly (the scheduler thread is
    stopped before torch is torn down)."""
    script = ("import alora\n"
              f"e = alora.Engine.from_pretrained({str(default_dir)!r})\n"
              "conv = e.conversation()\n"
              "g = conv.send('Tell me a long story about dragons.', max_new_tokens=100)\n"
              "for _, d in zip(range(10), g):\n    pass\n"
              "print('messages', len(conv.messages))\n")
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "messages 2" in done.stdout and "terminate" not in done.stderr


@pytest.mark.parametrize("policy", ["error", "drop_oldest"])
def test_context_overflow_policy(tiny_dirs, policy):
    """A full context: "error" raises and leaves the conversation as it was; "drop_oldest" drops whole early
    exchanges after the system prompt, says so in the stats, and the history is the template's rendering."""
    eng = alora.Engine.from_pretrained(tiny_dirs["llama"], device="cpu", dtype="float32")  # a 512-token context
    try:
        conv = eng.conversation(system="Be brief.", overflow=policy)
        long = " ".join(["word"] * 120)
        for i in range(3):
            "".join(conv.send(f"{i}: {long}", max_new_tokens=8, temperature=0.0))
        before = conv.messages
        if policy == "error":
            with pytest.raises(alora.ContextOverflowError, match="512"):
                conv.send(f"3: {long}", max_new_tokens=8)
            assert conv.messages == before
            return
        "".join(conv.send(f"3: {long}", max_new_tokens=8))
        msgs = conv.messages
        assert conv.stats.dropped_turns >= 1 and msgs[0] == before[0] and msgs[-2]["content"].startswith("3: ")
        assert [m["content"][:2] for m in msgs if m["role"] == "user"][0] != "0:"
        assert conv.history_ids == list(eng.tokenizer.apply_chat_template(msgs, tokenize=True,
                                                                          return_dict=True)["input_ids"])
    finally:
        eng.shutdown()
