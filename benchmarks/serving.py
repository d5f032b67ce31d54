"""Serving: K concurrent RAG-like conversations through an OpenAI-compatible server on loopback, aLoRA vs LoRA.

Each conversation opens with a ~1.5k-token prompt of synthetic documents and a question, then for every turn
asks the base model for a reply (streamed, greedy) and runs 1-3 intrinsic checks on the conversation so far (the
pattern of a RAG pipeline with answerability and hallucination checks): the checks of one turn are independent,
so they are sent at once. The workload is fixed below (``FULL``; ``QUICK`` for a smoke run) before anything is
measured; every conversation of every run has its own documents, so no run is served from another's prefixes.

Systems, on one server (the target's own, started here on a free 127.0.0.1 port, or ``--url`` of a running one):
- ``alora``: the intrinsic calls go to the demo aLoRAs ``title``, ``summary``, ``followup`` (cycled);
- ``lora``:  the same calls all go to ``title_lora``, the only LoRA twin shipped (a LoRA adapts every token, so
             its prefixes are cached per adapter: a second copy of every history).
Runs: each ``--kv-cache-gb`` budget (one server each) x system x K concurrent conversations (``--concurrency``).
``auto`` is a budget that holds every history once but not once per adapter: 1.5 x K_max x the aLoRA run's KV
bytes per conversation measured at the first budget (which should be roomy: ``default``, the server's own).

Per run: output tokens/s and requests/s over the run's wall time; p50/p99 time to first token (first content
chunk) and latency (to ``[DONE]``) for base turns and intrinsic calls separately; prefix-cache hit rate from
``usage.prompt_tokens_details.cached_tokens`` / ``prompt_tokens`` and from /metrics (hit / query tokens); KV
bytes per conversation (peak /metrics ``used`` during the run minus ``used`` at its start, over K: a lower
bound if the run evicted); other processes' CPU use during the run (``common.OtherCpu``: a run cannot be
repeated on a cold cache, so a busy one is flagged, not repeated).

Targets (issue 10), printed as met / missed / not evaluated: at K_max the aLoRA run's throughput >= 3x its K=1
throughput; >= 90% of the aLoRA run's prompt tokens from cache; intrinsic p50 TTFT at K_max <= 2x K=1; at a
budget that holds all histories once but not once per adapter, aLoRA >= 3x LoRA throughput at K_max.

Another server is another entry in ``TARGETS`` (how to start it, how a request picks an adapter and is sent, its
metric names). ``--target alora,llamacpp`` runs llama.cpp's ``llama-server`` (built by ``make peers``) side by side
in one run: the F32 GGUF of the same weights, the demo adapters converted by llama.cpp's ``convert_lora_to_gguf.py``
(selected per request with its ``lora`` field), one server per K with ``-np K`` slots, its prompt cache with
``--cache-reuse``, the same threads. It gets the token ids our server would run (the chat template rendered by our
tokenizer; an aLoRA's invocation appended) through ``/v1/completions``. Before the runs, a few greedy prompts go to
both servers, base model and every adapter, and whether the outputs match is recorded (``parity``); with llama.cpp
in the run, the issue-11 comparison at the largest K is printed too. Writes benchmarks/results/serving[_quick].json
and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import cycle
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CpuGuard, add_guard_args, filler, machine_info, now, print_table, pyplot,  # noqa: E402
                    result_path, save_figure, versions, write_json)
from peers import llamacpp  # noqa: E402


# ---- the workload, fixed before anything is measured -------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    docs: int                          # synthetic documents in the first user message
    doc_words: int                     # words per document (one token each, plus a few for the header)
    turns: int                         # base replies per conversation
    reply_tokens: int                  # max_tokens of a base reply
    intrinsic_tokens: int              # max_tokens of an intrinsic call
    calls_per_turn: tuple[int, ...]    # intrinsic calls after each reply, cycled
    concurrency: tuple[int, ...]       # K: conversations at once (default of --concurrency)


FULL = Workload(docs=4, doc_words=360, turns=6, reply_tokens=64, intrinsic_tokens=8, calls_per_turn=(1, 2, 3),
                concurrency=(1, 4, 8))
QUICK = Workload(docs=2, doc_words=40, turns=2, reply_tokens=8, intrinsic_tokens=4, calls_per_turn=(1, 2),
                 concurrency=(1, 2))
SYSTEMS = {"alora": ("title", "summary", "followup"),  # the demo aLoRAs `alora serve` loads by default
           "lora": ("title_lora",)}  # the only LoRA twin shipped: every intrinsic call of the LoRA run goes to it
SYSTEM_PROMPT = "You answer questions about the documents the user gives you. Be brief and cite the document."
QUESTIONS = ("Which document talks about music, and what does it say?", "What is the main point of document 2?",
             "Do any two documents disagree?", "Summarize the documents in two sentences.",
             "What would you ask the author of document 1?", "Which document is the most useful, and why?")
LLAMACPP_SLOT_CTX = 4096  # tokens of context per llama-server slot: the longest FULL conversation is ~2.2k
PARITY_TOKENS = 16  # greedy tokens per parity prompt
REQUEST_TIMEOUT_S = 600
START_TIMEOUT_S = 600  # the first start may convert the default model (~40 s on an idle machine)
METRICS_EVERY_S = 0.5
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def first_message(wl: Workload, seed: int) -> str:
    docs = "\n\n".join(f"Document {d + 1}: {filler(wl.doc_words, seed * 100 + d)}." for d in range(wl.docs))
    return f"{docs}\n\nQuestion: {QUESTIONS[0]}"


# ---- targets: a server to start, and how its requests pick an adapter ---------------------------------------

def _chat_request(fields: dict, messages: list[dict]) -> tuple[str, dict]:
    return "/v1/chat/completions", {**fields, "messages": messages}


@dataclass(frozen=True)
class Target:
    """A server the load generator can drive.

    ``command(port, kv_cache_gb, slots)`` is its argv on 127.0.0.1 (``kv_cache_gb`` None: its default budget;
    ``slots``: the run's K, for a server whose parallel slots are fixed at start, which then gets one server per K:
    ``per_k``); ``select(adapter, models)`` gives the request fields that pick the base model (``adapter`` None) or
    an adapter, ``models`` being the server's ``GET /v1/models`` data, with ``model`` naming the adapter in our
    records; ``request(fields, messages)`` gives the path and body of a streamed greedy request (default: a chat
    completion); ``metrics`` maps our names to its Prometheus series (a series it lacks is reported as missing);
    ``info`` goes into the results.
    """
    name: str
    command: Callable[[int, float | None, int], list[str]]
    select: Callable[[str | None, list[dict]], dict]
    metrics: dict[str, str]
    health: str = "/health"
    per_k: bool = False
    request: Callable[[dict, list[dict]], tuple[str, dict]] = _chat_request
    info: dict = field(default_factory=dict)


def _alora_select(adapter: str | None, models: list[dict]) -> dict:
    return {"model": adapter or next(m["id"] for m in models if not m.get("parent"))}


TARGETS = {"alora": Target(
    name="alora",
    command=lambda port, gb, slots: [sys.executable, "-m", "alora.cli", "serve", "--host", "127.0.0.1",
                                     "--port", str(port)] + ([] if gb is None else ["--kv-cache-gb", f"{gb:.4g}"]),
    select=_alora_select,
    metrics={"hits": "vllm:prefix_cache_hits_total", "queries": "vllm:prefix_cache_queries_total",
             "running": "vllm:num_requests_running", "budget": "alora:kv_cache_budget_bytes",
             "capacity": "alora:kv_cache_capacity_bytes", "used": "alora:kv_cache_used_bytes",
             "evictions": "alora:kv_evictions_total"})}


def llamacpp_target(threads: int, base_lora: str) -> Target | None:
    """llama-server of the built peer (None if not built): F32 GGUF, every converted demo adapter loaded at scale 0.

    A request gets the ids our server runs for the same chat request: the chat template rendered by our tokenizer,
    with the generation prompt for the base model and a LoRA, and for an aLoRA without it but followed by the
    invocation tokens. Its ``lora`` field sets the chosen adapter's scale to 1; a base request sends every adapter
    at scale 0 (``base_lora="zeros"``) or no ``lora`` field (``"omit"``): llama-server clears a slot's cache
    when the adapters named in a request change from an aLoRA to none, and does not look when the field is absent.
    """
    m = llamacpp.manifest()
    if m is None:
        return None
    from transformers import AutoTokenizer

    from alora.train import chat_ids

    tokenizer = AutoTokenizer.from_pretrained(m["base_safetensors"])
    adapters = llamacpp.converted_adapters(m)
    names = sorted(adapters)  # --lora order: llama-server's adapter ids

    def select(adapter: str | None, models: list[dict]) -> dict:
        if adapter is not None and adapter not in adapters:
            raise KeyError(f"llama-server has no GGUF of the adapter {adapter!r} (converted: {names})")
        lora = [{"id": i, "scale": float(n == adapter)} for i, n in enumerate(names)]
        return {"model": adapter or "base", **({} if adapter is None and base_lora == "omit" else {"lora": lora})}

    def request(fields: dict, messages: list[dict]) -> tuple[str, dict]:
        body = {k: v for k, v in fields.items() if k != "model"}
        inv = adapters[fields["model"]]["alora_invocation_tokens"] if fields["model"] in adapters else None
        ids = chat_ids(tokenizer, messages, not inv) + list(inv or [])
        return "/v1/completions", {**body, "prompt": ids, "cache_prompt": True}

    return Target(
        name="llamacpp",
        command=lambda port, gb, slots: llamacpp.server_command(m, port, slots, LLAMACPP_SLOT_CTX, threads,
                                                                [adapters[n]["gguf"] for n in names]),
        select=select, request=request, per_k=True,
        metrics={"running": "llamacpp:requests_processing"},
        info={"server": m["llama_server"], "llama_cpp_python_sdist": m["built_from"], "system_info": m["system_info"],
              "model": m["models"]["F32"], "threads": threads, "slot_ctx": LLAMACPP_SLOT_CTX,
              "adapters": {n: {"gguf": adapters[n]["gguf"], "read_as": adapters[n]["read_as"],
                               "invocation_tokens": adapters[n]["alora_invocation_tokens"]} for n in names},
              "not_converted": sorted(set(m["adapters"]) - set(adapters)), "base_requests_lora": base_lora,
              "flags": "-np K, -c K x slot_ctx, --cache-reuse 256, prompt cache (cache_prompt, --cache-ram default), "
                       "--lora each adapter, --lora-init-without-apply, -t/-tb threads"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_loopback(url: str) -> str:
    if urlsplit(url).hostname not in LOOPBACK:
        sys.exit(f"--url {url}: only a server on this machine (127.0.0.1) may be benchmarked")
    return url.rstrip("/")


@contextmanager
def serve(target: Target, kv_cache_gb: float | None = None, url: str | None = None, pid: int | None = None,
          slots: int = 1):
    """Yields ``(url, pid)``: the server at ``url`` (``pid`` as given), or a fresh one of ``target`` on a free
    loopback port (``slots``: parallel slots, where the target fixes them at start), stopped (SIGINT, then SIGKILL
    after 30 s) when the block ends. Its output goes to a temporary log, printed if it does not come up."""
    if url:
        yield check_loopback(url), pid
        return
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(target.command(port, kv_cache_gb, slots), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = now() + START_TIMEOUT_S
            while not _healthy(url + target.health):
                if proc.poll() is not None or now() > deadline:
                    log.seek(0)
                    why = f"exit {proc.returncode}" if proc.returncode is not None else f"not up in {START_TIMEOUT_S} s"
                    sys.exit(f"the {target.name} server failed ({why}):\n{log.read()[-4000:]}")
                time.sleep(0.5)
            yield url, proc.pid
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2, trust_env=False).status_code == 200
    except httpx.TransportError:
        return False


def client(url: str, connections: int) -> httpx.AsyncClient:
    """An HTTP client for the loopback server (environment proxies ignored)."""
    return httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, trust_env=False,
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


# ---- requests and metrics -----------------------------------------------------------------------------------

@dataclass
class Reply:
    kind: str                 # "base" | "intrinsic" (or a soak request kind)
    model: str
    ttft_s: float | None      # to the first content chunk (or the finish, for an empty reply)
    latency_s: float          # to the end of the stream
    text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    turn: int | None = None   # the conversation's turn (base replies of the workload)


class ServerError(RuntimeError):
    pass


async def chat(http: httpx.AsyncClient, fields: dict, messages: list[dict], max_tokens: int, kind: str,
               stop_after: int | None = None, target: Target | None = None, **body) -> Reply:
    """One streamed, greedy chat completion with usage (sent as ``target`` sends it; default: a chat completion);
    ``stop_after`` chunks: disconnect there (a cancel)."""
    path, request = (target.request if target else _chat_request)(fields, messages)
    request = {**request, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
               "stream_options": {"include_usage": True}, **body}
    t0, ttft, parts, usage, chunks = now(), None, [], {}, 0
    async with http.stream("POST", path, json=request) as r:
        if r.status_code != 200:
            raise ServerError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise ServerError(f"error in stream: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or choice.get("text")  # chat / completion
                if ttft is None and (piece or choice.get("finish_reason")):
                    ttft = now() - t0
                parts.append(piece or "")
            usage = chunk.get("usage") or usage
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                break  # leaving the block closes the connection mid-stream
    return Reply(kind, fields.get("model", ""), ttft, now() - t0, "".join(parts), usage.get("prompt_tokens", 0),
                 (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
                 usage.get("completion_tokens", 0))


def parse_prometheus(text: str) -> dict[str, float]:
    """``{series name: value}``, summed over label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("{", 1)[0].split()[0], line.rsplit(None, 1)[1]
            out[name] = out.get(name, 0.0) + float(value)
    return out


