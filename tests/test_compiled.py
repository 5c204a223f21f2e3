"""elm_mlx.compiled: the compiled step over a fixed-shape cache computes what the plain model computes.

Greedy decoding is token-exact against the plain generation loop (OpenELM and OLMo); a k-token verify step
gives the plain model's logits; trimming positions and writing them again gives the plain continuation.
"""

import mlx.core as mx
import numpy as np
import pytest

from conftest import TINY_VOCAB
from elm_mlx.cache import KVCache
from elm_mlx.compiled import CompiledStep, StaticCache, generate_greedy
from elm_mlx.errors import ElmError
from elm_mlx.generation import generate_step


def plain_greedy(model, prompt, n):
    steps = generate_step(prompt, model, lambda logprobs: mx.argmax(logprobs, axis=-1))
    return [next(steps)[0] for _ in range(n)]


@pytest.mark.parametrize("which", ["demo", "tiny", "olmo"])
def test_greedy_is_token_exact(which, request):
    model, tokenizer = request.getfixturevalue(which)
    prompt = tokenizer.encode("ROMEO:\nWhat light through yonder window breaks?")
    expected = plain_greedy(model, prompt, 60)
    if which == "demo":  # a text, not one token repeated (the random tiny models' greedy text is; the logits test covers them)
        assert len(set(expected)) > 5
    assert list(generate_greedy(model, prompt, 60)) == expected
    step = CompiledStep(model)  # one step object serves prompts of other lengths (its traces are per shape)
    assert list(generate_greedy(model, prompt[:3], 20, step)) == plain_greedy(model, prompt[:3], 20)
    assert list(generate_greedy(model, prompt, 20, step)) == expected[:20]


def test_verify_step_gives_the_plain_logits_and_trim_rewinds(tiny):
    model, _ = tiny
    rng = np.random.default_rng(0)
    prompt, proposals = rng.integers(3, TINY_VOCAB, 9).tolist(), rng.integers(3, TINY_VOCAB, 5).tolist()
    plain = [KVCache() for _ in model.layers]
    model(mx.array([prompt]), cache=plain)
    expected = model(mx.array([proposals]), cache=plain)

    step = CompiledStep(model)
    cache = StaticCache(model, 32)
    step(mx.array([prompt]), cache)
    got = step(mx.array([proposals]), cache)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=2e-4, rtol=1e-4)

    # Reject the last three: trim them, then score other tokens in their place.
    assert cache.trim(3) == 3 and cache.offset == len(prompt) + 2
    for c in plain:
        c.trim(3)
    others = rng.integers(3, TINY_VOCAB, 4).tolist()
    np.testing.assert_allclose(
        np.array(step(mx.array([others]), cache)), np.array(model(mx.array([others]), cache=plain)), atol=2e-4, rtol=1e-4
    )


def test_a_step_past_the_capacity_is_refused(tiny):
    model, _ = tiny
    step, cache = CompiledStep(model), StaticCache(model, 4)
    step(mx.array([[5, 6, 7]]), cache)
    with pytest.raises(ElmError, match="holds 4 positions; 5 asked for"):
        step(mx.array([[8, 9]]), cache)
    assert cache.offset == 3
    with pytest.raises(ElmError, match="empty"):
        next(generate_greedy(model, [], 3))
