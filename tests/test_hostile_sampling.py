"""Sampling settings at the edges: every accepted value behaves as its limit, the rest are refused.

Seen in issue 12: temperature below ~3e-39 and top_p below ~1e-45 gave uniformly
random tokens, and repetition_penalty 1e-300 a -inf log-probability.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from elm_mlx.errors import ElmError
from elm_mlx.sample import (
    LOGPROB_FLOOR,
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    SamplingParams,
    apply_temperature,
    finite_logprobs,
    make_logits_processors,
    make_sampler,
)

SEEDS = range(40)
TINY_TEMPS = [5e-324, 1e-320, 1e-45, 3e-39, 1e-38, 1e-30, 1e-8]
TINY_TOP_PS = [5e-324, 1e-320, 1e-46, 1e-45, 1e-40, 1e-10]


def logprobs_with_argmax(argmax: int, dtype, vocab: int = 64, seed: int = 0) -> mx.array:
    """Random log-probabilities (1, vocab) whose single most likely token is `argmax`, by a wide margin."""
    logits = np.random.default_rng(seed).standard_normal(vocab).astype(np.float32)
    logits[argmax] = logits.max() + 3.0
    logprobs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    return mx.array(logprobs[None]).astype(dtype)


def draws(params: SamplingParams, logprobs: mx.array) -> set:
    sampler = make_sampler(params)
    out = set()
    for seed in SEEDS:
        mx.random.seed(seed)
        out.add(sampler(logprobs).item())
    return out


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("temp", TINY_TEMPS)
def test_tiny_temperature_is_greedy(temp, dtype):
    logprobs = logprobs_with_argmax(17, dtype)
    assert draws(SamplingParams(temp=temp, top_p=1.0, min_p=0.0), logprobs) == {17}


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_a_certain_token_with_logprob_zero_is_greedy_at_any_temperature(dtype):
    # float16 rounds a very peaked distribution's best log-probability to exactly 0: 0 * (1/temp) must not be NaN.
    logprobs = mx.array([[-40.0, 0.0, -30.0, -50.0]]).astype(dtype)
    for temp in [1e-6, 1e-20, 5e-324]:
        assert draws(SamplingParams(temp=temp, top_p=1.0, min_p=0.0), logprobs) == {1}


def test_huge_temperature_is_uniform_over_the_kept_tokens():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps tokens 0 and 1; temp -> inf makes them equally likely.
    logprobs = mx.array([[math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]])
    sampler = make_sampler(SamplingParams(temp=1e300, top_p=0.7, min_p=0.0))
    mx.random.seed(0)
    picks = [sampler(logprobs).item() for _ in range(2000)]
    assert set(picks) == {0, 1}
    assert abs(picks.count(0) / len(picks) - 0.5) < 0.05  # ~4.5 standard errors


@pytest.mark.parametrize("temp", [5e-324, 1e-40, 1e-3, 1.0, 1e300])
def test_tempered_values_are_never_nan(temp):
    logprobs = mx.array([[0.0, -1.0, -mx.inf, -1e4]]).astype(mx.float16)
    out = apply_temperature(logprobs, temp).tolist()[0]
    assert not any(math.isnan(v) for v in out)
    assert out[0] == 0.0 and out[2] == -math.inf  # the best stays best, a filtered token stays filtered


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("top_p", TINY_TOP_PS)
def test_tiny_top_p_keeps_only_the_top_token(top_p, dtype):
    logprobs = logprobs_with_argmax(5, dtype, seed=1)
    assert draws(SamplingParams(temp=1.0, top_p=top_p, min_p=0.0), logprobs) == {5}


def test_min_p_near_one_keeps_only_the_top_token():
    logprobs = logprobs_with_argmax(9, mx.float16, seed=2)
    assert draws(SamplingParams(temp=1.0, top_p=1.0, min_p=1 - 1e-12), logprobs) == {9}


@pytest.mark.parametrize("penalty", [MIN_REPETITION_PENALTY, 0.37, 2.0, MAX_REPETITION_PENALTY])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_accepted_penalties_keep_every_logprob_finite(penalty, dtype):
    # Logits near float16's extremes (exact in float16 and bfloat16), the seen ones positive and negative.
    logits = mx.array([[65280.0, -65280.0, 3.0, -3.0, 0.0, 32768.0]]).astype(dtype)
    (processor,) = make_logits_processors(SamplingParams(repetition_penalty=penalty))
    out = processor(mx.array([0, 1, 2, 3]), logits)
    logprobs = out - mx.logsumexp(out, axis=-1, keepdims=True)
    assert all(math.isfinite(v) for v in logprobs.tolist()[0])
    # hand-computed: positive seen logits divided, negative ones multiplied
    values = out.tolist()[0]
    assert values[2] == pytest.approx(3.0 / penalty, rel=1e-6)
    assert values[3] == pytest.approx(-3.0 * penalty, rel=1e-6)
    assert values[4] == 0.0 and values[5] == 32768.0  # unseen tokens untouched


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(repetition_penalty=1e-300), r"repetition_penalty must be in \[0.001, 1000\]"),
        (dict(repetition_penalty=1e300), r"repetition_penalty must be in \[0.001, 1000\]"),
        (dict(repetition_penalty=math.inf), r"repetition_penalty must be in"),
        (dict(repetition_penalty=math.nan), r"repetition_penalty must be > 0"),
        (dict(repetition_penalty=-1.0), r"repetition_penalty must be > 0"),
        (dict(temp=math.inf), "temp must be >= 0"),
        (dict(temp=math.nan), "temp must be >= 0"),
        (dict(temp=-5e-324), "temp must be >= 0"),
        (dict(top_p=math.nan), r"top_p must be in \(0, 1\]"),
        (dict(top_p=-0.0), r"top_p must be in \(0, 1\]"),
        (dict(min_p=math.nan), r"min_p must be in \[0, 1\)"),
        (dict(temp="0.5"), "temp must be a number"),
        (dict(top_p=True), "top_p must be a number"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(repetition_context_size=None), "repetition_context_size must be an integer"),
    ],
)
def test_values_outside_the_accepted_ranges_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ElmError, match=message) as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


def test_finite_logprobs_makes_json_safe_numbers():
    raw = mx.array([0.0, -1.5, -mx.inf, mx.nan, -1e30, 1e-3])
    assert finite_logprobs(raw).tolist() == pytest.approx([0.0, -1.5, LOGPROB_FLOOR, LOGPROB_FLOOR, LOGPROB_FLOOR, 0.0])
