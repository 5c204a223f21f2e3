"""The OpenELM forward pass against mlx-lm's independent implementation, and the KV cache."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step as mlx_lm_generate_step
from mlx_lm.models import openelm as mlx_lm_openelm

from conftest import REFERENCE_CONFIGS, need_shared, random_weights, tiny_config
from elm_mlx.cache import KVCache, make_cache
from elm_mlx.generation import generate_step
from elm_mlx.load import build_model
from elm_mlx.sample import SamplingParams, make_sampler


def both_models(config, weights):
    ours = build_model(config)
    ours.load_weights(list(weights.items()), strict=True)
    theirs = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(config))
    theirs.load_weights(list(weights.items()), strict=True)
    return ours, theirs


def max_diff(a, b) -> float:
    return mx.abs(a - b).max().item()


@pytest.fixture(scope="module")
def tiny_pair():
    config = tiny_config()
    return both_models(config, random_weights(config))


def test_tiny_logits_match_mlx_lm(tiny_pair):
    ours, theirs = tiny_pair
    tokens = mx.array(np.random.default_rng(1).integers(0, 384, size=(2, 23)))
    a, b = ours(tokens), theirs(tokens)
    assert a.shape == (2, 23, 384)
    assert max_diff(a, b) <= 1e-4
    assert mx.abs(a).max().item() > 1.0  # the comparison is not between near-zero outputs


def test_untied_output_layer_matches_mlx_lm():
    config = tiny_config(share_input_output_layers=False)
    ours, theirs = both_models(config, random_weights(config, seed=3))
    tokens = mx.array([[1, 5, 9, 200, 7]])
    assert max_diff(ours(tokens), theirs(tokens)) <= 1e-4


def test_openelm_270m_shape_matches_mlx_lm():
    config = json.loads(need_shared(REFERENCE_CONFIGS / "OpenELM-270M.json").read_text())
    ours, theirs = both_models(config, random_weights(config, seed=2))
    tokens = mx.array([[1, 15043, 3186, 29892, 590, 1024, 338, 4699]])
    a, b = ours(tokens), theirs(tokens)
    assert max_diff(a, b) <= 1e-4, max_diff(a, b)


def test_cached_decoding_equals_full_forward_at_every_step(tiny_pair):
    model, _ = tiny_pair
    sequence = mx.array(np.random.default_rng(4).integers(0, 384, size=(1, 40)))
    full = model(sequence)
    cache = make_cache(model)
    prompt = 8
    model(sequence[:, :prompt], cache=cache)
    for t in range(prompt, prompt + 32):
        step_logits = model(sequence[:, t : t + 1], cache=cache)
        assert max_diff(step_logits[0, -1], full[0, t]) <= 1e-4, f"step {t}"
    assert cache[0].offset == prompt + 32


def test_cache_grows_in_blocks_not_per_token():
    cache = KVCache()
    k = mx.zeros((1, 2, 1, 16))
    cache.update_and_fetch(k, k)
    assert cache.keys.shape[2] == KVCache.step
    for _ in range(KVCache.step - 1):
        cache.update_and_fetch(k, k)
    assert cache.keys.shape[2] == KVCache.step  # still the first block
    keys, _ = cache.update_and_fetch(mx.ones((1, 2, 3, 16)), mx.ones((1, 2, 3, 16)))
    assert cache.keys.shape[2] == 2 * KVCache.step
    assert keys.shape[2] == KVCache.step + 3 and mx.all(keys[:, :, -3:] == 1).item()


def test_chunked_prefill_gives_the_same_logits(tiny_pair):
    model, _ = tiny_pair
    prompt = np.random.default_rng(5).integers(0, 384, size=50).tolist()
    greedy = make_sampler(SamplingParams(temp=0))
    runs = []
    for chunk in (7, 512):
        steps = generate_step(prompt, model, greedy, prefill_step_size=chunk)
        runs.append([next(steps) for _ in range(4)])
    for (tok_a, lp_a), (tok_b, lp_b) in zip(*runs):
        assert tok_a == tok_b and max_diff(lp_a, lp_b) <= 1e-4


def test_greedy_generation_matches_mlx_lm(tiny_pair):
    ours, theirs = tiny_pair
    prompt = [1, 17, 42, 99, 7, 250]
    greedy = make_sampler(SamplingParams(temp=0))
    our_steps = generate_step(prompt, ours, greedy)
    our_tokens = [next(our_steps)[0] for _ in range(40)]
    their_steps = mlx_lm_generate_step(mx.array(prompt), theirs, max_tokens=40)
    their_tokens = [int(t) for t, _ in their_steps]
    assert our_tokens == their_tokens
    assert len(set(our_tokens)) > 1
