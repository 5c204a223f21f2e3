"""Bounded and quantized KV caches (--max-kv-size, --kv-bits) against the plain cache.

A rotating window gives the plain cache's tokens exactly while it is not
exceeded, and past it what a full forward pass with the window's mask gives.
Quantized keys and values stay within stated tolerances of the plain ones,
measured on the demo model (figures in the tests' comments).
"""

import importlib

import mlx.core as mx
import numpy as np
import pytest

from conftest import TINY_VOCAB
from elm_mlx import ElmError, SamplingParams, stream_generate
from elm_mlx.cache import KEEP_TOKENS, KVCache, KVOptions, PromptCache, QuantizedKVCache, RotatingKVCache, make_cache
from elm_mlx.generation import prefill_chunk

GREEDY = SamplingParams(temp=0)
PROMPTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
    "ROMEO:",
    "KING HENRY:\nWhat say you, lords",
]


def tokens(model, tokenizer, prompt, max_tokens, **kwargs):
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens, GREEDY, **kwargs) if r.token is not None]


def stepped_logprobs(model, ids, start, kv, chunk=512):
    """Prefill ids[:start] in chunks, then feed the rest one token at a time: each step's log-probabilities."""
    cache = make_cache(model, kv)
    x = mx.array(ids, dtype=mx.uint32)
    done = 0
    while done < start:
        done = prefill_chunk(model, x, cache, done, start, chunk)
    rows = []
    for i in range(start, len(ids)):
        logits = model(x[i : i + 1][None], cache=cache)[0, -1]
        rows.append(logits - mx.logsumexp(logits))
    return mx.stack(rows)


# ---- rotating window ----------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [512, 8])
def test_a_window_not_exceeded_gives_the_plain_tokens(demo, chunk):
    model, tokenizer = demo
    for prompt in PROMPTS:
        plain = tokens(model, tokenizer, prompt, 40, prefill_step_size=chunk)
        window = len(tokenizer.encode(prompt)) + 40  # every position the answer needs, and no more
        assert tokens(model, tokenizer, prompt, 40, prefill_step_size=chunk, kv=KVOptions(max_size=window)) == plain


def window_reference(model, ids, max_size):
    """Log-probabilities of a full forward pass in which each token sees the first KEEP_TOKENS and its last max_size - KEEP_TOKENS."""
    pos = np.arange(len(ids))
    visible = (pos[None] <= pos[:, None]) & ((pos[None] < KEEP_TOKENS) | (pos[:, None] - pos[None] < max_size - KEEP_TOKENS))
    logits = model(mx.array(ids, dtype=mx.uint32)[None], mask=mx.array(visible))[0]
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@pytest.mark.parametrize("chunk", [7, 16, 100])
def test_past_the_window_each_token_sees_the_first_tokens_and_the_most_recent(tiny, chunk):
    """Chunked prefill longer than the window (explicit masks) and decoding past it both match the windowed forward pass."""
    model, _ = tiny
    ids = np.random.default_rng(4).integers(3, TINY_VOCAB, size=90).tolist()
    expected = window_reference(model, ids, 24)[60:]
    got = stepped_logprobs(model, ids, 60, KVOptions(max_size=24), chunk=chunk)
    assert mx.abs(got - expected).max().item() < 1e-4


def test_the_window_bounds_memory(tiny):
    model, tokenizer = tiny
    cache = make_cache(model, KVOptions(max_size=32))
    x = mx.array(np.random.default_rng(5).integers(3, TINY_VOCAB, size=300).tolist(), dtype=mx.uint32)
    done = 0
    while done < 200:
        done = prefill_chunk(model, x, cache, done, 200, 64)
    for i in range(200, 300):
        model(x[i : i + 1][None], cache=cache)
        assert all(c.held <= 32 for c in cache)
    assert cache[0].offset == 300  # positions keep counting: the context length still applies


def test_a_prompt_cache_with_a_window_starts_afresh_when_it_cannot_go_back(tiny):
    model, tokenizer = tiny
    ids = np.random.default_rng(6).integers(3, TINY_VOCAB, size=50).tolist()
    prompt_cache = PromptCache(model, KVOptions(max_size=16))
    first = tokens(model, tokenizer, ids, 4, prompt_cache=prompt_cache)
    extended = ids + first + [7]
    responses = list(stream_generate(model, tokenizer, extended, 4, GREEDY, prompt_cache=prompt_cache))
    assert responses[-1].prompt_cached_tokens == len(ids) + len(first)  # it extends everything held: reused
    edited = ids[:40] + [9, 9]
    responses = list(stream_generate(model, tokenizer, edited, 4, GREEDY, prompt_cache=prompt_cache))
    assert responses[-1].prompt_cached_tokens == 0  # tokens 40.. would have to come back: recomputed
    assert [r.token for r in responses if r.token is not None] == tokens(model, tokenizer, edited, 4, kv=KVOptions(max_size=16))


def test_rotating_cache_trims_only_while_nothing_was_dropped():
    cache = RotatingKVCache(8)
    cache.update_and_fetch(mx.zeros((1, 1, 6, 4)), mx.zeros((1, 1, 6, 4)))
    assert cache.trim(2) == 2 and cache.offset == 4
    for _ in range(10):
        cache.update_and_fetch(mx.zeros((1, 1, 1, 4)), mx.zeros((1, 1, 1, 4)))
    assert cache.held == 8 and cache.trim(1) == 0 and cache.offset == 14


