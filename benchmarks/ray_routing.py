"""Routing on Ray Serve: prefix-cache hit rate and throughput of S conversations at once, by routing policy.

The workload is serving.py's (``FULL``, or ``QUICK`` for a smoke run): every conversation opens with ~1.5k tokens
of synthetic documents, then for each turn a streamed greedy base reply and 1-3 intrinsic calls (the demo aLoRAs)
on the history, sent at once. S conversations (``--sessions``, default 10) run concurrently against
``alora.serve.ray_app`` on a local Ray instance; every run deploys fresh replicas (cold caches) and has documents
of its own. Runs (``--runs``):

- ``single``:  1 replica with all the CPUs: the hit rate a conversation gets when it cannot land elsewhere;
- ``session``: ``--replicas`` replicas (default 2), each conversation sends its ``x-session-id`` (Ray's
               ConsistentHashRouter);
- ``prefix``:  the same replicas, no header (Ray's PrefixCacheAffinityRouter);
- ``pow2``:    the same replicas under Ray Serve's default router (two replicas at random, the less busy one),
               which knows nothing of conversations: the control.

The replicas split the machine's CPUs evenly (``--replica-cpus``; torch gets the floor, at least one thread), so on
a 2-core machine 2 replicas are 2 x 1 thread against 1 x 2 threads: the throughput column compares routing
policies on the same hardware, not a scale-out (the replicas share the machine).

Per run: output tokens/s and requests/s over the run's wall time, p50/p99 TTFT and latency (base turns and
intrinsic calls), hit rate = cached / prompt tokens from ``usage``, and from the ``x-alora-replica`` header of
each response: how often a request landed on the replica of its conversation's previous request, and how many
replicas a conversation visited. Targets (issue 11), printed as met / missed / not evaluated: with session
affinity the hit rate within 5 points of the single replica's; the control's drop is reported. Other processes'
CPU use is recorded and a busy run flagged (a cold-cache run cannot be repeated).
Writes benchmarks/results/ray_routing[_quick].json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CpuGuard, add_guard_args, machine_info, now, print_table, result_path, versions, write_json  # noqa: E402
from serving import FULL, QUICK, REQUEST_TIMEOUT_S, SYSTEM_PROMPT, SYSTEMS, TARGETS, Reply, conversation  # noqa: E402
from serving import latency_stats, models  # noqa: E402

RUNS = {  # name: (replicas: 1 or --replicas, router, send x-session-id)
    "single": ("one", "conversation", True),
    "session": ("many", "conversation", True),
    "prefix": ("many", "conversation", False),
    "pow2": ("many", "pow2", True),
}
TARGET_POINTS = 0.05  # session affinity: hit rate within 5 points of the single replica's


async def run(url: str, sessions: int, header: bool, wl, seed: int, max_s: float) -> dict:
    """``sessions`` conversations at once (documents from ``seed``); the replica of every response recorded."""
    target = TARGETS["alora"]
    landed: dict[int, list[str]] = defaultdict(list)

    def http(c: int) -> httpx.AsyncClient:
        async def record(response: httpx.Response) -> None:
            landed[c].append(response.headers.get("x-alora-replica", "?"))
        return httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, trust_env=False,
                                 headers={"x-session-id": f"conversation-{seed}-{c}"} if header else None,
                                 event_hooks={"response": [record]})

    clients = [http(c) for c in range(sessions)]
    try:
        model_list = await models(clients[0])
        landed.clear()
        replies: list[Reply] = []
        t0 = now()
        tasks = [asyncio.create_task(conversation(clients[c], target, model_list, SYSTEMS["alora"], wl, seed + c,
                                                  replies)) for c in range(sessions)]
        _, pending = await asyncio.wait(tasks, timeout=max_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = now() - t0
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    errors = [repr(t.exception()) for t in tasks if not t.cancelled() and t.exception()]
    prompt, cached = sum(r.prompt_tokens for r in replies), sum(r.cached_tokens for r in replies)
    out_tokens = sum(r.completion_tokens for r in replies)
    stays = [a == b for seq in landed.values() for a, b in zip(seq, seq[1:])]
    per_replica: dict[str, int] = defaultdict(int)
    for seq in landed.values():
        for replica in seq:
            per_replica[replica.rsplit("#", 1)[-1]] += 1
    return {
        "wall_s": wall, "cut_at_time_limit": bool(pending), "errors": errors, "requests": len(replies),
        "output_tokens": out_tokens, "output_tok_s": out_tokens / wall, "requests_s": len(replies) / wall,
        "base": latency_stats([r for r in replies if r.kind == "base"]),
        "intrinsic": latency_stats([r for r in replies if r.kind == "intrinsic"]),
        "prompt_tokens": prompt, "cached_tokens": cached, "cache_hit_rate": cached / prompt if prompt else None,
        "same_replica_as_previous": sum(stays) / len(stays) if stays else None,
        "replicas_per_conversation": sum(len(set(seq)) for seq in landed.values()) / len(landed) if landed else None,
        "requests_per_replica": dict(per_replica),
        "replies": [asdict(r) | {"text": r.text[:60]} for r in replies],
    }


def evaluate(runs: dict[str, dict]) -> list[dict]:
    """Issue 11's routing target and the control's drop, each met / missed / not evaluated."""
    rate = {name: r["cache_hit_rate"] for name, r in runs.items() if r["cache_hit_rate"] is not None}
    rows = []
    for name, goal in (("session", f">= single - {TARGET_POINTS:g}"), ("prefix", f">= single - {TARGET_POINTS:g}")):
        value = rate[name] - rate["single"] if name in rate and "single" in rate else None
        rows.append({"target": f"hit rate, {name} affinity - single replica", "goal": goal, "measured": value,
                     "status": "not evaluated" if value is None else "met" if value >= -TARGET_POINTS else "missed"})
    drop = rate["pow2"] - rate["single"] if "pow2" in rate and "single" in rate else None
    rows.append({"target": "hit rate, control (pow2) - single replica", "goal": "reported (the drop)",
                 "measured": drop, "status": "not evaluated" if drop is None else "reported"})
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=lambda s: s.split(","), default=list(RUNS),
                   help=f"comma-separated, from {', '.join(RUNS)} (default all, in that order)")
    p.add_argument("--sessions", type=int, default=10, help="conversations at once (default 10)")
    p.add_argument("--replicas", type=int, default=2, help="replicas of the multi-replica runs (default 2)")
    p.add_argument("--replica-cpus", type=float,
                   help="CPUs per replica of the multi-replica runs (default: this machine's CPUs / --replicas)")
    p.add_argument("--kv-cache-gb", type=float, help="KV budget of each replica (default: the engine's own)")
    p.add_argument("--max-minutes", type=float, help="time limit of each run (default 30; --quick 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: serving.py's tiny workload; writes "
                                                        "ray_routing_quick.json")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/ray_routing[_quick].json)")
    add_guard_args(p, repeat=False)
    args = p.parse_args()
    if unknown := set(args.runs) - set(RUNS):
        p.error(f"--runs: unknown {sorted(unknown)}")
    if args.sessions < 1 or args.replicas < 2:
        p.error("--sessions must be >= 1 and --replicas >= 2")
    args.max_minutes = args.max_minutes or (2 if args.quick else 30)
    return args


def main() -> None:
    args = parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Ray's driver logging would print every request
    from alora.serve import ray_app

    wl = QUICK if args.quick else FULL
    cpus = os.cpu_count() or 1
    spec = ray_app.ReplicaSpec(kv_cache_gb=args.kv_cache_gb)
    runs: dict[str, dict] = {}
    with ray_app.run_local(None, port=0, num_cpus=cpus, log_to_driver=False) as url:
        guard = CpuGuard(args.max_other_cores, retries=0, pids=[p.pid for p in psutil.Process().children(True)])
        for i, name in enumerate(args.runs):
            size, routing, header = RUNS[name]
            replicas = 1 if size == "one" else args.replicas
            replica_cpus = cpus if size == "one" else args.replica_cpus or cpus / replicas
            ray_app.deploy(ray_app.build_app(spec, replicas=replicas, replica_cpus=replica_cpus, routing=routing))
            guard.pids = [p.pid for p in psutil.Process().children(True)]  # the new replicas are Ray's workers
            seed = 1000 * (i + 1)  # documents of its own: no run is served from another's prefixes
            result, cpu = guard.run(lambda: asyncio.run(run(url, args.sessions, header, wl, seed,
                                                            60 * args.max_minutes)))
            runs[name] = {"replicas": replicas, "replica_cpus": replica_cpus, "router": routing,
                          "x_session_id": header, **cpu, **result}
            print(f"{name:8s} {replicas} replica(s): hit rate {result['cache_hit_rate'] or 0:.3f}, "
                  f"{result['output_tok_s']:.3g} tok/s, {result['requests']} requests in {result['wall_s']:.3g} s, "
                  f"{len(result['errors'])} errors", file=sys.stderr)
    out = args.out or result_path("ray_routing", "cpu", args.quick, "json")
    result = {"benchmark": "ray_routing", "quick": args.quick, "machine": machine_info("cpu"), "versions": versions(),
              "ray": ray_app.RAY_VERSION,
              "workload": {**asdict(wl), "sessions": args.sessions, "adapters": SYSTEMS["alora"],
                           "system_prompt": SYSTEM_PROMPT, "decoding": "greedy (temperature 0)"},
              "config": {"runs": args.runs, "replicas": args.replicas, "kv_cache_gb": args.kv_cache_gb,
                         "max_minutes": args.max_minutes,
                         "routers": {"session": "ConsistentHashRouter (x-session-id)",
                                     "prefix": "PrefixCacheAffinityRouter (no header)",
                                     "pow2": "PowerOfTwoChoicesRequestRouter (Ray Serve's default)"}},
              "runs": runs, "targets": evaluate(runs), "cpu_guard": guard.summary()}
    write_json(out, result)
    report(result)
    guard.report()


def report(result: dict) -> None:
    _v = lambda x, scale=1.0: "-" if x is None else x * scale  # noqa: E731
    print_table(f"Ray Serve routing: {result['workload']['sessions']} conversations at once",
                ["run", "replicas", "router", "requests", "errors", "wall s", "out tok/s", "req/s", "hit rate",
                 "same replica", "replicas/conv", "base TTFT p50 ms", "intrinsic TTFT p50 ms", "other cores",
                 "flagged"],
                [[name, r["replicas"], r["router"], r["requests"], len(r["errors"]), r["wall_s"], r["output_tok_s"],
                  r["requests_s"], _v(r["cache_hit_rate"]), _v(r["same_replica_as_previous"]),
                  _v(r["replicas_per_conversation"]), _v(r["base"]["ttft_p50_s"], 1e3),
                  _v(r["intrinsic"]["ttft_p50_s"], 1e3), r["other_cpu_cores"],
                  "yes" if r["flagged"] or r["cut_at_time_limit"] else ""] for name, r in result["runs"].items()])
    print_table("Targets (issue 11)", ["target", "goal", "measured", "status"],
                [[t["target"], t["goal"], _v(t["measured"]), t["status"]] for t in result["targets"]])


if __name__ == "__main__":
    main()
