"""Engine speed: prefill time and decode tokens/s, ours vs transformers, side by side on the same model.

For each prompt length L, one greedy generation of ``--decode-tokens`` tokens (EOS disabled / suppressed) by
- ``ours``:        ``Engine.start_call`` on a fresh KV cache (the path ``conv.send`` runs);
- ``hf_loop``:     transformers, a plain loop: ``model(ids, DynamicCache, logits_to_keep=1)`` then one forward
                   per token (transformers' best case, no ``generate`` machinery);
- ``hf_generate``: transformers ``model.generate`` (what most users call), first token timed with a streamer.
``prefill_s`` is the time to the first sampled token; ``decode_tok_s`` is (tokens - 1) / (time after the first).
Median of ``--runs`` runs after one warm-up per length, the methods interleaved. A run taken while other
processes used more than ``--max-other-cores`` is repeated (``common.CpuGuard``; the JSON's ``cpu_guard`` counts
rejected and flagged runs).

Writes benchmarks/results/engine_speed[_cuda][_quick].json and .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (FirstTokenStreamer, add_guard_args, guard_from_args, machine_info, now,  # noqa: E402
                    print_table, progress, pyplot, result_path, save_figure, setup_torch, sync, versions, write_json)

METHODS = ("ours", "hf_loop", "hf_generate")
TEXT = ("The committee met on Tuesday to review the budget for the coming year. After a long discussion about "
        "roads, schools and the new library, the members agreed to postpone the vote until the next meeting. ")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same for both stacks (default 2)")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512, 1024, 2048],
                   help="prompt lengths (default 128,512,1024,2048)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per point after one warm-up (default 5)")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per run (default 32)")
    p.add_argument("--quick", action="store_true", help="smoke run: L=128,512, 2 runs, 8 tokens; writes *_quick files")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/engine_speed[_cuda][_quick].json)")
    add_guard_args(p)
    args = p.parse_args()
    if args.quick:
        args.lengths, args.runs, args.decode_tokens = [128, 512], min(args.runs, 2), min(args.decode_tokens, 8)
    if args.runs < 1 or args.decode_tokens < 2:
        p.error("--runs >= 1 and --decode-tokens >= 2")
    return args


def prompt_ids(tokenizer, L: int) -> list[int]:
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    return (ids * (L // len(ids) + 1))[:L]


def run_ours(engine, ids: list[int], n: int, device: str) -> dict:
    from alora import SamplingParams

    sync(device)
    t0 = now()
    call = engine.submit(ids, params=SamplingParams(max_new_tokens=n, ignore_eos=True), use_cache=False)
    for _ in call:
        pass
    sync(device)
    t1 = now()
    return _sample(t0, call.first_token_at, t1, len(call.output))


def run_hf_loop(model, ids: list[int], n: int, device: str) -> dict:
    from transformers import DynamicCache

    x = torch.tensor([ids], device=device)
    sync(device)
    t0 = now()
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = int(logits[0, -1].argmax())
        first = now()
        out = [token]
        for _ in range(n - 1):
            logits = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache,
                           use_cache=True).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
    sync(device)
    return _sample(t0, first, now(), len(out))


def run_hf_generate(model, ids: list[int], n: int, device: str) -> dict:
    streamer = FirstTokenStreamer()
    x = torch.tensor([ids], device=device)
    sync(device)
    t0 = now()
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, streamer=streamer, pad_token_id=model.config.eos_token_id)
    sync(device)
    return _sample(t0, streamer.at, now(), out.shape[1] - len(ids))


def _sample(t0: float, first: float, end: float, tokens: int) -> dict:
    return {"prefill_s": first - t0, "decode_tok_s": (tokens - 1) / (end - first), "total_s": end - t0,
            "tokens": tokens}


def main() -> None:
    args = parse_args()
    setup_torch(args.threads, args.device)
    import alora
    from transformers import AutoModelForCausalLM

    engine = alora.Engine.from_pretrained(args.model, device=args.device)
    engine.eos_token_ids = frozenset()  # every run decodes exactly --decode-tokens tokens
    hf = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=engine.dtype).to(args.device).eval()
    limit = engine.config.max_position_embeddings
    if any(L + args.decode_tokens > limit for L in args.lengths):
        sys.exit(f"--lengths must leave room for {args.decode_tokens} tokens in the context of {limit}")
    fns = {"ours": lambda ids: run_ours(engine, ids, args.decode_tokens, args.device),
           "hf_loop": lambda ids: run_hf_loop(hf, ids, args.decode_tokens, args.device),
           "hf_generate": lambda ids: run_hf_generate(hf, ids, args.decode_tokens, args.device)}

    guard = guard_from_args(args)
    points = []
    bar = progress(len(args.lengths) * len(METHODS) * (args.runs + 1), "engine speed")
    for L in args.lengths:
        bar.set_description(f"engine speed L={L}")
        ids = prompt_ids(engine.tokenizer, L)
        raw = {m: [] for m in METHODS}
        for run in range(args.runs + 1):  # run 0 is the warm-up
            for m in METHODS:
                if run == 0:
                    fns[m](ids)
                else:
                    sample, cpu = guard.run(fns[m], ids)
                    raw[m].append({**sample, **cpu})
                bar.update()
        points.append({"L": L, "methods": {m: {
            "median_prefill_s": statistics.median(s["prefill_s"] for s in raw[m]),
            "median_decode_tok_s": statistics.median(s["decode_tok_s"] for s in raw[m]),
            "runs": raw[m]} for m in METHODS}})
    bar.close()

    cfg = engine.config
    result = {
        "benchmark": "engine_speed", "quick": args.quick, "machine": machine_info(args.device), "versions": versions(),
        "model": {"path": str(engine.model_path), "name": engine.model_path.name, "layers": cfg.num_layers,
                  "hidden": cfg.hidden_size, "dtype": str(engine.dtype),
                  "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None)},
        "config": {"lengths": args.lengths, "runs": args.runs, "warmup_runs": 1, "decode_tokens": args.decode_tokens,
                   "threads": args.threads, "decoding": "greedy, EOS disabled (ours) / min_new_tokens (HF)"},
        "points": points, "cpu_guard": guard.summary(),
    }
    out = args.out or result_path("engine_speed", args.device, args.quick, "json")
    write_json(out, result)

    m = lambda p, k, key: p["methods"][k][key]  # noqa: E731
    print_table(f"Prefill: time to first token (ms, median of {args.runs})",
                ["L", "ours", "hf_loop", "hf_generate", "hf_loop/ours", "hf_generate/ours"],
                [[p["L"]] + [m(p, k, "median_prefill_s") * 1e3 for k in METHODS]
                 + [m(p, k, "median_prefill_s") / m(p, "ours", "median_prefill_s") for k in METHODS[1:]]
                 for p in points])
    print_table(f"Decode after an L-token prompt (tokens/s, median of {args.runs})",
                ["L", "ours", "hf_loop", "hf_generate", "ours/hf_loop", "ours/hf_generate"],
                [[p["L"]] + [m(p, k, "median_decode_tok_s") for k in METHODS]
                 + [m(p, "ours", "median_decode_tok_s") / m(p, k, "median_decode_tok_s") for k in METHODS[1:]]
                 for p in points])

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    Ls = [p["L"] for p in points]
    for k in METHODS:
        axes[0].plot(Ls, [m(p, k, "median_prefill_s") * 1e3 for p in points], marker="o", label=k)
        axes[1].plot(Ls, [m(p, k, "median_decode_tok_s") for p in points], marker="o", label=k)
    axes[0].set(yscale="log", ylabel="ms", title="prefill (time to first token)")
    axes[1].set(ylabel="tokens/s", title=f"decode ({args.decode_tokens} tokens)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ls, [str(L) for L in Ls])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"Engine speed — {engine.model_path.name}, {args.device}, {args.threads} threads")
    save_figure(fig, out.with_suffix(".png"))
    guard.report()


if __name__ == "__main__":
    main()
