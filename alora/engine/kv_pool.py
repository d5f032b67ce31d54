"""KV cache: the keys and values of one sequence, every layer, grown in place as the sequence grows."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer K/V tensors of shape [kv_heads, capacity, head_dim] plus the token ids they encode.

    ``length`` positions are valid. Positions past it are free and may be overwritten, which is how an
    adapter's invocation is rolled back: ``truncate(n)`` just moves the length back.
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, capacity: int = 256):
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

    def reserve(self, total: int) -> None:
        """Make room for ``total`` positions (doubling, so appends are amortized O(1))."""
        if total <= self.capacity:
            return
        new_cap = max(total, 2 * self.capacity)
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                grown = torch.empty(self.kv_heads, new_cap, self.head_dim, dtype=self.dtype, device=self.device)
                grown[:, : self.length] = old[:, : self.length]
                store[i] = grown

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

    def nbytes(self) -> int:
        """Bytes of K/V actually in use (valid positions, all layers)."""
        per_pos = 2 * self.num_layers * self.kv_heads * self.head_dim * self.k[0].element_size()
        return per_pos * self.length

    def common_prefix(self, ids: list[int]) -> int:
        """Length of the longest prefix of ``ids`` already held by this cache."""
        return common_prefix(self.tokens, ids)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
