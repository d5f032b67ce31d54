"""The UI's command line, shared by ``python -m app`` (``make demo``) and ``alora ui``.

    alora ui [--model PATH] [--dtype DTYPE] [--quantize int8] [--adapters DIR ...] [--host 127.0.0.1] [--port 7860]

Each ``--adapters DIR`` is an adapter folder or a directory of adapter folders: all of them are loaded at
start (a bad one is reported and skipped), and the UI may load more folders from under these directories
only. Without ``--model`` the embedded default model is used, with the demo adapters when they ship.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DESCRIPTION = "alora chat UI (Gradio): switch adapters mid-conversation; aLoRAs reuse the conversation's KV cache."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The UI's options, on ``p``: ``python -m app`` and ``alora ui`` share them."""
    from alora.cli import add_precision_arguments

    p.add_argument("--model", help="Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    add_precision_arguments(p)
    p.add_argument("--adapters", nargs="+", action="extend", default=[], metavar="DIR",
                   help="adapter folders, or directories of them, to load at start; the UI may load other "
                        "folders from under these directories only")
    p.add_argument("--no-demo", action="store_true",
                   help="do not load the demo adapters (loaded by default with the default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", default=False,
                   help="also open a public gradio.live link (off by default)")
    p.add_argument("--system", help="initial system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="initial temperature (default 0.7)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="initial reply length limit (default 256)")
    p.add_argument("--overflow", choices=("drop_oldest", "error"), default="drop_oldest",
                   help="when a chat outgrows the model's context: drop its oldest exchanges (default; the stats "
                        "say how many) or refuse the message with an error")
    p.add_argument("--concurrency", type=int, default=4,
                   help="generations that may stream at once across sessions (default 4)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m app`` (``python -m alora_app`` when installed)."""
    p = argparse.ArgumentParser(prog=f"python -m {__package__}", description=DESCRIPTION)
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m app``: parse ``argv`` and serve the UI."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Load the model and adapters ``args`` name, then serve the UI until interrupted; 2 on a bad option."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for d in args.adapters:
        if not Path(d).is_dir():
            print(f"error: --adapters {d}: no such directory", file=sys.stderr)
            return 2

    import alora

    from .session import ENGINE_ERRORS, AdapterFolders
    from .ui import ChatUI, launch

    engine = alora.Engine.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize)
    roots = list(args.adapters)
    wanted: list[tuple[str, Path]] = []
    if args.model is None and not args.no_demo:
        demos = alora.demo_adapters()
        wanted += list(demos.items())
        roots += sorted({str(f.parent) for f in demos.values()})
    folders = AdapterFolders(roots)
    wanted += AdapterFolders(args.adapters).discover()
    for name, folder in wanted:
        try:
            info = engine.load_adapter(name, folder)
            print(f"loaded {info.kind} {name!r} (rank {info.rank}) from {folder}")
        except ENGINE_ERRORS as e:
            print(f"warning: skipped adapter {name!r}: {e}", file=sys.stderr)

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: anyone who can reach this address can use the UI",
              file=sys.stderr)
    ui = ChatUI(engine, folders, system=args.system, temperature=args.temperature,
                max_new_tokens=args.max_new_tokens, concurrency=args.concurrency, overflow=args.overflow)
    launch(ui, host=args.host, port=args.port, share=args.share)
    return 0

