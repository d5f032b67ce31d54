"""``alora serve``: the OpenAI-compatible server (``openai_api``) on uvicorn, and optionally the chat UI at /ui.

    alora serve [--model PATH] [--dtype DTYPE] [--quantize int8] [--adapter NAME=PATH ...] [--host 127.0.0.1]
                [--port 8000] [--served-model-name NAME] [--kv-cache-gb X] [--max-queue N] [--api-key KEY]
                [--allow-runtime-adapters --adapter-dir DIR] [--ui]
                [--ray --replicas N [--max-replicas M] [--replica-cpus C] [--replica-gpus G]]

``--ray`` runs the same API as a Ray Serve application on a local Ray instance (``alora.serve.ray_app``).

Heavy imports (torch, FastAPI, uvicorn, gradio) happen when the command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from alora.cli import add_precision_arguments


def add_parser(subparsers) -> None:
    """Register the ``serve`` subcommand on ``alora``'s subparsers."""
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (chat and text completions; adapters chosen by 'model')",
        description="Serve the model over an OpenAI-compatible API: POST /v1/chat/completions and /v1/completions "
                    "(stream or not), GET /v1/models, /health, /metrics. Requests pick an adapter with "
                    "\"model\": \"<adapter name>\", the base model with its served name.")
    p.add_argument("--model", help="Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)")
    add_precision_arguments(p)
    p.add_argument("--adapter", action="append", metavar="NAME=PATH",
                   help="load a PEFT adapter folder under NAME (repeatable; default: the demo adapters that fit)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", help="the base model's name in the API (default: its folder's name)")
    p.add_argument("--kv-cache-gb", type=float, help="KV-cache budget in GB (default: sized for the machine)")
    p.add_argument("--max-queue", type=int, help="waiting requests before new ones get HTTP 429 (default: no limit)")
    p.add_argument("--api-key", default=os.environ.get("ALORA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $ALORA_API_KEY)")
    p.add_argument("--allow-runtime-adapters", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --adapter-dir)")
    p.add_argument("--adapter-dir", type=Path, help="the only directory runtime adapters may be loaded from")
    p.add_argument("--ui", action="store_true", help="also serve the Gradio chat UI at /ui, sharing the engine")
    group = p.add_argument_group(
        "Ray Serve (needs the 'ray' extra)",
        "--ray serves the same API from N engine replicas on a local Ray instance; a conversation stays on the "
        "replica holding its KV: by its x-session-id header, else by its prompt's prefix (alora.serve.ray_app)")
    group.add_argument("--ray", action="store_true", help="serve as a Ray Serve application")
    group.add_argument("--replicas", type=int, default=1, help="engine replicas (default 1)")
    group.add_argument("--max-replicas", type=int,
                     help="let Ray Serve's autoscaling add replicas up to this many (default: a fixed --replicas)")
    group.add_argument("--replica-cpus", type=float,
                     help="CPUs each replica reserves, fractions allowed (default: this machine's CPUs / replicas)")
    group.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs each replica reserves (default 0)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    problems = [f"--adapter expects NAME=PATH, got {s!r}" for s in args.adapter or [] if "=" not in s]
    if args.allow_runtime_adapters and not args.adapter_dir:
        problems.append("--allow-runtime-adapters needs --adapter-dir DIR")
    if args.adapter_dir and not args.adapter_dir.is_dir():
        problems.append(f"--adapter-dir {args.adapter_dir}: no such directory")
    if args.ui and args.api_key:
        problems.append("--ui cannot be combined with --api-key: a browser cannot send the key")
    if args.ray:
        if args.ui or args.allow_runtime_adapters:
            problems.append("--ray serves neither --ui nor --allow-runtime-adapters: each would change one replica "
                            "only; load adapters with --adapter")
        if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
            problems.append("--replicas must be >= 1, and --max-replicas >= --replicas")
        if args.replica_cpus is not None and args.replica_cpus <= 0:
            problems.append("--replica-cpus must be > 0")
    elif args.max_replicas is not None or args.replica_cpus is not None or args.replicas != 1 or args.replica_gpus:
        problems.append("--replicas, --max-replicas, --replica-cpus and --replica-gpus need --ray")
    for problem in problems:
        print(f"alora serve: error: {problem}", file=sys.stderr)
    if problems:
        return 2
    if args.ray:
        return _main_ray(args)

    import uvicorn

    import alora
    from alora.serve.openai_api import create_app

    engine = alora.Engine.from_pretrained(args.model, dtype=args.dtype, quantize=args.quantize,
                                          kv_cache_gb=args.kv_cache_gb, max_queue=args.max_queue)
    try:
        load_adapters(engine, args.adapter)
        app = create_app(engine, served_model_name=args.served_model_name, api_key=args.api_key,
                         allow_runtime_adapters=args.allow_runtime_adapters, adapter_dir=args.adapter_dir)
        if args.ui:
            _mount_ui(app, engine, args.adapter_dir)
        _warn_if_exposed(args)
        config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=10)
        signal.signal(signal.SIGTERM, _interrupt)  # uvicorn handles it, then re-raises it here: exit 0, as on Ctrl-C
        _server_class()(config, engine, args.served_model_name or engine.model_path.name, args.ui).run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT (or SIGTERM) it handled, after its graceful shutdown
        pass
    finally:
        engine.shutdown()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _main_ray(args: argparse.Namespace) -> int:
    from alora.serve import ray_app

    spec = ray_app.ReplicaSpec(model=args.model, adapters=tuple(args.adapter) if args.adapter else None,
                               served_model_name=args.served_model_name, kv_cache_gb=args.kv_cache_gb,
                               max_queue=args.max_queue, api_key=args.api_key, dtype=args.dtype,
                               quantize=args.quantize)
    cpus = args.replica_cpus or (os.cpu_count() or 1) / (args.max_replicas or args.replicas)
    app = ray_app.build_app(spec, replicas=args.replicas, max_replicas=args.max_replicas, replica_cpus=cpus,
                            replica_gpus=args.replica_gpus)
    _warn_if_exposed(args)
    return ray_app.serve_forever(app, host=args.host, port=args.port, replicas=args.replicas,
                                 label=args.served_model_name or args.model or "the default model")


