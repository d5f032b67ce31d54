"""Soak: a fixed request mix through the server on loopback for a bounded time, sampling the server's memory.

``WORKERS`` clients each cycle through ``MIX`` on a conversation of their own (restarted with new documents after
``SOAK.turns`` replies, so new prefixes keep arriving and old ones are evicted; ``QUICK`` for a smoke run):
  base        a streamed base reply, appended to the conversation
  intrinsic   a streamed aLoRA call on it (``title``, ``summary``, ``followup`` in turn)
  cancel      a streamed base request the client disconnects from after a few chunks
  lora        a streamed call to the LoRA ``title_lora`` (every token adapted, history recomputed or cached)
  plain       a non-streamed base request on a short new prompt
  completion  a non-streamed /v1/completions request on a raw prompt
  salted      a streamed base reply with a ``cache_salt`` of the worker's own
  bad         malformed JSON: must get a 4xx and disturb nothing
Every ``--sample-seconds`` the server's resident memory (VmRSS, /proc/PID/status) and its KV pool's capacity
(/metrics) are sampled. After the warm-up (the first third of the samples) RSS is flat when the least-squares
slope of the rest is within ``FLAT_MB_PER_MIN``; its max - min is reported too, and both for RSS minus the KV
pool's capacity (memory the pool does not explain). At the end /metrics must show no request running (cancelled
streams leak nothing). Bounded: ``--minutes``, ``--max-requests``, per-request timeouts, 127.0.0.1 only.

Writes benchmarks/results/soak[_quick].json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from dataclasses import asdict
from itertools import cycle
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CpuGuard, add_guard_args, filler, machine_info, now, print_table, pyplot,  # noqa: E402
                    result_path, save_figure, versions, write_json)
from serving import (QUESTIONS, SYSTEM_PROMPT, SYSTEMS, TARGETS, ServerError, Workload, chat,  # noqa: E402
                     check_loopback, client, first_message, models, scrape, serve)

SOAK = Workload(docs=3, doc_words=200, turns=8, reply_tokens=48, intrinsic_tokens=8, calls_per_turn=(1,),
                concurrency=(2,))
QUICK = Workload(docs=1, doc_words=40, turns=3, reply_tokens=8, intrinsic_tokens=4, calls_per_turn=(1,),
                 concurrency=(2,))
WORKERS = SOAK.concurrency[0]
MIX = ("base", "intrinsic", "cancel", "lora", "plain", "completion", "salted", "bad")
CANCEL_AFTER_CHUNKS = 3
FLAT_MB_PER_MIN = 1.0
WARMUP_FRACTION = 1 / 3
MAX_ERRORS_KEPT = 20


class Worker:
    """One client: its conversation and its place in the mix."""

    def __init__(self, index: int, http, target, model_list: list[dict], wl: Workload):
        self.index, self.http, self.wl = index, http, wl
        self.base = target.select(None, model_list)
        self.intrinsics = cycle([target.select(a, model_list) for a in SYSTEMS["alora"]])
        self.lora = target.select(SYSTEMS["lora"][0], model_list)
        self.seed = 10_000 * (index + 1)
        self.new_conversation()

    def new_conversation(self) -> None:
        self.seed += 1
        self.messages = [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": first_message(self.wl, self.seed)}]
        self.replies = 0

    async def step(self, kind: str) -> None:
        """One request of the mix; raises on anything but the expected answer."""
        http, msgs, wl = self.http, self.messages, self.wl
        if kind in ("base", "salted"):
            if msgs[-1]["role"] == "assistant":
                msgs.append({"role": "user", "content": QUESTIONS[self.replies % len(QUESTIONS)]})
            salt = {"cache_salt": f"tenant-{self.index}"} if kind == "salted" else {}
            reply = await chat(http, self.base, msgs, wl.reply_tokens, kind, **salt)
            msgs.append({"role": "assistant", "content": reply.text})
            self.replies += 1
            if self.replies >= wl.turns:
                self.new_conversation()
        elif kind == "intrinsic":
            await chat(http, next(self.intrinsics), msgs, wl.intrinsic_tokens, kind)
        elif kind == "lora":
            await chat(http, self.lora, msgs, wl.intrinsic_tokens, kind)
        elif kind == "cancel":
            await chat(http, self.base, msgs + [{"role": "user", "content": "Tell me a long story about them."}],
                       512, kind, stop_after=CANCEL_AFTER_CHUNKS)
        elif kind == "plain":
            r = await http.post("/v1/chat/completions", json={**self.base, "max_tokens": 16, "temperature": 0.0,
                                "messages": [{"role": "user", "content": filler(30, self.seed)}]})
            r.raise_for_status()
        elif kind == "completion":
            r = await http.post("/v1/completions", json={**self.base, "prompt": filler(60, self.seed),
                                                         "max_tokens": 8, "temperature": 0.0})
            r.raise_for_status()
        elif kind == "bad":
            r = await http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                                headers={"content-type": "application/json"})
            if not 400 <= r.status_code < 500:
                raise ServerError(f"malformed JSON got HTTP {r.status_code}")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


async def soak(url: str, pid: int, target, wl: Workload, minutes: float, sample_s: float, max_requests: int) -> dict:
    counts: dict[str, Counter] = {k: Counter() for k in MIX}
    errors: list[str] = []
    samples: list[dict] = []
    async with client(url, 2 * WORKERS + 2) as http:
        model_list = await models(http)
        t0 = now()
        deadline = t0 + 60 * minutes

        async def work(w: Worker) -> None:
            for kind in cycle(MIX):
                if now() >= deadline or sum(sum(c.values()) for c in counts.values()) >= max_requests:
                    return
                try:
                    await w.step(kind)
                    counts[kind]["ok"] += 1
                except Exception as e:  # noqa: BLE001 -- every failure is counted and reported, none stops the soak
                    counts[kind]["errors"] += 1
                    if len(errors) < MAX_ERRORS_KEPT:
                        errors.append(f"{kind}: {e!r}"[:300])

        async def sample() -> None:
            while True:
                m = await scrape(http, target)
                samples.append({"t_s": now() - t0, "rss_mb": rss_mb(pid),
                                "kv_capacity_mb": m["capacity"] / 2**20 if "capacity" in m else None,
                                "kv_used_mb": m["used"] / 2**20 if "used" in m else None,
                                "running": m.get("running")})
                await asyncio.sleep(sample_s)

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(work(Worker(i, http, target, model_list, wl)) for i in range(WORKERS)))
        wall = now() - t0
        for _ in range(20):  # in-flight work ends within a step of the last request
            final = await scrape(http, target)
            if not final.get("running"):
                break
            await asyncio.sleep(0.5)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        samples.append({"t_s": now() - t0, "rss_mb": rss_mb(pid),
                        "kv_capacity_mb": final["capacity"] / 2**20 if "capacity" in final else None,
                        "kv_used_mb": final["used"] / 2**20 if "used" in final else None,
                        "running": final.get("running")})
    return {"wall_s": wall, "requests": {k: dict(c) for k, c in counts.items()}, "errors": errors,
            "running_at_end": final.get("running"), "samples": samples}


def flatness(samples: list[dict], key) -> dict | None:
    """Least-squares slope (MB/min) and max - min of ``key(sample)`` over the samples after the warm-up."""
    points = [(s["t_s"], key(s)) for s in samples[int(len(samples) * WARMUP_FRACTION):] if key(s) is not None]
    if len(points) < 3:
        return None
    t, v = np.array(points).T
    slope, intercept = np.polyfit(t / 60, v, 1)
    return {"samples": len(points), "from_s": float(t[0]), "slope_mb_per_min": float(slope),
            "intercept_mb": float(intercept), "spread_mb": float(v.max() - v.min()),
            "flat": bool(abs(slope) <= FLAT_MB_PER_MIN)}


def verdict(rss: dict | None, result: dict, quick: bool) -> str:
    """One line: RSS flat or growing, and any failed requests or requests left running."""
    failed = sum(c.get("errors", 0) for c in result["requests"].values())
    words = ["not enough samples" if not rss else "RSS flat" if rss["flat"] else "RSS grows"]
    words += [f"{failed} failed requests"] * bool(failed)
    words += [f"{result['running_at_end']:g} requests still running"] * bool(result["running_at_end"])
    return ("smoke run, too short to judge: " if quick else "") + ", ".join(words)


def report(result: dict, png: Path) -> None:
    s = result["soak"]
    print_table(f"Soak: {result['config']['minutes']:.3g} min, {WORKERS} workers cycling the mix",
                ["request", "ok", "errors"],
                [[k, c.get("ok", 0), c.get("errors", 0)] for k, c in s["requests"].items()])
    for e in s["errors"]:
        print(f"  error: {e}")
    rows = [[name, f["samples"], f["slope_mb_per_min"], f["spread_mb"], "yes" if f["flat"] else "NO"]
            for name, f in result["flatness"].items() if f]
    print_table(f"Memory after the warm-up (flat: |slope| <= {FLAT_MB_PER_MIN} MB/min)",
                ["series", "samples", "slope MB/min", "max-min MB", "flat"], rows)
    print(f"\nrequests running at the end: {s['running_at_end']}; verdict: {result['verdict']}")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    t = [x["t_s"] / 60 for x in s["samples"]]
    ax.plot(t, [x["rss_mb"] for x in s["samples"]], label="server RSS")
    if all(x["kv_capacity_mb"] is not None for x in s["samples"]):
        ax.plot(t, [x["kv_capacity_mb"] for x in s["samples"]], label="KV pool capacity")
    f = result["flatness"]["rss"]
    if f:
        ax.axvspan(0, f["from_s"] / 60, color="grey", alpha=0.15, label="warm-up")
        fit_t = [f["from_s"] / 60, t[-1]]
        ax.plot(fit_t, [f["intercept_mb"] + f["slope_mb_per_min"] * x for x in fit_t], "--",
                label=f"fit: {f['slope_mb_per_min']:+.2f} MB/min")
    ax.set(xlabel="minutes", ylabel="MB",
           title=f"Soak through the OpenAI API ({result['target']}): {result['verdict']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, png)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=sorted(TARGETS), default="alora", help="the server to soak (default alora)")
    p.add_argument("--url", help="soak the server running at this loopback URL instead of starting one "
                                 "(needs --server-pid)")
    p.add_argument("--server-pid", type=int, help="with --url: the server's PID, whose RSS is sampled")
    p.add_argument("--minutes", type=float, help="how long the mix runs (default 30; --quick 0.25)")
    p.add_argument("--sample-seconds", type=float, help="RSS sampling period (default 10; --quick 1)")
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests (default 100000)")
    p.add_argument("--kv-cache-gb", type=float, default=0.5,
                   help="the started server's KV budget in GiB (default 0.5: small enough that the pool fills and "
                        "evicts during the warm-up, so that a growing RSS is not the cache filling up)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a tiny workload for 15 s, 1 s samples; writes soak_quick.*")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/soak[_quick].json)")
    add_guard_args(p, repeat=False)
    args = p.parse_args()
    args.minutes = args.minutes or (0.25 if args.quick else 30)
    args.sample_seconds = args.sample_seconds or (1 if args.quick else 10)
    if args.url and not args.server_pid:
        p.error("--url needs --server-pid (its RSS is what the soak measures)")
    if args.url:
        check_loopback(args.url)
    return args


def main() -> None:
    args = parse_args()
    target, wl = TARGETS[args.target], QUICK if args.quick else SOAK
    with serve(target, args.kv_cache_gb, args.url, args.server_pid) as (url, pid):
        guard = CpuGuard(args.max_other_cores, retries=0, pids=(pid,))
        result, cpu = guard.run(lambda: asyncio.run(soak(url, pid, target, wl, args.minutes, args.sample_seconds,
                                                          args.max_requests)))
    flat = {"rss": flatness(result["samples"], lambda s: s["rss_mb"]),
            "rss_minus_kv_capacity": flatness(result["samples"], lambda s: s["rss_mb"] - s["kv_capacity_mb"]
                                              if s["kv_capacity_mb"] is not None else None)}
    out = args.out or result_path("soak", "cpu", args.quick, "json")
    data = {"benchmark": "soak", "quick": args.quick, "machine": machine_info("cpu"), "versions": versions(),
            "target": target.name, "verdict": verdict(flat["rss"], result, args.quick),
            "config": {"minutes": args.minutes, "sample_seconds": args.sample_seconds, "workers": WORKERS,
                       "mix": MIX, "workload": asdict(wl), "cancel_after_chunks": CANCEL_AFTER_CHUNKS,
                       "kv_cache_gb": None if args.url else args.kv_cache_gb, "url": args.url,
                       "flat_mb_per_min": FLAT_MB_PER_MIN, "warmup_fraction": WARMUP_FRACTION},
            "soak": result, "flatness": flat, **cpu, "cpu_guard": guard.summary()}
    write_json(out, data)
    report(data, out.with_suffix(".png"))
    guard.report()


if __name__ == "__main__":
    main()
