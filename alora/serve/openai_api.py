"""The OpenAI-compatible HTTP API over one engine: ``create_app(engine, ...)`` returns a FastAPI app.

Routes, with vLLM's conventions: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming or
not), ``GET /v1/models``, ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (only when runtime
adapters are allowed, folders only from under one directory), ``GET /health`` and ``GET /metrics``.

Adapter choice: ``"model"`` names the base model (its served name) or a loaded adapter. An aLoRA on chat
completions renders the messages as for the base model (chat template with its generation prompt); when those
token ids contain the adapter's invocation tokens, activation starts at their last occurrence (PEFT's rule);
when only the invocation's text is there (a tokenizer merged its last token with what follows), the tail is
re-tokenized with the invocation's ids spliced in (``Engine.activation_prompt``); otherwise the messages are
rendered without the generation prompt and the invocation is appended, as ``Conversation.invoke`` does. ``/v1/completions`` applies the same rule to its raw prompt. A LoRA adapts every
token. Each request is stateless: the engine's prefix cache makes a request that extends an earlier one reuse
its KV (``usage.prompt_tokens_details.cached_tokens``), within one ``cache_salt``.

Structured outputs: OpenAI's ``response_format`` (``json_schema``, ``json_object``), vLLM's
``structured_outputs`` (``json``, ``json_object``, ``choice``) and its older ``guided_json`` / ``guided_choice``;
each request's grammar constrains its own rows of the shared batched step (``alora.engine.structured``). A schema
that does not compile is a 400. Logprobs are the model's, before the grammar's mask, as vLLM reports them.

Libraries: FastAPI (request bodies are pydantic models, so ``/openapi.json`` describes the real API; gradio
already depends on it) served by uvicorn. Streams are a plain ``StreamingResponse`` of ``data: {...}`` lines,
as vLLM does: OpenAI's stream format needs nothing from sse-starlette (event ids, retry, pings), and starlette
cancels the response body when the client disconnects, which ``_SSE`` turns into ``call.cancel()``.
``/metrics`` is written by hand: the values are a snapshot of ``engine.metrics()``, owned by the engine, which
prometheus_client's registry of mutable counters would only wrap in a custom collector.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from contextlib import aclosing
from pathlib import Path
from typing import Annotated, AsyncIterator, Callable, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

import alora
from alora.adapters import AdapterError, last_occurrence
from alora.errors import (AdapterInUseError, ContextOverflowError, InvalidSchemaError, QueueFullError,
                          UnknownAdapterError)

FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length", "cancelled": "abort"}


# ---- request bodies -------------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields we do not implement are accepted and ignored, as vLLM does


class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchemaFormat(_Body):
    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(_Body):
    json_: dict | str | None = Field(None, alias="json", description="a JSON schema the output follows")
    json_object: bool | None = None
    choice: list[str] | None = Field(None, min_length=1)


class _Sampling(_Body):
    model: str | None = Field(None, description="the served model name (base) or a loaded adapter's name; "
                                                "default: the base model")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2 ** 63, le=2 ** 64 - 1)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = Field(None, min_length=1, description="requests share cached prefixes only with "
                                                                   "requests of the same salt (vLLM's name)")
    response_format: ResponseFormat | None = Field(None, description="OpenAI's structured output: json_schema or "
                                                                     "json_object")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's: json (a schema), json_object "
                                                                           "or choice")
    guided_json: dict | str | None = Field(None, description="vLLM's older name for structured_outputs.json")
    guided_choice: list[str] | None = Field(None, min_length=1, description="vLLM's older structured_outputs.choice")

    def structured(self) -> dict:
        """The one structured-output constraint the request asks for, as ``SamplingParams`` fields
        (``json_schema`` or ``choice``; empty: free text)."""
        wanted = []
        if self.response_format is not None and self.response_format.type != "text":
            if self.response_format.type == "json_object":
                wanted.append({"json_schema": True})
            elif self.response_format.json_schema is None or self.response_format.json_schema.schema_ is None:
                raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                               param="response_format")
            else:
                wanted.append({"json_schema": self.response_format.json_schema.schema_})
        so = self.structured_outputs
        if so is not None:
            unsupported = sorted(k for k, v in (so.model_extra or {}).items() if v is not None)
            if unsupported:
                raise APIError(400, f"structured_outputs.{unsupported[0]} is not supported (supported: json, "
                                    "json_object, choice)", param="structured_outputs")
            wanted += [{"json_schema": so.json_}] if so.json_ is not None else []
            wanted += [{"json_schema": True}] if so.json_object else []
            wanted += [{"choice": so.choice}] if so.choice else []
        wanted += [{"json_schema": self.guided_json}] if self.guided_json is not None else []
        wanted += [{"choice": self.guided_choice}] if self.guided_choice else []
        if len(wanted) > 1:
            raise APIError(400, "give one structured-output constraint (response_format, structured_outputs, "
                                "guided_json or guided_choice), not several", param="response_format")
        return wanted[0] if wanted else {}


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict:
        """The message as the chat template takes it (text parts joined, 'developer' as 'system')."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI: max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="needs logprobs: true")


