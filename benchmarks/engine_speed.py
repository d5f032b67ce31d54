"""Engine speed: prefill time and decode tokens/s, ours vs transformers, side by side on the same model.

For each prompt length L, one greedy generation of ``--decode-tokens`` tokens (EOS disabled / suppressed) by
- ``ours``:        ``Engine.start_call`` on a fresh KV cache (the path ``conv.send`` runs), float32;
- ``ours_bf16``, ``ours_int8``: the same engine in bfloat16, and with weight-only int8 projections
                   (``quantize="int8"``, float32 activations), when ``--modes`` asks for them (CPU only);
- ``hf_loop``:     transformers, a plain loop: ``model(ids, DynamicCache, logits_to_keep=1)`` then one forward
                   per token (transformers' best case, no ``generate`` machinery);
- ``hf_generate``: transformers ``model.generate`` (what most users call), first token timed with a streamer;
- ``llamacpp_F32``, ``_F16``, ``_Q8_0``, ``_Q4_1``: llama.cpp (llama-cpp-python built from source with native flags
                   by ``make peers``) on GGUFs of the same weights: Q4_1 is the shipped GGUF our engine dequantizes,
                   the others requantized from it; a fresh KV cache each run, the same thread count, timed inside
                   its worker process (``benchmarks/peers/llamacpp_worker.py``). Left out, with a message, when the
                   peer is not built.
``prefill_s`` is the time to the first sampled token; ``decode_tok_s`` is (tokens - 1) / (time after the first).
Median of ``--runs`` runs after one warm-up per length, the methods interleaved. A run taken while other
processes used more than ``--max-other-cores`` is repeated (``common.CpuGuard``; the JSON's ``cpu_guard`` counts
rejected and flagged runs; the llama.cpp worker's own CPU use counts as another process's except during its own
runs).

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
from peers import llamacpp  # noqa: E402

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
    p.add_argument("--llamacpp", type=lambda s: [] if s == "none" else s.split(","), default=list(llamacpp.TYPES),
                   help=f"llama.cpp GGUF types to run when the peer is built (default {','.join(llamacpp.TYPES)}; "
                        "'none' leaves it out)")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["float32"],
                   help=f"our engine's modes, comma-separated from {', '.join(MODES)} (default float32; "
                        "bfloat16 and int8 on CPU only)")
    p.add_argument("--quick", action="store_true", help="smoke run: L=128,512, 2 runs, 8 tokens; writes *_quick files")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/engine_speed[_cuda][_quick].json)")
    add_guard_args(p)
    args = p.parse_args()
    if args.quick:
        args.lengths, args.runs, args.decode_tokens = [128, 512], min(args.runs, 2), min(args.decode_tokens, 8)
    if args.runs < 1 or args.decode_tokens < 2:
        p.error("--runs >= 1 and --decode-tokens >= 2")
    if unknown := set(args.llamacpp) - set(llamacpp.TYPES):
        p.error(f"--llamacpp: unknown types {sorted(unknown)}")
    if unknown := set(args.modes) - set(MODES):
        p.error(f"--modes: unknown modes {sorted(unknown)}")
    if "float32" not in args.modes:
        p.error("--modes must include float32: the other columns are compared with it")
    return args


MODES = {"float32": ("ours", {}), "bfloat16": ("ours_bf16", {"dtype": torch.bfloat16}),
         "int8": ("ours_int8", {"quantize": "int8"})}
"""Our engine's modes: --modes name -> (method name, Engine.from_pretrained keywords)."""


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


def run_llamacpp(worker, key: str, ids: list[int], n: int) -> dict:
    r = worker.generate(key, ids, n, fresh=True)
    return {"prefill_s": r["prefill_s"], "decode_tok_s": r["decode_tok_s"], "total_s": r["total_s"],
            "tokens": len(r["tokens"])}


