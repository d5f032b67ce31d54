"""Switch latency: running an adapter on a live conversation, aLoRA (base KV reused) against the alternatives.

One run measures, side by side, on the same model and the same random-weight adapters (made with PEFT here):

1. Sweep over the history length L: one adapter call (time to first token, time for N output tokens) by
   - ``alora_invoke``  ours, ``conv.invoke(aLoRA)``: the cached base history is reused, only the invocation is prefilled;
   - ``lora_invoke``   ours, ``conv.invoke(LoRA)``: the same task as a standard LoRA, history recomputed under it;
   - ``merge_swap``    ours, what a single-adapter server does: merge ``W += scale*B@A`` into the base weights
                       (timed), recompute history + invocation with no adapter, decode (weights restored untimed);
   - ``peft_alora``    transformers + PEFT, same aLoRA folder, generate on a base ``DynamicCache`` of the history
                       (PEFT's documented recipe; the cache is prefilled once untimed, and deep-copied before each
                       run, the copy untimed and reported as ``copy_s``);
   - ``peft_lora``     transformers + PEFT, the LoRA folder, generate on the full ids from scratch;
   - ``base_floor``    ours, base model: prefill of the same invocation tokens on the cached history + decode,
                       the floor an aLoRA call can reach;
   - ``llamacpp_alora`` llama.cpp (``make peers``; left out with a message when not built), F32 GGUF of the same
                       weights, the same aLoRA converted by llama.cpp's ``convert_lora_to_gguf.py``, on its own KV
                       cache of the history (prefilled untimed), applied by llama-server's aLoRA rule (adapter off
                       before the activation point, on from it; llama-server activates one token before the
                       invocation, so that token is recomputed each call), timed inside the worker process.
   Each is timed ``--runs`` times after one warm-up at every L; medians and the ratios are reported.
2. Chat: N turns of base chat, each followed by 1-3 adapter calls (cycling), with aLoRAs vs the equivalent LoRAs.
3. Scaling: k = 1..8 different adapters invoked one after another on the same history.
4. Memory: KV bytes per conversation with one base cache (aLoRA) vs one cached history per adapter.

Every call emits exactly ``--new-tokens`` tokens, greedy (EOS disabled in our engine, ``min_new_tokens`` in
transformers). An aLoRA and its LoRA twin share weights, rank, targets and the invocation text (the LoRA's is a
prompt suffix, ``alora_runtime.json``), so they run on the same token ids.

Quiet-machine guard (``common.CpuGuard``): a sweep or scaling sample taken while other processes used more than
``--max-other-cores`` is repeated (``--retries`` times, then kept and flagged); the chat runs, which change their
conversation and cannot be repeated, record other processes' CPU use. The JSON's ``cpu_guard`` counts them.

Writes benchmarks/results/switch_latency[_cuda][_quick].json and .png / _chat.png / _scaling.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (FirstTokenStreamer, OtherCpu, add_guard_args, filler, guard_from_args,  # noqa: E402
                    machine_info, now, print_table, progress, pyplot, result_path, save_figure, setup_torch, sync,
                    versions, write_json)
from peers import llamacpp  # noqa: E402

TASKS = ("judge", "title", "certainty", "safety", "summary", "answerability", "citation", "rewrite")
RANK, ALPHA, TARGETS = 32, 32, ["q_proj", "k_proj", "v_proj"]  # IBM's intrinsics: r=32 on q/k/v
METHODS = ("alora_invoke", "lora_invoke", "merge_swap", "peft_alora", "peft_lora", "base_floor", "llamacpp_alora")
USER_TURNS = ("Can you summarize what we discussed so far?", "What would be a good next step?",
              "Explain the main risk in one paragraph.", "Give me three examples.", "How confident are you?",
              "Rewrite that for a child.", "What did I ask first?", "Any final advice?")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same for both stacks (default 2)")
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                   help="history lengths L (default CPU: 256,512,1024,2048,4096; CUDA: doubling up to the context)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per point after one warm-up (default 5)")
    p.add_argument("--new-tokens", type=int, default=16, help="output tokens per adapter call (default 16)")
    p.add_argument("--scaling-length", type=int, help="history length of the k-adapter test (default 1024)")
    p.add_argument("--scaling-k", type=int, default=8, help="adapters invoked one after another (default 8)")
    p.add_argument("--chat-turns", type=int, default=8)
    p.add_argument("--chat-history", type=int, default=1024, help="tokens of history before the first turn")
    p.add_argument("--chat-reply-tokens", type=int, default=64, help="tokens of each base-model reply")
    p.add_argument("--skip-peer", action="store_true", help="leave out transformers + PEFT")
    p.add_argument("--skip-llamacpp", action="store_true", help="leave out llama.cpp (included when `make peers` "
                                                                "has built it)")
    p.add_argument("--quick", action="store_true", help="smoke run (< 2 min): L=128,256, 2 runs, 8 tokens, small "
                                                        "chat and scaling; writes *_quick files")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/switch_latency[_cuda][_quick].json)")
    add_guard_args(p)
    args = p.parse_args()
    if args.quick:
        args.lengths = args.lengths or [128, 256]
        args.runs, args.scaling_k, args.scaling_length = min(args.runs, 2), min(args.scaling_k, 3), 128
        args.new_tokens = min(args.new_tokens, 8)
        args.chat_turns, args.chat_history, args.chat_reply_tokens = 3, 128, 8
    args.scaling_length = args.scaling_length or 1024
    if args.runs < 1 or args.scaling_k < 1 or args.scaling_k > len(TASKS):
        p.error(f"--runs >= 1 and 1 <= --scaling-k <= {len(TASKS)}")
    return args


def default_lengths(device: str, context: int, margin: int) -> list[int]:
    if device == "cpu":
        return [256, 512, 1024, 2048, 4096]
    lengths, L = [], 256
    while L + margin <= context:
        lengths.append(L)
        L *= 2
    return lengths + ([context - margin] if lengths[-1] < context - margin else [])


# ---- adapters ------------------------------------------------------------------------------------------

@dataclass
class Task:
    name: str
    invocation: str
    inv_ids: list[int]
    alora_dir: Path
    lora_dir: Path

    @property
    def alora(self) -> str:
        return f"{self.name}-alora"

    @property
    def lora(self) -> str:
        return f"{self.name}-lora"


def make_tasks(model_dir: Path, tokenizer, out: Path, count: int) -> list[Task]:
    """For each task, a random-weight aLoRA and its LoRA twin (same weights), saved by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tasks = []
    for i, name in enumerate(TASKS[:count]):
        invocation = f"<|im_start|>{name}\n"
        inv_ids = tokenizer(invocation, add_special_tokens=False)["input_ids"]
        task = Task(name, invocation, inv_ids, out / f"{name}-alora", out / f"{name}-lora")
        for folder, extra in ((task.alora_dir, {"alora_invocation_tokens": inv_ids}), (task.lora_dir, {})):
            torch.manual_seed(1000 + i)
            cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                             task_type="CAUSAL_LM", **extra)
            peft_model = get_peft_model(model, cfg)
            with torch.no_grad():  # PEFT starts B at zero; give it trained-like magnitudes
                for pname, p in peft_model.named_parameters():
                    if "lora_B" in pname:
                        p.normal_(0, 0.02)
            peft_model.save_pretrained(folder)
            model = peft_model.unload()
        (task.lora_dir / "alora_runtime.json").write_text(json.dumps({"invocation": invocation}))
        tasks.append(task)
    return tasks