class CompletionRequest(_Sampling):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] \
        = Field(description="text, or token ids")
    max_tokens: int | None = Field(16, ge=1, description="default 16, as OpenAI's; null: the rest of the context")
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probabilities of the chosen token and of "
                                                                "this many most likely ones")


class LoadLoRAAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1, description="a PEFT adapter folder under the server's --adapter-dir "
                                                     "(relative paths are taken from there)")


class UnloadLoRAAdapterRequest(_Body):
    lora_name: str = Field(min_length=1)


# ---- errors -----------------------------------------------------------------------------------------------

class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    return APIError(400, f"{loc or 'body'}: {err['msg']}", param=loc or None)


# ---- one response, streamed or whole -------------------------------------------------------------------

class _Completion:
    """Turns one engine call's events into an OpenAI chat or text completion, as SSE chunks or one body."""

    def __init__(self, call, prompt_len: int, model: str, chat: bool, logprobs: bool, include_usage: bool,
                 token_text: Callable[[int], str]):
        self.call, self.prompt_len, self.model, self.chat = call, prompt_len, model, chat
        self.logprobs, self.include_usage, self.token_text = logprobs, include_usage, token_text
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())
        self.completion_tokens = 0
        self.text_offset = 0  # legacy completions logprobs: offset of the next token in the generated text

    async def events(self, request: Request | None = None) -> AsyncIterator:
        """The call's events; the call is cancelled if the consumer stops early (or ``request`` disconnects)."""
        finished = False
        try:
            async for ev in self.call.aiter():
                self.completion_tokens += len(ev.token_ids)
                finished = ev.finish_reason is not None
                yield ev
                if request is not None and not finished and await request.is_disconnected():
                    return
        finally:
            if not finished:
                self.call.cancel()

    def finish_reason(self, reason: str | None) -> str | None:
        if reason == "error":
            raise APIError(500, "the engine failed while generating this response", type="server_error")
        return FINISH_REASONS.get(reason, reason)

    def choice(self, text: str, lps, finish: str | None, stream: bool) -> dict:
        """One choice: a chat delta or message, or a completion text, with its logprobs."""
        if not self.chat:
            content = {"text": text}
        elif stream:
            content = {"delta": {"content": text} if text or lps else {}}
        else:
            content = {"message": {"role": "assistant", "content": text}}
        return {"index": 0, **content, "logprobs": self._logprobs(lps) if self.logprobs and lps is not None else None,
                "finish_reason": finish}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_len, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_len + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.call.stats.reused_tokens}}

    def _logprobs(self, lps) -> dict:
        text, lps = self.token_text, lps or []
        if self.chat:
            def entry(token_id: int, logprob: float) -> dict:
                t = text(token_id)
                return {"token": t, "logprob": logprob, "bytes": list(t.encode())}
            return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(*t) for t in lp.top]}
                                for lp in lps]}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            t = text(lp.token_id)
            out["tokens"].append(t)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append({text(i): v for i, v in [(lp.token_id, lp.logprob), *lp.top]})
            out["text_offset"].append(self.text_offset)
            self.text_offset += len(t)
        return out

    def _chunk(self, **fields) -> str:
        body = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, **fields}
        if self.include_usage:
            body.setdefault("usage", None)
        return f"data: {json.dumps(body)}\n\n"

    async def sse(self) -> AsyncIterator[str]:
        """The streamed response: OpenAI's chunks, the usage chunk if asked for, then ``data: [DONE]``."""
        try:
            if self.chat:
                yield self._chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}])
            async with aclosing(self.events()) as events:
                async for ev in events:
                    if ev.text or ev.logprobs:
                        yield self._chunk(choices=[self.choice(ev.text, ev.logprobs, None, stream=True)])
                    if ev.finish_reason is not None:
                        finish = self.finish_reason(ev.finish_reason)
                        yield self._chunk(choices=[self.choice("", None, finish, stream=True)])
            if self.include_usage:
                yield self._chunk(choices=[], usage=self.usage())
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    async def whole(self, request: Request) -> dict:
        """The non-streamed response body."""
        text, lps, finish = [], [], None
        async with aclosing(self.events(request)) as events:
            async for ev in events:
                text.append(ev.text)
                lps.extend(ev.logprobs or [])
                finish = ev.finish_reason
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self.choice("".join(text), lps, self.finish_reason(finish), stream=False)],
                "usage": self.usage()}


