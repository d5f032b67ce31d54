"""A conversation: chat history as messages and tokens, its base-model KV cache, send and invoke.

Invariant: the conversation's cache holds base-model KV of a prefix of the history tokens, nothing else.
Every call first reuses the longest cached prefix, feeds the rest, and at its end rolls back every position
an adapter touched, so the history's base KV survives any number of adapter calls.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Iterator

from alora.cache import common_prefix
from alora.sampling import SamplingParams

if TYPE_CHECKING:
    from alora.engine import Call, CallStats, Engine


class ConversationBusyError(RuntimeError):
    """A conversation serves one call at a time."""


@dataclass
class Turn:
    message: dict
    ids: list[int]  # this message's tokens in the history
    templated: bool  # rendered by the chat template (False: an adapter's invocation and output, kept verbatim)


@dataclass
class Job:
    """A prepared call on a conversation; run it with ``Engine.run_batch`` or stream it with ``Conversation``."""

    conversation: "Conversation"
    call: "Call"
    adapter: str | None
    keep: bool
    suffix_is_template: bool  # the prompt ended with the chat template's generation prompt
    suffix: list[int]
    added_user: bool
    rollback_to: int | None  # cache length to return to at the end (adapter positions), None: keep all
    thread: int = 0  # the thread that started it
    done: bool = False


class Conversation:
    """Chat with a base-model KV cache that adapters reuse. Create with ``Engine.conversation()``."""

    close_turn_limit = 64  # uncached history tokens prefilled eagerly at the end of a call

    def __init__(self, engine: "Engine", system: str | None = None, messages: list[dict] | None = None):
        self.engine = engine
        self._turns: list[Turn] = []
        self._cache = engine.new_cache()
        self._lock = threading.RLock()
        self._active: Job | None = None
        self._stats: CallStats | None = None
        if system is not None:
            msg = {"role": "system", "content": system}
            self._turns.append(Turn(msg, self._template_delta(msg), True))
        for msg in messages or []:
            if msg.get("role") not in ("system", "user", "assistant") or not isinstance(msg.get("content"), str):
                raise ValueError(f"a message needs a role (system, user, assistant) and str content, got {msg!r}")
            self._turns.append(Turn(dict(msg), self._template_delta(msg), True))

    # ---- public API -----------------------------------------------------------------------------------

    @property
    def messages(self) -> list[dict]:
        """The history as chat messages (copies); replies made by an adapter carry its name in 'adapter'."""
        self._settle()
        return [copy.deepcopy(t.message) for t in self._turns]

    @property
    def history_ids(self) -> list[int]:
        """The history as the token ids the model sees."""
        self._settle()
        return self._history_ids()

    @property
    def stats(self) -> CallStats | None:
        """What the last call cost (see ``CallStats``)."""
        self._settle()
        return self._stats

    @property
    def cached_tokens(self) -> int:
        """Positions of the history whose base-model KV is cached."""
        self._settle()
        return self._cache.length

    def cache_bytes(self) -> int:
        """Bytes of base-model KV this conversation holds."""
        return self._cache.nbytes()

    def send(self, text: str, adapter: str | None = None, **sampling) -> Iterator[str]:
        """Add a user message and stream the reply's text deltas; the reply joins the history.

        With ``adapter`` an aLoRA is invoked after the message (base history reused), a LoRA recomputes the
        history under its weights. Sampling keywords: max_new_tokens, temperature, top_k, top_p, stop, seed.
        """
        return self._stream(self.start_send(text, adapter, **sampling))

    def invoke(self, adapter: str, keep: bool = False, **sampling) -> Iterator[str]:
        """Run ``adapter`` on the conversation now and stream its output.

        An aLoRA appends its invocation after the cached history and prefills only that; a LoRA recomputes
        the whole history under its weights. The history is unchanged unless ``keep=True``, which appends
        the output (after the invocation) to it.
        """
        return self._stream(self.start_invoke(adapter, keep, **sampling))

    async def asend(self, text: str, adapter: str | None = None, **sampling) -> AsyncIterator[str]:
        """``send`` for asyncio servers: the forward passes run in a worker thread."""
        async for delta in _in_thread(self.send(text, adapter, **sampling)):
            yield delta

    async def ainvoke(self, adapter: str, keep: bool = False, **sampling) -> AsyncIterator[str]:
        async for delta in _in_thread(self.invoke(adapter, keep, **sampling)):
            yield delta

    def clear(self) -> None:
        """Forget every message but the system prompt."""
        with self._lock:
            self._close_active()
            self._turns = [t for t in self._turns[:1] if t.message["role"] == "system"]
            self._cache.truncate(0)

    # ---- jobs -----------------------------------------------------------------------------------------

    def start_send(self, text: str, adapter: str | None = None, **sampling) -> Job:
        """Prepare ``send`` without running it (see ``Engine.run_batch``)."""
        if not isinstance(text, str):
            raise TypeError(f"message must be str, got {type(text).__name__}")
        msg = {"role": "user", "content": text}
        with self._lock:
            self._close_active()
            turn = Turn(msg, self._template_delta(msg), True)
            self._turns.append(turn)
            try:
                return self._start(adapter, keep=True, params=SamplingParams(**sampling), added_user=True)
            except BaseException:
                self._turns.pop()
                raise

    def start_invoke(self, adapter: str, keep: bool = False, **sampling) -> Job:
        """Prepare ``invoke`` without running it (see ``Engine.run_batch``)."""
        with self._lock:
            self._close_active()
            return self._start(adapter, keep=keep, params=SamplingParams(**sampling), added_user=False)

    def _start(self, adapter: str | None, keep: bool, params: SamplingParams, added_user: bool) -> Job:
        from alora.engine import CallStats

        engine = self.engine
        info = engine.adapter(adapter) if adapter is not None else None
        history = self._history_ids()
        if info is not None and info.invocation_tokens:
            suffix, templated = list(info.invocation_tokens), False
        else:
            suffix, templated = self._generation_prompt(), True
        prompt = history + suffix
        slots = engine._registry.slots_for(adapter, prompt) if adapter else [-1] * len(prompt)
        first_adapted = next((i for i, s in enumerate(slots) if s >= 0), len(prompt))
        engine.check_fits(len(prompt) + 1)
        stats = CallStats(adapter=adapter)
        if first_adapted == 0:
            # Adapted from the first token (a LoRA): nothing cached is valid; recompute into a scratch cache.
            cache, reuse, rollback = engine.new_cache(len(prompt) + params.max_new_tokens), 0, None
        else:
            cache = self._cache
            reuse = min(cache.common_prefix(prompt), first_adapted, len(prompt) - 1)
            cache.truncate(reuse)
            rollback = first_adapted if first_adapted < len(prompt) else None
        stats.reused_tokens = reuse
        stats.prefill_tokens = len(prompt) - reuse
        already = len(history) - (len(self._turns[-1].ids) if added_user else 0)
        stats.recomputed_tokens = max(0, already - reuse)
        call = engine.start_call(cache, prompt[reuse:], slots[reuse:], slots[-1], params, stats)
        job = Job(self, call, adapter, keep, templated, suffix, added_user, rollback, threading.get_ident())
        self._active = job
        self._stats = stats
        return job

    def _stream(self, job: Job) -> Iterator[str]:
        if job.done:  # settled before anyone read it: hand over the whole output at once
            if job.call.stop.text:
                yield job.call.stop.text
            return
        try:
            yield from self.engine.stream(job.call)
        except GeneratorExit:
            self.finish(job)  # the caller stopped reading: keep what was generated
            raise
        except BaseException:
            self.finish(job, failed=True)
            raise
        else:
            self.finish(job)

    def finish(self, job: Job, failed: bool = False) -> None:
        """End a job: commit its output to the history (or drop it on failure) and roll adapter KV back."""
        with self._lock:
            if job.done:
                return
            job.done = True
            if self._active is job:
                self._active = None
            if job.rollback_to is not None:
                self._cache.truncate(job.rollback_to)
            if failed:
                if job.added_user:
                    self._turns.pop()
                self._cache.truncate(min(self._cache.length, len(self._history_ids())))
                return
            if job.keep:
                self._turns.append(self._reply_turn(job))
            self._close_turn()

    def _close_turn(self) -> None:
        """Prefill a short uncached tail of the history (the turn's end tokens, a kept invocation) in base
        weights now, so the next call starts from a fully cached history. Long tails (after a LoRA reply)
        wait for the next call."""
        history = self._history_ids()
        reuse = self._cache.common_prefix(history)
        if 0 < len(history) - reuse <= self.close_turn_limit:
            self._cache.truncate(reuse)
            self.engine._forward([(self._cache, history[reuse:], [-1] * (len(history) - reuse))])

    def _history_ids(self) -> list[int]:
        return [i for t in self._turns for i in t.ids]

    def _settle(self) -> None:
        """Run a call nobody has read from to its end, so ``conv.invoke(name, keep=True)`` used as a statement
        (its stream never iterated) still appends its output before the conversation is used again."""
        with self._lock:
            job = self._active
            if job is not None and not job.call.driven:
                try:
                    for _ in self.engine.stream(job.call):
                        pass
                except BaseException:
                    self.finish(job, failed=True)
                    raise
                self.finish(job)

    def _close_active(self) -> None:
        """Before a new call: end an abandoned stream of this thread (keeping its partial output); a call
        still running in another thread makes this one fail fast instead of corrupting the history."""
        self._settle()
        job = self._active
        if job is None:
            return
        if job.thread != threading.get_ident():
            raise ConversationBusyError("this conversation is busy with a call from another thread; wait for it "
                                        "to finish or stop it, or use one conversation per thread")
        self.finish(job)

    # ---- tokens of the history ----------------------------------------------------------------------

    def _reply_turn(self, job: Job) -> Turn:
        call = job.call
        text = call.stop.text
        msg = {"role": "assistant", "content": text}
        if job.adapter is not None:
            msg["adapter"] = job.adapter
        if job.suffix_is_template:
            return Turn(msg, self._template_delta(msg), True)
        ids = job.suffix + call.output
        eos = self.engine.tokenizer.eos_token_id
        if eos is not None and (not call.output or call.output[-1] not in self.engine.eos_token_ids):
            ids.append(eos)  # close the turn so later messages start cleanly
        return Turn(msg, ids, False)

    def _plain(self) -> list[dict]:
        return [{"role": t.message["role"], "content": t.message["content"]} for t in self._turns if t.templated]

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> list[int]:
        if not messages and not generation_prompt:
            return []
        out = self.engine.tokenizer.apply_chat_template(messages, tokenize=True,
                                                        add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def _template_delta(self, message: dict) -> list[int]:
        """Tokens the chat template adds for ``message`` after the current history."""
        plain = self._plain()
        before = self._render(plain)
        after = self._render(plain + [{"role": message["role"], "content": message["content"]}])
        return after[common_prefix(before, after):]

    def _generation_prompt(self) -> list[int]:
        plain = self._plain()
        before = self._render(plain)
        after = self._render(plain, generation_prompt=True)
        return after[common_prefix(before, after):]


async def _in_thread(gen: Iterator[str]) -> AsyncIterator[str]:
    """Drive a blocking generator from asyncio, one item per worker-thread hop; closes it if cancelled."""
    done = object()
    try:
        while True:
            item = await asyncio.to_thread(next, gen, done)
            if item is done:
                return
            yield item
    finally:
        await asyncio.to_thread(gen.close)