# ---- histories -----------------------------------------------------------------------------------------

def history_messages(engine, L: int, seed: int = 0) -> list[dict]:
    """User/assistant messages whose chat-template rendering (as ``conv.history_ids``) is exactly L tokens."""
    def rendered(msgs):
        return len(engine.tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])

    msgs, i = [], 0
    while True:  # whole exchanges while they leave room for a last, short one
        pair = [{"role": "user", "content": filler(60, seed + i)},
                {"role": "assistant", "content": filler(140, seed + i + 1)}]
        if rendered(msgs + pair) + 40 > L:
            break
        msgs, i = msgs + pair, i + 2
    msgs += [{"role": "user", "content": filler(5, seed + i)}, {"role": "assistant", "content": ""}]
    words = 1
    for _ in range(6):  # the last reply fills the rest; a filler word is one token, so this converges fast
        msgs[-1]["content"] = filler(words, seed + i + 1)
        n = len(engine.conversation(messages=msgs).history_ids)
        if n == L:
            return msgs
        words += L - n
        if words < 1:
            break
    raise ValueError(f"cannot build a history of exactly {L} tokens (too short for the chat template?)")


def primed_conversation(engine, L: int, alora_name: str, seed: int = 0):
    """A conversation of exactly L history tokens whose base KV is cached (prefilled by an untimed call)."""
    conv = engine.conversation(messages=history_messages(engine, L, seed))
    list(conv.invoke(alora_name, max_new_tokens=0))  # prefills the history in base weights, then rolls back
    assert conv.cached_tokens == L == len(conv.history_ids), (conv.cached_tokens, L)
    return conv