async def scrape(http: httpx.AsyncClient, target: Target) -> dict[str, float]:
    """The target's metrics under our names (missing series left out)."""
    series = parse_prometheus((await http.get("/metrics")).raise_for_status().text)
    return {ours: series[theirs] for ours, theirs in target.metrics.items() if theirs in series}


async def models(http: httpx.AsyncClient) -> list[dict]:
    return (await http.get("/v1/models")).raise_for_status().json()["data"]


# ---- one run ---------------------------------------------------------------------------------------------

async def conversation(http, target: Target, model_list: list[dict], adapters: tuple[str, ...], wl: Workload,
                       seed: int, replies: list[Reply]) -> None:
    """One conversation of the workload; its replies are appended as they finish (kept if the run is cut)."""
    base = target.select(None, model_list)
    checks = cycle([target.select(a, model_list) for a in adapters])
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": first_message(wl, seed)}]
    for turn in range(wl.turns):
        if turn:
            messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        reply = await chat(http, base, messages, wl.reply_tokens, "base", target=target)
        reply.turn = turn
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply.text})
        n = wl.calls_per_turn[turn % len(wl.calls_per_turn)]
        replies.extend(await asyncio.gather(*(chat(http, next(checks), list(messages), wl.intrinsic_tokens,
                                                   "intrinsic", target=target) for _ in range(n))))