class _SSE(StreamingResponse):
    """A stream whose body generator is always closed when the response ends, disconnects included, so the
    generator's ``finally`` cancels the engine call at once instead of whenever it is garbage-collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


# ---- metrics ---------------------------------------------------------------------------------------------

METRICS = [  # (engine.metrics() key, exposed name, Prometheus type, help); vLLM's names where it has one
    ("requests_running", "vllm:num_requests_running", "gauge", "Requests in the running batch."),
    ("requests_waiting", "vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled."),
    ("kv_cache_usage", "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage: 1 means the budget is used up."),
    ("prefix_cache_queries", "vllm:prefix_cache_queries_total", "counter",
     "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "vllm:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache."),
    ("prompt_tokens_total", "vllm:prompt_tokens_total", "counter", "Prompt tokens of finished requests."),
    ("generation_tokens_total", "vllm:generation_tokens_total", "counter", "Tokens generated."),
    ("kv_cache_budget_bytes", "alora:kv_cache_budget_bytes", "gauge", "The KV pool's budget (--kv-cache-gb)."),
    ("kv_cache_capacity_bytes", "alora:kv_cache_capacity_bytes", "gauge",
     "Bytes the KV pool holds allocated (never above the budget)."),
    ("kv_cache_used_bytes", "alora:kv_cache_used_bytes", "gauge", "Bytes of the pool holding KV."),
    ("kv_evictions", "alora:kv_evictions_total", "counter", "Cached KV entries evicted to make room."),
    ("preemptions", "vllm:num_preemptions_total", "counter", "Running requests preempted (KV recomputed later)."),
]


def _label(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def prometheus_text(metrics: dict, model_name: str) -> str:
    """``engine.metrics()`` in Prometheus' text format (0.0.4), every sample labelled with ``model_name``."""
    model = f'model_name="{_label(model_name)}"'
    lines = []
    for key, name, kind, help_ in METRICS:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{model}}} {float(metrics[key])}"]
    name = "vllm:request_success_total"
    lines += [f"# HELP {name} Requests finished, by adapter ('base' for the base model).",
              f"# TYPE {name} counter"]
    lines += [f'{name}{{{model},adapter="{_label(a)}"}} {float(n)}'
              for a, n in sorted(metrics["requests_finished"].items())]
    return "\n".join(lines) + "\n"


