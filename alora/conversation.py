"""A conversation: chat history as messages and tokens; send and invoke run as calls of the engine.

The conversation holds no KV of its own. Its history's base-model KV lives in the engine's pool as an
ordinary prefix-cache entry: every call looks up the longest cached prefix of its prompt, and at its end the
scheduler stores the call's base positions (an aLoRA's positions are never stored as base), so the next call
on the same history, with any adapter, starts from there. An idle conversation pins nothing: if its entry was
evicted, the next call recomputes it (``stats.recomputed_tokens``).

``history_ids`` always equals the chat template's rendering of the messages (a whole re-render each call, so
templates that rewrite earlier turns never leave stale tokens), with the turns an adapter's output was kept in
spliced in verbatim (its invocation and output tokens).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Sequence

from alora.engine.kv_pool import common_prefix
from alora.engine.request import Call, CallStats
from alora.engine.sampling import SamplingParams
from alora.errors import ContextOverflowError, ConversationBusyError, EngineClosedError
from alora.intrinsics import TOP_LOGPROBS

STATE_VERSION = 1


@dataclass
class Turn:
    message: dict
    ids: list[int] | None = None  # verbatim tokens (a kept adapter output); None: rendered by the template


@dataclass(eq=False)
class _Pending:
    """The call in flight on a conversation and what committing it to the history needs."""

    call: Call
    adapter: str | None
    keep: bool
    verbatim_suffix: list[int] | None  # the invocation tokens the prompt ended with (None: generation prompt)
    added_user: bool
    thread: int
    reading: bool = False  # a stream is consuming it
    seen_tokens: int = 0
    seen_text: str = ""
    done: bool = False


class Conversation:
    """Chat whose history's base KV every adapter call reuses. Create with ``Engine.conversation()``; it talks
    to its ``engine`` through the engine's public methods only (``submit``, ``adapter``, ``cached_prefix``).

    ``overflow`` is the policy when a call would not fit the context: ``"error"`` (default) raises
    ``ContextOverflowError`` and leaves the conversation as it was; ``"drop_oldest"`` drops whole exchanges
    after the system prompt, oldest first, until it fits (``stats.dropped_turns`` says how many; the rest of the
    history is recomputed where the prefix changed).
    """

    close_turn_limit = 64  # uncached history tokens computed eagerly when a turn ends

    def __init__(self, engine, system: str | None = None, messages: list[dict] | None = None,
                 cache_salt: str | None = None, overflow: str = "error"):
        if overflow not in ("error", "drop_oldest"):
            raise ValueError(f"overflow must be 'error' or 'drop_oldest', got {overflow!r}")
        self.engine = engine
        self.cache_salt = cache_salt
        self.overflow = overflow
        self._turns: list[Turn] = []
        self._lock = threading.RLock()
        self._pending: _Pending | None = None
        self._stats: CallStats | None = None
        self._computed: list[int] = []  # the tokens this conversation last had computed in base weights
        self._closing: Call | None = None  # the base prefill of a turn's closing tokens, started at its end
        if system is not None:
            self._turns.append(Turn({"role": "system", "content": system}))
        for msg in messages or []:
            if msg.get("role") not in ("system", "user", "assistant") or not isinstance(msg.get("content"), str):
                raise ValueError(f"a message needs a role (system, user, assistant) and str content, got {msg!r}")
            self._turns.append(Turn(dict(msg)))

    # ---- state ----------------------------------------------------------------------------------------

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
        """Leading positions of the history whose base-model KV is in the engine's cache now."""
        history = self.history_ids
        self._wait_closing()
        return self.engine.cached_prefix(history, self.cache_salt)

    def cache_bytes(self) -> int:
        """Bytes of base-model KV the engine holds for this conversation's history now."""
        return self.cached_tokens * self.engine.pool.bytes_per_token

    def to_dict(self) -> dict:
        """A JSON-serializable, token-exact snapshot (kept adapter turns included); see
        ``Engine.conversation_from``."""
        self._settle()
        return {"version": STATE_VERSION, "cache_salt": self.cache_salt, "overflow": self.overflow,
                "turns": [{"message": copy.deepcopy(t.message), **({"ids": list(t.ids)} if t.ids is not None else {})}
                          for t in self._turns]}

    @classmethod
    def from_dict(cls, engine, state: dict) -> "Conversation":
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a saved conversation of version {STATE_VERSION}: {str(state)[:80]!r}")
        conv = cls(engine, cache_salt=state.get("cache_salt"), overflow=state.get("overflow", "error"))
        vocab = engine.config.vocab_size
        for t in state["turns"]:
            msg, ids = t.get("message"), t.get("ids")
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or \
                    msg.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"a saved turn needs a message with a role and str content, got {t!r}")
            if ids is not None and not all(isinstance(i, int) and 0 <= i < vocab for i in ids):
                raise ValueError(f"a saved turn's ids must be token ids of this model (vocab {vocab})")
            conv._turns.append(Turn(dict(msg), list(ids) if ids is not None else None))
        return conv

    def clear(self) -> None:
        """Forget every message but the system prompt."""
        with self._lock:
            self._close_pending()
            self._turns = [t for t in self._turns[:1] if t.message["role"] == "system"]

    # ---- calls ----------------------------------------------------------------------------------------

    def send(self, text: str, adapter: str | None = None, *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] | str = (), seed: int | None = None,
             json_schema: dict | str | bool | None = None) -> Iterator[str]:
        """Add a user message and stream the reply's text deltas; the reply joins the history.

        With ``adapter`` an aLoRA is invoked after the message (base history reused), a LoRA runs on the
        history under its weights. The call starts at once and runs whether or not the stream is read;
        closing the stream early keeps the part read so far. ``json_schema``: the reply is decoded under it
        (structured output; ``True``: any JSON object); a schema that does not compile raises
        ``InvalidSchemaError`` before anything changes.
        """
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, stop, seed, json_schema=json_schema)
        return self._stream(self._start_send(text, adapter, params))

    def invoke(self, adapter: str, keep: bool = False, *, max_new_tokens: int = 256, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] | str = (), seed: int | None = None,
               json_schema: dict | str | bool | None = None) -> Iterator[str]:
        """Run ``adapter`` on the conversation now and stream its output.

        An aLoRA appends its invocation after the cached history and prefills only that; a LoRA computes
        the whole history under its weights (cached per adapter). The history is unchanged unless
        ``keep=True``, which appends the output (after the invocation) to it. ``json_schema`` as in ``send``.
        """
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, stop, seed, json_schema=json_schema)
        return self._stream(self._start_invoke(adapter, keep, params))

    def invoke_many(self, adapters: Sequence[str], *, max_new_tokens: int = 256, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, stop: Sequence[str] | str = (), seed: int | None = None
                    ) -> list[str]:
        """Fan-out: run several adapters on the history at once, batched in the same steps over the one
        cached base prefix; returns their outputs. The history is unchanged."""
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, stop, seed)
        for name in adapters:  # every name is checked before any call starts
            self.engine.adapter(name)
        with self._lock:
            self._close_pending()
            self._wait_closing()
            history = self._history_ids()
            if history and self.engine.cached_prefix(history, self.cache_salt) < len(history):
                warm = self.engine.submit(history, None, SamplingParams(max_new_tokens=0), self.cache_salt,
                                          expected_cached=common_prefix(self._computed, history))
                warm.wait()
                self._computed = history
            calls = [self.engine.submit(self._invoke_prompt(name, history)[0], name, params, self.cache_salt,
                                        expected_cached=common_prefix(self._computed, history))
                     for name in adapters]
            texts = self.engine.run_batch(calls)
            if calls:
                self._stats = calls[-1].stats
            return texts

    def run_intrinsic(self, name: str, /, **fields) -> Any:
        """Run intrinsic ``name`` (``Engine.load_intrinsic``) on the conversation now and return its result,
        e.g. ``{"answerability_likelihood": 0.93}``.

        As IBM's clients call one: its io.yaml ``instruction`` (placeholders filled from ``fields``) is
        appended as a user message, the adapter runs on the cached history (an aLoRA prefills the instruction
        only, a LoRA recomputes the history), the output is decoded under its ``response_format`` with the
        top logprobs, and its ``transformations`` turn those into the result. The history is unchanged;
        ``stats`` describes the call.
        """
        call = self.start_intrinsic(name, **fields)
        call.wait()
        return self.engine.intrinsic(name).result(call, self.engine.token_text)

    def start_intrinsic(self, name: str, /, **fields) -> Call:
        """Start ``run_intrinsic`` and return its call; ``engine.intrinsic(name).result(call,
        engine.token_text)`` reads the result once it has finished."""
        spec = self.engine.intrinsic(name)
        info = self.engine.adapter(name)
        params = SamplingParams(spec.max_new_tokens, temperature=float(spec.parameters.get("temperature") or 0.0),
                                json_schema=spec.response_format,
                                logprobs=TOP_LOGPROBS if spec.needs_logprobs else None)
        with self._lock:
            self._close_pending()
            self._wait_closing()
            history = self._history_ids()
            last = self._turns[-1].message["content"] if self._turns else None
            instruction = spec.instruction_text(last, fields)
            if instruction is None:
                prompt = self._invoke_prompt(name, history)[0]
            else:
                self._turns.append(Turn({"role": "user", "content": instruction}))
                try:
                    prompt = self._history_ids(generation_prompt=True)
                finally:
                    self._turns.pop()
                if info.kind == "alora":
                    prompt = self.engine.activation_prompt(name, prompt) or self.engine.invocation_prompt(name, prompt)
            call = self.engine.submit(prompt, name, params, self.cache_salt,
                                      expected_cached=common_prefix(self._computed, history))
            self._stats = call.stats
            return call

    def start_send(self, text: str, adapter: str | None = None, **sampling) -> Call:
        """Start ``send`` and return its call (its output joins the history when it ends); for
        ``Engine.run_batch`` or event-level access."""
        return self._start_send(text, adapter, SamplingParams(**sampling)).call

    def start_invoke(self, adapter: str, keep: bool = False, **sampling) -> Call:
        """Start ``invoke`` and return its call (see ``start_send``)."""
        return self._start_invoke(adapter, keep, SamplingParams(**sampling)).call

    async def asend(self, text: str, adapter: str | None = None, **sampling) -> AsyncIterator[str]:
        """``send`` for asyncio: text deltas without blocking the event loop."""
        async for delta in self._astream(self._start_send(text, adapter, SamplingParams(**sampling))):
            yield delta

    async def ainvoke(self, adapter: str, keep: bool = False, **sampling) -> AsyncIterator[str]:
        """``invoke`` for asyncio."""
        async for delta in self._astream(self._start_invoke(adapter, keep, SamplingParams(**sampling))):
            yield delta

    # ---- lifecycle ------------------------------------------------------------------------------------

    def _start_send(self, text: str, adapter: str | None, params: SamplingParams) -> _Pending:
        if not isinstance(text, str):
            raise TypeError(f"message must be str, got {type(text).__name__}")
        with self._lock:
            self._close_pending()
            before = self._history_ids()
            self._turns.append(Turn({"role": "user", "content": text}))
            try:
                return self._submit(adapter, keep=True, params=params, added_user=True, before=before)
            except BaseException:
                self._turns.pop()
                raise

    def _start_invoke(self, adapter: str, keep: bool, params: SamplingParams) -> _Pending:
        with self._lock:
            self._close_pending()
            return self._submit(adapter, keep=keep, params=params, added_user=False, before=self._history_ids())

    def _invoke_prompt(self, adapter: str | None, history: list[int]) -> tuple[list[int], list[int] | None]:
        """(prompt, verbatim suffix): the invocation after the history for an adapter that has one, else the
        template's generation prompt."""
        info = self.engine.adapter(adapter) if adapter is not None else None
        if info is not None and info.invocation_tokens:
            return history + list(info.invocation_tokens), list(info.invocation_tokens)
        return self._history_ids(generation_prompt=True), None

    def _submit(self, adapter: str | None, keep: bool, params: SamplingParams, added_user: bool,
                before: list[int]) -> _Pending:
        self._wait_closing()
        saved, dropped = list(self._turns), 0
        while True:
            prompt, suffix = self._invoke_prompt(adapter, self._history_ids())
            try:
                call = self.engine.submit(prompt, adapter, params, self.cache_salt,
                                          expected_cached=common_prefix(self._computed, before))
                break
            except ContextOverflowError:
                if self.overflow != "drop_oldest" or not self._drop_oldest_turn(keep_last=added_user):
                    self._turns = saved
                    raise
                dropped += 1
        call.stats.dropped_turns = dropped
        self._pending = _Pending(call, adapter, keep, suffix, added_user, threading.get_ident())
        self._stats = call.stats
        return self._pending

    def _drop_oldest_turn(self, keep_last: bool) -> bool:
        """Drop the oldest exchange after the system prompt (a user message and the replies up to the next
        one); never the message being sent. False when nothing is left to drop."""
        first = next((i for i, t in enumerate(self._turns) if t.message["role"] != "system"), None)
        last = len(self._turns) - (1 if keep_last else 0)
        if first is None or first >= last:
            return False
        end = first + 1
        while end < last and self._turns[end].message["role"] != "user":
            end += 1
        del self._turns[first:end]
        return True

    def _stream(self, p: _Pending) -> Iterator[str]:
        p.reading = True
        try:
            for ev in p.call:
                p.seen_tokens += len(ev.token_ids)
                p.seen_text += ev.text
                if ev.text:
                    yield ev.text
        except GeneratorExit:  # the reader stopped: keep what it was shown
            p.call.cancel()
            p.call.wait()
            self._commit(p, partial=True)
            raise
        except BaseException:
            self._commit(p)
            raise
        self._commit(p)

    async def _astream(self, p: _Pending) -> AsyncIterator[str]:
        p.reading = True
        try:
            async for ev in p.call.aiter():
                p.seen_tokens += len(ev.token_ids)
                p.seen_text += ev.text
                if ev.text:
                    yield ev.text
        except BaseException as e:
            if not p.call.finished:  # cancelled or closed by the caller
                p.call.cancel()
                await _wait_async(p.call)
                self._commit(p, partial=True)
            else:
                self._commit(p)
            if not isinstance(e, GeneratorExit):
                raise
            return
        self._commit(p)

    def _commit(self, p: _Pending, partial: bool = False) -> None:
        """Apply an ended call to the history: its reply joins (kept calls), or its user message is taken back
        (failed calls). ``partial``: only what the reader was shown is kept."""
        with self._lock:
            if p.done:
                return
            p.done = True
            if self._pending is p:
                self._pending = None
            call = p.call
            if call.error is not None:
                if p.added_user:
                    self._turns.pop()
                return
            output = call.output[:p.seen_tokens] if partial else call.output
            text = p.seen_text if partial else call.text
            if call.namespace[1] is not None:
                pass  # a LoRA's KV: the base history is as it was
            elif call.storable >= len(call.prompt):
                self._computed = (call.prompt + output)[:len(call.prompt) + max(0, len(output) - 1)]
            elif call.storable > 0:
                self._computed = call.prompt[:call.storable]
            if p.keep:
                msg = {"role": "assistant", "content": text}
                if p.adapter is not None:
                    msg["adapter"] = p.adapter
                if p.verbatim_suffix is None:
                    self._turns.append(Turn(msg))
                else:
                    ids = p.verbatim_suffix + list(output)
                    eos = self.engine.tokenizer.eos_token_id
                    if eos is not None and (not output or output[-1] not in self.engine.eos_token_ids):
                        ids.append(eos)  # close the turn so later messages start cleanly
                    self._turns.append(Turn(msg, ids))
                self._close_turn()

    def _close_turn(self) -> None:
        """Start computing the base KV of the few history tokens that close a kept turn (end of turn, a kept
        invocation) right away, while the user reads the reply, so the next call starts from a fully cached
        history and an aLoRA invoked next prefills its invocation only. Long tails (after a LoRA reply) are
        left to the next call."""
        history = self._history_ids()
        tail = len(history) - self.engine.cached_prefix(history, self.cache_salt)
        if 0 < tail <= self.close_turn_limit:
            try:
                self._closing = self.engine.submit(history, None, SamplingParams(max_new_tokens=0), self.cache_salt,
                                                   expected_cached=common_prefix(self._computed, history))
            except (EngineClosedError, ContextOverflowError):  # exiting; or a history at the context's end,
                return  # which the next call handles by its overflow policy
            self._computed = history

    def _wait_closing(self) -> None:
        closing, self._closing = self._closing, None
        if closing is not None:
            closing.wait()

    def _settle(self) -> None:
        """Wait for the call in flight and apply it, so the history is complete before it is read."""
        with self._lock:
            p = self._pending
        if p is not None:
            p.call.wait()
            self._commit(p)

    def _close_pending(self) -> None:
        """Before a new call: a call whose stream this thread left part-read ends now (keeping what was read);
        one never read runs to its end first; one being read by another thread makes this call fail fast."""
        p = self._pending
        if p is None:
            return
        if p.thread != threading.get_ident() and p.reading and not p.call.finished:
            raise ConversationBusyError("this conversation is busy with a call from another thread; wait for it "
                                        "to finish or stop it, or use one conversation per thread")
        if p.reading:
            p.call.cancel()
            p.call.wait()
            self._commit(p, partial=True)
        else:
            p.call.wait()
            self._commit(p)

    # ---- tokens of the history ----------------------------------------------------------------------

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> list[int]:
        if not messages and not generation_prompt:
            return []
        out = self.engine.tokenizer.apply_chat_template(messages, tokenize=True,
                                                        add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def _history_ids(self, generation_prompt: bool = False) -> list[int]:
        """The template's rendering of the messages, kept adapter turns spliced in verbatim where they were
        kept (the template renders the messages around them)."""
        out: list[int] = []
        plain: list[dict] = []
        shown: list[int] = []  # the rendering of ``plain`` already in ``out``
        for t in self._turns:
            if t.ids is None:
                plain.append({"role": t.message["role"], "content": t.message["content"]})
                continue
            now = self._render(plain)
            out += now[common_prefix(shown, now):] + t.ids
            shown = now
        now = self._render(plain, generation_prompt)
        return out + now[common_prefix(shown, now):]


async def _wait_async(call: Call) -> None:
    async for _ in call.aiter():
        pass
