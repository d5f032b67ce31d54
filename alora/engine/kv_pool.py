"""KV memory: one sequence's contiguous K/V buffers, and the engine-owned pool that holds them all.

The pool has one budget in bytes for every K/V tensor the engine holds: the buffers of running calls and the
prefix cache. Running calls get contiguous buffers (stock torch has no paged attention on CPU, and gathering
scattered blocks every step would copy the whole KV each step); the prefix cache stores finished sequences
as entries keyed by their token ids, indexed by hashed blocks of ``BLOCK`` tokens, in a *namespace*:
``(cache_salt, adapter uid or None)``. Base-model KV (including the positions of an aLoRA call before its
activation) lives in the ``None`` adapter namespace; a LoRA's KV under its immutable uid. A new call copies
the longest matching prefix of an entry into its own buffer (~10 ms for 1.5k tokens of the default model,
against seconds to recompute), so any number of calls share one entry read-only.

Entries are evicted least recently used when a buffer needs room. Only the scheduler thread mutates the
pool; the lock makes reads from other threads (metrics, ``Conversation.cached_tokens``) safe.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

BLOCK = 16  # tokens per hashed block of the prefix index

Namespace = tuple  # (cache_salt or None, adapter uid or None)


class KVCache:
    """Per-layer K/V tensors of shape [kv_heads, capacity, head_dim] plus the token ids they encode.

    ``length`` positions are valid; positions past it are free and may be overwritten.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.k = [torch.empty(kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty_like(t) for t in self.k]
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def resize(self, capacity: int) -> None:
        """Reallocate to ``capacity`` positions (>= length), keeping the valid ones."""
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                new = torch.empty(self.kv_heads, capacity, self.head_dim, dtype=self.dtype, device=self.device)
                new[:, :self.length] = old[:, :self.length]
                store[i] = new

    def copy_prefix(self, other: "KVCache", n: int) -> None:
        """Make this cache hold the first ``n`` positions of ``other`` (capacity must suffice)."""
        for dst, src in zip(self.k + self.v, other.k + other.v):
            dst[:, :n] = src[:, :n]
        self.tokens = other.tokens[:n]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` ([n, kv_heads, head_dim]) at positions [start, start+n); return the layer's
        keys and values for positions [0, start+n) as [kv_heads, start+n, head_dim] views."""
        end = start + k.shape[0]
        self.k[layer][:, start:end] = k.transpose(0, 1)
        self.v[layer][:, start:end] = v.transpose(0, 1)
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on."""
        if length < self.length:
            del self.tokens[length:]


@dataclass(eq=False)
class Entry:
    """A stored sequence in the prefix cache."""

    namespace: Namespace
    cache: KVCache
    keys: list[tuple]  # its index keys, one per full block
    last_used: float = field(default_factory=time.monotonic)


class KVPool:
    """Every K/V buffer of the engine within ``budget_bytes``: running calls' buffers and the prefix cache."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, budget_bytes: int):
        self.shape = (num_layers, kv_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.bytes_per_token = 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self.budget_bytes = int(budget_bytes)
        self.capacity_bytes = 0  # allocated, in buffers and entries
        self._live: dict[int, KVCache] = {}  # buffers of running calls, by id
        self._entries: list[Entry] = []
        self._index: dict[tuple, set[Entry]] = {}
        self._lock = threading.Lock()
        self.evictions = 0
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of those, served from the cache

    @property
    def budget_tokens(self) -> int:
        return self.budget_bytes // self.bytes_per_token

    def used_bytes(self) -> int:
        """Bytes of valid positions (running buffers and entries)."""
        with self._lock:
            n = sum(c.length for c in self._live.values()) + sum(e.cache.length for e in self._entries)
        return n * self.bytes_per_token

    # ---- buffers of running calls ---------------------------------------------------------------------

    def allocate(self, capacity: int) -> KVCache | None:
        """A new empty buffer of ``capacity`` positions, evicting cache entries as needed; None if even an
        empty prefix cache leaves too little room (the caller waits or preempts)."""
        if not self._make_room(capacity * self.bytes_per_token):
            return None
        cache = KVCache(*self.shape, self.dtype, self.device, capacity)
        with self._lock:
            self._live[id(cache)] = cache
            self.capacity_bytes += capacity * self.bytes_per_token
        return cache

    def grow(self, cache: KVCache, capacity: int) -> bool:
        """Resize a running buffer to ``capacity`` positions; False if there is no room."""
        extra = (capacity - cache.capacity) * self.bytes_per_token
        if extra <= 0:
            return True
        # the old and new tensors coexist during the copy: make room for both
        if not self._make_room(capacity * self.bytes_per_token):
            return False
        cache.resize(capacity)
        with self._lock:
            self.capacity_bytes += extra
        return True

    def free(self, cache: KVCache) -> None:
        with self._lock:
            if self._live.pop(id(cache), None) is not None:
                self.capacity_bytes -= cache.capacity * self.bytes_per_token

    def _make_room(self, nbytes: int) -> bool:
        with self._lock:
            if nbytes > self.budget_bytes - self.capacity_bytes + sum(
                    e.cache.capacity for e in self._entries) * self.bytes_per_token:
                return False
            while self.capacity_bytes + nbytes > self.budget_bytes:
                self._remove(min(self._entries, key=lambda e: e.last_used))
                self.evictions += 1
            return True

    # ---- prefix cache ---------------------------------------------------------------------------------

    def match(self, namespace: Namespace, tokens: list[int], count: bool = True) -> tuple[KVCache | None, int]:
        """The stored buffer sharing the longest prefix with ``tokens`` in ``namespace``, and that length."""
        with self._lock:
            best, n = self._match(namespace, tokens)
            if best is not None:
                best.last_used = time.monotonic()
            if count:
                self.queries += len(tokens)
                self.hits += n
            return (best.cache if best else None), n

    def _match(self, namespace: Namespace, tokens: list[int]) -> tuple[Entry | None, int]:
        candidates: set[Entry] = set()
        blocks = 0
        for blocks, key in enumerate(_block_keys(namespace, tokens), start=1):
            found = self._index.get(key)
            if not found:
                blocks -= 1
                break
            candidates = found
        if not candidates:
            return None, 0
        start = blocks * BLOCK
        best, best_n = None, 0
        for e in candidates:
            stored = e.cache.tokens
            if stored[:start] != tokens[:start]:  # a hash collision
                continue
            n = start
            limit = min(len(stored), len(tokens))
            while n < limit and stored[n] == tokens[n]:
                n += 1
            if n > best_n:
                best, best_n = e, n
        return best, best_n

    def store(self, namespace: Namespace, cache: KVCache, length: int) -> None:
        """Keep the first ``length`` positions of a finished call's buffer (handed over: the caller stops
        using it) as a cache entry; entries it extends are dropped. Short or redundant ones are freed."""
        self.free(cache)
        cache.truncate(length)
        if length < BLOCK:
            return
        with self._lock:
            if self._match(namespace, cache.tokens)[1] == length:
                return  # already stored
        shrink = cache.capacity > length + max(BLOCK, length // 4)  # don't keep much unused room
        if not self._make_room((length if shrink else cache.capacity) * self.bytes_per_token):
            return
        if shrink:
            tight = KVCache(*self.shape, self.dtype, self.device, length)
            tight.copy_prefix(cache, length)
            cache = tight
        tokens = cache.tokens
        keys = list(_block_keys(namespace, tokens))
        with self._lock:
            covered = set().union(*(self._index.get(k, ()) for k in keys))
            for e in covered:
                if len(e.cache.tokens) <= length and tokens[:e.cache.length] == e.cache.tokens:
                    self._remove(e)
            entry = Entry(namespace, cache, keys)
            self._entries.append(entry)
            for k in keys:
                self._index.setdefault(k, set()).add(entry)
            self.capacity_bytes += cache.capacity * self.bytes_per_token

    def _remove(self, entry: Entry) -> None:
        self._entries.remove(entry)
        for k in entry.keys:
            group = self._index.get(k)
            if group is not None:
                group.discard(entry)
                if not group:
                    del self._index[k]
        self.capacity_bytes -= entry.cache.capacity * self.bytes_per_token

    def drop(self, namespace_filter=lambda namespace: True) -> None:
        """Drop the cache entries whose namespace passes the filter (all by default); running buffers stay."""
        with self._lock:
            for e in [e for e in self._entries if namespace_filter(e.namespace)]:
                self._remove(e)


def _block_keys(namespace: Namespace, tokens: list[int]):
    """Chained hash keys of the full blocks of ``tokens``: key i covers tokens[: (i+1)*BLOCK]."""
    h = hash(namespace)
    for i in range(0, len(tokens) - BLOCK + 1, BLOCK):
        h = hash((h, *tokens[i:i + BLOCK]))
        yield (namespace, h)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i

