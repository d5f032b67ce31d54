"""The model runner: one forward over the new tokens of several sequences, base and adapter tokens mixed."""

from __future__ import annotations

import sys
from typing import Sequence

import torch

from alora.context import ForwardContext, SeqSpan, forward_context
from alora.engine.kv_pool import KVCache
from alora.models import LlamaModel
from alora_kernels import slot_runs


class ModelRunner:
    """Flattens the sequences of one step into a single forward: one base GEMM per projection for every
    token of every sequence, the adapter slots of all tokens mapped to runs of rows once."""

    def __init__(self, model: LlamaModel):
        self.model = model
        self.device = next(model.parameters()).device

    def run(self, feeds: Sequence[tuple[KVCache, list[int], list[int]]], all_rows: Sequence[bool]) -> list[torch.Tensor]:
        """Feed ``tokens`` (with their adapter ``slots``) into each ``cache`` after its valid positions.

        Returns each feed's logits: [vocab] of its last token, or [n, vocab] of every token where ``all_rows``.
        """
        ids, positions, slots, spans, rows = [], [], [], [], []
        for (cache, toks, toks_slots), every in zip(feeds, all_rows):
            start = len(ids)
            spans.append(SeqSpan(start, len(toks), cache, cache.length))
            positions.extend(range(cache.length, cache.length + len(toks)))
            ids.extend(toks)
            slots.extend(toks_slots)
            rows.extend(range(start, len(ids)) if every else [len(ids) - 1])
        dev = self.device
        adapted = any(s >= 0 for s in slots)
        ctx = ForwardContext(torch.tensor(positions, device=dev), tuple(spans),
                             torch.tensor(slots, dtype=torch.int32, device=dev) if adapted else None,
                             slot_runs(slots, sys.maxsize) if adapted else None)
        with torch.inference_mode(), forward_context(ctx):
            logits = self.model(torch.tensor(ids, device=dev),
                                None if len(rows) == len(ids) else torch.tensor(rows, device=dev))
        for cache, toks, _ in feeds:
            cache.tokens.extend(toks)
        out, i = [], 0
        for (_, toks, _), every in zip(feeds, all_rows):
            n = len(toks) if every else 1
            out.append(logits[i:i + n] if every else logits[i])
            i += n
        return out