# ---- ours ----------------------------------------------------------------------------------------------

def _drain(call, device: str, t0: float) -> tuple[dict, list[int]]:
    for _ in call:
        pass
    sync(device)
    return {"ttft_s": call.first_token_at - t0, "total_s": now() - t0, "tokens": len(call.output)}, list(call.output)


def timed_invoke(conv, name: str, n: int, device: str) -> tuple[dict, list[int]]:
    """``conv.invoke(name)``, timed from the call to the last token. A LoRA is timed as the switch it is: its
    first call on this history, nothing of it in the prefix cache (the engine caches LoRA prefixes per
    adapter, so a repeated ``conv.invoke`` would time a cache hit instead)."""
    from alora import SamplingParams

    engine = conv.engine
    info = engine.adapter(name)
    if info.kind == "lora":
        history = conv.history_ids
        prompt = (engine.invocation_prompt(name, history) if info.invocation_tokens else
                  engine.tokenizer.apply_chat_template(conv.messages, tokenize=True, return_dict=True,
                                                       add_generation_prompt=True)["input_ids"])
    sync(device)
    t0 = now()
    if info.kind == "lora":
        call = engine.submit(prompt, name, SamplingParams(max_new_tokens=n, ignore_eos=True), use_cache=False,
                             expected_cached=len(history))
    else:
        call = conv.start_invoke(name, max_new_tokens=n, ignore_eos=True)
    for _ in call:
        pass
    sync(device)
    t1 = now()
    s = call.stats
    return ({"ttft_s": call.first_token_at - t0, "total_s": t1 - t0, "tokens": len(call.output),
             "reused_tokens": s.reused_tokens, "prefill_tokens": s.prefill_tokens,
             "recomputed_tokens": s.recomputed_tokens}, list(call.output))


class BaseFloor:
    """Base-model prefill of ``len(invocation)`` tokens on a cached history, then decode: the aLoRA floor."""

    salt = "base-floor"  # its own prefix-cache namespace: only the history is ever stored there

    def __init__(self, engine, history: list[int], device: str):
        from alora import SamplingParams

        self.engine, self.history, self.device = engine, history, device
        for _ in engine.submit(history, params=SamplingParams(max_new_tokens=0), cache_salt=self.salt):
            pass

    def run(self, tokens: list[int], n: int) -> tuple[dict, list[int]]:
        from alora import SamplingParams

        sync(self.device)
        t0 = now()
        call = self.engine.submit(self.history + tokens, params=SamplingParams(max_new_tokens=n, ignore_eos=True),
                                  cache_salt=self.salt, store=False)
        return _drain(call, self.device, t0)


class MergeSwap:
    """A LoRA merged into the base weights (timed), the whole prompt recomputed with no adapter, then decode."""

    def __init__(self, engine, folder: Path, device: str):
        from alora.adapters import AdapterRegistry

        self.engine, self.device = engine, device
        # the engine's own parser: rank/alpha patterns and (rs)LoRA scaling applied, scale folded into B
        parsed = AdapterRegistry(engine.model, engine.tokenizer).read("merge_swap", folder)
        modules = engine.model.projections()
        self.deltas = []  # (module, rows of its weight to update, A, B * scale)
        for module_name, parts in sorted(parsed.weights.items()):
            mod = modules[module_name]
            w = mod.weight
            for part, (A, B) in sorted(parts.items()):
                r0 = sum(mod.parts[:part])
                self.deltas.append((mod, r0, r0 + mod.parts[part], A.to(w.device, w.dtype), B.to(w.device, w.dtype)))
        self.originals = {id(mod): (mod, mod.weight.detach().clone()) for mod, *_ in self.deltas}

    def run(self, prompt: list[int], n: int) -> tuple[dict, list[int]]:
        from alora import SamplingParams

        engine = self.engine
        sync(self.device)
        t0 = now()
        with torch.no_grad():
            for mod, r0, r1, A, B in self.deltas:
                mod.weight[r0:r1].addmm_(B, A)
        sync(self.device)
        merge_s = now() - t0
        # the merged weights are nobody else's: nothing is looked up in or stored to the prefix cache
        call = engine.submit(prompt, params=SamplingParams(max_new_tokens=n, ignore_eos=True), use_cache=False)
        sample, out = _drain(call, self.device, t0)
        with torch.no_grad():  # swap back (untimed): restore the exact base weights
            for mod, w in self.originals.values():
                mod.weight.copy_(w)
        return {**sample, "merge_s": merge_s}, out


# ---- the peer: transformers + PEFT ------------------------------------------------------------------------

