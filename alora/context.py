"""Per-forward context: the facts every layer needs about the tokens of one forward pass.

The engine sets it once per forward (``set_context``); layers read it (``get_context``) instead of taking
positions, caches and adapter slots through every call signature.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from alora.engine.kv_pool import KVCache



@dataclass(frozen=True)
class SeqSpan:
    """One sequence's new tokens inside the flattened batch: rows [start, start+length) of every
    activation, written into ``cache`` from position ``cache.length`` (at forward start) onwards."""

    start: int
    length: int
    cache: "KVCache"
    past: int  # tokens already in the cache before this forward


@dataclass(frozen=True)
class ForwardContext:
    positions: torch.Tensor  # [T] int64, absolute position of each token
    spans: tuple[SeqSpan, ...]
    slots: torch.Tensor | None  # [T] int32 adapter slot per token (-1 = base); None = no token adapted
    slot_runs: dict[int, list[tuple[int, int]]] | None = None  # slot -> its runs of rows, found once per forward


_local = threading.local()


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make ``ctx`` the current context for the duration of one forward (thread-local)."""
    previous = getattr(_local, "ctx", None)
    _local.ctx = ctx
    try:
        yield ctx
    finally:
        _local.ctx = previous


def get_context() -> ForwardContext:
    ctx = getattr(_local, "ctx", None)
    if ctx is None:
        raise RuntimeError("model layers were called outside a forward_context")
    return ctx
