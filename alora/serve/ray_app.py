"""alora as a Ray Serve application: replicas of one engine each, conversations kept on the replica holding their KV.

    alora serve --ray --replicas N [--max-replicas M] [--replica-cpus C] [--replica-gpus G] [the other serve flags]
    serve run alora.serve.ray_app:app_builder replicas=N model=PATH adapter=NAME=PATH,NAME=PATH ...   (a Ray cluster)

Two deployments, as Ray Serve LLM arranges its own OpenAI server:

- ``AloraIngress`` (one replica, no CPU reserved): receives every HTTP request from Ray's proxy, reads the body
  only to find what routing needs (the session id, the prompt), and forwards the request to an engine replica
  through a ``DeploymentHandle``; it retries a request whose replica dies (below).
- ``AloraReplica`` (N replicas, or Ray's autoscaling between N and M): one ``alora.Engine`` with every adapter
  configured (adapters are small: every replica serves every adapter), and ``openai_api.create_app``'s FastAPI app
  over it. The forwarded request is run through that app in process, so the HTTP API is exactly ``alora serve``'s.

Routing, in Ray 2.60.0 (the version pinned by the ``ray`` extra): the engine's prefix cache only helps a request
that lands on the replica that served its conversation's earlier turns, so the handle's router decides cache hits.
Ray ships two routers for this, each for half of the job, and a deployment takes exactly one router class:

- ``ray.serve.experimental.consistent_hash_router.ConsistentHashRouter`` keys a consistent-hash ring (100 virtual
  nodes per replica) on the request's session id, which Ray's proxy takes from the ``x-session-id`` header (the
  header's name is Ray's ``RAY_SERVE_SESSION_ID_HEADER_KEY``); without one it hashes a fresh request id, i.e.
  routes at random.
- ``PrefixCacheAffinityRouter`` (public as ``ray.serve.llm.request_router.PrefixCacheAffinityRouter``; imported
  here from the module that defines it, because ``ray.serve.llm`` needs the ``ray[llm]`` extra, vLLM included)
  keeps a prefix tree of the prompt text each replica has served and sends a request to the replica with the
  longest match; below a 10% match, to the replica holding the least text. It reads the text from a ``messages``
  or ``prompt`` attribute of the call's argument, so it only works on a handle call, not on Ray's HTTP proxy: hence
  the ingress deployment, which passes a ``ForwardedRequest`` whose ``prompt`` is the routing text (the
  messages but the system prompt, which every conversation shares: ``routing_text``).

``ConversationRouter`` is those two behind Ray's documented extension point (a ``RequestRouter`` subclass): a
request with a session id goes to ``ConsistentHashRouter.choose_replicas``, any other to
``PrefixCacheAffinityRouter.choose_replicas``; their state hooks (replica updates, deaths, routed requests) both run.
It adds no policy of its own. The session id is the stronger key: a conversation's next turn keeps its replica even
when the new text dwarfs the old (a pasted document), where the prefix router could fall below its 10% threshold.

A replica that dies: Ray's controller starts a replacement; the routers drop the dead replica at once (the ring
sends its sessions to the next replica on it, the prefix tree forgets its text), so the conversations it held
continue elsewhere, their history recomputed there (a lower ``usage.prompt_tokens_details.cached_tokens``). Ray
retries the choice of a replica, but not a request that a replica accepted and then died on: that raises
``RayActorError`` in the caller, so the ingress retries it (``ATTEMPTS`` times). A request not yet streaming is
simply sent again. A stream that already sent events is replayed on the new replica and the events already
forwarded are skipped, provided the replay repeats their text (greedy decoding and a ``seed`` do; a sampled
replay that differs ends the stream with an error event, as nothing else would be honest).

Not in Ray mode: ``--ui`` and runtime adapters (``/v1/load_lora_adapter``), which would change one replica only;
``/metrics`` answers from one replica (Ray's own metrics cover the deployment). Each response carries the
``x-alora-replica`` header: the Ray actor name of the replica that served it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

from alora.errors import AloraError

RAY_VERSION = "2.60.0"
try:
    import ray
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
    from ray.serve._private.constants import SERVE_SESSION_ID
    from ray.serve.config import RequestRouterConfig
    from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
except ImportError as e:
    raise AloraError(f"alora's Ray Serve app needs ray[serve]=={RAY_VERSION}: pip install 'alora-runtime[ray]' "
                     f"({type(e).__name__}: {e})") from e

APP_NAME = "alora"
ATTEMPTS = 3            # tries of one request while replicas die under it
RETRY_PAUSE_S = 0.2     # lets the controller's news of the death reach the router
# A replica that refuses a request (at max_ongoing_requests) pushes a conversation off its replica, so replicas
# accept what comes and the engine queues it (its --max-queue answers 429).
REPLICA_MAX_ONGOING = 512
INGRESS_MAX_ONGOING = 4096
# Autoscaling aims at this many requests in flight per replica: benchmarks/results/serving.json shows throughput
# flat from 4 to 8 concurrent conversations (one base turn or up to 3 intrinsic calls each) on 2 CPU cores.
TARGET_ONGOING_REQUESTS = 8
ROUTER_KWARGS = {
    "num_virtual_nodes": 100,    # ConsistentHashRouter's default
    "num_fallback_replicas": 1,  # the next replica on the ring when the owner refuses or is gone
    "do_eviction": True,         # bound the prefix tree (Ray's default thresholds, 400k characters)
}
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica builds: the engine (``model`` None: the embedded default; ``dtype`` and ``quantize``
    as ``Engine.from_pretrained`` takes them) and its adapters (``NAME=PATH`` specs; None: the demo adapters),
    and ``create_app``'s options."""
    model: str | None = None
    adapters: tuple[str, ...] | None = None
    served_model_name: str | None = None
    kv_cache_gb: float | None = None
    max_queue: int | None = None
    api_key: str | None = None
    dtype: str | None = None
    quantize: str | None = None


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress hands it to a replica. ``prompt`` is the routing text that Ray's
    ``PrefixCacheAffinityRouter`` reads (see ``routing_text``); the replica ignores it."""
    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    prompt: str


def routing_text(method: str, path: str, body: bytes) -> str:
    """The text the prefix router matches: for chat, the cache salt then each message but the system prompt as
    ``role: text``; for completions, the salt then the prompt (token ids as ``1,2,3,``). A conversation's next
    turn, and an aLoRA call on it, extends its earlier turns' text. The system prompt is left out because every
    conversation shares it: in the text, a long one would be the best match of every new conversation, sending
    them all to the first replica that served it (the router places a text that matches under 10% on the
    replica holding the least), while each replica caches it after its first request anyway. Anything else
    routes by ``METHOD path`` (never empty: the router divides by the text's length)."""
    if method == "POST" and path in GENERATION_PATHS:
        try:
            req = json.loads(body)
        except ValueError:
            req = None
        if isinstance(req, dict):
            head = f"{req.get('cache_salt') or ''}\n"
            if isinstance(req.get("messages"), list):
                return head + "".join(f"{m.get('role')}: {_content_text(m.get('content'))}\n"
                                      for m in req["messages"]
                                      if isinstance(m, dict) and m.get("role") not in ("system", "developer"))
            prompt = req.get("prompt")
            if isinstance(prompt, list):
                return head + "".join(f"{t}," for t in prompt)
            if isinstance(prompt, str):
                return head + prompt
    return f"{method} {path}"


def _content_text(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


class ConversationRouter(ConsistentHashRouter, PrefixCacheAffinityRouter):
    """Ray's session router for requests with a session id, Ray's prefix router for the rest (module docs).

    Keyword arguments (``RequestRouterConfig.request_router_kwargs``): ``num_virtual_nodes`` and
    ``num_fallback_replicas`` go to ``ConsistentHashRouter``, the others to ``PrefixCacheAffinityRouter``.
    """

    def initialize_state(self, num_virtual_nodes: int = 100, num_fallback_replicas: int = 2, **prefix_kwargs):
        ConsistentHashRouter.initialize_state(self, num_virtual_nodes=num_virtual_nodes,
                                              num_fallback_replicas=num_fallback_replicas)
        PrefixCacheAffinityRouter.initialize_state(self, **prefix_kwargs)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is not None and pending_request.metadata.session_id:
            return await ConsistentHashRouter.choose_replicas(self, candidate_replicas, pending_request)
        return await PrefixCacheAffinityRouter.choose_replicas(self, candidate_replicas, pending_request)


# ---- the engine replica -------------------------------------------------------------------------------------

@serve.deployment(max_ongoing_requests=REPLICA_MAX_ONGOING)
class AloraReplica:
    """One engine with every configured adapter, and ``alora serve``'s OpenAI app over it."""

    def __init__(self, spec: ReplicaSpec):
        import torch

        import alora
        from alora.serve.cli import load_adapters
        from alora.serve.openai_api import create_app

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, math.floor(cpus)))  # a fractional share: one thread
        self.engine = alora.Engine.from_pretrained(spec.model, dtype=spec.dtype, quantize=spec.quantize,
                                                   kv_cache_gb=spec.kv_cache_gb, max_queue=spec.max_queue)
        try:
            load_adapters(self.engine, list(spec.adapters) if spec.adapters is not None else None)
            self.app = create_app(self.engine, served_model_name=spec.served_model_name, api_key=spec.api_key)
        except BaseException:
            self.engine.shutdown()
            raise
        self.name = serve.get_replica_context().replica_id.to_full_id_str()

    async def __call__(self, request: ForwardedRequest) -> AsyncIterator[dict | bytes]:
        """The response of the app: first ``{"status", "headers"}``, then the body's chunks as they come."""
        async for item in call_asgi(self.app, request):
            if isinstance(item, dict):
                item["headers"].append((b"x-alora-replica", self.name.encode()))
            yield item

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