class Peer:
    def __init__(self, model_dir: Path, task: Task, device: str, dtype: torch.dtype):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        def load(folder):
            base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
            return PeftModel.from_pretrained(base, folder).eval()

        self.alora, self.lora, self.device = load(task.alora_dir), load(task.lora_dir), device

    def base_cache(self, history: list[int]):
        """PEFT's recipe: prefill the shared history with the adapter disabled into a DynamicCache."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.alora.config)
        with torch.no_grad(), self.alora.disable_adapter():
            self.alora(input_ids=torch.tensor([history], device=self.device), past_key_values=cache, use_cache=True)
        return cache

    def generate(self, model, ids: list[int], n: int, cache=None) -> tuple[dict, list[int]]:
        streamer = FirstTokenStreamer()
        x = torch.tensor([ids], device=self.device)
        sync(self.device)
        t0 = now()
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), past_key_values=cache,
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer,
                                 pad_token_id=model.config.eos_token_id)
        sync(self.device)
        t1 = now()
        toks = out[0, len(ids):].tolist()
        return {"ttft_s": streamer.at - t0, "total_s": t1 - t0, "tokens": len(toks)}, toks

    def run_alora(self, ids: list[int], base_cache, n: int) -> tuple[dict, list[int]]:
        t0 = now()
        cache = copy.deepcopy(base_cache)  # generate writes adapter KV into the cache: keep the base one clean
        copy_s = now() - t0
        sample, toks = self.generate(self.alora, ids, n, cache)
        return {**sample, "copy_s": copy_s}, toks


# ---- the peer: llama.cpp ------------------------------------------------------------------------------------

class LlamaCpp:
    """llama.cpp's aLoRA call on the F32 GGUF, through the peer's worker; ``None`` from ``start`` when not built."""

    def __init__(self, m: dict, task: Task, tmp: Path, threads: int, n_ctx: int):
        gguf = llamacpp.convert_adapter(m, task.alora_dir, tmp / f"{task.alora}.gguf")
        self.worker = llamacpp.Worker(m)
        self.info = self.worker.load("F32", m["models"]["F32"]["path"], threads, n_ctx, {task.alora: str(gguf)})
        self.adapter, self.pid = task.alora, self.worker.pid
        self.info.update(llama_cpp_python=m["llama_cpp_python"], system_info=m["system_info"],
                         adapter_gguf="converted here from the PEFT folder by llama.cpp's convert_lora_to_gguf.py")

    @classmethod
    def start(cls, args, task: Task, tmp: Path, n_ctx: int) -> "LlamaCpp | None":
        if args.skip_llamacpp:
            return None
        m = llamacpp.manifest()
        if m is None or args.device != "cpu":
            print(llamacpp.NOT_BUILT if m is None else f"llama.cpp: the peer is built for the CPU; left out of a "
                  f"--device {args.device} run", file=sys.stderr)
            return None
        return cls(m, task, tmp, args.threads, n_ctx)

    def prime(self, history: list[int]) -> None:
        """The history's base KV, computed once (untimed) on a fresh cache."""
        self.worker.generate("F32", history, 0, fresh=True)

    def call(self, prompt: list[int], n: int, activation: str = "server") -> tuple[dict, list[int]]:
        r = self.worker.generate("F32", prompt, n, self.adapter, activation=activation)
        return ({"ttft_s": r["prefill_s"], "total_s": r["total_s"], "tokens": len(r["tokens"]),
                 "reused_tokens": r["reused_tokens"], "prefill_tokens": r["prefill_tokens"]}, r["tokens"])

    def close(self) -> None:
        self.worker.close()


def dynamic_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


# ---- the three experiments ----------------------------------------------------------------------------------

def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _agree(a: list[int], b: list[int], eos: frozenset) -> bool:
    """Same greedy tokens up to the first EOS (ours decodes past EOS, transformers suppresses it)."""
    k = next((i for i, t in enumerate(a) if t in eos), len(a))
    return a[:k] == b[:k]


