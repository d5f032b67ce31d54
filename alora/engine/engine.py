"""The engine: model, tokenizer, adapters and the one loop that runs prefill and decode for any batch."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from alora.adapters import AdapterInfo, AdapterRegistry
from alora.cache import KVCache
from alora.context import ForwardContext, SeqSpan, forward_context
from alora.conversation import Conversation, Job
from alora.detokenize import IncrementalDetokenizer, StopMatcher
from alora.models import LlamaModel, load_model
from alora.sampling import SamplingParams, sample


class ContextOverflowError(ValueError):
    """The prompt does not fit in the model's context window."""


@dataclass
class CallStats:
    """What one call cost. ``reused_tokens`` came from the KV cache; ``prefill_tokens`` were computed
    before the first output token; ``recomputed_tokens`` are history tokens this call had to compute again."""

    prefill_tokens: int = 0
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    decode_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    finish_reason: str = ""
    adapter: str | None = None


@dataclass
class Call:
    """One generation in flight: a prompt to feed into ``cache`` (from ``cache.length`` on), then decoding."""

    cache: KVCache
    prompt: list[int]  # tokens still to feed before the first sample
    prompt_slots: list[int]  # adapter slot per prompt token (-1 = base)
    decode_slot: int  # adapter slot of generated tokens
    params: SamplingParams
    stats: CallStats
    detok: IncrementalDetokenizer
    stop: StopMatcher
    generator: torch.Generator | None
    started: float = field(default_factory=time.perf_counter)
    output: list[int] = field(default_factory=list)  # sampled tokens, stop token included
    pending: int | None = None  # sampled, not yet fed
    finished: bool = False
    driven: bool = False  # some loop (a stream, a batch, a UI) has stepped it
    first_token_at: float | None = None