# ---- the app ---------------------------------------------------------------------------------------------

def create_app(engine: "alora.Engine", *, served_model_name: str | None = None, api_key: str | None = None,
               allow_runtime_adapters: bool = False, adapter_dir: str | Path | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``engine`` (which the caller owns and shuts down).

    ``served_model_name`` names the base model (default: its folder's name). ``api_key`` makes the ``/v1``
    routes and ``/metrics`` require ``Authorization: Bearer <api_key>`` (``/health`` and the API docs stay
    open). ``allow_runtime_adapters`` enables ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` for
    folders under ``adapter_dir``.
    """
    base_name = served_model_name or engine.model_path.name
    if allow_runtime_adapters and adapter_dir is None:
        raise ValueError("runtime adapters need an adapter directory (--adapter-dir) to load from")
    root = Path(adapter_dir).expanduser().resolve() if adapter_dir is not None else None
    tokenizer = engine.tokenizer
    context = engine.config.max_position_embeddings
    vocab = engine.config.vocab_size
    token_text = engine.token_text

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    app = FastAPI(title="alora", version=alora.__version__, summary="OpenAI-compatible API of an alora engine")
    app.add_exception_handler(APIError, lambda _, e: e.response())
    app.add_exception_handler(RequestValidationError, lambda _, e: _validation_error(e).response())
    app.add_exception_handler(HTTPException, lambda _, e: APIError(
        e.status_code, str(e.detail), type="invalid_request_error" if e.status_code < 500 else "server_error"
    ).response())
    app.add_exception_handler(Exception, lambda _, e: APIError(
        500, f"internal error: {type(e).__name__}: {e}", type="server_error").response())
    api = APIRouter(dependencies=[Depends(check_key)])

    def adapter_for(model: str | None) -> str | None:
        if model is None or model == base_name:
            return None
        if model in engine.adapters:
            return model
        raise APIError(404, f"The model '{model}' does not exist: this server has '{base_name}' and the "
                            f"adapters {sorted(engine.adapters)}", param="model", code="model_not_found")

    def render(messages: list[dict], generation_prompt: bool) -> list[int]:
        try:
            out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        except TemplateError as e:
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from e
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def lacks_invocation(ids: list[int], adapter: str | None) -> bool:
        """True for an aLoRA whose invocation tokens do not occur in ``ids`` (the server appends them)."""
        info = engine.adapters.get(adapter) if adapter else None
        return info is not None and info.kind == "alora" and last_occurrence(ids, info.invocation_tokens) is None

    async def run(req: _Sampling, request: Request, adapter: str | None, chat: bool,
                  prompt: Callable[[], list[int]], max_tokens: int | None, logprobs: int | None) -> Response:
        def submit():
            ids = prompt()
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            try:
                params = alora.SamplingParams(
                    max_new_tokens=max_tokens or max(1, context - len(ids)),
                    temperature=req.temperature, top_p=req.top_p,
                    stop=(req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ()), seed=req.seed,
                    logprobs=logprobs, **req.structured())
            except ValueError as e:
                raise APIError(400, str(e)) from e
            try:
                return engine.submit(ids, adapter=adapter, params=params, cache_salt=req.cache_salt), len(ids)
            except InvalidSchemaError as e:
                raise APIError(400, str(e), param="response_format", code="invalid_json_schema") from e
            except ContextOverflowError as e:
                raise APIError(400, str(e), code="context_length_exceeded") from e
            except QueueFullError as e:
                raise APIError(429, str(e), type="rate_limit_error", code="queue_full") from e
            except UnknownAdapterError as e:  # unloaded since adapter_for looked
                raise APIError(404, str(e), param="model", code="model_not_found") from e

        call, n_prompt = await run_in_threadpool(submit)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        done = _Completion(call, n_prompt, req.model or base_name, chat, logprobs is not None, include_usage,
                           token_text)
        if req.stream:
            return _SSE(done.sse(), media_type="text/event-stream")
        return JSONResponse(await done.whole(request))

    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        """A chat completion; ``model`` picks the base model or an adapter (aLoRA: see the module docs)."""
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [m.as_dict() for m in req.messages]
        adapter = adapter_for(req.model)

        def prompt() -> list[int]:
            ids = render(messages, True)
            if not lacks_invocation(ids, adapter):
                return ids
            return engine.activation_prompt(adapter, ids) or engine.invocation_prompt(adapter, render(messages, False))
        return await run(req, request, adapter, True, prompt, req.max_completion_tokens or req.max_tokens,
                         (req.top_logprobs or 0) if req.logprobs else None)

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        """A text completion of a raw prompt (text or token ids); an aLoRA's invocation is appended if absent."""
        if isinstance(req.prompt, list) and any(not 0 <= t < vocab for t in req.prompt):
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        adapter = adapter_for(req.model)

        def prompt() -> list[int]:
            ids = list(req.prompt) if isinstance(req.prompt, list) else list(tokenizer(req.prompt)["input_ids"])
            return engine.invocation_prompt(adapter, ids) if lacks_invocation(ids, adapter) else ids
        return await run(req, request, adapter, False, prompt, req.max_tokens, req.logprobs)

    @api.get("/v1/models")
    def models() -> dict:
        """The base model under its served name, and every loaded adapter with ``parent`` = the base."""
        created = int(time.time())

        def card(name: str, root: str, parent: str | None) -> dict:
            return {"id": name, "object": "model", "created": created, "owned_by": "alora", "root": root,
                    "parent": parent, "max_model_len": context}
        return {"object": "list", "data": [card(base_name, str(engine.model_path), None)] + [
            card(name, str(info.path), base_name) for name, info in engine.adapters.items()]}

    def runtime_folder(path: str) -> Path:
        if not allow_runtime_adapters:
            raise APIError(404, "loading and unloading adapters at runtime is off: start the server with "
                                "--allow-runtime-adapters --adapter-dir DIR", code="not_found")
        try:
            folder = (root / path).resolve()  # an absolute path replaces root; symlinks are followed
        except (OSError, ValueError) as e:
            raise APIError(400, f"bad lora_path: {e}", param="lora_path") from e
        if not folder.is_relative_to(root):
            raise APIError(400, "lora_path must lie under the server's adapter directory", param="lora_path")
        return folder

    @api.post("/v1/load_lora_adapter")
    def load_lora_adapter(req: LoadLoRAAdapterRequest) -> PlainTextResponse:
        """Load a PEFT adapter folder (aLoRA or LoRA) under ``lora_name`` (needs --allow-runtime-adapters)."""
        folder = runtime_folder(req.lora_path)
        if req.lora_name == base_name or req.lora_name in engine.adapters:
            raise APIError(400, f"the name '{req.lora_name}' is taken; unload that adapter first", param="lora_name")
        try:
            engine.load_adapter(req.lora_name, folder)
        except (AdapterError, FileNotFoundError, ValueError) as e:
            raise APIError(400, str(e), param="lora_path") from e
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @api.post("/v1/unload_lora_adapter")
    def unload_lora_adapter(req: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        """Unload the adapter ``lora_name`` (needs --allow-runtime-adapters)."""
        runtime_folder(".")
        try:
            engine.unload_adapter(req.lora_name)
        except UnknownAdapterError as e:
            raise APIError(404, str(e), param="lora_name", code="model_not_found") from e
        except AdapterInUseError as e:
            raise APIError(409, str(e), param="lora_name") from e
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @api.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus text: requests running and waiting, KV pool, prefix-cache tokens, requests per adapter."""
        return PlainTextResponse(prometheus_text(engine.metrics(), base_name),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/health")
    def health() -> Response:
        """200 while the server runs (no API key needed)."""
        return Response(status_code=200)

    app.include_router(api)
    return app
