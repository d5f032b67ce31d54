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

Another server is another entry in ``TARGETS`` (how to start it, how a request picks an adapter, its metric
names); only ``alora`` exists so far. Writes benchmarks/results/serving[_quick].json and .png.
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
from dataclasses import asdict, dataclass
from itertools import cycle
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CpuGuard, add_guard_args, filler, machine_info, now, print_table, pyplot,  # noqa: E402
                    result_path, save_figure, versions, write_json)


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
REQUEST_TIMEOUT_S = 600
START_TIMEOUT_S = 600  # the first start may convert the default model (~40 s on an idle machine)
METRICS_EVERY_S = 0.5
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def first_message(wl: Workload, seed: int) -> str:
    docs = "\n\n".join(f"Document {d + 1}: {filler(wl.doc_words, seed * 100 + d)}." for d in range(wl.docs))
    return f"{docs}\n\nQuestion: {QUESTIONS[0]}"


# ---- targets: a server to start, and how its requests pick an adapter ---------------------------------------

@dataclass(frozen=True)
class Target:
    """A server the load generator can drive.

    ``command(port, kv_cache_gb)`` is its argv on 127.0.0.1 (``kv_cache_gb`` None: its default budget);
    ``select(adapter, models)`` gives the request fields that pick the base model (``adapter`` None) or an adapter,
    ``models`` being the server's ``GET /v1/models`` data; ``metrics`` maps our names to its Prometheus series
    (a series it lacks is reported as missing). llama.cpp's llama-server, for one, would pick an adapter with a
    ``lora`` field and export ``llamacpp:`` series.
    """
    name: str
    command: Callable[[int, float | None], list[str]]
    select: Callable[[str | None, list[dict]], dict]
    metrics: dict[str, str]
    health: str = "/health"


def _alora_select(adapter: str | None, models: list[dict]) -> dict:
    return {"model": adapter or next(m["id"] for m in models if not m.get("parent"))}


TARGETS = {"alora": Target(
    name="alora",
    command=lambda port, gb: [sys.executable, "-m", "alora.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    + ([] if gb is None else ["--kv-cache-gb", f"{gb:.4g}"]),
    select=_alora_select,
    metrics={"hits": "vllm:prefix_cache_hits_total", "queries": "vllm:prefix_cache_queries_total",
             "running": "vllm:num_requests_running", "budget": "alora:kv_cache_budget_bytes",
             "capacity": "alora:kv_cache_capacity_bytes", "used": "alora:kv_cache_used_bytes",
             "evictions": "alora:kv_evictions_total"})}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_loopback(url: str) -> str:
    if urlsplit(url).hostname not in LOOPBACK:
        sys.exit(f"--url {url}: only a server on this machine (127.0.0.1) may be benchmarked")
    return url.rstrip("/")


@contextmanager
def serve(target: Target, kv_cache_gb: float | None = None, url: str | None = None, pid: int | None = None):
    """Yields ``(url, pid)``: the server at ``url`` (``pid`` as given), or a fresh one of ``target`` on a free
    loopback port, stopped (SIGINT, then SIGKILL after 30 s) when the block ends. Its output goes to a temporary
    log, printed if it does not come up."""
    if url:
        yield check_loopback(url), pid
        return
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(target.command(port, kv_cache_gb), stdout=log, stderr=subprocess.STDOUT,
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


class ServerError(RuntimeError):
    pass


async def chat(http: httpx.AsyncClient, fields: dict, messages: list[dict], max_tokens: int, kind: str,
               stop_after: int | None = None, **body) -> Reply:
    """One streamed, greedy chat completion with usage; ``stop_after`` chunks: disconnect there (a cancel)."""
    request = {**fields, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
               "stream_options": {"include_usage": True}, **body}
    t0, ttft, parts, usage, chunks = now(), None, [], {}, 0
    async with http.stream("POST", "/v1/chat/completions", json=request) as r:
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
                piece = (choice.get("delta") or {}).get("content")
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
        reply = await chat(http, base, messages, wl.reply_tokens, "base")
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply.text})
        n = wl.calls_per_turn[turn % len(wl.calls_per_turn)]
        replies.extend(await asyncio.gather(*(chat(http, next(checks), list(messages), wl.intrinsic_tokens,
                                                   "intrinsic") for _ in range(n))))


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

