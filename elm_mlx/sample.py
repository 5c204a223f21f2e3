"""Turning logits into the next token.

Order of operations (the same as llama.cpp and mlx-lm):
  1. logits processors (repetition penalty) on the raw logits;
  2. log-softmax;
  3. filters on the *untempered* distribution: top-k, then top-p, then min-p,
     each setting excluded tokens to -inf;
  4. temperature 0 picks the argmax, otherwise sample from softmax(logprobs / temp).
All functions take (batch, vocab) arrays.

Every accepted value behaves as its limit: a tiny temperature is greedy (the
scaling is done in float32 after subtracting the maximum, so it can never
produce 0 * inf = NaN, which made float16 sampling uniformly random), a tiny
top_p keeps exactly the most likely token, and the repetition penalty is
computed in float32 within a range that keeps every logit finite.
"""

import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import mlx.core as mx

from .errors import ElmError

# sampler(logprobs, key=None): a key (mx.random.key) makes the draw depend on it alone, not on the global seed.
Sampler = Callable[..., mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


# Accepted repetition penalties: far beyond any useful value (1.1-1.5), and narrow enough that
# dividing or multiplying a float16 logit (|x| <= 65504) stays finite in float32.
MIN_REPETITION_PENALTY = 1e-3
MAX_REPETITION_PENALTY = 1e3
# What JSON gets for a log-probability that is not a finite number (OpenAI's floor).
LOGPROB_FLOOR = -9999.0
_F32 = mx.finfo(mx.float32)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; anything outside the accepted ranges raises ElmError (the server's 400).

    temp >= 0 (finite), top_p in (0, 1], top_k >= 0, min_p in [0, 1),
    repetition_penalty in [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY],
    repetition_context_size >= 1.
    """

    temp: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    repetition_context_size: int = 64

    def __post_init__(self):
        for name in ("temp", "top_p", "min_p", "repetition_penalty"):
            if not _is_number(getattr(self, name)):
                raise ElmError(f"{name} must be a number, got {getattr(self, name)!r}")
        for name in ("top_k", "repetition_context_size"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ElmError(f"{name} must be an integer, got {getattr(self, name)!r}")
        low, high = MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY
        checks = [
            (self.temp >= 0 and math.isfinite(self.temp), f"temp must be >= 0, got {self.temp}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 disables it), got {self.top_k}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (low <= self.repetition_penalty <= high, f"repetition_penalty must be in [{low:g}, {high:g}], got {self.repetition_penalty}"),
            (self.repetition_context_size >= 1, f"repetition_context_size must be >= 1, got {self.repetition_context_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ElmError(message)


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens."""
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    dropped = mx.argpartition(-logprobs, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(logprobs, dropped, mx.array(-mx.inf, logprobs.dtype), axis=-1)


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least top_p."""
    if top_p >= 1.0:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_probs = mx.exp(mx.take_along_axis(logprobs, order, axis=-1))
    mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    # The most likely token always stays, even when top_p is below float32's smallest number.
    keep_sorted = (mass_before < top_p) | (mx.arange(logprobs.shape[-1]) == 0)
    keep = mx.put_along_axis(mx.zeros(logprobs.shape, mx.bool_), order, keep_sorted, axis=-1)
    return mx.where(keep, logprobs, -mx.inf)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep tokens at least min_p times as likely as the most likely one."""
    if min_p <= 0.0:
        return logprobs
    threshold = logprobs.max(axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= threshold, logprobs, -mx.inf)


def apply_temperature(logprobs: mx.array, temp: float) -> mx.array:
    """logprobs / temp, computed so that every temp > 0 gives finite-or--inf values, never NaN.

    In float32 and relative to the maximum: the best token gets exactly 0, the
    others are <= 0 (or -inf), so a tiny temp sends them to -inf (greedy) and a
    huge one to 0 (uniform over the tokens the filters kept).
    """
    scale = min(max(1.0 / temp, _F32.smallest_normal), _F32.max)
    logprobs = logprobs.astype(mx.float32)
    return (logprobs - logprobs.max(axis=-1, keepdims=True)) * scale


def make_sampler(params: SamplingParams) -> Sampler:
    """A function from log-probabilities (batch, vocab), and an optional random key, to token ids (batch,).

    With a key, the draw depends on the key alone: a sequence that owns its
    key gets the same tokens whatever else is sampled around it.
    """
    if params.temp == 0:
        return lambda logprobs, key=None: mx.argmax(logprobs, axis=-1)

    def sample(logprobs: mx.array, key: Optional[mx.array] = None) -> mx.array:
        return mx.random.categorical(sampling_logits(logprobs, params), axis=-1, key=key)

    return sample


def sampling_logits(logprobs: mx.array, params: SamplingParams) -> mx.array:
    """Unnormalised log-weights (float32) of the distribution make_sampler draws from when temp > 0.

    Shared with speculative decoding, which needs the distribution itself
    (to accept or reject a proposed token), not only a draw from it.
    """
    logprobs = apply_top_k(logprobs, params.top_k)
    logprobs = apply_top_p(logprobs, params.top_p)
    logprobs = apply_min_p(logprobs, params.min_p)
    return apply_temperature(logprobs, params.temp)


def key_stream(seed: Optional[int]) -> Iterator[mx.array]:
    """One random key per token for one sequence: from `seed`, or, without one, from the global generator
    (so mx.random.seed still makes unseeded runs repeatable)."""
    if seed is None:
        seed = mx.random.randint(0, 1 << 31, ()).item()
    key = mx.random.key(seed)
    while True:
        key, subkey = mx.random.split(key)
        yield subkey


def apply_repetition_penalty(logits: mx.array, tokens: mx.array, penalty: float) -> mx.array:
    """Make already-seen tokens less likely: positive logits divided by, negative ones multiplied by, the penalty.

    In float32: a float16 logit times a large penalty would overflow to -inf.
    """
    if tokens.size == 0:
        return logits
    logits = logits.astype(mx.float32)
    seen = logits[:, tokens]
    logits[:, tokens] = mx.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def make_logits_processors(params: SamplingParams) -> List[LogitsProcessor]:
    """Processors called as processor(token_history, logits) before sampling."""
    if params.repetition_penalty == 1.0:
        return []
    size, penalty = params.repetition_context_size, params.repetition_penalty
    return [lambda tokens, logits: apply_repetition_penalty(logits, tokens[-size:], penalty)]


def finite_logprobs(logprobs: mx.array) -> mx.array:
    """Log-probabilities safe to write as JSON numbers: NaN and -inf become LOGPROB_FLOOR, nothing above 0."""
    logprobs = mx.where(mx.isnan(logprobs), LOGPROB_FLOOR, logprobs)
    return mx.clip(logprobs, LOGPROB_FLOOR, 0.0)