def start_peer(args, n_ctx: int):
    """``(worker, {type: context info}, manifest)`` of the built llama.cpp peer, or Nones with a message."""
    if not args.llamacpp:
        return None, {}, None
    if args.model is not None:
        print("llama.cpp: the peer's GGUFs hold the default model; left out of a --model run", file=sys.stderr)
        return None, {}, None
    m = llamacpp.manifest()
    if m is None or args.device != "cpu":
        print(llamacpp.NOT_BUILT if m is None else "llama.cpp: the peer is built for the CPU; left out of a "
              f"--device {args.device} run", file=sys.stderr)
        return None, {}, None
    worker = llamacpp.Worker(m)
    info = {t: worker.load(t, m["models"][t]["path"], args.threads, n_ctx) for t in args.llamacpp}
    return worker, info, m


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
    fns = {"ours": lambda ids: run_ours(engine, ids, args.decode_tokens, args.device)}
    for mode in args.modes:
        if mode != "float32":
            name, kwargs = MODES[mode]
            other = alora.Engine.from_pretrained(args.model, device=args.device, **kwargs)
            other.eos_token_ids = frozenset()
            fns[name] = lambda ids, e=other: run_ours(e, ids, args.decode_tokens, args.device)
    fns |= {"hf_loop": lambda ids: run_hf_loop(hf, ids, args.decode_tokens, args.device),
            "hf_generate": lambda ids: run_hf_generate(hf, ids, args.decode_tokens, args.device)}
    worker, peer_info, peer = start_peer(args, max(args.lengths) + args.decode_tokens + 16)
    for t in peer_info:
        fns[f"llamacpp_{t}"] = lambda ids, t=t: run_llamacpp(worker, t, ids, args.decode_tokens)
    methods = list(fns)

    guard = guard_from_args(args)
    points = []
    bar = progress(len(args.lengths) * len(methods) * (args.runs + 1), "engine speed")
    try:
        for L in args.lengths:
            bar.set_description(f"engine speed L={L}")
            ids = prompt_ids(engine.tokenizer, L)
            raw = {m: [] for m in methods}
            for run in range(args.runs + 1):  # run 0 is the warm-up
                for m in methods:
                    if run == 0:
                        fns[m](ids)
                    else:
                        # the idle worker counts as another process while the others run
                        guard.pids = (worker.pid,) if m.startswith("llamacpp_") else ()
                        sample, cpu = guard.run(fns[m], ids)
                        raw[m].append({**sample, **cpu})
                    bar.update()
            points.append({"L": L, "methods": {m: {
                "median_prefill_s": statistics.median(s["prefill_s"] for s in raw[m]),
                "median_decode_tok_s": statistics.median(s["decode_tok_s"] for s in raw[m]),
                "runs": raw[m]} for m in methods}})
    finally:
        bar.close()
        if worker is not None:
            worker.close()

    cfg = engine.config
    result = {
        "benchmark": "engine_speed", "quick": args.quick, "machine": machine_info(args.device), "versions": versions(),
        "model": {"path": str(engine.model_path), "name": engine.model_path.name, "layers": cfg.num_layers,
                  "hidden": cfg.hidden_size, "dtype": str(engine.dtype),
                  "hf_attn_implementation": getattr(hf.config, "_attn_implementation", None)},
        "config": {"lengths": args.lengths, "runs": args.runs, "warmup_runs": 1, "decode_tokens": args.decode_tokens,
                   "threads": args.threads, "methods": methods, "modes": args.modes,
                   "decoding": "greedy, EOS disabled (ours, llama.cpp) / min_new_tokens (HF)"},
        "llamacpp": {"built": peer is not None, "contexts": peer_info,
                     **({"llama_cpp_python": peer["llama_cpp_python"], "built_from": peer["built_from"],
                         "system_info": peer["system_info"], "models": peer["models"],
                         "timing": "inside the worker process, a fresh KV cache per run"} if peer else
                        {"note": llamacpp.NOT_BUILT if args.llamacpp else "left out (--llamacpp none)"})},
        "points": points, "cpu_guard": guard.summary(),
    }
    out = args.out or result_path("engine_speed", args.device, args.quick, "json")
    write_json(out, result)

    m = lambda p, k, key: p["methods"][k][key]  # noqa: E731
    others = methods[1:]
    print_table(f"Prefill: time to first token (ms, median of {args.runs}); k/ours > 1: ours is faster",
                ["L"] + methods + [f"{k}/ours" for k in others],
                [[p["L"]] + [m(p, k, "median_prefill_s") * 1e3 for k in methods]
                 + [m(p, k, "median_prefill_s") / m(p, "ours", "median_prefill_s") for k in others]
                 for p in points])
    print_table(f"Decode after an L-token prompt (tokens/s, median of {args.runs}); ours/k > 1: ours is faster",
                ["L"] + methods + [f"ours/{k}" for k in others],
                [[p["L"]] + [m(p, k, "median_decode_tok_s") for k in methods]
                 + [m(p, "ours", "median_decode_tok_s") / m(p, k, "median_decode_tok_s") for k in others]
                 for p in points])

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    Ls = [p["L"] for p in points]
    for k in methods:
        style = dict(marker="o", label=k, linestyle="--" if k.startswith("llamacpp_") else "-")
        axes[0].plot(Ls, [m(p, k, "median_prefill_s") * 1e3 for p in points], **style)
        axes[1].plot(Ls, [m(p, k, "median_decode_tok_s") for p in points], **style)
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
