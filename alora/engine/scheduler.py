"""The scheduler: one thread owns the model's forward; calls join and leave at any step.

Each step packs one token of every decoding call and prefill chunks of the others under a token budget
(while anyone is decoding, what fits in a target step time by the measured costs, so their tokens keep
flowing; large when only prompts wait), base and
adapter tokens of all calls in one forward. The scheduler owns a call's whole lifecycle: admission (a KV
buffer from the pool, the longest cached prefix copied in), steps, cancellation, preemption (by recompute,
when the pool cannot grow a buffer), and the end (the call's storable prefix handed to the prefix cache,
adapter positions dropped). Nothing else drives calls.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Callable

import torch

from alora.engine.kv_pool import KVPool
from alora.engine.request import Call, Event, TokenLogprob
from alora.engine.runner import ModelRunner
from alora.engine.sampling import sample
from alora.errors import EngineClosedError, QueueFullError
from alora_kernels import cpu_gemv


class Scheduler:
    step_target_s = 0.2  # a step's duration while some call is decoding: the streams' inter-token gap
    prefill_step_tokens = 2048  # token budget of a step with prompts only (and the most a step ever takes)
    min_prefill_chunk = 16
    max_running = 64
    grow_tokens = 64  # a buffer grows by at least this many positions (and at least by half)

    def __init__(self, runner: ModelRunner, pool: KVPool, eos_token_ids: frozenset[int], max_context: int,
                 max_queue: int | None = None):
        self.runner, self.pool = runner, pool
        self.eos_token_ids = eos_token_ids
        self.max_context = max_context
        self.max_queue = max_queue
        self.structured = None  # the engine's StructuredOutputs, set before the first call with a json_schema
        self.waiting: deque[Call] = deque()
        self.running: list[Call] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.finished_by_adapter: Counter[str] = Counter()
        self.preemptions = 0
        self.steps = 0
        # measured costs (moving averages) that size the prefill chunks of a step with decodes in it
        self.decode_row_s = 0.05  # seconds a step takes per decoding call
        self.prefill_token_s = 0.002  # seconds it takes per prefill token on top of that

    # ---- any thread ------------------------------------------------------------------------------------

    def submit(self, call: Call) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine has been shut down")
            if self.max_queue is not None and len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue}); "
                                     "retry later")
            self.waiting.append(call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="alora-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify()

    def active(self, predicate: Callable[[Call], bool]) -> bool:
        """Whether a waiting or running call matches ``predicate``."""
        with self._cond:
            return any(predicate(c) for c in (*self.waiting, *self.running))

    def counts(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._cond:
            return len(self.running), len(self.waiting)

    def shutdown(self) -> None:
        """Cancel every call and stop the thread."""
        with self._cond:
            self._closed = True
            for c in (*self.waiting, *self.running):
                c.cancel()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # ---- the scheduler thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        if self.runner.device.type == "cpu":
            cpu_gemv.use_worker_pool()  # the forward's threads are the kernels' own, whoever else uses torch
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self.waiting or self.running)
                if self._closed:
                    for c in (*self.waiting, *self.running):
                        self._finish(c, "cancelled")
                    return
            try:
                self.step()
            except Exception as e:  # a failed forward fails the calls in it, never the engine
                with self._cond:
                    failed = list(self.running)
                for c in failed:
                    c.error = e
                    self._finish(c, "error", store=False)

    def step(self) -> None:
        """One scheduling round and at most one forward."""
        with self._cond:
            for c in [c for c in (*self.waiting, *self.running) if c.cancelled]:
                self._finish(c, "cancelled")
        decoding = [c for c in self.running if c.pending == 1 and c.output]
        budget = self._prefill_budget(len(decoding))
        admitting = budget  # waiting calls are admitted (FIFO) while their uncached prompts fit in one step
        while admitting > 0 and len(self.running) < self.max_running:
            with self._cond:
                if not self.waiting:
                    break
                call = self.waiting[0]
            if not self._admit(call):
                break
            admitting -= call.pending
        # prompts are fed shortest remaining first, so a short call (an aLoRA's invocation on a cached history)
        # never waits behind a long prompt's chunks; the long one takes what the step has left
        feeds: list[tuple[Call, int]] = [(c, 1) for c in decoding]
        for c in sorted((c for c in self.running if c not in decoding), key=lambda c: c.pending):
            if budget <= 0:
                break
            n = min(c.pending, budget)
            feeds.append((c, n))
            budget -= n
        for c, n in feeds:
            if c.seq is not None:
                self._reserve(c, c.seq.length + n)
        feeds = [(c, n) for c, n in feeds if c.seq is not None]  # minus the preempted
        if not feeds:
            return
        batch = []
        for c, n in feeds:
            start = c.seq.length
            toks = c.tokens_at(start, n)
            batch.append((c.seq, toks, [c.slot_of(i) for i in range(start, start + n)]))
        started = time.perf_counter()
        logits = self.runner.run(batch, [c.all_logits for c, _ in feeds])
        self._measure(time.perf_counter() - started, len(decoding), sum(n for _, n in feeds) - len(decoding))
        self.steps += 1
        sampling = [(c, row) for (c, _), row in zip(feeds, logits) if c.pending == 0]
        masks = self._grammar_masks([c for c, _ in sampling])
        for (c, _), row in zip(feeds, logits):
            if c.all_logits:
                c.logits_rows.append(row.float().cpu())
        for c, row in sampling:  # the whole sequence is in: sample its next token
            try:
                self._advance(c, row[-1] if c.all_logits else row, masks.get(id(c)))
            except Exception as e:  # e.g. a logits processor: this call fails, the others go on
                c.error = e
                self._finish(c, "error", store=False)

    def _grammar_masks(self, calls: list[Call]) -> dict[int, torch.Tensor]:
        """The allowed-token masks of the structured-output calls about to sample, filled in one batch."""
        constrained = [c for c in calls if c.grammar is not None and len(c.output) < c.params.max_new_tokens]
        if not constrained:
            return {}
        rows = self.structured.allowed([c.grammar for c in constrained]).to(self.runner.device)
        return {id(c): row for c, row in zip(constrained, rows)}

    def _prefill_budget(self, decode_rows: int) -> int:
        """Prompt tokens this step may take: as many as fit in ``step_target_s`` beside the decoding calls
        (chunked prefill: their tokens keep flowing while a long prompt comes in), all it can when none
        decodes."""
        if not decode_rows:
            return self.prefill_step_tokens
        spare = self.step_target_s - self.decode_row_s * decode_rows
        return int(min(self.prefill_step_tokens, max(self.min_prefill_chunk, spare / self.prefill_token_s)))

    def _measure(self, seconds: float, decode_rows: int, prefill_tokens: int, weight: float = 0.3) -> None:
        """Update the step cost model from one forward (and its sampling) that took ``seconds``."""
        if prefill_tokens == 0 and decode_rows:
            self.decode_row_s += weight * (seconds / decode_rows - self.decode_row_s)
        elif prefill_tokens >= self.min_prefill_chunk:
            per_token = max(1e-6, (seconds - self.decode_row_s * decode_rows) / prefill_tokens)
            self.prefill_token_s += weight * (per_token - self.prefill_token_s)

    def _admit(self, call: Call) -> bool:
        """Give the first waiting call a buffer with its longest cached prefix; False if memory is short."""
        tokens = call.tokens
        if call.use_cache:
            limit = call.storable if call.storable < len(call.prompt) else len(tokens)
            cached, n = self.pool.match(call.namespace, tokens[:limit])
            n = min(n, len(tokens) - 1)  # at least one token is fed, for its logits
        else:
            cached, n = None, 0
        remaining = max(0, call.params.max_new_tokens - len(call.output))
        seq = self.pool.allocate(min(len(tokens) + min(remaining, self.grow_tokens), self.max_context))
        if seq is None:
            return False
        if n:
            seq.copy_prefix(cached, n)
        call.seq = seq
        with self._cond:
            self.waiting.popleft()
            self.running.append(call)
        s = call.stats
        if not s.prompt_tokens:  # first admission (a preempted call keeps its first numbers)
            s.prompt_tokens = len(call.prompt)
            s.reused_tokens = n
            s.prefill_tokens = len(call.prompt) - n
            s.recomputed_tokens = max(0, min(call.expected_cached, len(call.prompt)) - n)
            self.prompt_tokens_total += len(call.prompt)
        return True

    def _reserve(self, call: Call, positions: int) -> None:
        """Make ``call``'s buffer hold ``positions``, preempting the newest other calls (or, last, ``call``
        itself) while memory is short."""
        seq = call.seq
        if positions <= seq.capacity:
            return
        most = min(len(call.prompt) + call.params.max_new_tokens, self.max_context)
        target = min(max(positions, seq.capacity + max(self.grow_tokens, seq.capacity // 2)), max(most, positions))
        while not self.pool.grow(seq, target):
            victim = next((c for c in reversed(self.running) if c is not call), call)
            self._preempt(victim)
            if victim is call:
                return

    def _preempt(self, call: Call) -> None:
        """Free a running call's buffer and queue it first: it is recomputed when memory allows."""
        self.pool.free(call.seq)
        call.seq = None
        self.preemptions += 1
        with self._cond:
            self.running.remove(call)
            self.waiting.appendleft(call)

    def _advance(self, c: Call, logits, allowed=None) -> None:
        """Sample the next token of ``c``, deliver its text, and end the call if it is done."""
        now = time.perf_counter()
        if len(c.output) >= c.params.max_new_tokens:
            self._finish(c, "length")
            return
        token, lp = sample(logits, c.params, c.generator, c.output, allowed)
        if c.first_token_at is None:
            c.first_token_at = now
        c.output.append(token)
        self.generation_tokens_total += 1
        logprobs = (TokenLogprob(token, *lp),) if lp is not None else None
        reason = None
        if token in self.eos_token_ids and not c.params.ignore_eos:
            text, reason = "", "stop"
        else:
            text = c.stop.feed(c.detok.push(token))
            if c.grammar is not None and not c.grammar.consume_token(token):
                raise RuntimeError(f"structured output: the grammar rejected token {token}: {c.grammar.get_error()}")
            if c.stop.stopped or (c.grammar is not None and c.grammar.is_stopped()):
                reason = "stop"  # a complete structured output ends without spending a step on its EOS
            elif len(c.output) >= c.params.max_new_tokens:
                reason = "length"
            elif c.seq.length + 1 >= self.max_context:
                reason = "context"
        if reason is None:
            c.push(Event(text, (token,), logprobs))
        else:
            self._finish(c, reason, text=text, token=token, logprobs=logprobs)

    def _finish(self, c: Call, reason: str, text: str = "", token: int | None = None, logprobs=None,
                store: bool = True) -> None:
        """End a call: store its reusable prefix, free its buffer, fill its stats, deliver the last event."""
        with self._cond:
            if c in self.running:
                self.running.remove(c)
            elif c in self.waiting:
                self.waiting.remove(c)
        if c.seq is not None:
            seq, c.seq = c.seq, None
            if store and c.store and c.error is None:
                keep = c.storable if c.storable < len(c.prompt) else seq.length
                self.pool.store(c.namespace, seq, min(keep, seq.length))
            else:
                self.pool.free(seq)
        now = time.perf_counter()
        s = c.stats
        s.finish_reason = reason
        s.decode_tokens = len(c.output)
        first = c.first_token_at or now
        s.ttft_s = first - c.submitted
        s.total_s = now - c.submitted
        s.decode_tokens_per_s = (len(c.output) - 1) / (now - first) if len(c.output) > 1 and now > first else 0.0
        if c.params.max_new_tokens:  # prefill-only calls warm the cache (a turn's end, fan-out): not requests
            self.finished_by_adapter[s.adapter or ""] += 1
        c.push(Event(text + c.stop.flush(), (token,) if token is not None else (), logprobs, reason))