async def call_asgi(app, request: ForwardedRequest) -> AsyncIterator[dict | bytes]:
    """Run ``request`` through the ASGI ``app`` in this process: yields ``{"status", "headers"}``, then the
    body's chunks. Closing the iterator early disconnects the request (a streaming engine call is cancelled)."""
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if disconnected.is_set():
            raise OSError("the client disconnected")
        await messages.put(message)

    # ASGI spec 2.0 (no spec_version): a streaming response also listens for the disconnect, so a stream the
    # consumer dropped is cancelled at once, not at its next chunk
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
             "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
             "query_string": request.query_string, "root_path": "", "headers": list(request.headers),
             "client": None, "server": None}
    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body"):
                    break
        else:
            task.result()  # the app ended without finishing its response: its exception, if any
            raise RuntimeError(f"{request.method} {request.path}: the app sent no complete response")
    finally:
        disconnected.set()
        if not task.done():
            await asyncio.wait([task], timeout=10)
            task.cancel()


# ---- the ingress --------------------------------------------------------------------------------------------

@serve.deployment(max_ongoing_requests=INGRESS_MAX_ONGOING, ray_actor_options={"num_cpus": 0})
class AloraIngress:
    """Forwards each HTTP request to an ``AloraReplica`` chosen by ``ConversationRouter``; sends it again when
    its replica dies (module docs)."""

    def __init__(self, replicas):
        self.replicas = replicas

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        forwarded = ForwardedRequest(request.method, request.url.path, request.scope.get("query_string", b""),
                                     tuple(request.headers.raw), body,
                                     routing_text(request.method, request.url.path, body))
        handle = self.replicas.options(stream=True)
        if session := request.headers.get(SERVE_SESSION_ID):
            handle = handle.options(session_id=session)
        for attempt in range(ATTEMPTS):
            stream = handle.remote(forwarded)
            try:
                start = await stream.__anext__()
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
                if start["status"] == 200 and headers.get("content-type", "").startswith("text/event-stream"):
                    return StreamingResponse(self._relay(handle, forwarded, stream, attempt), headers=headers)
                content = b"".join([chunk async for chunk in stream])
                return Response(content, status_code=start["status"], headers=headers)
            except RayActorError:
                stream.cancel()
                await asyncio.sleep(RETRY_PAUSE_S)
        return Response(json.dumps(_died_error()), status_code=503, media_type="application/json")

    async def _relay(self, handle, forwarded: ForwardedRequest, stream, attempt: int) -> AsyncIterator[bytes]:
        """Forward an SSE stream; if its replica dies, replay the request and skip the events already sent."""
        sent: list[str] = []        # the content text of each event forwarded
        first: dict | None = None   # the first event: a replay's events take its id and creation time
        replay = False
        try:
            while True:
                try:
                    if replay:
                        stream = handle.remote(forwarded)
                        if (await stream.__anext__())["status"] != 200:
                            yield _sse_error("the replica serving this stream died, and its replay was refused")
                            return
                    skip, replayed = len(sent), []
                    async for event, data in _sse_events(stream):
                        if len(replayed) < skip:
                            replayed.append(_event_text(data))
                            if len(replayed) == skip and replayed != sent:
                                yield _sse_error("the replica serving this stream died, and its replay on another "
                                                 "replica generated different text (sampling without a seed)")
                                return
                            continue
                        if data is not None:
                            if first is None:
                                first = data
                            elif replay and "id" in data:
                                event = _sse({**data, "id": first.get("id"), "created": first.get("created")})
                            sent.append(_event_text(data))
                        yield event
                    if len(replayed) < skip:
                        yield _sse_error("the replica serving this stream died, and its replay ended sooner")
                    return
                except RayActorError:
                    stream.cancel()
                    attempt += 1
                    if attempt == ATTEMPTS:
                        yield _sse(_died_error()) + b"data: [DONE]\n\n"
                        return
                    await asyncio.sleep(RETRY_PAUSE_S)
                    replay = True
        finally:
            stream.cancel()