async def run(url: str, target: Target, adapters: tuple[str, ...], K: int, wl: Workload, seed: int,
              max_s: float) -> dict:
    """K conversations at once (documents from ``seed``), cut at ``max_s``; /metrics sampled meanwhile."""
    async with client(url, 4 * K + 4) as http:
        model_list = await models(http)
        before = await scrape(http, target)
        samples: list[dict] = []

        async def sample_metrics():
            while True:
                samples.append(await scrape(http, target))
                await asyncio.sleep(METRICS_EVERY_S)

        sampler = asyncio.create_task(sample_metrics())
        replies: list[Reply] = []
        t0 = now()
        tasks = [asyncio.create_task(conversation(http, target, model_list, adapters, wl, seed + c, replies))
                 for c in range(K)]
        _, pending = await asyncio.wait(tasks, timeout=max_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = now() - t0
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        after = await scrape(http, target)
    errors = [repr(t.exception()) for t in tasks if not t.cancelled() and t.exception()]
    return summarize(replies, wall, K, before, samples + [after], errors, cut=bool(pending))


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def latency_stats(replies: list[Reply]) -> dict:
    ttft = [r.ttft_s for r in replies if r.ttft_s is not None]
    lat = [r.latency_s for r in replies]
    return {"requests": len(replies), "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99)}


def summarize(replies: list[Reply], wall: float, K: int, before: dict, samples: list[dict], errors: list[str],
              cut: bool) -> dict:
    after = samples[-1]
    delta = lambda k: after[k] - before[k] if k in after and k in before else None  # noqa: E731
    prompt, cached = sum(r.prompt_tokens for r in replies), sum(r.cached_tokens for r in replies)
    out_tokens = sum(r.completion_tokens for r in replies)
    used = [s["used"] for s in samples if "used" in s]
    capacity = [s["capacity"] for s in samples if "capacity" in s]
    budget = after.get("budget")
    return {
        "wall_s": wall, "cut_at_time_limit": cut, "errors": errors, "requests": len(replies),
        "output_tokens": out_tokens, "output_tok_s": out_tokens / wall, "requests_s": len(replies) / wall,
        "base": latency_stats([r for r in replies if r.kind == "base"]),
        # every turn after the first follows the previous turn's intrinsic calls on the same history
        "base_after_intrinsic": latency_stats([r for r in replies if r.kind == "base" and r.turn]),
        "intrinsic": latency_stats([r for r in replies if r.kind == "intrinsic"]),
        "prompt_tokens": prompt, "cached_tokens": cached, "cache_hit_rate_usage": cached / prompt if prompt else None,
        "cache_hit_rate_metrics": (delta("hits") / delta("queries")) if delta("queries") else None,
        "kv": {"budget_bytes": budget, "used_at_start_bytes": before.get("used"),
               "used_peak_bytes": max(used) if used else None,
               "capacity_peak_bytes": max(capacity) if capacity else None,
               "capacity_over_budget_samples": sum(c > budget for c in capacity) if budget else None,
               "per_conversation_bytes": (max(used) - before["used"]) / K if used and "used" in before else None,
               "evictions": delta("evictions")},
        "replies": [asdict(r) | {"text": r.text[:80]} for r in replies],
    }


# ---- targets ---------------------------------------------------------------------------------------------

def _status(value, test) -> str:
    return "not evaluated" if value is None else "met" if test(value) else "missed"


def evaluate(runs: list[dict], ks: list[int]) -> list[dict]:
    """The issue's four targets on our server's runs: each met, missed or not evaluated (and why)."""
    k1, km = min(ks), max(ks)
    runs = [r for r in runs if r["target"] == "alora"]
    budgets = list(dict.fromkeys(r["kv_cache_gb"] for r in runs))

    def get(system: str, K: int, gb="first"):
        gb = budgets[0] if gb == "first" else gb
        return next((r for r in runs if (r["system"], r["K"], r["kv_cache_gb"]) == (system, K, gb)), None)

    rows = []

    def add(name: str, goal: str, value, test, why: str) -> None:
        rows.append({"target": name, "goal": goal, "measured": value, "status": _status(value, test),
                     **({"why": why} if value is None else {})})

    a1, am, lm = get("alora", k1), get("alora", km), get("lora", km)
    scaling = bool(a1 and am and k1 == 1 and km > 1)
    need_k = "needs aLoRA runs at K=1 and a larger K"
    add(f"aLoRA throughput K={km} / K=1", ">= 3x",
        am["output_tok_s"] / a1["output_tok_s"] if scaling else None, lambda v: v >= 3, need_k)
    add(f"aLoRA prompt tokens from cache, K={km}", ">= 0.9", am and am["cache_hit_rate_usage"], lambda v: v >= 0.9,
        "no aLoRA run with usage")
    t1, tm = (a1["intrinsic"]["ttft_p50_s"], am["intrinsic"]["ttft_p50_s"]) if scaling else (None, None)
    add(f"aLoRA intrinsic p50 TTFT K={km} / K=1", "<= 2x", tm / t1 if t1 and tm else None, lambda v: v <= 2, need_k)

    # KV sizes measured at the first budget (roomy: nothing evicted there, or they are lower bounds)
    once = am and am["kv"]["per_conversation_bytes"] and km * am["kv"]["per_conversation_bytes"]
    per_adapter = lm and lm["kv"]["per_conversation_bytes"] and km * lm["kv"]["per_conversation_bytes"]
    fitting = [(get("alora", km, gb), get("lora", km, gb)) for gb in budgets]
    fitting = [(a, b) for a, b in fitting if a and b and once and per_adapter and a["kv"]["budget_bytes"]
               and once <= a["kv"]["budget_bytes"] < per_adapter]
    add(f"aLoRA / LoRA throughput K={km}, tight budget", ">= 3x",
        fitting[0][0]["output_tok_s"] / fitting[0][1]["output_tok_s"] if fitting else None, lambda v: v >= 3,
        f"no budget in the sweep holds every history once but not once per adapter, [{once / 2**30:.3g}, "
        f"{per_adapter / 2**30:.3g}) GiB: add --kv-cache-gb auto"
        if once and per_adapter else "needs both systems at the largest K on the first budget")
    if fitting:
        rows[-1]["kv_cache_gb"] = fitting[0][0]["kv_cache_gb"]
    return rows


def auto_budget(runs: list[dict], km: int) -> float:
    """GiB that hold 1.5x the aLoRA run's histories at K=km (first budget): every history once, not twice."""
    runs = [r for r in runs if r["target"] == "alora"]
    first = runs[0]["kv_cache_gb"] if runs else None
    per_conv = next((r["kv"]["per_conversation_bytes"] for r in runs
                     if (r["system"], r["K"], r["kv_cache_gb"]) == ("alora", km, first)), None)
    if not per_conv:
        sys.exit("--kv-cache-gb auto needs a budget before it with an aLoRA run at the largest K")
    return round(1.5 * km * per_conv / 2**30, 4)


def compare_peer(runs: list[dict], ks: list[int]) -> list[dict]:
    """Issue 11's comparison with llama-server at the largest K (our server at its first budget), aLoRA system."""
    km = max(ks)

    def get(target: str):
        return next((r for r in runs if (r["target"], r["system"], r["K"]) == (target, "alora", km)), None)

    ours, peer = get("alora"), get("llamacpp")
    rows = []
    for name, goal, key, test in (
            (f"throughput ours / llama-server, K={km}", ">= 3x", lambda r: 1 / r["output_tok_s"], lambda v: v >= 3),
            (f"p50 TTFT of base turns after intrinsic calls, llama-server / ours, K={km}", ">= 3x",
             lambda r: r["base_after_intrinsic"]["ttft_p50_s"], lambda v: v >= 3),
            (f"p50 TTFT of intrinsic calls, llama-server / ours, K={km}", "reported", lambda r: r["intrinsic"][
                "ttft_p50_s"], None)):
        value = key(peer) / key(ours) if ours and peer and key(peer) and key(ours) else None
        status = "not evaluated" if value is None else "reported" if test is None else _status(value, test)
        rows.append({"target": name, "goal": goal, "measured": value, "status": status})
    return rows


def parity_cases() -> list[list[dict]]:
    """Short conversations (their own documents) whose greedy outputs both servers give for every adapter."""
    return [[{"role": "system", "content": SYSTEM_PROMPT},
             {"role": "user", "content": first_message(QUICK, 900_000 + i)}] for i in range(3)]


async def parity_outputs(url: str, target: Target) -> list[dict]:
    """For each parity conversation: the base model, every adapter of ``SYSTEMS``, then the base model again
    (after the adapters: a stale cache would show here), greedy, ``PARITY_TOKENS`` tokens, one at a time."""
    adapters = sorted({a for names in SYSTEMS.values() for a in names})
    out = []
    async with client(url, 2) as http:
        model_list = await models(http)
        for i, messages in enumerate(parity_cases()):
            for label, adapter in [("base", None)] + [(a, a) for a in adapters] + [("base_after_adapters", None)]:
                r = await chat(http, target.select(adapter, model_list), messages, PARITY_TOKENS, "parity",
                               target=target)
                out.append({"case": i, "model": label, "text": r.text, "prompt_tokens": r.prompt_tokens,
                            "completion_tokens": r.completion_tokens})
    return out


def parity(outputs: dict[str, list[dict]]) -> dict:
    """Greedy outputs of the targets, compared case by case with ours (``alora``)."""
    ours = {(o["case"], o["model"]): o for o in outputs.get("alora", [])}
    cases, summary = [], {}
    for name, outs in outputs.items():
        if name == "alora":
            continue
        for o in outs:
            ref = ours.get((o["case"], o["model"]))
            same = ref is not None and ref["text"] == o["text"]
            cases.append({"target": name, "case": o["case"], "model": o["model"], "match": same,
                          "same_prompt_tokens": ref is not None and ref["prompt_tokens"] == o["prompt_tokens"],
                          "ours": ref and ref["text"], "theirs": o["text"]})
            key = f"{name}:{o['model']}"
            hits, total = summary.get(key, (0, 0))
            summary[key] = (hits + same, total + 1)
    return {"tokens": PARITY_TOKENS, "decoding": "greedy", "match": "same output text",
            "summary": {k: f"{h}/{t}" for k, (h, t) in summary.items()}, "cases": cases, "outputs": outputs}


# ---- report ------------------------------------------------------------------------------------------------

def _v(value, scale: float = 1.0):
    return "-" if value is None else value * scale


def _gb(gb) -> str:
    return "default" if gb is None else f"{gb:.3g}"


def _budget(run: dict) -> str:
    """The run's KV budget in GiB, as the server reported it (else as asked for)."""
    b = run["kv"]["budget_bytes"]
    return f"{b / 2**30:.3g}" if b else _gb(run["kv_cache_gb"])


def report(result: dict, png: Path) -> None:
    runs = result["runs"]
    print_table(f"Serving ({result['target']}): throughput and prefix cache; 'lora' sends every intrinsic call to "
                f"{SYSTEMS['lora'][0]} (the only LoRA twin shipped)",
                ["target", "system", "GiB", "K", "requests", "errors", "wall s", "out tok/s", "req/s", "hit (usage)",
                 "hit (metrics)", "KV MiB/conv", "evictions", "other cores", "flagged"],
                [[r["target"], r["system"], _budget(r), r["K"], r["requests"], len(r["errors"]), r["wall_s"],
                  r["output_tok_s"], r["requests_s"], _v(r["cache_hit_rate_usage"]), _v(r["cache_hit_rate_metrics"]),
                  _v(r["kv"]["per_conversation_bytes"], 2**-20), _v(r["kv"]["evictions"]), r["other_cpu_cores"],
                  "yes" if r["flagged"] or r["cut_at_time_limit"] else ""] for r in runs])
    print_table("Serving: latency (ms; TTFT = to the first content chunk, latency = to the end of the stream; "
                "'after intr.': base turns that follow intrinsic calls)",
                ["target", "system", "GiB", "K", "base TTFT p50", "p99", "after intr. TTFT p50", "base latency p50",
                 "p99", "intrinsic TTFT p50", "p99", "intrinsic latency p50", "p99"],
                [[r["target"], r["system"], _budget(r), r["K"]]
                 + [_v(r["base"][key], 1e3) for key in ("ttft_p50_s", "ttft_p99_s")]
                 + [_v(r["base_after_intrinsic"]["ttft_p50_s"], 1e3)]
                 + [_v(r["base"][key], 1e3) for key in ("latency_p50_s", "latency_p99_s")]
                 + [_v(r["intrinsic"][key], 1e3) for key in ("ttft_p50_s", "ttft_p99_s", "latency_p50_s",
                                                             "latency_p99_s")] for r in runs])
    print_table("Targets (issue 10)", ["target", "goal", "measured", "status"],
                [[t["target"], t["goal"], _v(t["measured"]), t["status"]] for t in result["targets"]])
    for t in result["targets"]:
        if "why" in t or "kv_cache_gb" in t:
            print(f"  {t['target']}: " + (t.get("why") or f"at {t['kv_cache_gb']:.3g} GiB"))
    if result.get("peer_comparison"):
        print_table("Against llama-server (issue 11)", ["comparison", "goal", "measured", "status"],
                    [[t["target"], t["goal"], _v(t["measured"]), t["status"]] for t in result["peer_comparison"]])
    if result.get("parity"):
        print_table(f"Greedy outputs equal to ours ({PARITY_TOKENS} tokens; cases matched / cases)",
                    ["target:model", "matched"], [[k, v] for k, v in result["parity"]["summary"].items()])
    plot(result, png)


def plot(result: dict, png: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    series = dict.fromkeys((r["target"], r["system"], r["kv_cache_gb"]) for r in result["runs"])
    for target, system, gb in series:
        rs = [r for r in result["runs"] if (r["target"], r["system"], r["kv_cache_gb"]) == (target, system, gb)]
        ks = [r["K"] for r in rs]
        label = f"{system}, {_budget(rs[0])} GiB" if target == "alora" else f"{target}: {system}"
        style = dict(marker="o" if target == "alora" else "s", label=label,
                     linestyle="-" if system == "alora" else "--")
        axes[0].plot(ks, [r["output_tok_s"] for r in rs], **style)
        axes[1].plot(ks, [(r["intrinsic"]["ttft_p50_s"] or float("nan")) * 1e3 for r in rs], **style)
        axes[2].plot(ks, [(r["kv"]["per_conversation_bytes"] or float("nan")) / 2**20 for r in rs], **style)
    for ax, title, unit in zip(axes, ("output throughput", "intrinsic call p50 TTFT", "KV per conversation"),
                               ("tokens/s", "ms", "MiB")):
        ax.set(xlabel="concurrent conversations K", ylabel=unit, title=title)
        ax.set_xticks(sorted({r["K"] for r in result["runs"]}))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Serving on loopback ({result['target']}): aLoRA vs LoRA twin")
    save_figure(fig, png)


# ---- main --------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=lambda s: s.split(","),
                   help="servers to benchmark in one run, comma-separated, from alora, llamacpp (llama.cpp's "
                        "llama-server, built by `make peers`); default: alora, and llamacpp when built (not with --url)")
    p.add_argument("--threads", type=int, help="llama-server's threads (default: torch's thread count here, which "
                                               "our server also uses)")
    p.add_argument("--llamacpp-base-lora", choices=["zeros", "omit"], default="zeros",
                   help="how a base request to llama-server names no adapter: every adapter at scale 0 (default; "
                        "llama-server then clears a slot's cache after an aLoRA call) or no lora field")
    p.add_argument("--url", help="benchmark the server running at this loopback URL instead of starting one "
                                 "(its adapters must include those of --systems; one budget only)")
    p.add_argument("--server-pid", type=int, help="with --url: the server's PID, so that its CPU use is not "
                                                  "counted as other processes'")
    p.add_argument("--systems", type=lambda s: s.split(","), default=list(SYSTEMS),
                   help=f"comma-separated, from {', '.join(SYSTEMS)} (default both)")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")],
                   help=f"K values (default {','.join(map(str, FULL.concurrency))}; "
                        f"--quick {','.join(map(str, QUICK.concurrency))})")
    p.add_argument("--kv-cache-gb", type=lambda s: s.split(","),
                   help="budgets to sweep, comma-separated GiB; 'default' = the server's own, 'auto' = 1.5x what the "
                        "aLoRA run's histories took at the first budget (holds them once, not once per adapter); "
                        "a server is started for each (default: default,auto; --quick or --url: default)")
    p.add_argument("--max-minutes", type=float, help="time limit of each run: conversations still going are cut "
                                                     "and the run flagged (default 20; --quick 1)")
    p.add_argument("--quick", action="store_true", help="smoke run of a few seconds per run: tiny workload, K=1,2, "
                                                        "the server's default budget; writes serving_quick.*")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/serving[_quick].json)")
    add_guard_args(p, repeat=False)
    args = p.parse_args()
    if args.target and (unknown := set(args.target) - {"alora", "llamacpp"}):
        p.error(f"--target: unknown {sorted(unknown)}")
    if args.url and args.target and len(args.target) > 1:
        p.error("--url: one target only (the running server's)")
    if args.url and args.kv_cache_gb not in (None, ["default"]):
        p.error("--url: the running server has one budget; leave --kv-cache-gb out")
    args.kv_cache_gb = args.kv_cache_gb or (["default"] if args.quick or args.url else ["default", "auto"])
    args.max_minutes = args.max_minutes or (1 if args.quick else 20)
    if unknown := set(args.systems) - set(SYSTEMS):
        p.error(f"--systems: unknown {sorted(unknown)}")
    if args.url:
        check_loopback(args.url)
    if any(x not in ("default", "auto") and float(x) <= 0 for x in args.kv_cache_gb):
        p.error("--kv-cache-gb: budgets must be > 0")
    return args