def sweep(engine, tasks, peer, lcpp, demo: dict, args, eos: frozenset, guard) -> dict:
    task, n = tasks[0], args.new_tokens
    methods = [m for m in METHODS if (peer is not None or not m.startswith("peft"))
               and (lcpp is not None or not m.startswith("llamacpp"))]
    merge = MergeSwap(engine, task.lora_dir, args.device)
    bar = progress(len(args.lengths) * (len(methods) + len(demo)) * (args.runs + 1), "switch sweep")
    points = []
    for L in args.lengths:
        bar.set_description(f"switch sweep L={L}")
        conv = primed_conversation(engine, L, task.alora)
        hist = conv.history_ids
        prompt = hist + task.inv_ids
        floor = BaseFloor(engine, hist, args.device)
        fns = {"alora_invoke": lambda: timed_invoke(conv, task.alora, n, args.device),
               "lora_invoke": lambda: timed_invoke(conv, task.lora, n, args.device),
               "merge_swap": lambda: merge.run(prompt, n),
               "base_floor": lambda: floor.run(task.inv_ids, n)}
        peer_bytes = None
        if peer is not None:
            base_cache = peer.base_cache(hist)
            peer_bytes = dynamic_cache_bytes(base_cache)
            fns["peft_alora"] = lambda: peer.run_alora(prompt, base_cache, n)
            fns["peft_lora"] = lambda: peer.generate(peer.lora, prompt, n)
        if lcpp is not None:
            lcpp.prime(hist)
            fns["llamacpp_alora"] = lambda: lcpp.call(prompt, n)
        for name in demo:
            fns[f"demo:{name}"] = lambda name=name: timed_invoke(conv, f"demo:{name}", n, args.device)
        raw = {m: [] for m in fns}
        outputs = {}
        for run in range(args.runs + 1):  # run 0 is the warm-up
            for m in [m for m in methods if m in fns] + [m for m in fns if m.startswith("demo:")]:
                if run == 0:
                    _, toks = fns[m]()
                else:
                    # the idle llama.cpp worker counts as another process while the others run
                    guard.pids = (lcpp.pid,) if m.startswith("llamacpp") else ()
                    (sample, toks), cpu = guard.run(fns[m])
                    raw[m].append({**sample, **cpu})
                outputs[m] = toks
                bar.update()
        if lcpp is not None:  # untimed: does PEFT's activation point (the invocation's first token) agree better?
            outputs["llamacpp_alora_peft_rule"] = lcpp.call(prompt, n, activation="peft")[1]
        point = {"L": L, "invocation_tokens": len(task.inv_ids), "cache_bytes": conv.cache_bytes(),
                 "peer_cache_bytes": peer_bytes, "methods": {}}
        for m, samples in raw.items():
            point["methods"][m] = {
                "median_ttft_s": statistics.median(s["ttft_s"] for s in samples),
                "median_total_s": statistics.median(s["total_s"] for s in samples),
                "runs": samples}
        med = {m: v for m, v in point["methods"].items()}

        def ratios(key):
            get = lambda m: med[m][key] if m in med else None  # noqa: E731
            return {"lora/alora": _ratio(get("lora_invoke"), get("alora_invoke")),
                    "merge_swap/alora": _ratio(get("merge_swap"), get("alora_invoke")),
                    "peer/ours alora": _ratio(get("peft_alora"), get("alora_invoke")),
                    "peer/ours lora": _ratio(get("peft_lora"), get("lora_invoke")),
                    "alora/base_floor": _ratio(get("alora_invoke"), get("base_floor")),
                    **({"llamacpp/ours alora": _ratio(get("llamacpp_alora"), get("alora_invoke"))}
                       if "llamacpp_alora" in med else {})}

        point["ratios"] = {"ttft": ratios("median_ttft_s"), "total": ratios("median_total_s")}
        point["outputs_agree"] = {"alora_invoke==peft_alora": _agree(outputs["alora_invoke"], outputs["peft_alora"], eos)
                                  if "peft_alora" in outputs else None,
                                  "lora_invoke==peft_lora": _agree(outputs["lora_invoke"], outputs["peft_lora"], eos)
                                  if "peft_lora" in outputs else None,
                                  "merge_swap==lora_invoke": _agree(outputs["merge_swap"], outputs["lora_invoke"], eos),
                                  "alora_invoke==llamacpp_alora": _agree(outputs["alora_invoke"],
                                                                         outputs["llamacpp_alora"], eos)
                                  if "llamacpp_alora" in outputs else None,
                                  "alora_invoke==llamacpp_alora_peft_rule": _agree(
                                      outputs["alora_invoke"], outputs["llamacpp_alora_peft_rule"], eos)
                                  if "llamacpp_alora_peft_rule" in outputs else None}
        points.append(point)
        del conv, floor
    bar.close()
    return {"methods": list(methods) + [f"demo:{d}" for d in demo], "new_tokens": n, "task": task.name,
            "points": points}