async def _sse_events(stream) -> AsyncIterator[tuple[bytes, dict | None]]:
    """Whole server-sent events from a byte stream, each with its JSON payload (None for ``[DONE]``)."""
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            payload = event.removeprefix(b"data:").strip()
            try:
                data = json.loads(payload) if payload != b"[DONE]" else None
            except ValueError:
                data = None
            yield event + b"\n\n", data if isinstance(data, dict) else None
    if buffer.strip():
        yield buffer, None


def _event_text(data: dict | None) -> str:
    choices = (data or {}).get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content") or choices[0].get("text") or ""


def _sse(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _sse_error(message: str) -> bytes:
    return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}}) \
        + b"data: [DONE]\n\n"


def _died_error() -> dict:
    return {"error": {"message": f"the replicas serving this request died {ATTEMPTS} times", "type": "server_error",
                      "param": None, "code": "replica_died"}}


# ---- the application ----------------------------------------------------------------------------------------

def build_app(spec: ReplicaSpec, *, replicas: int = 1, max_replicas: int | None = None, replica_cpus: float = 1.0,
              replica_gpus: float = 0.0, routing: str = "conversation"):
    """The Ray Serve application: ``replicas`` engine replicas (Ray's autoscaling up to ``max_replicas`` when
    given), each reserving ``replica_cpus`` CPUs (fractions allowed) and ``replica_gpus`` GPUs.

    ``routing``: ``"conversation"`` (``ConversationRouter``) or ``"pow2"``, Ray's default router (two replicas at
    random, the less busy one: no affinity), the control of ``benchmarks/ray_routing.py``.
    """
    if replicas < 1 or (max_replicas is not None and max_replicas < replicas):
        raise ValueError(f"replicas must be >= 1 and max_replicas >= replicas (got {replicas}, {max_replicas})")
    if routing not in ("conversation", "pow2"):
        raise ValueError(f"routing must be 'conversation' or 'pow2', got {routing!r}")
    scaling = (dict(num_replicas="auto", autoscaling_config={
        "min_replicas": replicas, "initial_replicas": replicas, "max_replicas": max_replicas,
        "target_ongoing_requests": TARGET_ONGOING_REQUESTS}) if max_replicas is not None
        else dict(num_replicas=replicas))
    router = dict(request_router_config=RequestRouterConfig(request_router_class=ConversationRouter,
                                                            request_router_kwargs=ROUTER_KWARGS)
                  ) if routing == "conversation" else {}
    engines = AloraReplica.options(ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
                                   **scaling, **router).bind(spec)
    return AloraIngress.bind(engines)


