"""Held-out quality of the demo intrinsics (answerability, hallucination, query_rewrite) against their labels.

The held-out rows (``benchmarks/data/{name}_heldout.jsonl``, from ``make_intrinsics_data.py``; entities never seen
in training) are run as an intrinsic call: the chat, the io.yaml instruction as the last user message, the
generation prompt. Systems:

- ``base + instruction``: the base model on that same prompt (the instruction names the answers it may give);
- ``aLoRA``: the shipped aLoRA ``name`` (activated by its invocation inside the instruction's turn);
- ``LoRA twin``: ``{name}_lora``, a standard LoRA trained on the same rows with the same recipe;
- for ``query_rewrite`` also ``last question as is`` (no rewrite at all), the floor any rewriter must beat.

Each system runs twice for the classifiers:

- ``first-token``: the likelihood from the logits after the JSON string's opening quote (what the schema forces
  first): the probabilities of the categories' first tokens, renormalized over the categories and weighted by
  their io.yaml values (the base model's likelihood of the same categories, from its logits);
- ``pipeline``: the call a client makes: the adapters through ``conv.run_intrinsic`` (grammar-constrained
  greedy decoding, top-10 logprobs, the io.yaml's likelihood and nest rules as granite-common applies them), the
  base model through the same decoding and rules on its own logprobs.

Reported: accuracy (likelihood on the label's side of 0.5), Brier score, expected calibration error (10
equal-width bins), AUROC, and accuracy per construction case. ``query_rewrite``: greedy decoding under the
schema (``run_intrinsic`` for the adapters), exact match (case, spaces and final punctuation ignored) and ROUGE-L
F1 over words, per case too; an output that is not the schema's JSON counts as an empty rewrite.

Writes ``benchmarks/results/intrinsics_quality.json`` and ``.md`` and prints the table.

    .venv/bin/python benchmarks/intrinsics_quality.py [--n 200] [--adapters DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from distill_quality import rouge_l  # noqa: E402
from make_intrinsics_data import DATA_DIR, INTRINSICS  # noqa: E402

RESULTS = HERE / "results"


def normalize(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(" ?.!")


def first_tokens(tokenizer, categories: dict) -> dict[str, int]:
    """The token each category's JSON string starts with, after its opening quote (they must differ)."""
    quote = tokenizer('"', add_special_tokens=False)["input_ids"]
    out = {}
    for c in categories:
        ids = tokenizer(json.dumps(c), add_special_tokens=False)["input_ids"]
        if ids[:len(quote)] != quote:
            raise SystemExit(f"category {c!r} does not tokenize with a separate opening quote: {ids}")
        out[c] = ids[len(quote)]
    if len(set(out.values())) != len(out):
        raise SystemExit(f"categories share a first token: {out}")
    return out


def likelihoods(engine, prompts: list[list[int]], adapter: str | None, cat_ids: dict[str, int],
                values: dict[str, float], quote: list[int], batch: int) -> list[float]:
    """The likelihood each prompt gives (categories' probabilities renormalized, weighted by their values),
    read from the logits after the opening quote; the calls run batched by the engine's scheduler."""
    from alora import SamplingParams

    ids = torch.tensor(list(cat_ids.values()))
    vals = torch.tensor([values[c] for c in cat_ids])
    out: list[float] = []
    for i in range(0, len(prompts), batch):
        seen: list[torch.Tensor | None] = []
        calls = []
        for p in prompts[i:i + batch]:
            seen.append(None)

            def capture(generated, logits, slot=len(seen) - 1):
                seen[slot] = logits.float()[ids]
                return logits

            calls.append(engine.submit(p + quote, adapter=adapter,
                                       params=SamplingParams(max_new_tokens=1, logits_processors=(capture,))))
        engine.run_batch(calls)
        out.extend(float((torch.softmax(s, -1) * vals).sum()) for s in seen)
    return out


def pipeline(engine, spec, rows: list[dict], prompts: list[list[int]], adapter: str | None, batch: int
             ) -> list:
    """Results of the intrinsic call for each row: ``conv.start_intrinsic`` with an adapter; for the base model
    the same prompt, decoding (schema, greedy, top logprobs) and rules. ``None`` where the output does not parse."""
    from alora import SamplingParams
    from alora.intrinsics import TOP_LOGPROBS, IntrinsicError

    params = SamplingParams(spec.max_new_tokens, json_schema=spec.response_format,
                            logprobs=TOP_LOGPROBS if spec.needs_logprobs else None)
    out: list = []
    for i in range(0, len(rows), batch):
        if adapter is None:
            calls = [engine.submit(p, None, params) for p in prompts[i:i + batch]]
        else:
            calls = [engine.conversation(messages=r["messages"]).start_intrinsic(adapter) for r in rows[i:i + batch]]
        for call in calls:
            try:
                out.append(spec.result(call, engine.token_text))
            except IntrinsicError:
                out.append(None)
    return out


