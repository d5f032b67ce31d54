"""Decode projections on CPU: torch's F.linear against our GEMV kernel (``alora_kernels.cpu_gemv``), in GB/s.

For each projection of the default model (SmolLM2-135M as the engine fuses them: qkv 576->960, o 576->576,
gate_up 576->3072, down 1536->576; 30 layers) and the vocabulary projection (576->49152), and for M = 1, 4, 8
and 16 rows of activations (decode of 1 to 16 sequences), a sample is one pass over a chain of distinct random
weights of that shape (30 of them, one per layer, so no weight is still in cache when it is read again; ``step``
chains all 120 projections in layer order: one decode step's projections). GB/s counts each weight byte once
per pass. float32 and bfloat16.

Variants, sampled in turn in one process (A/B interleaved, in a fresh random order each round), medians over
``--rounds``: ``torch`` is F.linear on [in, out] storage (torch's faster layout, which the loader gives
weights where our kernel does not serve their dtype), ``torch_rowmajor`` F.linear on contiguous [out, in] weights, ``ours`` the kernel on contiguous
[out, in] weights on torch's threads (OpenMP, the main thread's team), ``ours_pool`` the same on the kernel's
own worker threads, run from a thread that called ``cpu_gemv.use_worker_pool`` (what the engine's scheduler
thread does), each sample 20 ms after the previous one: OpenMP's threads keep spinning for a few ms after the
main thread's last parallel loop and then hold the CPUs the pool's threads need (the engine's main thread is
idle). Every sample is taken under the quiet-machine guard (``common.CpuGuard``): a sample during
which other processes used more than ``--max-other-cores`` is repeated, and the JSON counts those.

Prints a table and writes benchmarks/results/gemv[_quick].json.
"""

from __future__ import annotations

import argparse
import queue
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_guard_args, guard_from_args, machine_info, now, print_table, result_path,  # noqa: E402
                    write_json)

from alora_kernels import cpu_gemv  # noqa: E402

LAYERS = 30
SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}  # (in, out)
VOCAB = 49152
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads, for both variants (default 2)")
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16],
                   help="comma-separated M values, rows of activations (default 1,4,8,16)")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=list(DTYPES),
                   help="comma-separated, of float32,bfloat16 (default both)")
    p.add_argument("--rounds", type=int, default=15, help="samples per variant and point (default 15)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 rounds, M=1,8, gate_up and step only; writes gemv_quick.json")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gemv[_quick].json)")
    add_guard_args(p)
    args = p.parse_args()
    if unknown := set(args.dtypes) - set(DTYPES):
        p.error(f"--dtypes: unknown {sorted(unknown)}; choose from {list(DTYPES)}")
    if any(m < 1 or m > cpu_gemv.MAX_ROWS for m in args.rows):
        p.error(f"--rows: each M must be 1..{cpu_gemv.MAX_ROWS} (the kernel's range)")
    if args.quick:
        args.rounds, args.rows = 3, [m for m in args.rows if m in (1, 8)] or args.rows[:1]
    return args


def chains(dtype: torch.dtype, quick: bool) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per shape name: the chain of (row-major [out, in] weight, the same in [in, out] storage)."""
    gen = torch.Generator().manual_seed(0)

    def weight(k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
        return w, w.t().contiguous().t()

    names = ["gate_up"] if quick else list(SHAPES)
    out = {name: [weight(*SHAPES[name]) for _ in range(LAYERS)] for name in names}
    # one decode step's projections in layer order: the chains above, interleaved by layer
    out["step"] = [pair for layer in range(LAYERS) for name in SHAPES
                   for pair in ([out[name][layer]] if name in out else [weight(*SHAPES[name])])]
    if not quick:
        out["lm_head"] = [weight(576, VOCAB)]
    return out


def timed_pass(fn, xs: dict[int, torch.Tensor], chain: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds for one pass of ``fn(x, weight pair)`` over the chain; ``xs``: the activations for each input size."""
    t0 = now()
    for w in chain:
        fn(xs[w[0].shape[1]], w)
    return now() - t0