def app_builder(args: dict[str, str]):
    """For ``serve run alora.serve.ray_app:app_builder key=value ...``: ``replicas``, ``max_replicas``,
    ``replica_cpus``, ``replica_gpus``, ``model``, ``adapter`` (``NAME=PATH`` specs, comma-separated),
    ``served_model_name``, ``kv_cache_gb``, ``max_queue``, ``api_key``, ``dtype``, ``quantize``, ``routing``."""
    known = {"replicas", "max_replicas", "replica_cpus", "replica_gpus", "model", "adapter", "served_model_name",
             "kv_cache_gb", "max_queue", "api_key", "dtype", "quantize", "routing"}
    if unknown := set(args) - known:
        raise ValueError(f"unknown arguments {sorted(unknown)}; known: {sorted(known)}")
    number = lambda key, kind: kind(args[key]) if key in args else None  # noqa: E731
    spec = ReplicaSpec(model=args.get("model"),
                       adapters=tuple(args["adapter"].split(",")) if args.get("adapter") else None,
                       served_model_name=args.get("served_model_name"), kv_cache_gb=number("kv_cache_gb", float),
                       max_queue=number("max_queue", int), api_key=args.get("api_key"), dtype=args.get("dtype"),
                       quantize=args.get("quantize"))
    return build_app(spec, replicas=number("replicas", int) or 1, max_replicas=number("max_replicas", int),
                     replica_cpus=number("replica_cpus", float) or 1.0, replica_gpus=number("replica_gpus", float) or 0.0,
                     routing=args.get("routing", "conversation"))


