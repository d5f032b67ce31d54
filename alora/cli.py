"""The ``alora`` command: a streaming terminal chat, adapter training, and the UI."""

from __future__ import annotations

import argparse
import sys


def _chat(args: argparse.Namespace) -> int:
    from alora import Engine

    engine = Engine.from_pretrained(args.model)
    for spec in args.adapter or []:
        name, _, path = spec.partition("=")
        if not path:
            print(f"--adapter expects NAME=PATH, got {spec!r}", file=sys.stderr)
            return 2
        info = engine.load_adapter(name, path)
        print(f"loaded {info.kind} {name!r} (rank {info.rank}) from {path}")
    conv = engine.conversation(system=args.system)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    names = ", ".join(engine.adapters) or "none loaded"
    print(f"Chatting with {engine.model_path.name}. Type a message; '/invoke NAME' runs an adapter "
          f"({names}); '/stats' shows the last call's cost; '/quit' or Ctrl-D ends.")
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/stats":
            print(conv.stats)
            continue
        try:
            if line.startswith("/invoke "):
                name = line.split(None, 1)[1]
                stream, label = conv.invoke(name, **sampling), f"[{name}]"
            else:
                stream, label = conv.send(line, **sampling), "assistant"
            print(f"{label}> ", end="", flush=True)
            for delta in stream:
                print(delta, end="", flush=True)
            print()
        except KeyboardInterrupt:
            print("\n(stopped)")
        except (KeyError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alora",
        description="Chat with a language model whose skills are switched mid-conversation by Activated LoRA "
                    "adapters, reusing the conversation's KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="streaming chat in the terminal",
                          description="Streaming terminal chat. Without --model, the embedded SmolLM2-135M-Instruct "
                                      "(converted once into ~/.cache/alora or $ALORA_CACHE).")
    chat.add_argument("--model", help="Hugging Face model folder (config.json, *.safetensors, tokenizer)")
    chat.add_argument("--adapter", action="append", metavar="NAME=PATH",
                      help="load a PEFT adapter folder under NAME (repeatable)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default 256)")
    chat.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling threshold (default 0.9)")
    chat.set_defaults(func=_chat)

    from alora import train

    train.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError, KeyError) as e:  # bad paths, adapters, configs: no traceback
        print(f"alora: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
