"""Build the distilled demo adapters' training data (title, summary, followup) from the default model itself.

These are the first demo adapters: they show the aLoRA mechanism, not a skill (their teacher is the 135M model
itself). The demo intrinsics with labels that come from how the data is built are made by
``make_intrinsics_data.py``.

1. Conversations: for each seed question below (written for this project, varied topics), the base model
   (SmolLM2-135M-Instruct, default system prompt) writes a short reply, sampled with a per-conversation seed.
2. Teacher targets: for each intrinsic, the base model's *greedy* answer when the same conversation is
   followed by a long, explicit instruction as a user turn (then cleaned: first line, no quotes, ...).
3. Student rows: ``{"messages": conversation, "invocation": "<|im_start|>NAME\\n", "target": teacher}``; the
   aLoRA sees only the short invocation, exactly what ``conv.invoke(NAME)`` appends after the history.

Intrinsics: ``title`` (3-8 word conversation title), ``summary`` (one sentence), ``followup`` (the next
question the user might ask). Output: ``benchmarks/data/{name}_{train,heldout}.jsonl``.

Reproduce the shipped data and adapters (times on the shared, heavily loaded 2-core CPU of the build)::

    .venv/bin/python benchmarks/make_distill_data.py             # ~9 min: 48 conversations x 3 intrinsics
    T="--top-layers 12 --epochs 8 --batch-size 6 --lr 2e-3 --save-dtype float16"
    for n in title summary followup; do   # ~1.5 min each (32 steps)
      .venv/bin/python -m alora.cli train benchmarks/data/${n}_train.jsonl alora/demo_adapters/${n} \\
          --val benchmarks/data/${n}_heldout.jsonl $T
    done
    .venv/bin/python -m alora.cli train benchmarks/data/title_train.jsonl alora/demo_adapters/title_lora \\
        --val benchmarks/data/title_heldout.jsonl $T --lora
    .venv/bin/python benchmarks/distill_quality.py               # the quality table

Validation during training uses the held-out file (reported only: no model selection). Scale up with
``--n`` (at most 80 seeds) and more ``--epochs`` on a faster machine.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

DATA_DIR = Path(__file__).resolve().parent / "data"

INSTRUCTIONS = {
    "title": ("Write a title for our conversation so far, like the one a chat app shows in its sidebar. "
              "The title must be 3 to 8 words long, name the main topic, and have no quotes and no final "
              "punctuation. Reply with the title only."),
    "summary": ("Summarize our conversation so far in exactly one sentence of at most 25 words: say what the "
                "user asked and what the assistant answered. Reply with that one sentence only."),
    "followup": ("Suggest the next question I, the user, might ask to continue our conversation. Write it as "
                 "the user would, in one short sentence ending with a question mark. Reply with the "
                 "question only."),
}
INVOCATIONS = {name: f"<|im_start|>{name}\n" for name in INSTRUCTIONS}
MAX_TOKENS = {"title": 12, "summary": 28, "followup": 18}

# Seed questions: a varied list of everyday, study, work and hobby topics, one opening message each.
SEEDS = [
    "How do volcanoes form?", "What is a good way to start learning the guitar?",
    "Can you explain how vaccines train the immune system?", "What should I pack for a weekend camping trip?",
    "How does compound interest work?", "Give me tips for a job interview at a software company.",
    "Why is the sky blue?", "How do I keep my basil plant alive indoors?",
    "What is the difference between weather and climate?", "How can I improve my sleep?",
    "What are black holes?", "How do I make a simple tomato pasta sauce?",
    "What caused the fall of the Roman Empire?", "How do electric cars work?",
    "What is machine learning in simple terms?", "How can I save money on groceries?",
    "What are the health benefits of walking every day?", "How do bees make honey?",
    "Explain photosynthesis to a ten year old.", "What is the best way to learn a new language?",
    "How do I write a good cover letter?", "Why do cats purr?",
    "What is inflation and why does it happen?", "How does the internet send data around the world?",
    "What are some tips for running my first marathon?", "How do I clean a cast iron pan?",
    "What is the theory of evolution?", "How can I be more productive when working from home?",
    "How do solar panels generate electricity?", "What are good habits for a healthy diet?",
    "How does a bill become a law?", "What is the water cycle?",
    "How do I train my puppy to sit?", "What is quantum computing?",
    "How do I prepare for a math exam?", "What are the main causes of climate change?",
    "How do airplanes stay in the air?", "What should I know before adopting a cat?",
    "How do I start a vegetable garden?", "What is the difference between a virus and bacteria?",
    "How can I reduce stress before a big presentation?", "What is blockchain?",
    "How do tides work?", "What are some fun things to do in Paris?",
    "How do I change a flat tire?", "What is meditation and how do I begin?",
    "How did the printing press change the world?", "What is a healthy breakfast idea?",
    "How do I budget my monthly income?", "Why do leaves change color in autumn?",
    "How does the heart pump blood?", "What are the rules of chess for beginners?",
    "How can I make my small apartment feel bigger?", "What is the greenhouse effect?",
    "How do I write a short story?", "What are the planets in our solar system?",
    "How can I stay motivated to exercise?", "What is recycling and why does it matter?",
    "How do earthquakes happen?", "What are some tips for taking better photos with a phone?",
    "How do I bake bread at home?", "What is the role of the United Nations?",
    "How do I learn to code in Python?", "What makes a good team leader?",
    "How do rainbows form?", "What are some ways to be kinder to the environment?",
    "How does memory work in the brain?", "What is a good stretching routine for the morning?",
    "How do I negotiate a higher salary?", "What are dinosaurs and when did they live?",
    "How do I care for a succulent?", "What is the stock market?",
    "How do I plan a birthday party for a child?", "What is the difference between a crocodile and an alligator?",
    "How can I improve my handwriting?", "How do noise cancelling headphones work?",
    "What should I do if I feel lonely?", "How do I choose a good book to read?",
    "What is the history of the Olympic Games?", "How do I make a cup of pour-over coffee?",
]


def clean(name: str, text: str) -> str:
    """The teacher's answer reduced to the intrinsic's format ('' when unusable)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    line = re.sub(r"^(title|summary|question|follow-?up( question)?)\s*:\s*", "", lines[0], flags=re.I)
    line = line.strip().strip('"\u201c\u201d*').strip()
    if line.endswith(":") or re.match(r"(here'?s|here is|sure|certainly|i'm|i am)\b", line, flags=re.I):
        return ""  # a preamble or a refusal, not an answer
    if name == "title":
        words = line.rstrip(".!?:;,").split()
        return " ".join(words) if 2 <= len(words) <= 10 else ""
    if name == "summary":
        m = re.match(r"(.+?[.!?])(\s|$)", line)
        return (m.group(1) if m else line).strip() if len(line.split()) >= 4 else ""
    if name == "followup":
        q = line.split("?")[0].strip() + "?" if "?" in line else ""
        return q if len(q.split()) >= 3 else ""
    raise ValueError(name)