def scaling(engine, tasks, args, guard) -> dict:
    """k different adapters invoked one after another on one history, aLoRA vs LoRA."""
    L, k, runs = args.scaling_length, args.scaling_k, 1 if args.quick else min(args.runs, 3)
    conv = primed_conversation(engine, L, tasks[0].alora, seed=7)
    out = {"L": L, "k_max": k, "runs": runs, "new_tokens": args.new_tokens}
    bar = progress(2 * runs * k, f"scaling L={L}")
    for kind in ("alora", "lora"):
        per_run = []
        for _ in range(runs):
            times = []
            for task in tasks[:k]:
                (sample, _), _ = guard.run(timed_invoke, conv, getattr(task, kind), args.new_tokens, args.device)
                times.append(sample["total_s"])
                bar.update()
            per_run.append(times)
        per_adapter = [statistics.median(r[j] for r in per_run) for j in range(k)]
        out[kind] = {"per_adapter_s": per_adapter,
                     "cumulative_s": [sum(per_adapter[:j + 1]) for j in range(k)], "raw_s": per_run}
    bar.close()
    return out


def chat(engine, tasks, args) -> dict:
    """N turns of base chat, each followed by 1, 2, 3, 1, ... adapter calls; aLoRAs vs their LoRA twins."""
    out = {"turns": args.chat_turns, "start_history": args.chat_history, "reply_tokens": args.chat_reply_tokens,
           "adapter_tokens": args.new_tokens, "adapters": [t.name for t in tasks[:3]]}
    for kind in ("alora", "lora"):
        conv = primed_conversation(engine, args.chat_history, tasks[0].alora, seed=99)  # same start for both
        turns = []
        t_all = now()
        with OtherCpu() as cpu:
            for i in tqdm_range(args.chat_turns, f"chat {kind}"):
                t0 = now()
                for _ in conv.send(USER_TURNS[i % len(USER_TURNS)], max_new_tokens=args.chat_reply_tokens):
                    pass
                send_s = now() - t0
                invokes = [{"adapter": getattr(t, kind), **timed_invoke(conv, getattr(t, kind), args.new_tokens,
                                                                        args.device)[0]}
                           for t in tasks[: 1 + i % min(3, len(tasks))]]
                turns.append({"turn": i + 1, "history_tokens": len(conv.history_ids), "send_s": send_s,
                              "adapters_s": sum(x["total_s"] for x in invokes), "turn_s": now() - t0,
                              "invokes": invokes})
        out[kind] = {"total_s": now() - t_all, "turns": turns, "other_cpu_cores": round(cpu.cores, 3)}
    out["lora/alora total"] = out["lora"]["total_s"] / out["alora"]["total_s"]
    return out


def tqdm_range(n: int, desc: str):
    bar = progress(n, desc)
    for i in range(n):
        yield i
        bar.update()
    bar.close()


def memory(sweep_result: dict, k_max: int) -> dict:
    rows = []
    for p in sweep_result["points"]:
        one = p["cache_bytes"]
        rows.append({"L": p["L"], "alora_one_base_cache_bytes": one, "peer_dynamic_cache_bytes": p["peer_cache_bytes"],
                     "cache_per_adapter_bytes": {k: (1 + k) * one for k in range(1, k_max + 1)}})
    return {"note": "aLoRA: one base-model KV history per conversation, whatever the number of adapters. "
                    "Caching one history per adapter (LoRA design) holds the base chat's cache plus one per adapter: "
                    "(1 + k) x.", "rows": rows}


# ---- report -----------------------------------------------------------------------------------------------

LABELS = {"alora_invoke": "ours aLoRA invoke", "lora_invoke": "ours LoRA (recompute)", "merge_swap": "ours merge+swap",
          "peft_alora": "HF+PEFT aLoRA (cache)", "peft_lora": "HF+PEFT LoRA", "base_floor": "ours base floor",
          "llamacpp_alora": "llama.cpp F32 aLoRA (cache)"}


