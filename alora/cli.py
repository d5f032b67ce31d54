"""The ``alora`` command: a streaming terminal chat, adapter training, and the UI."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Iterator

from alora.errors import AloraError, ContextOverflowError

SLASH_COMMANDS = """\
commands inside the chat (anything else is sent to the model as your message):
  /invoke NAME      run adapter NAME on the conversation now and show its output; the history is unchanged
  /keep NAME        run adapter NAME and keep its output in the history (the next message sees it)
  /send NAME TEXT   send TEXT with adapter NAME (an aLoRA is invoked after it, a LoRA recomputes the history)
  /clear            forget the conversation (the system prompt stays)
  /stats            what the last call cost: tokens reused, prefilled, recomputed, time to first token, ...
  /help             this list
  /quit, /exit      end the chat (so does Ctrl-D); Ctrl-C stops a reply while it streams"""

USAGE = {"/invoke": "/invoke NAME", "/keep": "/keep NAME", "/send": "/send NAME TEXT"}
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE_MODES = ("int8",)  # alora.models.QUANTIZE_MODES, without importing torch to build the parser


def add_precision_arguments(p: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--quantize``, the same for ``alora chat``, ``alora ui`` and ``alora serve``."""
    p.add_argument("--dtype", choices=DTYPES, help="weights and activations (default: bfloat16 on CUDA, "
                                                   "float32 on CPU)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="int8: weight-only int8, CPU only (the engine then runs on CPU). The decoder's projection "
                        "weights are stored as int8 with one float32 scale per output row, a quarter of float32's "
                        "bytes, for faster decode; embeddings, LM head, activations and adapters keep --dtype "
                        "(default: no quantization)")


def _chat(args: argparse.Namespace) -> int:
    from alora import Engine

    engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    for spec in args.adapter or []:
        name, _, path = spec.partition("=")
        if not path:
            print(f"--adapter expects NAME=PATH, got {spec!r}", file=sys.stderr)
            return 2
        info = engine.load_adapter(name, path)
        print(f"loaded {info.kind} {name!r} (rank {info.rank}) from {path}")
    conv = engine.conversation(system=args.system, overflow=args.overflow)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    seed=args.seed)
    names = ", ".join(engine.adapters) or "none loaded"
    print(f"Chatting with {engine.model_path.name} (adapters: {names}). Type a message; /help lists the "
          "commands; /quit or Ctrl-D ends.")
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/quit", "/exit"):
            return 0
        stream = None
        try:
            call = chat_call(conv, line, sampling) if line else None
            if call is not None:
                label, stream = call
                print(f"{label}> ", end="", flush=True)
                for delta in stream:
                    print(delta, end="", flush=True)
                print()
                stats = conv.stats
                if stats.finish_reason == "length":
                    print(f"(cut at {stats.decode_tokens} tokens: --max-new-tokens)")
                if stats.dropped_turns:
                    print(f"(the context was full: the {stats.dropped_turns} oldest exchange(s) were dropped)")
        except KeyboardInterrupt:  # the conversation keeps what a send generated; an invoke leaves no trace
            if stream is not None:
                stream.close()
            print("\n(stopped by Ctrl-C)")
        except (AloraError, ValueError) as e:  # unknown adapter, context overflow, ...: the chat goes on
            print(f"\nerror: {e}" if stream is not None else f"error: {e}", file=sys.stderr)
            if isinstance(e, ContextOverflowError) and conv.overflow == "error":
                print("(/clear starts over; or restart with --overflow drop_oldest to drop the oldest exchanges "
                      "automatically)", file=sys.stderr)


def chat_call(conv, line: str, sampling: dict) -> tuple[str, Iterator[str]] | None:
    """The model call a chat line asks for, as (label, stream of text deltas); None for a command that does
    its work here (help, stats, clear, or a usage message for a malformed command)."""
    if not line.startswith("/"):
        return "assistant", conv.send(line, **sampling)
    command, _, arg = line.partition(" ")
    arg = arg.strip()
    if command in ("/invoke", "/keep") and arg:
        return f"[{arg}]", conv.invoke(arg, keep=command == "/keep", **sampling)
    if command == "/send" and len(arg.split(None, 1)) == 2:
        name, text = arg.split(None, 1)
        return f"assistant [{name}]", conv.send(text, adapter=name, **sampling)
    if command == "/help":
        print(SLASH_COMMANDS)
    elif command == "/stats":
        print(format_stats(conv.stats))
    elif command == "/clear":
        conv.clear()
        print("(conversation cleared)")
    elif command in USAGE:
        print(f"usage: {USAGE[command]}", file=sys.stderr)
    else:
        print(f"unknown command {command}; /help lists the commands", file=sys.stderr)
    return None


def format_stats(stats) -> str:
    """A call's ``CallStats`` under a title line, one ``name: value`` line per field (floats to 3 decimals)."""
    if stats is None:
        return "no call yet"
    names = [f.name for f in dataclasses.fields(stats)]
    width = max(map(len, names)) + 1
    lines = ["the last call:"]
    for name in names:
        value = getattr(stats, name)
        shown = f"{value:.3f}" if isinstance(value, float) else "-" if value is None else value
        lines.append(f"  {name + ':':<{width}} {shown}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alora",
        description="Chat with a language model whose skills are switched mid-conversation by Activated LoRA "
                    "adapters, reusing the conversation's KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="streaming chat in the terminal",
                          description="Streaming terminal chat. Without --model, the embedded SmolLM2-135M-Instruct "
                                      "(converted once into ~/.cache/alora or $ALORA_CACHE).",
                          epilog=SLASH_COMMANDS, formatter_class=argparse.RawDescriptionHelpFormatter)
    chat.add_argument("--model", help="Hugging Face model folder (config.json, *.safetensors, tokenizer)")
    chat.add_argument("--adapter", action="append", metavar="NAME=PATH",
                      help="load a PEFT adapter folder under NAME (repeatable)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    add_precision_arguments(chat)
    chat.add_argument("--seed", type=int, help="sampling seed of every reply, for reproducible output")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default 256)")
    chat.add_argument("--overflow", choices=("error", "drop_oldest"), default="error",
                      help="when the history outgrows the context: report it (default) or drop the oldest "
                           "exchanges after the system prompt")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default 0.9)")
    chat.set_defaults(func=_chat)

    from alora_app import cli as ui_cli

    ui = sub.add_parser("ui", help="serve the chat UI (Gradio) on 127.0.0.1", description=ui_cli.DESCRIPTION)
    ui_cli.add_arguments(ui)
    ui.set_defaults(func=ui_cli.run)

    from alora import train

    train.add_parser(sub)
    from alora.serve import cli as serve_cli
    serve_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``alora`` command: run the subcommand ``argv`` names; errors the user can fix print one line."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (AloraError, OSError, ValueError) as e:  # bad paths, adapters, configs: no traceback
        print(f"alora: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