def run_jobs(engine, make_jobs, batch: int, desc: str) -> list[str]:
    """Run job factories in batches of ``batch`` with one progress bar; return every job's text."""
    from tqdm import tqdm

    out: list[str] = []
    with tqdm(total=len(make_jobs), desc=desc, unit="conv") as bar:
        for i in range(0, len(make_jobs), batch):
            jobs = [f() for f in make_jobs[i:i + batch]]
            out.extend(engine.run_batch(jobs))
            bar.update(len(jobs))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=48, help=f"conversations, at most {len(SEEDS)} (default 48)")
    p.add_argument("--heldout", type=int, default=12, help="conversations held out for evaluation (default 12)")
    p.add_argument("--reply-tokens", type=int, default=20, help="assistant reply length limit (default 20)")
    p.add_argument("--intrinsics", default=",".join(INSTRUCTIONS), help="comma-separated names")
    p.add_argument("--batch", type=int, default=48, help="sequences per batched forward (default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DATA_DIR)
    p.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    import alora

    names = [n for n in args.intrinsics.split(",") if n]
    for n in names:
        if n not in INSTRUCTIONS:
            p.error(f"unknown intrinsic {n!r} (known: {', '.join(INSTRUCTIONS)})")
    seeds = list(SEEDS[:args.n])
    random.Random(args.seed).shuffle(seeds)
    engine = alora.Engine.from_pretrained(args.model)
    t0 = time.time()

    convs = [engine.conversation() for _ in seeds]
    replies = run_jobs(engine, [
        (lambda c=c, q=q, i=i: c.start_send(q, max_new_tokens=args.reply_tokens, temperature=0.7, top_p=0.9,
                                            seed=args.seed * 10_000 + i))
        for i, (c, q) in enumerate(zip(convs, seeds))], args.batch, "conversations")
    histories = [[m for m in c.messages] for c in convs]
    for h, r in zip(histories, replies):
        h[-1]["content"] = h[-1]["content"].strip() or r
    del convs

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conversations.jsonl").write_text("".join(json.dumps({"messages": h}, ensure_ascii=False) + "\n"
                                                          for h in histories))
    pairs = [(name, h) for name in names for h in histories]
    answers = run_jobs(engine, [
        (lambda name=name, h=h: engine.conversation(messages=h).start_send(
            INSTRUCTIONS[name], max_new_tokens=MAX_TOKENS[name], temperature=0.0))
        for name, h in pairs], args.batch, "teacher answers")
    for name in names:
        rows = [{"messages": h, "invocation": INVOCATIONS[name], "target": clean(name, a), "teacher_raw": a}
                for (n, h), a in zip(pairs, answers) if n == name]
        heldout, train = rows[:args.heldout], rows[args.heldout:]
        for split, part in (("train", train), ("heldout", heldout)):
            kept = [r for r in part if r["target"]]
            path = args.out / f"{name}_{split}.jsonl"
            with path.open("w") as f:
                for r in kept:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            print(f"{path}: {len(kept)} rows ({len(part) - len(kept)} dropped: unusable teacher answer)")
    print(f"done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