@contextmanager
def run_local(app=None, *, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None,
              log_to_driver: bool = True) -> Iterator[str]:
    """Start a Ray instance on this machine (Ray's usage reporting off unless ``RAY_USAGE_STATS_ENABLED`` says
    otherwise), Ray Serve's HTTP proxy on ``host:port`` (0: a free port) and ``app`` (None: ``deploy`` one later);
    yields the base URL. ``log_to_driver``: print the replicas' logs here. On exit, Serve and Ray are shut down:
    no Ray process is left behind."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, configure_logging=False,
             log_to_driver=log_to_driver)
    try:
        serve.start(http_options={"host": host, "port": port})
        if app is not None:
            deploy(app)
        yield f"http://{f'[{host}]' if ':' in host else host}:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def deploy(app) -> None:
    """Deploy ``app`` as the application ``alora`` at ``/`` of the running Ray Serve, replacing any earlier one
    (its replicas and their caches go with it); returns once its replicas are up."""
    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    serve.run(app, name=APP_NAME, route_prefix="/")


def serve_forever(app, *, host: str, port: int, replicas: int, label: str) -> int:
    """``alora serve --ray``: run ``app`` locally until SIGINT or SIGTERM, then shut everything down."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with run_local(app, host=host, port=port) as url:
        print(f"alora serve: {label} on Ray Serve ({replicas} replica{'s' * (replicas > 1)}) at {url}/v1 "
              "(Ctrl-C stops)", flush=True)
        stop.wait()
        print("alora serve: shutting down Ray Serve", file=sys.stderr, flush=True)
    return 0
