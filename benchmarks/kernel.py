"""mixed_lora_linear against the base GEMM and an unfused LoRA, on the shapes the engine runs.

CPU (default): the torch path on the default model's projections (SmolLM2-135M as the engine fuses them:
qkv 576->960, o 576->576, gate_up 576->3072, down 1536->576; 30 layers) for T=1 decode and T=128/512 prefill.
CUDA (``--device cuda``): the Triton kernel against cuBLAS (F.linear) on an 8B-class projection, K=N=4096.

Columns: ``base`` is F.linear alone (what a forward without adapters costs); ``mixed`` is mixed_lora_linear
(the torch path on CPU, the Triton kernel on CUDA, plus the torch path there as ``torch``); ``naive`` is an
unfused LoRA on every row, ``x@W.T + scale*(x@A.T)@B.T``, the cost of serving one adapter without mixing.
Row mixes: ``base`` no adapted row (slots all -1, not None), ``tail10`` the last 10% of rows on one adapter
(an aLoRA invocation), ``all`` every row on one adapter, ``mixed4`` rows cycling over four adapters.

Prints a table (per forward on CPU: summed over projections and layers) and writes
benchmarks/results/kernel_<device>.json with every measurement and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from alora_kernels import mixed_lora_linear

SMOLLM2_PROJECTIONS = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}
SMOLLM2_LAYERS = 30
RESULTS = Path(__file__).resolve().parent / "results"


def make_inputs(T: int, K: int, N: int, r: int, mix: str, dtype: torch.dtype, device: str, adapters: int = 4):
    """Random projection and adapter stack, and the slot per row for one row mix."""
    x = torch.randn(T, K, dtype=dtype, device=device)
    W = torch.randn(N, K, dtype=dtype, device=device) / K**0.5
    A = torch.randn(adapters, r, K, dtype=dtype, device=device) / K**0.5
    B = torch.randn(adapters, N, r, dtype=dtype, device=device) / r**0.5
    scale = torch.full((adapters,), 2.0, device=device)
    slot = torch.full((T,), -1, dtype=torch.int32)
    if mix == "tail10":
        slot[T - max(1, T // 10):] = 0
    elif mix == "all":
        slot[:] = 0
    elif mix == "mixed4":
        slot = torch.arange(T, dtype=torch.int32) % adapters
    return x, W, A, B, scale, slot.to(device)


def measure(fn, device: str, budget_s: float) -> float:
    """Median seconds per call over 7 blocks of calls (CUDA: timed with events)."""
    fn()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    iters = max(1, min(2000, int(budget_s / 7 / max(time.perf_counter() - start, 1e-7))))
    samples = []
    for _ in range(7):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3 / iters)
        else:
            begin_s = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - begin_s) / iters)
    return statistics.median(samples)


def bench_case(proj: str, K: int, N: int, T: int, r: int, mix: str, args: argparse.Namespace) -> dict:
    x, W, A, B, scale, slot = make_inputs(T, K, N, r, mix, args.dtype, args.device)
    s = float(scale[0])
    fns = {
        "base": lambda: F.linear(x, W),
        "mixed": lambda: mixed_lora_linear(x, W, None, A, B, scale, slot),
        "naive": lambda: F.linear(x, W) + s * ((x @ A[0].T) @ B[0].T),
    }
    if args.device == "cuda":
        fns["torch"] = lambda: mixed_lora_linear(x, W, None, A, B, scale, slot, backend="torch")
    row = {"proj": proj, "K": K, "N": N, "T": T, "r": r, "mix": mix, "adapted_rows": int((slot >= 0).sum())}
    with torch.inference_mode():
        for name, fn in fns.items():
            row[f"{name}_us"] = measure(fn, args.device, args.budget) * 1e6
    return row


def cases(args: argparse.Namespace):
    """(proj, K, N, T, r, mix) to measure on this device."""
    if args.device == "cuda":
        projections, batch_sizes, ranks = {"4096x4096": (4096, 4096)}, (1, 16, 512, 4096), (8, 16, 32, 64)
    else:
        projections, batch_sizes, ranks = SMOLLM2_PROJECTIONS, (1, 128, 512), (8, 16, 64)
    if args.quick:
        batch_sizes, ranks = batch_sizes[:2], ranks[1:2]
    for T in batch_sizes:
        for r in ranks:
            for mix in ("base", "all") if T == 1 else ("base", "tail10", "all", "mixed4"):
                for proj, (K, N) in projections.items():
                    yield proj, K, N, T, r, mix


def per_forward(rows: list[dict], methods: list[str]) -> list[dict]:
    """Sum the CPU measurements over the projections of one layer, times the layer count: ms per forward."""
    totals: dict[tuple, dict] = {}
    for row in rows:
        total = totals.setdefault((row["T"], row["r"], row["mix"]), {"T": row["T"], "r": row["r"], "mix": row["mix"]})
        for m in methods:
            total[f"{m}_ms"] = total.get(f"{m}_ms", 0.0) + row[f"{m}_us"] * SMOLLM2_LAYERS / 1e3
    return list(totals.values())


def print_table(rows: list[dict], keys: list[str], unit: str) -> None:
    value_keys = [k for k in rows[0] if k.endswith(f"_{unit}")]
    header = keys + [k.removesuffix(f"_{unit}") + f" {unit}" for k in value_keys] + ["mixed/base"]
    print("  ".join(f"{h:>10}" for h in header))
    for row in rows:
        cells = [f"{row[k]:>10}" for k in keys] + [f"{row[k]:>10.1f}" for k in value_keys]
        print("  ".join(cells) + f"  {row[f'mixed_{unit}'] / row[f'base_{unit}']:>10.2f}")


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version()}
    if device == "cuda":
        import triton

        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, triton=triton.__version__)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on CPU (the engine's CPU dtype), bfloat16 on CUDA")
    parser.add_argument("--budget", type=float, default=0.15, help="seconds of timing per measurement")
    parser.add_argument("--quick", action="store_true", help="two batch sizes, one rank")
    parser.add_argument("--detail", action="store_true", help="print every projection, not only the CPU totals")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/kernel_<device>.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    torch.manual_seed(0)

    rows = []
    for case in cases(args):
        rows.append(bench_case(*case, args))
        print(f"\r{len(rows)} measured", end="", flush=True)
    print()
    if args.device == "cpu":
        totals = per_forward(rows, ["base", "mixed", "naive"])
        print(f"SmolLM2-135M, ms per forward ({SMOLLM2_LAYERS} layers x {len(SMOLLM2_PROJECTIONS)} projections), "
              f"{args.dtype}, {torch.get_num_threads()} threads")
        print_table(totals, ["T", "r", "mix"], "ms")
    if args.device == "cuda" or args.detail:
        print(f"per call, {args.dtype}")
        print_table(rows, ["proj", "T", "r", "mix"], "us")

    out = args.out or RESULTS / f"kernel_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(args.device), "device": args.device, "dtype": str(args.dtype),
              "budget_s": args.budget, "results": rows}
    if args.device == "cpu":
        result["per_forward"] = totals
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
