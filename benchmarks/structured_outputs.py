"""What structured outputs cost, and how fast an intrinsic answers through the server.

1. Decode time per token with and without a JSON schema, at batch 1 and batch 8 (the same prompts, the same
   number of generated tokens: the schema is an object with one long free string, so the grammar is consulted
   at every token but never ends the reply early; the free calls use ``ignore_eos``). Samples alternate
   between the two modes. Target (issue "Intrinsics"): the schema costs <= 10% of decode time per token.
2. An intrinsic called the way IBM's clients call it (chat completion with the io.yaml's instruction, logprobs,
   ``structured_outputs.json``) through ``alora serve`` on a history of about 1.5k tokens that an earlier
   request left in the cache: its latency, end to end over HTTP. Target: < 0.3 s on the 2-core CPU.

    python benchmarks/structured_outputs.py [--repeats 5] [--tokens 48] [--history-tokens 1500] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_guard_args, filler, guard_from_args, machine_info, now, print_table,  # noqa: E402
                    result_path, setup_torch, versions, write_json)

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}}, "required": ["story"],
          "additionalProperties": False}


def decode_seconds_per_token(engine, batch: int, tokens: int, schema: bool, seed: int) -> float:
    """Seconds per decode step of ``batch`` calls generating ``tokens`` tokens each (prefill excluded)."""
    from alora import SamplingParams

    tok = engine.tokenizer
    params = SamplingParams(max_new_tokens=tokens, json_schema=SCHEMA if schema else None, ignore_eos=not schema)
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"[{seed}-{i}] Write a long story about "
                                         + filler(8, seed + i) + " as JSON."}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"] for i in range(batch)]
    calls = [engine.submit(p, params=params, use_cache=False) for p in prompts]
    firsts, ends, counts = [], [], []
    for call in calls:
        for _ in call:
            pass
        firsts.append(call.first_token_at)
        ends.append(call.submitted + call.stats.total_s)
        counts.append(len(call.output))
    if min(counts) < tokens:
        raise RuntimeError(f"a call stopped after {min(counts)} of {tokens} tokens: the timing would not compare")
    return (max(ends) - max(firsts)) / (tokens - 1)


def history_messages(engine, n_tokens: int, seed: int) -> list[dict]:
    """A chat of about ``n_tokens`` tokens: alternating turns of filler text."""
    messages, i = [], 0
    while True:
        messages += [{"role": "user", "content": f"[{seed}] Question {i}: " + filler(60, seed + i)},
                     {"role": "assistant", "content": "Answer: " + filler(60, seed + 1000 + i)}]
        i += 1
        ids = engine.tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
        if len(ids) >= n_tokens:
            return messages


def intrinsic_latency(url: str, io_yaml: Path, messages: list[dict], fields: dict, repeats: int, guard) -> dict:
    """Seconds of an intrinsic request (granite-common's rewriter and result processor, the openai client)
    on a history the server has cached; the first request (which computes the history) is reported apart."""
    import openai
    from granite_common.intrinsics.input import IntrinsicsRewriter
    from granite_common.intrinsics.output import IntrinsicsResultProcessor

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    rewriter, processor = IntrinsicsRewriter(config_file=io_yaml), IntrinsicsResultProcessor(config_file=io_yaml)
    request = rewriter.transform({"messages": messages}, **fields)

    def once():
        t = now()
        response = client.chat.completions.create(**request.model_dump())
        result = processor.transform(response, request).choices[0].message.content
        return now() - t, response.usage.prompt_tokens, response.usage.prompt_tokens_details.cached_tokens, result

    cold = once()
    samples = [guard.run(once) for _ in range(repeats)]
    times = [s[0][0] for s in samples]
    return {"cold_s": cold[0], "prompt_tokens": cold[1], "seconds": times, "p50_s": statistics.median(times),
            "cached_tokens": samples[-1][0][2], "result": samples[-1][0][3],
            "other_cpu": [s[1] for s in samples]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="samples per cell (default 5)")
    p.add_argument("--tokens", type=int, default=48, help="tokens generated per call (default 48)")
    p.add_argument("--history-tokens", type=int, default=1500, help="history of the intrinsic call (default 1500)")
    p.add_argument("--intrinsic", help="demo intrinsic to call (default: the first shipped one with an io.yaml)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, 12 tokens, a short history")
    add_guard_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.tokens, args.history_tokens = 1, 12, 200
    setup_torch(args.threads, "cpu")
    import uvicorn

    import alora
    from alora.intrinsics import IO_FILE
    from alora.serve.openai_api import create_app

    guard = guard_from_args(args)
    engine = alora.Engine.from_pretrained(device="cpu", dtype="float32")
    engine.structured_outputs()
    decode_seconds_per_token(engine, 1, 4, True, 0)  # warm-up: grammar tables, first forward
    rows, cells = [], []
    for batch in (1, 8):
        free, constrained = [], []
        for r in range(args.repeats):
            for schema, out in ((False, free), (True, constrained)):
                t, info = guard.run(decode_seconds_per_token, engine, batch, args.tokens, schema, 100 * r)
                out.append(t)
        f, c = statistics.median(free), statistics.median(constrained)
        cells.append({"batch": batch, "free_s_per_step": free, "schema_s_per_step": constrained,
                      "overhead": c / f - 1})
        rows.append([batch, f"{1000 * f:.1f}", f"{1000 * c:.1f}", f"{100 * (c / f - 1):+.1f}%"])
    print_table("Decode step time with and without a JSON schema (median ms per step)",
                ["batch", "free", "json schema", "overhead"], rows)

    demos = {n: d for n, d in alora.demo_adapters().items() if (d / IO_FILE).is_file()}
    name = args.intrinsic or next(iter(demos), None)
    intrinsic = None
    if name is None:
        print("no shipped intrinsic has an io.yaml: skipping the server measurement")
    else:
        spec = engine.load_intrinsic(demos[name], name)
        fields = {k: "the documents" for k in _placeholders(spec.instruction or "") if k != "last_message"}
        app = create_app(engine, served_model_name="smol")
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        try:
            intrinsic = intrinsic_latency(url, demos[name] / IO_FILE, history_messages(engine, args.history_tokens, 7),
                                          fields, args.repeats, guard)
        finally:
            server.should_exit = True
            thread.join(30)
        intrinsic["intrinsic"] = name
        print_table(f"Intrinsic '{name}' through the server (granite-common client), history "
                    f"{intrinsic['prompt_tokens']} prompt tokens",
                    ["first call (history computed)", "p50 cached", "cached tokens", "result"],
                    [[f"{intrinsic['cold_s']:.3f} s", f"{intrinsic['p50_s']:.3f} s", intrinsic["cached_tokens"],
                      intrinsic["result"]]])
    guard.report()
    write_json(result_path("structured_outputs", "cpu", args.quick, "json"),
               {"machine": machine_info("cpu"), "versions": versions(), "args": vars(args),
                "decode": cells, "intrinsic": intrinsic, "guard": guard.summary()})
    engine.shutdown()
    return 0


def _placeholders(template: str) -> list[str]:
    import string

    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


if __name__ == "__main__":
    raise SystemExit(main())