def report(result: dict, paths: dict[str, Path]) -> None:
    sw = result["sweep"]
    methods = [m for m in sw["methods"] if not m.startswith("demo:")]
    for key, what in (("median_ttft_s", "time to first token"), ("median_total_s", f"{sw['new_tokens']} tokens")):
        rkey = "ttft" if key == "median_ttft_s" else "total"
        rnames = list(sw["points"][0]["ratios"][rkey])
        rows = [[p["L"]] + [p["methods"][m][key] * 1e3 for m in methods]
                + [p["ratios"][rkey][r] if p["ratios"][rkey][r] is not None else "-" for r in rnames]
                for p in sw["points"]]
        print_table(f"Switch latency, {what} (ms, median of {result['config']['runs']})",
                    ["L"] + methods + rnames, rows)
    demo = [m for m in sw["methods"] if m.startswith("demo:")]
    if demo:
        print_table("Demo adapters, invoke (ms, median: ttft / total)", ["L"] + demo,
                    [[p["L"]] + [f"{p['methods'][m]['median_ttft_s'] * 1e3:.1f} / {p['methods'][m]['median_total_s'] * 1e3:.1f}"
                                 for m in demo] for p in sw["points"]])
    agree = [[p["L"]] + list(p["outputs_agree"].values()) for p in sw["points"]]
    print_table("Greedy outputs agree (up to EOS)", ["L"] + list(sw["points"][0]["outputs_agree"]), agree)

    sc = result["scaling"]
    print_table(f"Scaling: k adapters one after another on L={sc['L']} (s, cumulative)",
                ["k", "aLoRA", "LoRA", "LoRA/aLoRA"],
                [[k + 1, sc["alora"]["cumulative_s"][k], sc["lora"]["cumulative_s"][k],
                  sc["lora"]["cumulative_s"][k] / sc["alora"]["cumulative_s"][k]] for k in range(sc["k_max"])])

    ch = result["chat"]
    print_table(f"Chat: {ch['turns']} turns from {ch['start_history']} tokens, {ch['reply_tokens']}-token replies, "
                f"1-3 adapter calls per turn (s)",
                ["turn", "history", "aLoRA turn", "aLoRA adapters", "LoRA turn", "LoRA adapters", "LoRA/aLoRA"],
                [[a["turn"], b["history_tokens"], a["turn_s"], a["adapters_s"], b["turn_s"], b["adapters_s"],
                  b["turn_s"] / a["turn_s"]] for a, b in zip(ch["alora"]["turns"], ch["lora"]["turns"])]
                + [["total", "", ch["alora"]["total_s"], "", ch["lora"]["total_s"], "", ch["lora/alora total"]]])

    mem = result["memory"]["rows"]
    ks = [k for k in (1, 3, 8) if k <= result["config"]["scaling_k"]]
    print_table("KV cache per conversation (MiB): one base cache (aLoRA) vs one history per adapter",
                ["L", "aLoRA", "HF DynamicCache"] + [f"per-adapter k={k}" for k in ks],
                [[r["L"], r["alora_one_base_cache_bytes"] / 2**20,
                  r["peer_dynamic_cache_bytes"] / 2**20 if r["peer_dynamic_cache_bytes"] else "-"]
                 + [r["cache_per_adapter_bytes"][k] / 2**20 for k in ks] for r in mem])
    plots(result, paths)


