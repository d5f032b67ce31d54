"""One request to the engine: its prompt and sampling, the state the scheduler keeps for it, and the handle
its submitter reads events from (in a thread or in asyncio) and cancels it with."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import torch

from alora.engine.detokenize import IncrementalDetokenizer, StopMatcher
from alora.engine.kv_pool import KVCache, Namespace
from alora.engine.sampling import SamplingParams


@dataclass(eq=False)
class CallStats:
    """What one call cost. ``reused_tokens`` came from the KV cache; ``prefill_tokens`` were computed
    before the first output token; ``recomputed_tokens`` are tokens that had been computed before (by the same
    conversation) and had to be computed again (a LoRA's history, an evicted cache entry)."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0
    reused_tokens: int = 0
    recomputed_tokens: int = 0
    decode_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    finish_reason: str = ""  # stop | length | context | cancelled | error
    adapter: str | None = None
    dropped_turns: int = 0  # exchanges a conversation dropped to fit the context (overflow="drop_oldest")


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the distribution the sampler used, and the top alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Event:
    """What a call produced since the previous event; ``finish_reason`` is set on the last one."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None


@dataclass(eq=False)
class Call:
    """A request and its handle. Iterate it (``for ev in call``) or ``async for ev in call.aiter()``;
    ``cancel()`` from any thread ends it at the next scheduler step."""

    prompt: list[int]
    slots: list[int]  # adapter slot per prompt token (-1 = base)
    decode_slot: int  # adapter slot of generated tokens
    params: SamplingParams
    namespace: Namespace  # prefix-cache namespace of the tokens it may reuse and store
    storable: int  # leading prompt tokens computed in the namespace's weights (aLoRA: before activation)
    detok: IncrementalDetokenizer
    stop: StopMatcher
    stats: CallStats
    use_cache: bool = True  # look up cached prefixes
    store: bool = True  # store its prefix for later calls
    all_logits: bool = False  # keep the logits of every prompt row (``forward_logits``)
    expected_cached: int = 0  # prompt tokens its submitter had computed before: misses are "recomputed"
    generator: torch.Generator | None = None
    grammar: object | None = None  # the structured output's matcher (``params.json_schema``)
    # scheduler state
    seq: KVCache | None = None
    output: list[int] = field(default_factory=list)
    logits_rows: list[torch.Tensor] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    error: BaseException | None = None
    # consumer side
    _events: list[Event] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _async_waiters: list = field(default_factory=list)
    _cancelled: bool = False
    finished: bool = False

    # ---- scheduler side --------------------------------------------------------------------------------

    @property
    def tokens(self) -> list[int]:
        """Prompt then output: the sequence whose KV the call builds."""
        return self.prompt + self.output

    @property
    def pending(self) -> int:
        """Tokens of that sequence not yet in the call's KV buffer (1 while decoding)."""
        return len(self.prompt) + len(self.output) - self.seq.length

    def tokens_at(self, start: int, n: int) -> list[int]:
        """``tokens[start:start + n]`` without building the whole sequence (this runs every step)."""
        p = len(self.prompt)
        return self.prompt[start:start + n] + self.output[max(0, start - p):max(0, start + n - p)]

    def slot_of(self, i: int) -> int:
        return self.slots[i] if i < len(self.prompt) else self.decode_slot

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def push(self, event: Event) -> None:
        """Deliver an event to the consumer (scheduler thread)."""
        with self._cond:
            self._events.append(event)
            if event.finish_reason is not None:
                self.finished = True
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_wake, fut)

    # ---- consumer side ---------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop at the next scheduler step; what was generated so far is kept in ``output``."""
        self._cancelled = True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the call has finished; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.finished, timeout)

    def __iter__(self) -> Iterator[Event]:
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._events) > i)
                batch = self._events[i:]
            i += len(batch)
            for ev in batch:
                yield ev
                if self._ends(ev):
                    return

    async def aiter(self) -> AsyncIterator[Event]:
        """The events, for asyncio: never blocks the event loop."""
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            with self._cond:
                batch = self._events[i:]
                if not batch:
                    fut = loop.create_future()
                    self._async_waiters.append((loop, fut))
            if not batch:
                await fut
                continue
            i += len(batch)
            for ev in batch:
                yield ev
                if self._ends(ev):
                    return

    def _ends(self, ev: Event) -> bool:
        """Whether ``ev`` is the last event; a failed call raises its error there."""
        if ev.finish_reason is None:
            return False
        if self.error is not None:
            raise self.error
        return True

    @property
    def output_ids(self) -> list[int]:
        """The generated token ids (a stop token included)."""
        return list(self.output)

    @property
    def text(self) -> str:
        """The generated text so far, stop strings cut."""
        return self.stop.text

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """The logprobs delivered so far, one per generated token (empty unless ``params.logprobs`` is set)."""
        with self._cond:
            return [lp for ev in self._events for lp in (ev.logprobs or ())]


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