# ---- quantized keys and values ------------------------------------------------------------------


def teacher_forced(model, ids, kv):
    """Log-probabilities at every position of one pass over ids. With a QuantizedKVCache this is what decoding
    token by token computes: new keys are quantized before any token attends to them."""
    logits = model(mx.array(ids, dtype=mx.uint32)[None], cache=make_cache(model, kv))[0]
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def continuations(demo):
    """Each prompt followed by the plain cache's 300 greedy tokens, and where those start."""
    model, tokenizer = demo
    return [(tokenizer.encode(p) + tokens(model, tokenizer, p, 300), len(tokenizer.encode(p))) for p in PROMPTS]


@pytest.mark.parametrize(
    "bits, min_agreement, max_diff, max_mean",
    [
        # Measured on the demo model (fp32, group 32; 3 prompts x 300 tokens): argmax agreement 0.997-1.0,
        # log-probability difference max 0.13, mean 0.006.
        (8, 0.98, 0.3, 0.02),
        # Measured: agreement 0.93-0.96, max 1.56, mean 0.10.
        (4, 0.85, 3.0, 0.25),
    ],
)
def test_quantized_kv_stays_within_tolerance_of_the_plain_cache(demo, continuations, bits, min_agreement, max_diff, max_mean):
    """Teacher-forced over the plain greedy continuation: the same next-token choice, close log-probabilities."""
    model, _ = demo
    for ids, start in continuations:
        a, b = teacher_forced(model, ids, None)[start - 1 :], teacher_forced(model, ids, KVOptions(bits=bits))[start - 1 :]
        agreement = (mx.argmax(a, -1) == mx.argmax(b, -1)).mean().item()
        diff = mx.abs(a - b)
        assert agreement >= min_agreement and diff.max().item() < max_diff and diff.mean().item() < max_mean, (agreement, diff.max())


def test_eight_bit_kv_decodes_the_plain_greedy_text(demo, continuations):
    """Measured: greedy tokens identical for 300, 300 and 171 tokens of the three prompts; asserted for 150 of the first."""
    model, tokenizer = demo
    ids, start = continuations[0]
    assert tokens(model, tokenizer, PROMPTS[0], 150, kv=KVOptions(bits=8)) == ids[start : start + 150]


def test_quantized_decoding_equals_one_pass(demo, continuations):
    """Step by step through the cache or in one pass, as the tolerance tests measure: the same log-probabilities up
    to a number rounded to the neighbouring quantization level (a float difference of 1e-7 can flip it; measured 0.011)."""
    model, _ = demo
    ids, start = continuations[1]
    ids = ids[: start + 30]
    stepped = stepped_logprobs(model, ids, start, KVOptions(bits=8))
    assert mx.abs(stepped - teacher_forced(model, ids, KVOptions(bits=8))[start:]).max().item() < 0.05


def test_quantized_storage_is_smaller_and_dequantizes_close():
    keys = mx.random.normal((1, 2, 40, 64), key=mx.random.key(0))
    plain, eight, four = KVCache(), QuantizedKVCache(8, 64), QuantizedKVCache(4, 64)
    for cache in (plain, eight, four):
        got, _ = cache.update_and_fetch(keys, keys)
    assert mx.abs(eight.update_and_fetch(keys[..., :1, :], keys[..., :1, :])[0][..., :40, :] - keys).max().item() < 0.05
    assert mx.abs(got - keys).max().item() < 0.5
    # float32: 8 bits plus a float32 scale and bias per 64 numbers = 0.28 of the bytes, 4 bits 0.16.
    per_position = lambda c: c.nbytes / c.keys[0].shape[2] if isinstance(c, QuantizedKVCache) else c.nbytes / c.keys.shape[2]  # noqa: E731
    assert per_position(eight) <= 0.29 * per_position(plain) and per_position(four) <= 0.16 * per_position(plain)
    assert eight.trim(5) == 5 and eight.offset == 36


# ---- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_size=4), "above 4"),
        (dict(max_size=True), "integer"),
        (dict(bits=3), "kv_bits must be one of 4, 8"),
        (dict(bits=8, group_size=48), "kv_group_size must be one of"),
        (dict(group_size=32), "needs kv_bits"),
        (dict(max_size=64, bits=8), "do not combine"),
    ],
)
def test_bad_kv_options_are_one_clear_error(options, message):
    with pytest.raises(ElmError, match=message):
        KVOptions(**options)


def test_the_group_size_must_split_the_heads(demo):
    model, _ = demo  # head size 32
    with pytest.raises(ElmError, match="does not divide this model's head size 32"):
        make_cache(model, KVOptions(bits=8, group_size=64))
    assert make_cache(model, KVOptions(bits=8))[0].group_size == 32


def test_the_command_line_kv_options_give_the_plain_text(demo, capsys):
    generate = importlib.import_module("elm_mlx.generate")
    prompt = PROMPTS[0]
    base = ["--no-verbose", "--no-chat", "-p", prompt, "-m", "40", "--temp", "0", "--dtype", "float32"]
    generate.main(base)
    plain = capsys.readouterr().out
    generate.main(base + ["--max-kv-size", "200"])
    assert capsys.readouterr().out == plain
    generate.main(base + ["--kv-bits", "8"])
    assert capsys.readouterr().out == plain  # measured: identical for 300 tokens
