"""`alora serve`'s OpenAI-compatible API, driven by the official ``openai`` client against live uvicorn servers on
loopback ports, over real engines (the default model, its demo aLoRAs and a PEFT-made LoRA)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

import alora
from alora.serve.openai_api import create_app
from peft_helpers import make_adapter

GREEDY = dict(temperature=0.0, max_tokens=6)
ERROR_KEYS = {"message", "type", "param", "code"}


@contextmanager
def serving(app):
    """Run ``app`` on a free loopback port in a background thread; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def metric(text: str, name: str) -> float:
    """The sum of the samples of ``name`` in a Prometheus text page (KeyError when absent)."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if not line.startswith("#") and line.split("{", 1)[0].split(" ", 1)[0] == name]
    if not values:
        raise KeyError(name)
    return sum(values)


def unique(text: str) -> str:
    """``text`` tagged so that no earlier request of the session shares its prefix."""
    return f"[{uuid.uuid4().hex[:8]}] {text}"


def render(engine, messages, generation_prompt: bool) -> list[int]:
    out = engine.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, default_dir) -> dict[str, Path]:
    """A PEFT-made LoRA, and an adapter directory for runtime loading holding a copy of it."""
    tmp = tmp_path_factory.mktemp("server")
    make_adapter(default_dir, tmp / "lora", seed=3, lora_alpha=64)
    shutil.copytree(tmp / "lora", tmp / "runtime" / "lora2")
    return {"lora": tmp / "lora", "runtime": tmp / "runtime"}


@pytest.fixture(scope="module")
def srv_engine(default_dir, folders):
    """The server's own engine (not the session's): the demo aLoRAs and the LoRA 'lora'."""
    engine = alora.Engine.from_pretrained(default_dir, device="cpu", dtype="float32", max_queue=64)
    alora.load_demo_adapters(engine)
    engine.load_adapter("lora", folders["lora"])
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(srv_engine, folders):
    app = create_app(srv_engine, served_model_name="smol", allow_runtime_adapters=True,
                     adapter_dir=folders["runtime"])
    with serving(app) as u:
        yield u


@pytest.fixture(scope="module")
def api(url) -> openai.OpenAI:
    return client(url)


def alora_name(engine) -> str:
    return next(n for n, i in engine.adapters.items() if i.kind == "alora")


# ---- the OpenAI surface ------------------------------------------------------------------------------------

def test_models_lists_base_and_adapters_with_parent(api, srv_engine):
    models = {m.id: m for m in api.models.list().data}
    assert set(models) == {"smol", *srv_engine.adapters}
    assert models["smol"].model_extra["parent"] is None
    assert all(models[n].model_extra["parent"] == "smol" for n in srv_engine.adapters)


def test_chat_equals_a_conversation_streamed_or_not(api, srv_engine):
    history = [{"role": "user", "content": "Name a color."}]
    whole = api.chat.completions.create(model="smol", messages=history, **GREEDY)
    chunks = list(api.chat.completions.create(model="smol", messages=history, stream=True,
                                              stream_options={"include_usage": True}, **GREEDY))
    expected = "".join(srv_engine.conversation().send("Name a color.", max_new_tokens=6, temperature=0.0))
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    u = whole.usage
    assert u.prompt_tokens == len(render(srv_engine, history, True)) and u.total_tokens == u.prompt_tokens + 6
    assert chunks[-1].usage.prompt_tokens == u.prompt_tokens


def test_completions_text_or_token_ids_streamed_or_not(api, srv_engine):
    prompt = "The capital of France is"
    whole = api.completions.create(model="smol", prompt=prompt, **GREEDY)
    ids = srv_engine.tokenizer(prompt)["input_ids"]
    by_ids = api.completions.create(model="smol", prompt=ids, **GREEDY)
    streamed = list(api.completions.create(model="smol", prompt=prompt, stream=True,
                                           stream_options={"include_usage": True}, **GREEDY))
    text = whole.choices[0].text
    assert text and by_ids.choices[0].text == text
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    assert whole.usage.prompt_tokens == len(ids) and streamed[-1].usage.completion_tokens == 6
    default = api.completions.create(model="smol", prompt=prompt, temperature=0.0)  # OpenAI's default: 16
    assert default.usage.completion_tokens <= 16 and default.choices[0].text.startswith(text)


def test_chat_logprobs_in_openai_shape_streamed_or_not(api):
    kw = dict(model="smol", messages=[{"role": "user", "content": "Say hello."}], logprobs=True, top_logprobs=3,
              **GREEDY)
    whole = api.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens == 6
    assert "".join(e.token for e in content) == whole.choices[0].message.content
    for e in content:
        assert e.bytes == list(e.token.encode()) and e.logprob <= 0
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy: the top token was chosen
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-5)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    streamed = [e for c in api.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, e.top_logprobs[1].token) for e in streamed] == [(e.token, e.top_logprobs[1].token)
                                                                      for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_completions_legacy_logprobs(api):
    whole = api.completions.create(model="smol", prompt="One, two, three,", logprobs=2, **GREEDY)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == whole.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and max(top.values()) == pytest.approx(logprob, abs=1e-5) == top[token]
    streamed = list(api.completions.create(model="smol", prompt="One, two, three,", logprobs=2, stream=True,
                                           **GREEDY))
    offsets = [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


# ---- adapters by model name ----------------------------------------------------------------------------------

def test_alora_by_model_name_equals_conversation_invoke(api, srv_engine):
    name = alora_name(srv_engine)
    messages = [{"role": "user", "content": unique("I booked a trip to Lisbon for May.")},
                {"role": "assistant", "content": "Lovely! Lisbon is sunny in May."}]
    expected = "".join(srv_engine.conversation(messages=messages).invoke(name, max_new_tokens=6, temperature=0.0))
    history = render(srv_engine, messages, False)
    api.chat.completions.create(model="smol", messages=messages, **GREEDY)
    chat = api.chat.completions.create(model=name, messages=messages, **GREEDY)
    assert chat.choices[0].message.content == expected
    assert chat.usage.prompt_tokens_details.cached_tokens >= len(history)  # the base request's prefix
    # a raw prompt that already ends with the invocation runs as is; one without it gets it appended
    invocation = list(srv_engine.adapters[name].invocation_tokens)
    assert api.completions.create(model=name, prompt=history + invocation, **GREEDY).choices[0].text == expected
    assert api.completions.create(model=name, prompt=history, **GREEDY).choices[0].text == expected


def test_lora_by_model_name_adapts_every_token(api, srv_engine):
    messages = [{"role": "user", "content": "Tell me about ships."}]
    chat = api.chat.completions.create(model="lora", messages=messages, logprobs=True, **GREEDY)
    expected = "".join(srv_engine.conversation().send("Tell me about ships.", adapter="lora", max_new_tokens=6,
                                                      temperature=0.0))
    assert chat.choices[0].message.content == expected
    base = api.chat.completions.create(model="smol", messages=messages, logprobs=True, **GREEDY)
    assert chat.choices[0].logprobs.content[0].logprob != pytest.approx(base.choices[0].logprobs.content[0].logprob,
                                                                        abs=1e-4)


# ---- prefix cache -------------------------------------------------------------------------------------------

def test_a_request_extending_the_last_reuses_its_prefix(api):
    messages = [{"role": "user", "content": unique("Describe the sea in one sentence.")}]
    first = api.chat.completions.create(model="smol", messages=messages, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the sky?"}]
    second = api.chat.completions.create(model="smol", messages=messages, **GREEDY)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_cache_salts_never_share(api, srv_engine):
    messages = [{"role": "user", "content": unique("A secret prompt about the moon.")}]
    shared = srv_engine.cached_prefix(render(srv_engine, messages, True))  # the template's default system prompt

    def cached(salt):
        body = {"cache_salt": salt} if salt else None
        return api.chat.completions.create(model="smol", messages=messages, extra_body=body,
                                           **GREEDY).usage.prompt_tokens_details.cached_tokens
    assert cached("tenant-a") == 0
    assert cached("tenant-a") > 0
    assert cached("tenant-b") == 0
    assert cached(None) == shared  # the salted requests left nothing for unsalted ones


# ---- concurrency and cancellation -----------------------------------------------------------------------------

def test_concurrent_greedy_clients_get_their_serial_outputs(api):
    prompts = ["Count to five.", "Name a fruit.", "What is 2+2?", "Say something kind."]

    def ask(p):
        return api.chat.completions.create(model="smol", messages=[{"role": "user", "content": p}],
                                           **GREEDY).choices[0].message.content
    serial = [ask(p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, prompts)) == serial


def test_a_client_that_disconnects_mid_stream_frees_its_place(url, api):
    body = {"model": "smol", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400,
            "temperature": 0.0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert sum(line.startswith("data: {") for line in (next(lines), next(lines), next(lines))) >= 2
    deadline = time.monotonic() + 10
    while metric(httpx.get(f"{url}/metrics").text, "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the disconnected stream kept running"
        time.sleep(0.05)
    assert api.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}],
                                       **GREEDY).choices[0].finish_reason == "length"


# ---- errors ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status", [
    ("{not json", 400),
    ("[1, 2]", 400),
    (json.dumps({"model": "smol"}), 400),  # no messages
    (json.dumps({"model": "smol", "messages": []}), 400),
    (json.dumps({"model": "smol", "messages": [{"role": "robot", "content": "hi"}]}), 400),
    (json.dumps({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}), 400),
    (json.dumps({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "n": 2}), 400),
    (json.dumps({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}), 400),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}), 404),
])
def test_bad_requests_get_openai_errors(url, body, status):
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and set(r.json()["error"]) == ERROR_KEYS, r.text


def test_errors_through_the_client(api, srv_engine):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    limit = srv_engine.config.max_position_embeddings
    with pytest.raises(openai.BadRequestError, match=str(limit)):
        api.completions.create(model="smol", prompt=[42] * (limit + 1), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        api.completions.create(model="smol", prompt="", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model="smol", prompt=[10 ** 9], max_tokens=2)
    r = httpx.get(f"{api.base_url}nope")
    assert r.status_code == 404 and set(r.json()["error"]) == ERROR_KEYS


def test_a_full_queue_answers_429(api, srv_engine, monkeypatch):
    def full(*args, **kwargs):
        raise alora.QueueFullError("64 requests are waiting; retry later")
    monkeypatch.setattr(srv_engine, "submit", full)
    with pytest.raises(openai.RateLimitError, match="retry later"):
        api.completions.create(model="smol", prompt="Hi", max_tokens=2)
    monkeypatch.undo()
    assert api.completions.create(model="smol", prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_api_key(srv_engine):
    with serving(create_app(srv_engine, api_key="sekret")) as u:
        with pytest.raises(openai.AuthenticationError):
            client(u, "wrong").models.list()
        assert httpx.post(f"{u}/v1/chat/completions", content="{").status_code == 401
        assert httpx.get(f"{u}/metrics").status_code == 401
        assert httpx.get(f"{u}/health").status_code == 200
        assert client(u, "sekret").models.list().data[0].id == srv_engine.model_path.name
        r = httpx.post(f"{u}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "y"},
                       headers={"authorization": "Bearer sekret"})
        assert r.status_code == 404 and "--allow-runtime-adapters" in r.json()["error"]["message"]


def test_runtime_adapters_load_only_from_the_adapter_dir(url, api, folders):
    def post(route, **body):
        return httpx.post(f"{url}/v1/{route}", json=body, timeout=60)

    assert post("load_lora_adapter", lora_name="x", lora_path=str(folders["lora"])).status_code == 400  # outside
    assert post("load_lora_adapter", lora_name="x", lora_path="../lora").status_code == 400
    assert post("load_lora_adapter", lora_name="x", lora_path="missing").status_code == 400
    assert post("load_lora_adapter", lora_name="lora", lora_path="lora2").status_code == 400  # name taken
    r = post("load_lora_adapter", lora_name="lora2", lora_path="lora2")
    assert r.status_code == 200, r.text
    assert {m.id: m.model_extra["parent"] for m in api.models.list().data}["lora2"] == "smol"
    messages = [{"role": "user", "content": "Tell me about ships."}]
    twin = api.chat.completions.create(model="lora2", messages=messages, **GREEDY).choices[0].message.content
    assert twin == api.chat.completions.create(model="lora", messages=messages, **GREEDY).choices[0].message.content
    assert post("unload_lora_adapter", lora_name="lora2").status_code == 200
    assert post("unload_lora_adapter", lora_name="lora2").status_code == 404
    assert "lora2" not in {m.id for m in api.models.list().data}


def test_metrics_use_vllm_names(url, api):
    api.completions.create(model="smol", prompt="Hello", **GREEDY)
    text = httpx.get(f"{url}/metrics").text
    for name in ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "alora:kv_cache_capacity_bytes", "alora:kv_cache_budget_bytes",
                 "alora:kv_evictions_total"]:
        metric(text, name)
    assert metric(text, "vllm:num_requests_running") == metric(text, "vllm:num_requests_waiting") == 0
    assert metric(text, "vllm:generation_tokens_total") >= 6
    assert 'vllm:request_success_total{model_name="smol",adapter="base"}' in text


# ---- memory pressure ------------------------------------------------------------------------------------------

def test_a_tiny_kv_budget_evicts_but_every_request_completes(default_dir, srv_engine):
    """A pool for ~2.5 of the six histories: all requests complete, capacity never exceeds the budget."""
    c = srv_engine.config
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.empty((), dtype=srv_engine.dtype).element_size()
    engine = alora.Engine.from_pretrained(default_dir, device="cpu", dtype="float32", kv_cache_gb=450 * per_token / 1e9)
    samples, stop = [], threading.Event()
    try:
        with serving(create_app(engine)) as u:
            def sample():
                while not stop.is_set():
                    samples.append(httpx.get(f"{u}/metrics").text)
                    time.sleep(0.02)

            def conversation(i):
                api = client(u)
                messages = [{"role": "system", "content": f"Conversation {i}. " + "Be brief and kind. " * 30}]
                for turn in ("Hello!", "What can you do?"):
                    messages.append({"role": "user", "content": turn})
                    r = api.chat.completions.create(model=engine.model_path.name, messages=messages, **GREEDY)
                    assert r.choices[0].finish_reason == "length"
                    messages.append({"role": "assistant", "content": r.choices[0].message.content})
            sampler = threading.Thread(target=sample)
            sampler.start()
            with ThreadPoolExecutor(3) as pool:
                list(pool.map(conversation, range(6)))
            stop.set()
            sampler.join()
            samples.append(httpx.get(f"{u}/metrics").text)
    finally:
        stop.set()
        engine.shutdown()
    assert len(samples) > 10
    for text in samples:
        assert metric(text, "alora:kv_cache_capacity_bytes") <= metric(text, "alora:kv_cache_budget_bytes")
    assert metric(samples[-1], "alora:kv_evictions_total") > 0


# ---- the command ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_alora_serve_with_ui_shares_one_engine_and_stops_on_sigterm():
    from gradio_client import Client

    proc = subprocess.Popen([sys.executable, "-m", "alora.cli", "serve", "--port", "0", "--ui", "--served-model-name",
                             "smol"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        deadline = time.monotonic() + 180
        while not any(line.startswith("alora serve:") for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        ready = next(line for line in lines if line.startswith("alora serve:"))
        u = re.search(r"http://127\.0\.0\.1:\d+", ready).group(0)
        assert f"{u}/v1" in ready and f"{u}/ui" in ready and "title" in ready  # the demo adapters
        r = client(u).chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], **GREEDY)
        assert r.usage.completion_tokens == 6
        Client(f"{u}/ui/", verbose=False).submit("Hello", "base", "", 0.0, 4, False, api_name="/send").result()
        page = httpx.get(f"{u}/metrics").text
        assert 'vllm:request_success_total{model_name="smol",adapter="base"} 2.0' in page  # the UI's call too
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- fuzzing --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_schemathesis_finds_no_server_error(srv_engine, tmp_path):
    """Every operation of the server's own OpenAPI schema, with valid and invalid bodies: never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    app = create_app(srv_engine, allow_runtime_adapters=True, adapter_dir=tmp_path)
    with serving(app) as u:
        schema = schemathesis.openapi.from_url(f"{u}/openapi.json")
        for result in schema.get_all_operations():
            operation = result.ok()
            invalid = [GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else []  # GETs take no input
            for mode in [GenerationMode.POSITIVE, *invalid]:
                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                def fuzz(case):
                    if isinstance(case.body, dict):  # keep generations short: the point is the request handling
                        for key in ("max_tokens", "max_completion_tokens"):
                            if not isinstance(case.body.get(key), int) or case.body[key] > 2:
                                case.body[key] = 2
                    response = case.call(base_url=u, timeout=60)
                    assert response.status_code < 500, (case.body, response.text)
                fuzz()
