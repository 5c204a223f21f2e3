"""Samplers and the repetition penalty on hand-built logits."""

import math

import mlx.core as mx
import numpy as np
import pytest

from elm_mlx.errors import ElmError
from elm_mlx.sample import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
)

# probabilities 0.4, 0.3, 0.15, 0.1, 0.05 in a shuffled order
PROBS = [0.1, 0.4, 0.05, 0.3, 0.15]
LOGPROBS = mx.array([[math.log(p) for p in PROBS]])


def kept(logprobs) -> set:
    return {i for i, v in enumerate(logprobs[0].tolist()) if v > -math.inf}


def test_top_k_1_equals_argmax():
    logits = mx.array(np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32))
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    sampler = make_sampler(SamplingParams(temp=1.0, top_k=1, top_p=1.0, min_p=0.0))
    for _ in range(10):
        assert sampler(logprobs).tolist() == mx.argmax(logits, axis=-1).tolist()


def test_top_k_keeps_the_k_largest():
    assert kept(apply_top_k(LOGPROBS, 2)) == {1, 3}
    assert kept(apply_top_k(LOGPROBS, 0)) == set(range(5))


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.35, {1}),  # 0.4 alone covers 0.35
        (0.5, {1, 3}),  # 0.4 + 0.3 = 0.7 >= 0.5
        (0.7, {1, 3}),
        (0.71, {1, 3, 4}),  # needs 0.15 too: 0.85
        (0.9, {1, 3, 4, 0}),
        (1.0, {0, 1, 2, 3, 4}),
    ],
)
def test_top_p_keeps_the_smallest_covering_set(top_p, expected):
    assert kept(apply_top_p(LOGPROBS, top_p)) == expected


@pytest.mark.parametrize(
    "min_p, expected",
    [
        (0.0, {0, 1, 2, 3, 4}),
        (0.25, {0, 1, 3, 4}),  # threshold 0.1: 0.1 itself stays
        (0.3, {1, 3, 4}),  # threshold 0.12
        (0.8, {1}),  # threshold 0.32
    ],
)
def test_min_p_keeps_tokens_above_a_fraction_of_the_top(min_p, expected):
    assert kept(apply_min_p(LOGPROBS, min_p)) == expected


def test_sampling_only_ever_returns_kept_tokens_and_follows_the_distribution():
    mx.random.seed(0)
    sampler = make_sampler(SamplingParams(temp=1.0, top_p=0.71, min_p=0.0))
    draws = [sampler(LOGPROBS).item() for _ in range(5000)]
    assert set(draws) <= {1, 3, 4}
    # renormalised over {0.4, 0.3, 0.15}: token 1 has probability 0.4 / 0.85 = 0.47
    assert abs(draws.count(1) / len(draws) - 0.4 / 0.85) < 0.03  # ~4 standard errors


def test_repetition_penalty_changes_exactly_the_seen_tokens():
    logits = mx.array([[2.0, -1.0, 0.5, -3.0, 4.0, 1.0]])
    seen = mx.array([0, 1, 1, 3])  # duplicates must not compound
    out = apply_repetition_penalty(mx.array(logits), seen, 2.0).tolist()[0]
    assert out == [1.0, -2.0, 0.5, -6.0, 4.0, 1.0]


def test_repetition_context_size_limits_the_window():
    params = SamplingParams(repetition_penalty=2.0, repetition_context_size=2)
    (processor,) = make_logits_processors(params)
    logits = mx.array([[2.0, 2.0, 2.0, 2.0]])
    out = processor(mx.array([0, 1, 2]), logits).tolist()[0]
    assert out == [2.0, 1.0, 1.0, 2.0]  # token 0 is outside the last 2
    assert make_logits_processors(SamplingParams(repetition_penalty=1.0)) == []


def test_same_seed_same_samples():
    logits = mx.array(np.random.default_rng(0).standard_normal((1, 100)).astype(np.float32))
    sampler = make_sampler(SamplingParams(temp=1.0, top_p=1.0, min_p=0.0))

    def draw(seed):
        mx.random.seed(seed)
        return [sampler(logits).item() for _ in range(30)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temp=-1), "temp must be >= 0"),
        (dict(top_p=0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-2), "top_k must be >= 0"),
        (dict(min_p=1.0), r"min_p must be in \[0, 1\)"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    ],
)
def test_invalid_parameters_are_refused(kwargs, message):
    with pytest.raises(ElmError, match=message):
        SamplingParams(**kwargs)
