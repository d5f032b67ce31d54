"""`alora serve --ray`: the Ray Serve application on a local Ray instance (2 replicas of the default model with
its demo adapters, half a CPU each), driven by the official ``openai`` client through Ray's HTTP proxy on
127.0.0.1. Conversations keep their replica (by ``x-session-id``, or by prompt prefix without one) and so their
cache; a replica killed mid-run loses no request; shutting down leaves no Ray process behind."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import httpx
import openai
import psutil
import pytest

pytest.importorskip("ray", reason="the Ray Serve app needs the 'ray' extra")
import ray  # noqa: E402

from alora.serve import ray_app  # noqa: E402

GREEDY = dict(temperature=0.0, max_tokens=8)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def _ask(url: str, messages: list[dict], session: str | None = None, model: str | None = None, **params):
    """One chat completion; returns (reply text, usage, the replica that served it)."""
    raw = _client(url).chat.completions.with_raw_response.create(
        model=model or "SmolLM2-135M-Instruct-f32", messages=messages, **{**GREEDY, **params},
        extra_headers={"x-session-id": session} if session else None)
    out = raw.parse()
    return out.choices[0].message.content, out.usage, raw.headers["x-alora-replica"]


def _opening(tag: str) -> list[dict]:
    return [{"role": "user", "content": f"[{tag}-{uuid.uuid4().hex[:8]}] Tell me about rivers, lakes and seas."}]


class Cluster:
    """The local Ray instance serving the app; ``close()`` shuts it down (once)."""

    def __init__(self):
        self.stack = ExitStack()
        app = ray_app.app_builder({"replicas": "2", "replica_cpus": "0.5", "kv_cache_gb": "0.25"})  # `serve run`'s
        self.url = self.stack.enter_context(ray_app.run_local(app, port=0, num_cpus=2))
        self.processes = psutil.Process().children(recursive=True)  # Ray's daemons and workers

    def close(self) -> None:
        self.stack.close()


@pytest.fixture(scope="module")
def cluster(default_dir):  # default_dir: the model is converted before the replicas load it
    c = Cluster()
    yield c
    c.close()


@pytest.fixture(scope="module")
def sessions(cluster) -> dict[str, tuple[list[dict], object]]:
    """Two session ids whose conversations the session router sent to different replicas: {replica: (session,
    messages after turn 1, turn 1's usage)}."""
    found = {}
    for i in range(16):
        session, messages = f"session-{i}", _opening(f"s{i}")
        text, usage, replica = _ask(cluster.url, messages, session)
        found.setdefault(replica, (session, messages + [{"role": "assistant", "content": text}], usage))
        if len(found) == 2:
            return found
    pytest.fail(f"16 sessions all went to {list(found)}: the ring does not spread sessions over 2 replicas")


def _history_tokens(default_dir, messages: list[dict]) -> int:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(default_dir).apply_chat_template(messages, tokenize=True,
                                                                          return_dict=True)["input_ids"]
    return len(ids)


@pytest.mark.slow
def test_each_session_keeps_its_replica_and_its_cache(cluster, sessions):
    assert len(sessions) == 2
    for replica, (session, messages, first) in sessions.items():
        _, usage, again = _ask(cluster.url, messages + [{"role": "user", "content": "And mountains?"}], session)
        assert again == replica
        assert usage.prompt_tokens_details.cached_tokens >= first.prompt_tokens  # all of turn 1's prompt


@pytest.mark.slow
def test_alora_call_lands_where_its_history_is(cluster, sessions, default_dir):
    # with a session id: the consistent-hash ring
    replica, (session, messages, _) = next(iter(sessions.items()))
    _, usage, where = _ask(cluster.url, messages, session, model="title")
    assert where == replica
    assert usage.prompt_tokens_details.cached_tokens >= _history_tokens(default_dir, messages)
    # without one: the prefix router, for the next turn and for the aLoRA call after it
    messages = _opening("noheader")
    text, turn1, first = _ask(cluster.url, messages)
    messages += [{"role": "assistant", "content": text}]
    _, turn2, second = _ask(cluster.url, messages + [{"role": "user", "content": "And deserts?"}])
    _, call, third = _ask(cluster.url, messages, model="title")
    assert first == second == third
    # all the KV turn 1 computed: its prompt and its reply but the reply's last token, never fed back (the reply
    # was cut at max_tokens, before its end-of-turn token)
    assert turn2.prompt_tokens_details.cached_tokens >= turn1.prompt_tokens + turn1.completion_tokens - 1
    assert call.prompt_tokens_details.cached_tokens >= _history_tokens(default_dir, messages)


def _replica_load(url: str, session: str) -> float:
    """Requests running and waiting on the replica that ``session`` routes to (its /metrics)."""
    text = httpx.get(f"{url}/metrics", headers={"x-session-id": session}, timeout=60).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(("vllm:num_requests_running{", "vllm:num_requests_waiting{")))


@pytest.mark.slow
def test_killing_a_replica_mid_run_loses_no_request(cluster, sessions, default_dir):
    (doomed, (session, history, _)), (survivor, _) = sessions.items()
    history = history + [{"role": "user", "content": "Name three long rivers and say where they flow."}]
    others = [_opening(f"other{i}") for i in range(3)]  # other conversations on the same replica
    with ThreadPoolExecutor(4) as pool:
        plain = [pool.submit(_ask, cluster.url, m, session, max_tokens=48) for m in others]
        stream = _client(cluster.url).chat.completions.create(
            model="SmolLM2-135M-Instruct-f32", messages=history, stream=True, temperature=0.0, max_tokens=24,
            stream_options={"include_usage": True}, extra_headers={"x-session-id": session})
        chunks = iter(stream)
        texts = []
        while not any(c.choices and c.choices[0].delta.content for c in texts[-1:]):
            texts.append(next(chunks))  # the stream is under way on the doomed replica...
        deadline = time.monotonic() + 60
        while _replica_load(cluster.url, session) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)  # ...and so are the three others
        ray.kill(ray.get_actor(doomed, namespace="serve"), no_restart=True)
        texts += list(chunks)
        results = [f.result() for f in plain]
    assert all(text and where == survivor for text, _, where in results)
    finish = [c.choices[0].finish_reason for c in texts if c.choices and c.choices[0].finish_reason]
    assert finish in (["length"], ["stop"])
    reply = "".join(c.choices[0].delta.content or "" for c in texts if c.choices)
    assert reply.strip()
    assert len({c.id for c in texts}) == 1  # one response, though a replica replayed its end
    # the history was recomputed on the survivor: only the chat template's opening was cached there
    usage = texts[-1].usage
    assert usage.prompt_tokens_details.cached_tokens < _history_tokens(default_dir, history[:1])
    # the conversation goes on, on a live replica, from its cache again
    history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Which is longest?"}]
    _, usage, where = _ask(cluster.url, history, session)
    assert where != doomed


