"""The engine: model, tokenizer, adapters, the KV pool and the scheduler that runs every call."""

from __future__ import annotations

import functools
import os
import threading
import weakref
from pathlib import Path
from typing import Sequence

import torch

from alora.adapters import AdapterInfo, AdapterRegistry, last_occurrence
from alora.engine.detokenize import IncrementalDetokenizer, StopMatcher
from alora.engine.kv_pool import KVPool
from alora.engine.request import Call, CallStats
from alora.engine.runner import ModelRunner
from alora.engine.sampling import SamplingParams
from alora.engine.scheduler import Scheduler
from alora.engine.structured import StructuredOutputs
from alora.errors import AdapterInUseError, AloraError, ContextOverflowError, UnknownAdapterError
from alora.intrinsics import IO_FILE, Intrinsic
from alora.models import LlamaModel, check_quantize, load_model


def default_kv_cache_gb(device: torch.device) -> float:
    """The KV budget when none is given: 30% of free GPU memory on CUDA; on CPU 10% of RAM, at most 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.3 * free / 2**30
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * 2**30
    return min(4.0, 0.1 * ram / 2**30)


class Engine:
    """Owns the model, tokenizer, adapters and all KV memory; every call runs through its scheduler, so
    calls from any number of threads, conversations and clients are batched together. Thread-safe.

    >>> engine = Engine.from_pretrained()            # the embedded SmolLM2-135M-Instruct
    >>> conv = engine.conversation()
    >>> print("".join(conv.send("Hello!", max_new_tokens=16)))
    """

    def __init__(self, model: LlamaModel, tokenizer, eos_token_ids: Sequence[int], model_path: Path,
                 kv_cache_gb: float | None = None, max_queue: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos_token_ids = frozenset(eos_token_ids)
        self._lock = threading.RLock()
        self._registry = AdapterRegistry(model, tokenizer)
        c = self.config
        gb = default_kv_cache_gb(self.device) if kv_cache_gb is None else kv_cache_gb
        if gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {gb}")
        self.pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype, self.device, int(gb * 2**30))
        self.scheduler = Scheduler(ModelRunner(model), self.pool, self.eos_token_ids,
                                   c.max_position_embeddings, max_queue)
        self._structured: StructuredOutputs | None = None
        self._intrinsics: dict[str, Intrinsic] = {}
        self._token_text = functools.lru_cache(maxsize=1 << 16)(lambda i: tokenizer.decode([i]))
        # stop the scheduler thread when the engine goes away, or at exit before torch is torn down
        weakref.finalize(self, self.scheduler.shutdown)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, device: str | None = None,
                        dtype: torch.dtype | str | None = None, kv_cache_gb: float | None = None,
                        max_queue: int | None = None, quantize: str | None = None) -> "Engine":
        """Load an HF model folder (config.json, *.safetensors, tokenizer), or the embedded default model.

        ``device`` defaults to CUDA when available (CPU with ``quantize``); ``dtype`` to bfloat16 on CUDA,
        float32 on CPU. ``kv_cache_gb`` bounds all KV memory (default: ``default_kv_cache_gb``); ``max_queue``
        bounds the calls waiting for the scheduler (default: unbounded; ``QueueFullError`` past it).

        ``quantize="int8"``: weight-only int8 on CPU. Every decoder projection (q|k|v, o, gate|up, down) and the
        LM head are quantized once at load (symmetric, one float32 scale per output row) and their float copies
        freed (a tied LM head's embedding table stays); the embeddings, norms, biases, activations, the KV
        cache and adapters keep ``dtype``. Decode reads about a quarter of the float32 weights' bytes. Another
        value, or a non-CPU device, raises ``QuantizationError`` (an ``AloraError`` and ``ValueError``).
        """
        from transformers import AutoTokenizer, GenerationConfig

        from alora.default_model import default_model_dir

        device = device or ("cuda" if torch.cuda.is_available() and quantize is None else "cpu")
        check_quantize(quantize, device)  # before anything is read or converted
        folder = Path(path) if path is not None else default_model_dir()
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {folder}")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model = load_model(folder, dtype=dtype, device=device, quantize=quantize)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            raise AloraError(f"{folder}: the tokenizer could not be loaded: {type(e).__name__}: {e}") from e
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        if (folder / "generation_config.json").is_file():
            gen_eos = GenerationConfig.from_pretrained(folder).eos_token_id
            eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
        return cls(model, tokenizer, sorted(eos), folder, kv_cache_gb=kv_cache_gb, max_queue=max_queue)

    # ---- adapters -------------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Load a PEFT adapter folder (aLoRA or LoRA) under ``name``; on error the engine is unchanged.
        A folder with an ``io.yaml`` is also registered as an intrinsic (see ``load_intrinsic``)."""
        folder = Path(path)
        spec = Intrinsic.from_folder(folder, name) if (folder / IO_FILE).is_file() else None
        with self._lock:
            info = self._registry.load(name, folder)
            if spec is not None:
                self._intrinsics[name] = spec
            return info

    def load_intrinsic(self, path: str | Path, name: str | None = None) -> Intrinsic:
        """Load an intrinsic: an adapter folder (IBM's layout: ``adapter_config.json``,
        ``adapter_model.safetensors``) with an ``io.yaml`` saying how to call it and read its output.

        ``name`` defaults to the io.yaml's ``model`` (else the intrinsic's folder name in IBM's layouts); the
        adapter is loaded under it, so it is also an ordinary adapter (``invoke``, the server's ``model``).
        Run it with ``conv.run_intrinsic(name, **fields)``.
        """
        folder = Path(path)
        spec = Intrinsic.from_folder(folder, name)
        self.load_adapter(spec.name, folder)
        return spec

    @property
    def intrinsics(self) -> dict[str, Intrinsic]:
        """Loaded intrinsics by name (adapters that came with an io.yaml)."""
        return dict(self._intrinsics)

    def intrinsic(self, name: str) -> Intrinsic:
        """The loaded intrinsic ``name``; ``UnknownAdapterError`` if none has that name."""
        spec = self.intrinsics.get(name)
        if spec is None:
            raise UnknownAdapterError(f"no intrinsic named {name!r} is loaded (loaded: {sorted(self.intrinsics)}); "
                                      "load one with engine.load_intrinsic(folder)")
        return spec

    def unload_adapter(self, name: str) -> None:
        """Unload adapter ``name``. Refused (``AdapterInUseError``) while a call that uses it is waiting or
        running, so no call ever continues on another adapter's weights."""
        with self._lock:
            slot, uid = self._registry.slot(name), self._registry.get(name).uid
            if self.scheduler.active(lambda c: c.decode_slot == slot or slot in c.slots):
                raise AdapterInUseError(f"adapter {name!r} is in use by a running call; unload it when the "
                                        "call has finished (or cancel it)")
            self._registry.unload(name)
            self._intrinsics.pop(name, None)
            self.pool.drop(lambda namespace: namespace[1] == uid)  # its LoRA prefixes can never match again

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """Loaded adapters by name: kind ('alora' | 'lora'), rank, invocation tokens, folder."""
        return dict(self._registry.infos)

    def adapter(self, name: str) -> AdapterInfo:
        """The ``AdapterInfo`` of a loaded adapter; ``UnknownAdapterError`` if none has that name."""
        return self._registry.get(name)

    def slots_for(self, adapter: str | None, ids: Sequence[int]) -> list[int]:
        """The adapter slot of every token of ``ids`` when ``adapter`` runs on them (-1 = base), by its
        activation rule (aLoRA: from the last occurrence of its invocation; LoRA: every token)."""
        return self._registry.slots_for(adapter, ids) if adapter else [-1] * len(ids)

    def activation_prompt(self, adapter: str, ids: Sequence[int]) -> list[int] | None:
        """``ids`` in which aLoRA ``adapter``'s invocation occurs as its exact token ids, or None if its text
        is not there either.

        Activation is matched on token ids, but a tokenizer can merge an invocation's last token with the
        text after it (``<req>`` + ``:`` tokenized as ``<req`` ``>:``), so a prompt that says the invocation
        may not contain its ids. Then the tail of ``ids`` from the invocation's last textual occurrence on
        is re-tokenized with the invocation's ids spliced in, as the adapter was trained; the tokens before
        it (the cached history) are untouched.
        """
        ids = list(ids)
        info = self.adapter(adapter)
        inv = list(info.invocation_tokens or ())
        if info.kind != "alora" or not inv or last_occurrence(ids, inv) is not None:
            return ids
        text = self.tokenizer.decode(inv)
        if text not in self.tokenizer.decode(ids[-4096:]):  # the usual case, one decode: no invocation at all
            return None
        for k in range(len(inv), min(len(ids), 4096) + 1):
            tail = self.tokenizer.decode(ids[-k:])
            at = tail.rfind(text)
            if at >= 0:
                encode = lambda t: self.tokenizer(t, add_special_tokens=False)["input_ids"] if t else []  # noqa: E731
                return ids[:-k] + encode(tail[:at]) + inv + encode(tail[at + len(text):])
        return None

    def invocation_prompt(self, adapter: str, ids: Sequence[int]) -> list[int]:
        """``ids`` followed by ``adapter``'s invocation tokens (an aLoRA's activation, a LoRA's optional
        prompt suffix); unchanged for an adapter without one."""
        return list(ids) + list(self.adapter(adapter).invocation_tokens or ())

    # ---- calls ----------------------------------------------------------------------------------------

    def check_fits(self, n_tokens: int) -> None:
        """Raise ``ContextOverflowError`` if ``n_tokens`` positions exceed the context or the KV budget."""
        limit = self.config.max_position_embeddings
        if n_tokens > limit:
            raise ContextOverflowError(
                f"{n_tokens} tokens exceed the model's context of {limit} tokens; start a new conversation "
                "or shorten the input")
        if n_tokens > self.pool.budget_tokens:
            raise ContextOverflowError(
                f"{n_tokens} tokens exceed the KV cache budget of {self.pool.budget_tokens} tokens "
                f"({self.pool.budget_bytes / 2**30:.3g} GiB); raise kv_cache_gb")

    def submit(self, prompt: Sequence[int], adapter: str | None = None, params: SamplingParams | None = None,
               cache_salt: str | None = None, *, expected_cached: int = 0, use_cache: bool = True,
               store: bool | None = None, all_logits: bool = False) -> Call:
        """Queue a generation and return its handle (iterate it for ``Event``s; ``cancel()`` it).

        An aLoRA adapts from the last occurrence of its invocation in ``prompt`` (none: the prompt runs in base
        weights, see ``invocation_prompt``); a LoRA adapts every token. The longest cached prefix of the
        prompt is reused: base-model KV for base tokens (and an aLoRA's tokens before its activation), a LoRA's
        own KV under its weights; ``cache_salt`` keeps a tenant's prefixes apart from everyone else's.
        ``expected_cached``: prompt tokens the caller computed before (misses count as recomputed).
        ``use_cache=False`` computes everything afresh; ``store`` (default: ``use_cache``) keeps the call's
        reusable prefix in the cache when it ends. ``all_logits`` keeps every prompt row's logits
        (``call.logits_rows``).
        """
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        params = params or SamplingParams()
        with self._lock:
            slots = self.slots_for(adapter, prompt)
            info = self.adapter(adapter) if adapter else None
            first_adapted = next((i for i, s in enumerate(slots) if s >= 0), len(prompt))
            if info is not None and info.kind == "lora":
                namespace, storable = (cache_salt, info.uid), len(prompt)
            else:
                namespace, storable = (cache_salt, None), first_adapted
            decode_slot = self._registry.slot(adapter) if adapter and first_adapted < len(prompt) else -1
            self.check_fits(len(prompt) + 1)
            self.check_fits(min(len(prompt) + params.max_new_tokens, self.config.max_position_embeddings))
            grammar = None
            if params.json_schema is not None or params.choice is not None:
                grammar = self.structured_outputs().matcher(params.json_schema, params.choice)
            call = Call(prompt, slots, decode_slot, params, namespace, storable,
                        IncrementalDetokenizer(self.tokenizer), StopMatcher(params.stop), CallStats(adapter=adapter),
                        use_cache=use_cache, store=use_cache if store is None else store, all_logits=all_logits,
                        expected_cached=expected_cached,
                        generator=params.generator(), grammar=grammar)
            self.scheduler.submit(call)
        return call

    def token_text(self, token_id: int) -> str:
        """One token's text as logprobs report it (``tokenizer.decode([token_id])``, cached)."""
        return self._token_text(int(token_id))

    def structured_outputs(self) -> StructuredOutputs:
        """The JSON-schema grammar compiler for this tokenizer (built on first use, about a second)."""
        with self._lock:
            if self._structured is None:
                eos = self.tokenizer.eos_token_id
                self._structured = StructuredOutputs(self.tokenizer, self.config.vocab_size,
                                                     eos if eos in self.eos_token_ids else min(self.eos_token_ids))
                self.scheduler.structured = self._structured
            return self._structured

    def forward_logits(self, token_ids: Sequence[int] | torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        """Logits [len(token_ids), vocab] float32 of one pass with no cache; an aLoRA is activated by its
        format's rule, a LoRA adapts every token."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids
        call = self.submit(ids, adapter, SamplingParams(max_new_tokens=0), use_cache=False, all_logits=True)
        for _ in call:
            pass
        return torch.cat(call.logits_rows)

    def run_batch(self, calls: Sequence[Call]) -> list[str]:
        """Wait for calls submitted together (``engine.submit``, ``conv.start_send``/``start_invoke``) and
        return each one's text. They run batched by the scheduler, as every call does."""
        texts = []
        for call in calls:
            for _ in call:
                pass
            texts.append(call.text)
        return texts

    # ---- conversations --------------------------------------------------------------------------------

    def conversation(self, system: str | None = None, messages: list[dict] | None = None,
                     cache_salt: str | None = None, overflow: str = "error"):
        """A new chat; ``system`` is an optional system prompt and ``messages`` an earlier history to
        continue (computed on the first call). ``cache_salt`` keeps its KV apart from other tenants';
        ``overflow`` ("error" or "drop_oldest") is what happens when the history outgrows the context."""
        from alora.conversation import Conversation

        return Conversation(self, system, messages, cache_salt=cache_salt, overflow=overflow)

    def conversation_from(self, state: dict):
        """Restore a conversation saved with ``Conversation.to_dict()``: the same tokens and messages."""
        from alora.conversation import Conversation

        return Conversation.from_dict(self, state)

    def cached_prefix(self, ids: Sequence[int], cache_salt: str | None = None) -> int:
        """How many leading tokens of ``ids`` have base-model KV in the prefix cache now."""
        return self.pool.match((cache_salt, None), list(ids), count=False)[1]

    # ---- observability --------------------------------------------------------------------------------

    def metrics(self) -> dict:
        """Counters and gauges for ``/metrics``: requests, KV memory, prefix-cache hits, per-adapter counts."""
        running, waiting = self.scheduler.counts()
        pool, sched = self.pool, self.scheduler
        used = pool.used_bytes()
        return {
            "requests_running": running,
            "requests_waiting": waiting,
            "kv_cache_budget_bytes": pool.budget_bytes,
            "kv_cache_capacity_bytes": pool.capacity_bytes,
            "kv_cache_used_bytes": used,
            "kv_cache_usage": used / pool.budget_bytes,
            "kv_evictions": pool.evictions,
            "prefix_cache_queries": pool.queries,
            "prefix_cache_hits": pool.hits,
            "preemptions": sched.preemptions,
            "prompt_tokens_total": sched.prompt_tokens_total,
            "generation_tokens_total": sched.generation_tokens_total,
            "requests_finished": {name or "base": n for name, n in sched.finished_by_adapter.items()},
        }

    def shutdown(self) -> None:
        """Cancel every call and stop the scheduler thread (also done at interpreter exit)."""
        self.scheduler.shutdown()