def resolve_targets(args) -> list[Target]:
    """The targets to run; llamacpp is left out, with a message, when the peer is not built."""
    names = args.target or (["alora"] if args.url else ["alora", "llamacpp"])
    targets = []
    for name in names:
        if name == "llamacpp":
            target = llamacpp_target(args.threads, args.llamacpp_base_lora)
            if target is None:
                print(llamacpp.NOT_BUILT, file=sys.stderr)
                continue
            targets.append(target)
        else:
            targets.append(TARGETS[name])
    if not targets:
        sys.exit(llamacpp.NOT_BUILT)
    return targets


def main() -> None:
    args = parse_args()
    import torch

    args.threads = args.threads or torch.get_num_threads()
    wl = QUICK if args.quick else FULL
    targets = resolve_targets(args)
    ks = args.concurrency or list(wl.concurrency)
    guard = CpuGuard(args.max_other_cores, retries=0)  # a run cannot be repeated on a cold cache: flag, not repeat
    runs: list[dict] = []
    outputs: dict[str, list[dict]] = {}  # greedy parity outputs per target
    for target in targets:
        # one server per budget; a target whose slots are fixed at start gets one per K (its own budget only)
        servers = [(spec, (K,)) for spec in ["default"] for K in ks] if target.per_k else \
            [(spec, tuple(ks)) for spec in args.kv_cache_gb]
        for spec, server_ks in servers:
            gb = auto_budget(runs, max(ks)) if spec == "auto" else None if spec == "default" else float(spec)
            with serve(target, gb, args.url, args.server_pid, slots=max(server_ks)) as (url, pid):
                guard.pids = (pid,) if pid else ()
                if target.name == "alora":
                    served = {m["id"] for m in asyncio.run(_models(url))}
                    if missing := {a for s in args.systems for a in SYSTEMS[s]} - served:
                        sys.exit(f"the server at {url} lacks the adapters {sorted(missing)} (it serves "
                                 f"{sorted(served)})")
                if "llamacpp" in (t.name for t in targets) and target.name not in outputs:
                    outputs[target.name] = asyncio.run(parity_outputs(url, target))
                for system in args.systems:
                    for K in server_ks:
                        seed = 1000 * (len(runs) + 1)  # documents of its own: no run is served from another's
                        result, cpu = guard.run(lambda: asyncio.run(run(url, target, SYSTEMS[system], K, wl, seed,
                                                                        60 * args.max_minutes)))
                        runs.append({"target": target.name, "system": system, "K": K, "kv_cache_gb": gb, **cpu,
                                     **result})
                        print(f"{target.name} {system:5s} K={K} budget {_gb(gb)} GiB: {result['output_tok_s']:.3g} "
                              f"tok/s, {result['requests']} requests in {result['wall_s']:.3g} s, "
                              f"{len(result['errors'])} errors", file=sys.stderr)
    if outputs and "alora" not in outputs:  # llama.cpp alone: our outputs still, from a server of our own
        with serve(TARGETS["alora"]) as (url, _):
            outputs["alora"] = asyncio.run(parity_outputs(url, TARGETS["alora"]))
    out = args.out or result_path("serving", "cpu", args.quick, "json")
    result = {"benchmark": "serving", "quick": args.quick, "machine": machine_info("cpu"), "versions": versions(),
              "target": ",".join(t.name for t in targets),
              "targets_info": {t.name: t.info for t in targets if t.info},
              "workload": {**asdict(wl), "concurrency": ks, "systems": {s: SYSTEMS[s] for s in args.systems},
                           "system_prompt": SYSTEM_PROMPT, "questions": QUESTIONS, "decoding": "greedy (temperature 0)",
                           "intrinsic_calls": "sent at once after each base reply, on the history including it"},
              "config": {"kv_cache_gb": args.kv_cache_gb, "url": args.url, "max_minutes": args.max_minutes,
                         "threads_llamacpp": args.threads},
              "runs": runs, "targets": evaluate(runs, ks), "cpu_guard": guard.summary()}
    if any(t.name == "llamacpp" for t in targets):
        result["peer_comparison"] = compare_peer(runs, ks)
        result["parity"] = parity(outputs)
    write_json(out, result)
    report(result, out.with_suffix(".png"))
    guard.report()


async def _models(url: str) -> list[dict]:
    async with client(url, 1) as http:
        return await models(http)


if __name__ == "__main__":
    main()