def classifier_metrics(probs: list[float], labels: list[float], cases: list[str]) -> dict:
    """Accuracy, Brier, ECE (10 bins), AUROC and per-case accuracy of likelihoods against 0/1 labels."""
    n = len(probs)
    hits = [(p >= 0.5) == (y >= 0.5) for p, y in zip(probs, labels)]
    bins: dict[int, list[tuple[float, float]]] = {}
    for p, y in zip(probs, labels):
        bins.setdefault(min(int(p * 10), 9), []).append((p, y))
    ece = sum(len(b) / n * abs(sum(p for p, _ in b) / len(b) - sum(y for _, y in b) / len(b))
              for b in bins.values())
    pos = [p for p, y in zip(probs, labels) if y >= 0.5]
    neg = [p for p, y in zip(probs, labels) if y < 0.5]
    auroc = (sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))
             if pos and neg else None)
    by_case: dict[str, list[bool]] = {}
    for h, c in zip(hits, cases):
        by_case.setdefault(c, []).append(h)
    return {"n": n, "accuracy": sum(hits) / n, "brier": sum((p - y) ** 2 for p, y in zip(probs, labels)) / n,
            "ece": ece, "auroc": auroc, "mean_likelihood": sum(probs) / n,
            "by_case": {c: {"n": len(v), "accuracy": sum(v) / len(v)} for c, v in sorted(by_case.items())}}