class Engine:
    """Owns the model, tokenizer, adapters and KV caches; thread-safe.

    >>> engine = Engine.from_pretrained()            # the embedded SmolLM2-135M-Instruct
    >>> conv = engine.conversation()
    >>> print("".join(conv.send("Hello!", max_new_tokens=16)))
    """

    prefill_chunk = 2048  # longer prompts are prefilled in chunks of this many tokens

    def __init__(self, model: LlamaModel, tokenizer, eos_token_ids: Sequence[int], model_path: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.config = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos_token_ids = frozenset(eos_token_ids)
        self._lock = threading.RLock()
        self._registry = AdapterRegistry(model, tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, device: str | None = None,
                        dtype: torch.dtype | None = None) -> "Engine":
        """Load an HF model folder (config.json, *.safetensors, tokenizer), or the embedded default model.

        ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 on CUDA, float32 on CPU.
        """
        from transformers import AutoTokenizer, GenerationConfig

        from alora.default_model import default_model_dir

        folder = Path(path) if path is not None else default_model_dir()
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {folder}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model = load_model(folder, dtype=dtype, device=device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            raise FileNotFoundError(f"{folder}: no usable tokenizer ({e})") from e
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        if (folder / "generation_config.json").is_file():
            gen_eos = GenerationConfig.from_pretrained(folder).eos_token_id
            eos |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
        return cls(model, tokenizer, sorted(eos), folder)

    # ---- adapters -------------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Load a PEFT adapter folder (aLoRA or LoRA) under ``name``; on error the engine is unchanged."""
        with self._lock:
            return self._registry.load(name, Path(path))

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            self._registry.unload(name)

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """Loaded adapters by name: kind ('alora' | 'lora'), rank, invocation tokens, folder."""
        return dict(self._registry.infos)

    def adapter(self, name: str) -> AdapterInfo:
        return self._registry.get(name)

    # ---- one-pass logits ------------------------------------------------------------------------------

    def forward_logits(self, token_ids: Sequence[int] | torch.Tensor, adapter: str | None = None) -> torch.Tensor:
        """Logits [len(token_ids), vocab] float32 of one pass with no cache; an aLoRA is activated by its
        format's rule, a LoRA adapts every token."""
        ids = [int(t) for t in (token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)]
        if not ids:
            raise ValueError("forward_logits needs at least one token")
        self.check_fits(len(ids))
        slots = self._registry.slots_for(adapter, ids) if adapter else [-1] * len(ids)
        cache = self.new_cache(len(ids))
        out = [self._forward([(cache, ids[i:i + self.prefill_chunk], slots[i:i + self.prefill_chunk])], all_rows=True)[0]
               for i in range(0, len(ids), self.prefill_chunk)]
        return torch.cat(out).cpu()

    # ---- conversations --------------------------------------------------------------------------------

    def conversation(self, system: str | None = None, messages: list[dict] | None = None) -> Conversation:
        """A new chat with its own base-model KV cache; ``system`` is an optional system prompt and
        ``messages`` an earlier history to continue (prefilled on the first call)."""
        return Conversation(self, system, messages)

    def new_cache(self, capacity: int = 256) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype, self.device, capacity)

    def check_fits(self, n_tokens: int) -> None:
        limit = self.config.max_position_embeddings
        if n_tokens > limit:
            raise ContextOverflowError(
                f"{n_tokens} tokens exceed the model's context of {limit} tokens; start a new conversation "
                "or shorten the input")

    # ---- the loop ----------------------------------------------------------------------------------------

    def _forward(self, feeds: list[tuple[KVCache, list[int], list[int]]], all_rows: bool = False) -> list[torch.Tensor]:
        """One forward over the new tokens of several sequences; returns each one's logits (last row, or all)."""
        ids, positions, slots, spans, rows = [], [], [], [], []
        for cache, toks, toks_slots in feeds:
            spans.append(SeqSpan(len(ids), len(toks), cache, cache.length))
            positions.extend(range(cache.length, cache.length + len(toks)))
            ids.extend(toks)
            slots.extend(toks_slots)
            rows.append(len(ids) - 1)
        dev = self.device
        slot_t = torch.tensor(slots, dtype=torch.int32, device=dev) if any(s >= 0 for s in slots) else None
        ctx = ForwardContext(torch.tensor(positions, device=dev), tuple(spans), slot_t)
        with self._lock:
            for cache, toks, _ in feeds:
                cache.reserve(cache.length + len(toks))
            with torch.inference_mode(), forward_context(ctx):
                logits = self.model(torch.tensor(ids, device=dev),
                                    None if all_rows else torch.tensor(rows, device=dev))
            for cache, toks, _ in feeds:
                cache.tokens.extend(toks)
        if all_rows:
            return [logits[s.start:s.start + s.length] for s in spans]
        return list(logits)

    def start_call(self, cache: KVCache, prompt: list[int], prompt_slots: list[int], decode_slot: int,
                   params: SamplingParams, stats: CallStats) -> Call:
        """Prepare a generation; the caller has already trimmed ``cache`` to the reusable prefix."""
        if not prompt:
            raise ValueError("nothing to feed: the prompt is empty")
        self.check_fits(cache.length + len(prompt))
        return Call(cache, list(prompt), list(prompt_slots), decode_slot, params, stats,
                    IncrementalDetokenizer(self.tokenizer), StopMatcher(params.stop), params.generator())

    def step(self, calls: Sequence[Call]) -> list[str]:
        """Advance every unfinished call by one forward (a prefill chunk or one decode token), batched.

        Returns the text delta of each call ('' when nothing new is visible yet).
        """
        active = [c for c in calls if not c.finished]
        feeds = []
        for c in active:
            c.driven = True
            if c.prompt:
                n = min(len(c.prompt), self.prefill_chunk)
                feeds.append((c.cache, c.prompt[:n], c.prompt_slots[:n]))
                del c.prompt[:n], c.prompt_slots[:n]
            else:
                feeds.append((c.cache, [c.pending], [c.decode_slot]))
                c.pending = None
        logits = self._forward(feeds) if feeds else []
        deltas = {id(c): "" for c in calls}
        for c, row in zip(active, logits):
            if c.prompt:
                continue
            deltas[id(c)] = self._advance(c, row)
        return [deltas[id(c)] for c in calls]

    def _advance(self, c: Call, logits: torch.Tensor) -> str:
        """Sample the next token of ``c`` and turn it into visible text; mark the call finished if it ends."""
        now = time.perf_counter()
        if c.params.max_new_tokens == 0:
            return self._finish(c, "length", now)
        token = sample(logits, c.params, c.generator)
        if c.first_token_at is None:
            c.first_token_at = now
        c.output.append(token)
        if token in self.eos_token_ids:
            return self._finish(c, "stop", now)
        text = c.stop.feed(c.detok.push(token))
        if c.stop.stopped:
            return text + self._finish(c, "stop", now)
        if len(c.output) >= c.params.max_new_tokens:
            return text + self._finish(c, "length", now)
        if c.cache.length + 1 >= self.config.max_position_embeddings:
            return text + self._finish(c, "context", now)
        c.pending = token
        return text

    def _finish(self, c: Call, reason: str, now: float) -> str:
        c.finished = True
        s = c.stats
        s.finish_reason = reason
        s.decode_tokens = len(c.output)
        first = c.first_token_at or now
        s.ttft_s = first - c.started
        s.total_s = now - c.started
        s.decode_tokens_per_s = (len(c.output) - 1) / (now - first) if len(c.output) > 1 and now > first else 0.0
        return c.stop.flush()

    def stream(self, call: Call) -> Iterator[str]:
        """Run one call to the end, yielding text deltas."""
        while not call.finished:
            delta = self.step([call])[0]
            if delta:
                yield delta

    def run_batch(self, jobs: Sequence[Job]) -> list[str]:
        """Run prepared jobs (``conv.start_send`` / ``conv.start_invoke``) together, one batched forward per
        step, mixing base and adapter tokens; returns each job's text. Equal to running each one alone."""
        calls = [j.call for j in jobs]
        texts = ["" for _ in jobs]
        try:
            while not all(c.finished for c in calls):
                for i, d in enumerate(self.step(calls)):
                    texts[i] += d
        except BaseException:
            for j in jobs:
                j.conversation.finish(j, failed=True)
            raise
        for j in jobs:
            j.conversation.finish(j)
        return texts
