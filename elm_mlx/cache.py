"""Key/value caches for incremental decoding: one sequence (KVCache) or a batch of them (BatchKVCache).

Storage grows in blocks of `step` positions, so appending one token is a slice
assignment into preallocated memory, not a reallocation per token.
"""

from typing import List, Optional, Sequence, Tuple

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

    def trim(self, n: int) -> int:
        """Forget the last n positions (kept storage is overwritten by later updates); return how many went."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self) -> List[mx.array]:
        """Arrays to pass to mx.eval to materialise the cache."""
        return [] if self.keys is None else [self.keys, self.values]


def make_cache(model) -> List[KVCache]:
    return [KVCache() for _ in model.layers]


class BatchKVCache:
    """One layer's keys and values for a batch of sequences of different lengths, right-aligned.

    Row b holds its sequence in columns [padding[b], size); every row's next
    token goes to column `size`, so one decode step appends one column for
    all rows. The columns left of padding[b] are masked out (`mask`), and
    `offset` gives each row its own rotary position (its first real token is
    at position 0), so a row computes what its sequence would alone.
    """

    step = 256

    def __init__(self):
        self.keys: Optional[mx.array] = None  # (B, kv_heads, capacity, head_dim)
        self.values: Optional[mx.array] = None
        self.padding: List[int] = []
        self.size = 0
        self._offset: Optional[mx.array] = None

    @property
    def offset(self) -> mx.array:
        """Each row's position for the next token: (B,) int32, what mx.fast.rope takes per sequence."""
        if self._offset is None:
            self._offset = mx.array([self.size - p for p in self.padding], dtype=mx.int32)
        return self._offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append (B, heads, L, head_dim) keys/values to every row; return all columns so far."""
        n = keys.shape[2]
        if self.keys is None:
            self._allocate(keys, values)
        if self.size + n > self.keys.shape[2]:
            self._widen(right=-(-n // self.step) * self.step)
        self.keys[..., self.size : self.size + n, :] = keys
        self.values[..., self.size : self.size + n, :] = values
        self.size += n
        self._offset = None
        return self.keys[..., : self.size, :], self.values[..., : self.size, :]

    def mask(self) -> mx.array:
        """(B, 1, 1, size + 1) booleans for a decode step's attention: each row sees its own columns only."""
        columns = mx.arange(self.size + 1)
        return (columns[None, :] >= mx.array(self.padding)[:, None])[:, None, None, :]

    def add(self, cache: KVCache) -> None:
        """Append a sequence prefilled alone (a KVCache holding it, perhaps nothing yet) as a new last row."""
        length = cache.offset
        if length:
            keys, values = cache.keys[..., :length, :], cache.values[..., :length, :]
            if self.keys is None:
                self._allocate(keys, values)
            if length > self.size:
                self._widen(left=length - self.size)
            self.keys = mx.concatenate([self.keys, self._row(keys)], axis=0)
            self.values = mx.concatenate([self.values, self._row(values)], axis=0)
        elif self.keys is not None:
            self.keys = mx.concatenate([self.keys, self._row(self.keys[:1, :, :0])], axis=0)
            self.values = mx.concatenate([self.values, self._row(self.values[:1, :, :0])], axis=0)
        self.padding.append(self.size - length)
        self._offset = None

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows (in this order), and drop the columns no kept row uses.

        The kept rows are copied into new arrays, so the memory of the rows
        that left is free once the caller evaluates `state`.
        """
        if not rows:
            self.__init__()
            return
        start = min(self.padding[r] for r in rows)
        index = mx.array(list(rows))
        self.keys = self.keys[:, :, start:, :][index]
        self.values = self.values[:, :, start:, :][index]
        self.padding = [self.padding[r] - start for r in rows]
        self.size -= start
        self._offset = None

    def _allocate(self, keys: mx.array, values: mx.array) -> None:
        """Zero-width storage for the rows so far, once the first keys tell the heads, width and dtype."""
        B = len(self.padding)
        self.keys = mx.zeros((B, keys.shape[1], 0, keys.shape[3]), keys.dtype)
        self.values = mx.zeros((B, values.shape[1], 0, values.shape[3]), values.dtype)

    def _row(self, part: mx.array) -> mx.array:
        """A (1, heads, capacity, dim) row holding `part` right-aligned to `size`."""
        B, heads, capacity, _ = self.keys.shape
        row = mx.zeros((1, heads, capacity, part.shape[3]), part.dtype)
        row[..., self.size - part.shape[2] : self.size, :] = part
        return row

    def _widen(self, left: int = 0, right: int = 0) -> None:
        """Add zero columns: on the left (more padding for every row), or on the right (room to append)."""

        def widen(a: mx.array) -> mx.array:
            B, heads, _, dim = a.shape
            pieces = [mx.zeros((B, heads, left, dim), a.dtype)] if left else []
            pieces.append(a[..., : self.size, :] if right else a)
            if right:
                pieces.append(mx.zeros((B, heads, right, dim), a.dtype))
            return mx.concatenate(pieces, axis=2)

        self.keys, self.values = widen(self.keys), widen(self.values)
        self.padding = [p + left for p in self.padding]
        self.size += left
        self._offset = None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> List[mx.array]:
        return [] if self.keys is None else [self.keys, self.values]


class PromptCache:
    """A model's KV cache together with the tokens it holds, reused by the next prompt that shares a prefix.

    Conversations resend their history with every turn; only the tokens after
    the longest common prefix need a forward pass.
    """

    def __init__(self, model):
        self.model = model
        self.cache: List[KVCache] = make_cache(model)
        self.tokens: List[int] = []

    def reuse(self, prompt: Sequence[int]) -> int:
        """Keep the cached prefix `prompt` starts with (all but its last token at most); return its length."""
        common = 0
        for cached, new in zip(self.tokens, prompt[:-1]):  # the last prompt token must run to give logits
            if cached != new:
                break
            common += 1
        if common == 0:
            self.cache, self.tokens = make_cache(self.model), []
            return 0
        for layer_cache in self.cache:
            layer_cache.trim(layer_cache.offset - common)
        self.tokens = self.tokens[:common]
        return common

    def record(self, tokens: Sequence[int]) -> None:
        """After generation: `tokens` were fed (the prompt, then every generated token).

        An interruption can leave layers holding different lengths, or one
        token more than was handed out; keep what every layer has and
        `tokens` names.
        """
        keep = min([len(tokens)] + [c.offset for c in self.cache])
        for layer_cache in self.cache:
            layer_cache.trim(layer_cache.offset - keep)
        self.tokens = list(tokens[:keep])
