"""A decode step compiled with mx.compile, over a key/value cache of fixed shape.

Why: a small model's decode step on a CPU is many small operations, and MLX
dispatches each one separately; mx.compile traces the step once and fuses the
elementwise work. It can only trace a function whose shapes do not change
from call to call, which the growing KVCache (`keys[..., :offset, :]`) breaks.
So here every layer keeps a buffer of `capacity` positions allocated up
front; a step writes its L new keys and values at the offset (an array, so
that it is an input of the trace and not a constant), and attends over the
whole buffer with a mask that hides the positions not written yet. One trace
serves every step of the same L: L = 1 for decoding, L = k for verifying k
proposed tokens.

The price is attention over all `capacity` positions at every step instead of
the `offset` written so far. Whether the fusion pays for that depends on the
model and machine: `python -m bench speculative` measures it side by side
with the plain step.
"""

from typing import Iterator, List, Sequence

import mlx.core as mx
import mlx.nn as nn

from .errors import ElmError


class _Layer:
    """One layer's buffers as the models' attention expects a cache: `offset`, `update_and_fetch`."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys = mx.slice_update(self.keys, keys, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset, axes=(2,))
        return self.keys, self.values


class StaticCache:
    """Keys and values of one sequence in fixed (1, kv_heads, capacity, head_dim) buffers per layer."""

    def __init__(self, model: nn.Module, capacity: int, dtype=mx.float32):
        self.capacity = capacity
        self.offset = 0
        self.buffers: List[mx.array] = []
        for layer in model.layers:
            attention = getattr(layer, "attn", None) or layer.self_attn
            shape = (1, attention.n_kv_heads, capacity, attention.head_dim)
            self.buffers += [mx.zeros(shape, dtype), mx.zeros(shape, dtype)]
        mx.eval(self.buffers)

    def trim(self, n: int) -> int:
        """Forget the last n positions (they are masked out and later overwritten); return how many went."""
        n = min(self.offset, n)
        self.offset -= n
        return n


def _forward(model: nn.Module, tokens: mx.array, offset: mx.array, buffers: Sequence[mx.array]):
    """Logits (1, L, vocab) and the updated buffers; key j is visible to new token i when j <= offset + i."""
    n, capacity = tokens.shape[1], buffers[0].shape[2]
    layers = [_Layer(buffers[i], buffers[i + 1], offset) for i in range(0, len(buffers), 2)]
    visible = mx.arange(capacity)[None, :] <= (offset + mx.arange(n))[:, None]
    logits = model(tokens, layers, mask=visible[None, None])
    return logits, [a for layer in layers for a in (layer.keys, layer.values)]


class CompiledStep:
    """model(tokens, cache) for a StaticCache, compiled once per number of new tokens."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._step = mx.compile(lambda tokens, offset, *buffers: _forward(model, tokens, offset, buffers))

    def __call__(self, tokens: mx.array, cache: StaticCache) -> mx.array:
        n = tokens.shape[1]
        if cache.offset + n > cache.capacity:
            raise ElmError(f"the compiled step's cache holds {cache.capacity} positions; {cache.offset + n} asked for")
        logits, cache.buffers = self._step(tokens, mx.array([cache.offset], mx.int32), *cache.buffers)
        cache.offset += n
        return logits


def generate_greedy(model: nn.Module, prompt: Sequence[int], max_tokens: int, step: CompiledStep = None) -> Iterator[int]:
    """Greedy decoding with the compiled step: what plain greedy decoding yields, token for token.

    The prompt goes through the same static cache uncompiled (its length differs per prompt, so a
    trace would serve once); every later step is the compiled one-token step.
    """
    if not prompt:
        raise ElmError("the prompt is empty")
    step = step or CompiledStep(model)
    cache = StaticCache(model, len(prompt) + max_tokens, _dtype(model))
    logits, cache.buffers = _forward(model, mx.array([list(prompt)]), mx.array([0], mx.int32), cache.buffers)
    cache.offset = len(prompt)
    token = mx.argmax(logits[:, -1, :], axis=-1)
    mx.async_eval(token)
    for i in range(max_tokens):
        if i + 1 < max_tokens:  # token i+1 is computed while the caller handles token i, as in plain decoding
            next_token = mx.argmax(step(token[:, None], cache)[:, -1, :], axis=-1)
            mx.async_eval(next_token)
        yield token.item()
        token = next_token


def _dtype(model: nn.Module):
    return next(p.dtype for _, p in nn.utils.tree_flatten(model.parameters()) if mx.issubdtype(p.dtype, mx.floating))