class PoolThread:
    """Runs callables on one thread that uses the kernels' worker pool (``cpu_gemv.use_worker_pool``), under
    inference mode, as the engine's scheduler thread does; ``__call__`` waits for the result."""

    def __init__(self, threads: int):
        self._jobs: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, args=(threads,), daemon=True).start()

    def _serve(self, threads: int) -> None:
        cpu_gemv.use_worker_pool(threads)
        with torch.inference_mode():
            while True:
                fn, args = self._jobs.get()
                self._results.put(fn(*args))

    def __call__(self, fn, *args):
        self._jobs.put((fn, args))
        return self._results.get()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    t0 = now()
    ready = {name: cpu_gemv.available(dtype) for name, dtype in DTYPES.items()}
    warmup_s = now() - t0
    if not any(ready[d] for d in args.dtypes):
        sys.exit("the GEMV kernel is not available on this machine (see the warning above): nothing to compare")
    guard = guard_from_args(args)
    pool = PoolThread(args.threads)
    ours = lambda x, w: cpu_gemv.linear(x, w[0])  # noqa: E731
    variants = {"torch": lambda x, w: F.linear(x, w[1]), "torch_rowmajor": lambda x, w: F.linear(x, w[0]),
                "ours": ours, "ours_pool": ours}
    on_pool = {"ours_pool"}
    points = []
    with torch.inference_mode():
        for dname in args.dtypes:
            if not ready[dname]:
                print(f"{dname}: the kernel does not serve this dtype on this CPU; skipped")
                continue
            dtype = DTYPES[dname]
            for shape, chain in chains(dtype, args.quick).items():
                gbytes = sum(w.numel() * w.element_size() for w, _ in chain) / 1e9
                for M in args.rows:
                    gen = torch.Generator().manual_seed(M)
                    xs = {k: torch.randn(M, k, generator=gen).to(dtype) for k in {w.shape[1] for w, _ in chain}}
                    times: dict[str, list[float]] = {v: [] for v in variants}
                    def sample(v: str) -> float:
                        if v not in on_pool:
                            return timed_pass(variants[v], xs, chain)
                        time.sleep(0.02)  # OpenMP's threads spin for a few ms after the main thread's last loop
                        return pool(timed_pass, variants[v], xs, chain)

                    for v in variants:  # warm-up: page the weights in, first-call setup
                        sample(v)
                    rng = random.Random(M)
                    for _ in range(args.rounds):
                        for v in rng.sample(list(variants), len(variants)):
                            seconds, _cpu = guard.run(sample, v)
                            times[v].append(seconds)
                    med = {v: statistics.median(t) for v, t in times.items()}
                    point = {"dtype": dname, "shape": shape, "M": M, "weights": len(chain), "gbytes": round(gbytes, 4)}
                    for v in variants:
                        point[f"{v}_ms"] = round(med[v] * 1e3, 3)
                        point[f"{v}_gbps"] = round(gbytes / med[v], 2)
                        point[f"{v}_samples_ms"] = [round(t * 1e3, 3) for t in times[v]]
                    point["speedup_vs_best_torch"] = round(min(med["torch"], med["torch_rowmajor"]) / med["ours"], 3)
                    point["pool_speedup_vs_best_torch"] = round(min(med["torch"], med["torch_rowmajor"])
                                                                / med["ours_pool"], 3)
                    points.append(point)
                    print(f"\r{len(points)} points measured", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    rows = [[p["dtype"], p["shape"], p["M"], p["torch_gbps"], p["torch_rowmajor_gbps"], p["ours_gbps"],
             p["ours_pool_gbps"], p["torch_ms"], p["ours_pool_ms"], p["pool_speedup_vs_best_torch"]] for p in points]
    print_table(f"GB/s of weights read (median of {args.rounds}), {args.threads} threads; PROVISIONAL unless the "
                f"guard below rejected nothing and flagged nothing",
                ["dtype", "shape", "M", "torch GB/s", "torch_rowmajor GB/s", "ours GB/s", "ours_pool GB/s",
                 "torch ms", "ours_pool ms", "ours_pool vs best torch"], rows)
    guard.report()
    print(f"kernel build/load on first use this run: {warmup_s:.1f} s")
    result = {"benchmark": "gemv", "quick": args.quick, "machine": machine_info("cpu"),
              "versions": {"torch": torch.__version__}, "threads": args.threads, "rounds": args.rounds,
              "kernel_first_use_s": round(warmup_s, 2), "points": points, "cpu_guard": guard.summary()}
    write_json(args.out or result_path("gemv", "cpu", args.quick, "json"), result)


if __name__ == "__main__":
    main()
