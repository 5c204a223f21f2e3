"""Key/value cache for incremental decoding.

Storage grows in blocks of `step` positions, so appending one token is a slice
assignment into preallocated memory, not a reallocation per token.
"""

from typing import List, Sequence, Tuple

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
