"""Key/value cache for incremental decoding.

Storage grows in blocks of `step` positions, so appending one token is a slice
assignment into preallocated memory, not a reallocation per token.
"""

from typing import List, Tuple

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append (B, heads, L, head_dim) keys/values; return everything cached so far."""
        start, n = self.offset, keys.shape[2]
        if self.keys is None or start + n > self.keys.shape[2]:
            self._grow(keys, values, n)
        self.keys[..., start : start + n, :] = keys
        self.values[..., start : start + n, :] = values
        self.offset += n
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grow(self, keys: mx.array, values: mx.array, n: int) -> None:
        blocks = (n + self.step - 1) // self.step
        B, n_kv_heads, _, k_dim = keys.shape
        new_k = mx.zeros((B, n_kv_heads, blocks * self.step, k_dim), keys.dtype)
        new_v = mx.zeros((B, n_kv_heads, blocks * self.step, values.shape[3]), values.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            used = self.offset
            self.keys = mx.concatenate([self.keys[..., :used, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :used, :], new_v], axis=2)

    @property
    def state(self) -> List[mx.array]:
        """Arrays to pass to mx.eval to materialise the cache."""
        return [] if self.keys is None else [self.keys, self.values]


def make_cache(model) -> List[KVCache]:
    return [KVCache() for _ in model.layers]
