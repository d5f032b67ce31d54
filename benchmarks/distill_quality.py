"""Quality of the distilled demo adapters (title, summary, followup) on the held-out split: agreement with the teacher (context distillation).

For every intrinsic with ``benchmarks/data/{name}_heldout.jsonl`` it compares, against the teacher's
target (the base model's greedy answer to a long explicit instruction):

- ``base + invocation``: the base model given only the short invocation (what the aLoRA sees, no adapter);
- ``aLoRA``: the shipped aLoRA ``name`` via ``conv.invoke`` (history cache reused);
- ``LoRA``: the shipped standard LoRA ``{name}_lora`` when there is one (same data and recipe).

Metrics: exact match (case, spaces and edge punctuation ignored) and ROUGE-L F1 over words, greedy decoding.
Writes ``benchmarks/results/distill_quality.json`` and ``.md`` and prints the table.

    .venv/bin/python benchmarks/distill_quality.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_distill_data import DATA_DIR, MAX_TOKENS  # noqa: E402

RESULTS = HERE / "results"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def exact(a: str, b: str) -> float:
    return float(words(a) == words(b))


def rouge_l(pred: str, ref: str) -> float:
    p, r = words(pred), words(ref)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for x in p:
        cur = [0]
        for j, y in enumerate(r):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def run(engine, items, batch: int, desc: str) -> list[str]:
    """items: ('base', messages, invocation, n): the base model on history + invocation; or
    ('adapter', messages, name, n): ``conv.invoke(name)``. Runs ``batch`` at a time; returns the texts."""
    from tqdm import tqdm

    from alora import SamplingParams

    out = []
    with tqdm(total=len(items), desc=desc, unit="gen") as bar:
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            calls = []
            for kind, messages, what, n in chunk:
                conv = engine.conversation(messages=messages)
                if kind == "base":
                    prompt = conv.history_ids + engine.tokenizer(what, add_special_tokens=False)["input_ids"]
                    calls.append(engine.submit(prompt, params=SamplingParams(max_new_tokens=n)))
                else:
                    calls.append(conv.start_invoke(what, max_new_tokens=n, temperature=0.0))
            out.extend(t.strip() for t in engine.run_batch(calls))
            bar.update(len(chunk))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA_DIR)
    p.add_argument("--adapters", type=Path, help="folder of adapter folders (default: the shipped demo adapters)")
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    import alora
    from alora.demo import demo_adapters

    folders = ({d.name: d for d in sorted(args.adapters.iterdir()) if (d / "adapter_config.json").is_file()}
               if args.adapters else demo_adapters())
    engine = alora.Engine.from_pretrained()
    for name, folder in folders.items():
        engine.load_adapter(name, folder)

    items, keys, refs = [], [], []
    for name in MAX_TOKENS:
        path = args.data / f"{name}_heldout.jsonl"
        if not path.is_file() or name not in folders:
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        systems = [("base + invocation", "base", None), ("aLoRA", "adapter", name)]
        if f"{name}_lora" in folders:
            systems.append(("LoRA", "adapter", f"{name}_lora"))
        for label, kind, adapter in systems:
            for i, row in enumerate(rows):
                items.append((kind, row["messages"], row["invocation"] if kind == "base" else adapter,
                              MAX_TOKENS[name]))
                keys.append((name, label, i))
                refs.append(row["target"])
    t0 = time.time()
    preds = run(engine, items, args.batch, "held-out generations")

    results: dict[str, dict] = {}
    examples: dict[str, list] = {}
    for (name, label, i), pred, ref in zip(keys, preds, refs):
        r = results.setdefault(name, {}).setdefault(label, {"n": 0, "exact_match": 0.0, "rouge_l": 0.0})
        r["n"] += 1
        r["exact_match"] += exact(pred, ref)
        r["rouge_l"] += rouge_l(pred, ref)
        if i < 2:
            examples.setdefault(name, []).append({"system": label, "example": i, "target": ref, "output": pred})
    for per in results.values():
        for r in per.values():
            r["exact_match"] /= r["n"]
            r["rouge_l"] /= r["n"]

    lines = ["| intrinsic | held-out n | system | exact match | ROUGE-L F1 |", "|---|---:|---|---:|---:|"]
    for name, per in results.items():
        for label, r in per.items():
            lines.append(f"| {name} | {r['n']} | {label} | {r['exact_match']:.2f} | {r['rouge_l']:.2f} |")
    table = "\n".join(lines)
    note = ("Agreement with the teacher (the base model's greedy answer to a long explicit instruction) on the "
            "held-out conversations; greedy decoding; SmolLM2-135M-Instruct. `base + invocation`: the base model "
            "given only the short invocation. aLoRA and LoRA: the shipped demo adapters (`alora.demo_adapters()`), "
            "trained on the same data with the same recipe.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distill_quality.json").write_text(json.dumps(
        {"results": results, "examples": examples, "adapters": {n: str(f.name) for n, f in folders.items()},
         "seconds": round(time.time() - t0, 1)}, indent=1) + "\n")
    (args.out / "distill_quality.md").write_text(f"# Distilled demo adapters: held-out quality\n\n{note}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