def rewrite_metrics(preds: list[str], refs: list[str], cases: list[str]) -> dict:
    em = [float(normalize(p) == normalize(r)) for p, r in zip(preds, refs)]
    rl = [rouge_l(p, r) for p, r in zip(preds, refs)]
    by_case: dict[str, list[int]] = {}
    for i, c in enumerate(cases):
        by_case.setdefault(c, []).append(i)
    return {"n": len(preds), "exact_match": sum(em) / len(em), "rouge_l": sum(rl) / len(rl),
            "by_case": {c: {"n": len(ix), "exact_match": sum(em[i] for i in ix) / len(ix),
                            "rouge_l": sum(rl[i] for i in ix) / len(ix)} for c, ix in sorted(by_case.items())}}


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(results: dict) -> str:
    lines = ["| intrinsic | held-out n | system | accuracy | Brier | ECE | AUROC | pipeline: accuracy | Brier | "
             "ECE | unparsed |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, per in results.items():
        for label, r in per.items():
            if "first_token" in r:
                f, q = r["first_token"], r["pipeline"]
                lines.append(f"| {name} | {f['n']} | {label} | {_f(f['accuracy'])} | {_f(f['brier'])} | "
                             f"{_f(f['ece'])} | {_f(f['auroc'])} | {_f(q['accuracy'])} | {_f(q['brier'])} | "
                             f"{_f(q['ece'])} | {q['unparsed']} |")
    rw = ["", "| intrinsic | held-out n | system | exact match | ROUGE-L F1 | unparsed |", "|---|---:|---|---:|---:|---:|"]
    for name, per in results.items():
        for label, r in per.items():
            if "exact_match" in r:
                rw.append(f"| {name} | {r['n']} | {label} | {r['exact_match']:.3f} | {r['rouge_l']:.3f} | "
                          f"{r.get('unparsed', 0)} |")
    cases = ["", "Per construction case (first-token accuracy, or exact match for query_rewrite):", "",
             "| intrinsic | case | n | base + instruction | aLoRA | LoRA twin |", "|---|---|---:|---:|---:|---:|"]
    for name, per in results.items():
        base = per.get("base + instruction", {})
        for case, c in base.get("first_token", base).get("by_case", {}).items():
            cells = []
            for s in ("base + instruction", "aLoRA", "LoRA twin"):
                r = per.get(s)
                r = r.get("first_token", r) if r else None
                cells.append("-" if r is None else f"{r['by_case'][case].get('accuracy', r['by_case'][case].get('exact_match')):.2f}")
            cases.append(f"| {name} | {case} | {c['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + rw + cases)


def _spec_folder(data: Path, name: str) -> Path:
    """A folder holding the data's io.yaml for ``name`` (for the base model's run when no adapter is shipped)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f"{name}-io-"))
    (folder / "io.yaml").write_text((data / f"{name}_io.yaml").read_text())
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DATA_DIR)
    p.add_argument("--adapters", type=Path, help="folder of adapter folders (default: the shipped demo adapters)")
    p.add_argument("--intrinsics", default=",".join(INTRINSICS), help="comma-separated names")
    p.add_argument("--n", type=int, help="held-out rows per intrinsic (default: all)")
    p.add_argument("--batch", type=int, default=16, help="calls submitted together (default 16)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import alora
    from alora.demo import demo_adapters
    from alora.intrinsics import Intrinsic
    from alora.train import Example, prompt_ids

    folders = ({d.name: d for d in sorted(args.adapters.iterdir()) if (d / "adapter_config.json").is_file()}
               if args.adapters else demo_adapters())
    engine = alora.Engine.from_pretrained()
    tok = engine.tokenizer
    quote = tok('"', add_special_tokens=False)["input_ids"]
    t0 = time.time()
    results: dict[str, dict] = {}
    examples: dict[str, list] = {}
    seconds: dict[str, float] = {}
    for name in [n for n in args.intrinsics.split(",") if n]:
        path = args.data / f"{name}_heldout.jsonl"
        if not path.is_file():
            print(f"skipping {name}: no {path}")
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:args.n]
        systems = {"base + instruction": None}
        for label, adapter in (("aLoRA", name), ("LoRA twin", f"{name}_lora")):
            if adapter in folders:
                engine.load_adapter(adapter, folders[adapter])
                systems[label] = adapter
        prompts = [prompt_ids(tok, Example(r["messages"], r.get("invocation"), r["target"], r["instruction"]))
                   for r in rows]  # what alora train trained on: the chat, the instruction, the generation prompt
        cases = [r["case"] for r in rows]
        spec = INTRINSICS[name]
        per: dict[str, dict] = {}
        t1 = time.time()
        io = Intrinsic.from_folder(folders[name] if name in folders else _spec_folder(args.data, name), name)
        if spec["categories"]:
            cat_ids = first_tokens(tok, spec["categories"])
            labels = [spec["categories"][r["label"]] for r in rows]
            for label, adapter in systems.items():
                probs = likelihoods(engine, prompts, adapter, cat_ids, spec["categories"], quote, args.batch)
                got = pipeline(engine, io, rows, prompts, adapter, args.batch)
                piped = [None if g is None else g[spec["field"]] for g in got]
                ok = [i for i, g in enumerate(piped) if g is not None]
                per[label] = {"first_token": classifier_metrics(probs, labels, cases),
                              "pipeline": {**classifier_metrics([piped[i] for i in ok], [labels[i] for i in ok],
                                                                [cases[i] for i in ok]),
                                           "unparsed": len(rows) - len(ok)}}
                examples.setdefault(name, []).extend(
                    {"system": label, "row": i, "case": cases[i], "label": rows[i]["label"],
                     "first_token": round(probs[i], 4), "pipeline": piped[i]} for i in range(min(3, len(rows))))
                print(f"{name} / {label}: accuracy {per[label]['first_token']['accuracy']:.3f} (pipeline "
                      f"{per[label]['pipeline']['accuracy']:.3f}), Brier {per[label]['first_token']['brier']:.3f}")
        else:
            refs = [r["label"] for r in rows]
            per["last question as is"] = rewrite_metrics([r["messages"][-1]["content"] for r in rows], refs, cases)
            for label, adapter in systems.items():
                got = pipeline(engine, io, rows, prompts, adapter, args.batch)
                preds = [g.get("rewritten_question", "") if isinstance(g, dict) else "" for g in got]
                per[label] = {**rewrite_metrics(preds, refs, cases), "unparsed": sum(g is None for g in got)}
                examples.setdefault(name, []).extend(
                    {"system": label, "row": i, "case": cases[i], "reference": refs[i], "output": preds[i]}
                    for i in range(min(3, len(rows))))
                print(f"{name} / {label}: exact match {per[label]['exact_match']:.3f}")
        seconds[name] = round(time.time() - t1, 1)
        for adapter in systems.values():
            if adapter is not None:
                engine.unload_adapter(adapter)
        results[name] = per

    md = table(results)
    note = ("Held-out rows (entities never seen in training) from `benchmarks/make_intrinsics_data.py`, labels "
            "known by construction; SmolLM2-135M-Instruct, float32, CPU. Every system sees the same prompt: the "
            "chat, the io.yaml instruction as the last user message, the generation prompt. Classifier "
            "likelihoods come from the probabilities of the categories' first tokens after the JSON string's "
            "opening quote, renormalized over the categories (`accuracy`...`AUROC`); `pipeline`: the call as a "
            "client makes it (`conv.run_intrinsic` for the adapters: grammar-constrained greedy decoding, top-10 "
            "logprobs, the io.yaml's likelihood rule; the base model through the same decoding and rule). "
            "Accuracy thresholds the likelihood at 0.5; ECE over 10 bins. query_rewrite: greedy decoding under the "
            "schema, exact match ignoring case and final punctuation.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "intrinsics_quality.json").write_text(json.dumps(
        {"results": results, "examples": examples, "adapters": {n: f.name for n, f in folders.items()},
         "seconds": seconds, "total_seconds": round(time.time() - t0, 1), "note": note}, indent=1) + "\n")
    (args.out / "intrinsics_quality.md").write_text(f"# Demo intrinsics: held-out quality\n\n{note}\n\n{md}\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