def evaluate(runs: list[dict], ks: list[int]) -> list[dict]:
    """The issue's four targets on the runs made: each met, missed or not evaluated (and why)."""
    k1, km = min(ks), max(ks)
    budgets = list(dict.fromkeys(r["kv_cache_gb"] for r in runs))

    def get(system: str, K: int, gb="first"):
        gb = budgets[0] if gb == "first" else gb
        return next((r for r in runs if (r["system"], r["K"], r["kv_cache_gb"]) == (system, K, gb)), None)

    rows = []

    def add(name: str, goal: str, value, test, why: str) -> None:
        status = "not evaluated" if value is None else "met" if test(value) else "missed"
        rows.append({"target": name, "goal": goal, "measured": value, "status": status,
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
    first = runs[0]["kv_cache_gb"] if runs else None
    per_conv = next((r["kv"]["per_conversation_bytes"] for r in runs
                     if (r["system"], r["K"], r["kv_cache_gb"]) == ("alora", km, first)), None)
    if not per_conv:
        sys.exit("--kv-cache-gb auto needs a budget before it with an aLoRA run at the largest K")
    return round(1.5 * km * per_conv / 2**30, 4)


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
                ["system", "GiB", "K", "requests", "errors", "wall s", "out tok/s", "req/s", "hit (usage)",
                 "hit (metrics)", "KV MiB/conv", "evictions", "other cores", "flagged"],
                [[r["system"], _budget(r), r["K"], r["requests"], len(r["errors"]), r["wall_s"],
                  r["output_tok_s"], r["requests_s"], _v(r["cache_hit_rate_usage"]), _v(r["cache_hit_rate_metrics"]),
                  _v(r["kv"]["per_conversation_bytes"], 2**-20), _v(r["kv"]["evictions"]), r["other_cpu_cores"],
                  "yes" if r["flagged"] or r["cut_at_time_limit"] else ""] for r in runs])
    print_table("Serving: latency (ms; TTFT = to the first content chunk, latency = to the end of the stream)",
                ["system", "GiB", "K", "base TTFT p50", "p99", "base latency p50", "p99", "intrinsic TTFT p50", "p99",
                 "intrinsic latency p50", "p99"],
                [[r["system"], _budget(r), r["K"]]
                 + [_v(r[kind][key], 1e3) for kind in ("base", "intrinsic")
                    for key in ("ttft_p50_s", "ttft_p99_s", "latency_p50_s", "latency_p99_s")] for r in runs])
    print_table("Targets (issue 10)", ["target", "goal", "measured", "status"],
                [[t["target"], t["goal"], _v(t["measured"]), t["status"]] for t in result["targets"]])
    for t in result["targets"]:
        if "why" in t or "kv_cache_gb" in t:
            print(f"  {t['target']}: " + (t.get("why") or f"at {t['kv_cache_gb']:.3g} GiB"))
    plot(result, png)


def plot(result: dict, png: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    series = dict.fromkeys((r["system"], r["kv_cache_gb"]) for r in result["runs"])
    for system, gb in series:
        rs = [r for r in result["runs"] if (r["system"], r["kv_cache_gb"]) == (system, gb)]
        ks = [r["K"] for r in rs]
        style = dict(marker="o", label=f"{system}, {_budget(rs[0])} GiB", linestyle="-" if system == "alora" else "--")
        axes[0].plot(ks, [r["output_tok_s"] for r in rs], **style)
        axes[1].plot(ks, [(r["intrinsic"]["ttft_p50_s"] or float("nan")) * 1e3 for r in rs], **style)
        axes[2].plot(ks, [(r["kv"]["per_conversation_bytes"] or float("nan")) / 2**20 for r in rs], **style)
    for ax, title, unit in zip(axes, ("output throughput", "intrinsic call p50 TTFT", "KV per conversation"),
                               ("tokens/s", "ms", "MiB")):
        ax.set(xlabel="concurrent conversations K", ylabel=unit, title=title)
        ax.set_xticks(sorted({r["K"] for r in result["runs"]}))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Serving through the OpenAI API ({result['target']}, loopback): aLoRA vs LoRA twin")
    save_figure(fig, png)


# ---- main --------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=sorted(TARGETS), default="alora", help="the server to benchmark (default alora)")
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


def main() -> None:
    args = parse_args()
    wl = QUICK if args.quick else FULL
    target = TARGETS[args.target]
    ks = args.concurrency or list(wl.concurrency)
    guard = CpuGuard(args.max_other_cores, retries=0)  # a run cannot be repeated on a cold cache: flag, not repeat
    runs: list[dict] = []
    for spec in args.kv_cache_gb:
        gb = auto_budget(runs, max(ks)) if spec == "auto" else None if spec == "default" else float(spec)
        with serve(target, gb, args.url, args.server_pid) as (url, pid):
            guard.pids = (pid,) if pid else ()
            served = {m["id"] for m in asyncio.run(_models(url))}
            if missing := {a for s in args.systems for a in SYSTEMS[s]} - served:
                sys.exit(f"the server at {url} lacks the adapters {sorted(missing)} (it serves {sorted(served)})")
            for system in args.systems:
                for K in ks:
                    seed = 1000 * (len(runs) + 1)  # documents of its own: no run is served from another's prefixes
                    result, cpu = guard.run(lambda: asyncio.run(run(url, target, SYSTEMS[system], K, wl, seed,
                                                                    60 * args.max_minutes)))
                    runs.append({"system": system, "K": K, "kv_cache_gb": gb, **cpu, **result})
                    print(f"{system:5s} K={K} budget {_gb(gb)} GiB: {result['output_tok_s']:.3g} tok/s, "
                          f"{result['requests']} requests in {result['wall_s']:.3g} s, {len(result['errors'])} errors",
                          file=sys.stderr)
    out = args.out or result_path("serving", "cpu", args.quick, "json")
    result = {"benchmark": "serving", "quick": args.quick, "machine": machine_info("cpu"), "versions": versions(),
              "target": target.name,
              "workload": {**asdict(wl), "concurrency": ks, "systems": {s: SYSTEMS[s] for s in args.systems},
                           "system_prompt": SYSTEM_PROMPT, "questions": QUESTIONS, "decoding": "greedy (temperature 0)",
                           "intrinsic_calls": "sent at once after each base reply, on the history including it"},
              "config": {"kv_cache_gb": args.kv_cache_gb, "url": args.url, "max_minutes": args.max_minutes},
              "runs": runs, "targets": evaluate(runs, ks), "cpu_guard": guard.summary()}
    write_json(out, result)
    report(result, out.with_suffix(".png"))
    guard.report()


async def _models(url: str) -> list[dict]:
    async with client(url, 1) as http:
        return await models(http)


if __name__ == "__main__":
    main()