@pytest.mark.slow
def test_shutdown_leaves_no_ray_process(cluster):
    processes = cluster.processes
    assert any("raylet" in p.name() for p in processes) and any("gcs_server" in p.name() for p in processes)
    cluster.close()
    deadline = time.monotonic() + 60
    while (alive := [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, [(p.pid, p.name()) for p in alive]
    assert not ray.is_initialized()


@pytest.mark.slow
def test_alora_serve_ray_serves_and_stops_on_sigint(default_dir):
    proc = subprocess.Popen([sys.executable, "-m", "alora.cli", "serve", "--ray", "--replicas", "1", "--replica-cpus",
                             "0.5", "--kv-cache-gb", "0.25", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline, url, log = time.monotonic() + 300, None, []
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                log.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            if m := re.search(r"on Ray Serve \(1 replica\) at (http://\S+)/v1", log[-1]):
                url = m.group(1)
        assert url, "".join(log[-50:])
        text, usage, _ = _ask(url, _opening("cli"))
        assert text and usage.completion_tokens > 0
        processes = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in p.name() for p in processes)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
        deadline = time.monotonic() + 60
        while (alive := [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, [(p.pid, p.name()) for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- without Ray running -------------------------------------------------------------------------------------

def test_routing_text_of_a_turn_extends_the_conversations_earlier_text():
    def text(body: dict, path: str = "/v1/chat/completions") -> str:
        return ray_app.routing_text("POST", path, json.dumps(body).encode())

    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    turn2 = turn1 + [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": [
        {"type": "text", "text": "More"}]}]
    assert text({"messages": turn2}).startswith(text({"messages": turn1}))
    assert text({"messages": turn2, "model": "title"}) == text({"messages": turn2})
    assert text({"messages": turn1}) == text({"messages": turn1[1:]}) == "\nuser: Hi\n"  # the shared system prompt
    assert not text({"messages": turn1, "cache_salt": "a"}).startswith(text({"messages": turn1}).strip())
    assert text({"prompt": [1, 2, 3]}, "/v1/completions") == "\n1,2,3,"
    assert text({"prompt": [1, 2, 34]}, "/v1/completions").startswith(text({"prompt": [1, 2]}, "/v1/completions"))
    assert ray_app.routing_text("GET", "/v1/models", b"") == "GET /v1/models"
    assert ray_app.routing_text("POST", "/v1/completions", b"{not json") == "POST /v1/completions"


def test_app_options_name_rays_routers_and_autoscaling():
    spec = ray_app.ReplicaSpec()
    app = ray_app.build_app(spec, replicas=2, max_replicas=4, replica_cpus=0.5)
    engines = app._bound_deployment.init_args[0]._bound_deployment  # the AloraReplica the ingress forwards to
    config = engines._deployment_config
    assert config.request_router_config.request_router_class == \
        f"{ray_app.ConversationRouter.__module__}.ConversationRouter"
    assert (config.autoscaling_config.min_replicas, config.autoscaling_config.max_replicas) == (2, 4)
    assert engines.ray_actor_options["num_cpus"] == 0.5
    control = ray_app.build_app(spec, replicas=2, routing="pow2")._bound_deployment.init_args[0]._bound_deployment
    assert "PowerOfTwoChoices" in control._deployment_config.request_router_config.request_router_class
    assert control._deployment_config.num_replicas == 2
    with pytest.raises(ValueError, match="max_replicas"):
        ray_app.build_app(spec, replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="unknown arguments"):
        ray_app.app_builder({"replica": "2"})


def test_ray_flags_are_checked_before_anything_starts(capsys):
    from alora.cli import main

    def run(*args) -> tuple[int, str]:
        code = main(["serve", *args])
        return code, capsys.readouterr().err

    code, err = run("--replicas", "2")
    assert code == 2 and "need --ray" in err
    code, err = run("--ray", "--ui")
    assert code == 2 and "--ui" in err
    code, err = run("--ray", "--replicas", "2", "--max-replicas", "1")
    assert code == 2 and "--max-replicas" in err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert {"--ray", "--replicas", "--max-replicas", "--replica-cpus"} <= set(capsys.readouterr().out.split())