def _warn_if_exposed(args: argparse.Namespace) -> None:
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: anyone who can reach this address can use the model"
              + ("" if args.api_key else " (no --api-key)"), file=sys.stderr)


def load_adapters(engine, specs: list[str] | None) -> None:
    """Load ``NAME=PATH`` specs; with none, the demo adapters (those that do not fit the model are skipped)."""
    import alora

    if specs:
        for spec in specs:
            name, _, path = spec.partition("=")
            info = engine.load_adapter(name, path)
            print(f"loaded {info.kind} {name!r} (rank {info.rank}) from {path}")
        return
    for name, folder in alora.demo_adapters().items():
        try:
            engine.load_adapter(name, folder)
        except alora.AdapterError as e:
            print(f"warning: skipped demo adapter {name!r}: {e}", file=sys.stderr)
    print(f"loaded demo adapters: {', '.join(engine.adapters) or 'none'}")


def _mount_ui(app, engine, adapter_dir: Path | None) -> None:
    """The Gradio chat UI at /ui, on the same engine; it may load adapters from under --adapter-dir only."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from alora_app import render
    from alora_app.session import AdapterFolders
    from alora_app.ui import ChatUI

    demo = ChatUI(engine, AdapterFolders([adapter_dir] if adapter_dir else [])).build()
    demo.queue(default_concurrency_limit=1)
    gr.mount_gradio_app(app, demo, path="/ui", css=render.CSS, ssr_mode=False, show_error=True)


def _server_class():
    """uvicorn.Server with our start and stop hooks (defined here so that the parser does not import uvicorn)."""
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server that prints the URL once listening and stops the engine's scheduler on shutdown
        (SIGINT, SIGTERM), before uvicorn re-raises the signal."""

        def __init__(self, config, engine, model_name: str, ui: bool):
            super().__init__(config)
            self.engine, self.model_name, self.ui = engine, model_name, ui

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
                print(f"alora serve: '{self.model_name}' and adapters {sorted(self.engine.adapters)} at {url}/v1"
                      + (f", UI at {url}/ui" if self.ui else "") + " (Ctrl-C stops)", flush=True)

        async def shutdown(self, sockets=None) -> None:
            await super().shutdown(sockets)
            self.engine.shutdown()

    return Server