def plots(result: dict, paths: dict[str, Path]) -> None:
    plt = pyplot()
    sw = result["sweep"]
    Ls = [p["L"] for p in sw["points"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, what in ((axes[0], "median_ttft_s", "time to first token"),
                          (axes[1], "median_total_s", f"{sw['new_tokens']} output tokens")):
        for m in sw["methods"]:
            ax.plot(Ls, [p["methods"][m][key] * 1e3 for p in sw["points"]], marker="o", label=LABELS.get(m, m),
                    linestyle="--" if m in ("base_floor",) or m.startswith("demo:") else "-")
        ax.set_xscale("log", base=2)
        ax.set(yscale="log", xlabel="history length L (tokens)", ylabel="ms", title=what)
        ax.set_xticks(Ls, [str(L) for L in Ls], minor=False)
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Adapter switch latency — {result['model']['name']}, {result['machine']['device']}")
    save_figure(fig, paths["png"])

    ch = result["chat"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    turns = [t["turn"] for t in ch["alora"]["turns"]]
    w = 0.38
    for off, kind, color in ((-w / 2, "alora", "tab:blue"), (w / 2, "lora", "tab:red")):
        ts = ch[kind]["turns"]
        xs = [t + off for t in turns]
        ax.bar(xs, [t["send_s"] for t in ts], w, color=color, alpha=0.45, label=f"{kind}: base reply")
        ax.bar(xs, [t["adapters_s"] for t in ts], w, bottom=[t["send_s"] for t in ts], color=color,
               label=f"{kind}: adapter calls (total {ch[kind]['total_s']:.1f} s)")
    ax.set(xlabel="turn (1-3 adapter calls each)", ylabel="seconds", xticks=turns,
           title=f"Chat with intrinsic adapters: aLoRA vs LoRA ({ch['lora/alora total']:.1f}x total)")
    ax.legend(fontsize=8)
    save_figure(fig, paths["chat_png"])

    sc = result["scaling"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ks = list(range(1, sc["k_max"] + 1))
    for kind in ("alora", "lora"):
        ax.plot(ks, sc[kind]["cumulative_s"], marker="o", label=kind)
    ax.set(xlabel="adapters invoked one after another (k)", ylabel="cumulative seconds", xticks=ks,
           title=f"k adapters on one history of {sc['L']} tokens")
    ax.grid(True, alpha=0.3)
    ax.legend()
    save_figure(fig, paths["scaling_png"])


def main() -> None:
    args = parse_args()
    setup_torch(args.threads, args.device)
    import alora

    engine = alora.Engine.from_pretrained(args.model, device=args.device)
    eos = engine.eos_token_ids  # timed calls ignore it (ignore_eos): each emits exactly the tokens asked for
    cfg = engine.config
    margin = 8 + 2 * args.new_tokens
    args.lengths = args.lengths or default_lengths(args.device, cfg.max_position_embeddings, margin)
    too_long = [L for L in args.lengths + [args.scaling_length] if L + margin > cfg.max_position_embeddings]
    if too_long:
        sys.exit(f"lengths {too_long} do not fit the model's context of {cfg.max_position_embeddings} tokens")

    out = args.out or result_path("switch_latency", args.device, args.quick, "json")
    paths = {"json": out, "png": out.with_suffix(".png"), "chat_png": out.with_name(out.stem + "_chat.png"),
             "scaling_png": out.with_name(out.stem + "_scaling.png")}
    n_tasks = max(args.scaling_k, min(3, len(TASKS)))
    with tempfile.TemporaryDirectory(prefix="alora-bench-") as tmp:
        tasks = make_tasks(engine.model_path, engine.tokenizer, Path(tmp), n_tasks)
        for t in tasks:
            engine.load_adapter(t.alora, t.alora_dir)
            engine.load_adapter(t.lora, t.lora_dir)
        demo = {}
        for name, folder in ({} if args.quick else alora.demo_adapters()).items():
            try:
                engine.load_adapter(f"demo:{name}", folder)
                demo[name] = {"folder": str(folder), "kind": engine.adapter(f"demo:{name}").kind}
            except (ValueError, OSError) as e:
                print(f"skipping demo adapter {name}: {e}", file=sys.stderr)
        peer = None if args.skip_peer else Peer(engine.model_path, tasks[0], args.device, engine.dtype)
        lcpp = LlamaCpp.start(args, tasks[0], Path(tmp), max(args.lengths) + margin + 16)
        guard = guard_from_args(args)
        t_start = now()
        result = {
            "benchmark": "switch_latency", "quick": args.quick, "machine": machine_info(args.device),
            "versions": versions(),
            "model": {"path": str(engine.model_path), "name": engine.model_path.name, "layers": cfg.num_layers,
                      "hidden": cfg.hidden_size, "context": cfg.max_position_embeddings, "dtype": str(engine.dtype),
                      "params": sum(p.numel() for p in engine.model.parameters())},
            "config": {"lengths": args.lengths, "runs": args.runs, "warmup_runs": 1, "new_tokens": args.new_tokens,
                       "threads": args.threads, "scaling_k": args.scaling_k, "decoding": "greedy, EOS disabled",
                       "adapters": {"rank": RANK, "alpha": ALPHA, "targets": TARGETS,
                                    "invocations": {t.name: t.invocation for t in tasks},
                                    "made_with": "PEFT, random lora_B ~ N(0, 0.02)"},
                       "demo_adapters": demo,
                       "timing": "ttft_s: call start to first sampled token; total_s: call start to last token "
                                 "(ours: rollback included; merge_swap: merge included, unmerge excluded; "
                                 "peft_alora: the DynamicCache deepcopy excluded, reported as copy_s; "
                                 "llamacpp_alora: inside the worker process, its cache truncation included)"},
            "llamacpp": {"built": True, "context": lcpp.info,
                         "activation": "llama-server's rule: the adapter from the token before the last occurrence "
                                       "of the invocation tokens (PEFT: from the invocation's first token); the "
                                       "cached history is reused up to that token"}
            if lcpp else {"built": False, "note": "left out (--skip-llamacpp)" if args.skip_llamacpp
                          else llamacpp.NOT_BUILT},
        }
        try:
            result["sweep"] = sweep(engine, tasks, peer, lcpp, demo, args, eos, guard)
        finally:
            if lcpp is not None:
                lcpp.close()
        del peer
        result["scaling"] = scaling(engine, tasks, args, guard)
        result["chat"] = chat(engine, tasks, args)
        result["memory"] = memory(result["sweep"], args.scaling_k)
        result["wall_s"] = now() - t_start
        result["cpu_guard"] = guard.summary()
    write_json(paths["json"], result)
    report(result, paths)
    guard.report()


if __name__ == "__main__":
    main()
