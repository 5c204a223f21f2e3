"""Continuous batching with quantized keys and values (kv_bits): each sequence as stream_generate computes it alone.

The expected tokens come from stream_generate with the same KVOptions, the
expected keys and values from a PromptCache with them, the expected bytes
from the model's shapes; never from the batch engine itself.
"""

from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import pytest

from conftest import CountingModel, PeakActive
from elm_mlx import ElmError, SamplingParams, batch_generate, stream_generate
from elm_mlx.batching import BatchEngine, Request
from elm_mlx.cache import KVCache, KVOptions, PromptCache, PromptStore, QuantizedBatchKVCache, QuantizedKVCache

GREEDY = SamplingParams(temp=0)

# Different lengths (1 to ~60 tokens); with prefill_step_size 32 the last one is prefilled in chunks.
PROMPTS = [
    "HAMLET:",
    "KING HENRY:\nWhat say you, lords",
    "O",
    "JULIET:\nO Romeo, Romeo!",
    "To be, or not to be",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved?",
]
MAX_TOKENS = [18, 10, 14, 6, 20, 12]  # rows leave at different steps and the waiting ones join


def alone(model, tokenizer, prompt, **kwargs):
    return [r.token for r in stream_generate(model, tokenizer, prompt, **kwargs) if r.token is not None]


def run(engine):
    events = []
    while engine.active or engine.queued:
        events += engine.step()
    return events


class GroupSpy(BatchEngine):
    """A BatchEngine noting how many sequences each group prefill took."""

    def _prefill_together(self):
        events, spent, waiting = super()._prefill_together()
        if spent:
            self.groups = getattr(self, "groups", []) + [sum(e.prefilled is not None for e in events)]
        return events, spent, waiting


@pytest.mark.parametrize("bits", [8, 4])
def test_prompts_decoded_together_with_quantized_kv_equal_each_alone(demo, bits):
    model, tokenizer = demo
    kv = KVOptions(bits=bits)
    expected = [alone(model, tokenizer, p, max_tokens=n, sampling=GREEDY, kv=kv) for p, n in zip(PROMPTS, MAX_TOKENS)]
    plain = [alone(model, tokenizer, p, max_tokens=n, sampling=GREEDY) for p, n in zip(PROMPTS, MAX_TOKENS)]
    assert expected != plain  # the quantization shows in the answers: a batch that ignored kv would fail here
    engine = GroupSpy(model, tokenizer, max_batch=4, prefill_step_size=32, kv=kv)
    ids = [engine.submit(Request(p, n, GREEDY)) for p, n in zip(PROMPTS, MAX_TOKENS)]
    events = run(engine)
    assert [[e.token for e in events if e.id == i and e.token is not None] for i in ids] == expected
    assert engine.groups and engine.groups[0] >= 3  # the first short prompts were prefilled in one padded pass
    assert isinstance(engine.cache[0], QuantizedBatchKVCache) and engine.kv_bytes() == 0


def test_a_row_and_its_stored_keys_and_values_are_bit_for_bit_what_the_sequence_holds_alone(demo):
    # A sequence prefilled alone (in chunks, for the last prompt), joined to the batch with its quantized parts
    # copied, decoded, and stored when it leaves, against what a PromptCache holds after stream_generate with
    # the same options. One row at a time, with a store of its own, so that the floats are computed in the same
    # shapes (across rows, a batched product may round differently, as without quantization).
    model, tokenizer = demo
    kv = KVOptions(bits=4)
    for prompt in (PROMPTS[0], PROMPTS[3], PROMPTS[5]):
        store = PromptStore(1 << 30)
        batch_generate(model, tokenizer, [prompt], max_tokens=6, sampling=GREEDY, prefill_step_size=32, kv=kv, prompt_cache=store)
        own = PromptCache(model, kv)
        list(stream_generate(model, tokenizer, prompt, max_tokens=6, sampling=GREEDY, prefill_step_size=32, prompt_cache=own))
        n, layers = store.lookup(own.tokens, form=(4, 32))
        assert n >= len(tokenizer.encode(prompt)) + 4 and store.lookup(own.tokens)[0] == 0  # no plain cache gets them
        for layer_cache, (keys, values) in zip(own.cache, layers):
            for mine, stored in zip(layer_cache.keys + layer_cache.values, keys + values):
                assert mx.array_equal(mine[..., :n, :], stored).item()


def test_the_quantized_batch_cache_keeps_each_rows_parts_as_they_are():
    def alone_cache(length: int, seed: int) -> QuantizedKVCache:
        cache = QuantizedKVCache(bits=4, group_size=32)
        keys, values = mx.random.normal((2, 1, 2, length, 64), key=mx.random.key(seed))
        cache.update_and_fetch(keys, values)
        return cache

    rows = [alone_cache(3, 0), alone_cache(5, 1), QuantizedKVCache(bits=4, group_size=32)]
    batch = QuantizedBatchKVCache(bits=4, group_size=32)
    for row in rows:
        batch.add(row)
    assert (batch.padding, batch.size) == ([2, 0, 5], 5)
    new_keys, new_values = mx.random.normal((2, 3, 2, 1, 64), key=mx.random.key(2))
    keys, values = batch.update_and_fetch(new_keys, new_values)
    new = [*mx.quantize(new_keys, group_size=32, bits=4), *mx.quantize(new_values, group_size=32, bits=4)]
    for b, row in enumerate(rows):  # each row: its own parts, then its new column quantized
        held = [p[..., : row.offset, :] for p in row.keys + row.values] if row.offset else [n[:1, :, :0] for n in new]
        expected = [mx.concatenate([h, n[b : b + 1]], axis=2) for h, n in zip(held, new)]
        got_keys, got_values = batch.row(b)
        assert all(mx.array_equal(g, e).item() for g, e in zip(got_keys + got_values, expected))
        dequantized = mx.dequantize(*got_keys, group_size=32, bits=4)
        assert mx.array_equal(keys[b : b + 1, :, batch.padding[b] :], dequantized).item()  # attention reads these
    batch.keep([2, 0])  # the longest row leaves: its columns go, the others' parts stay as they were
    kept = QuantizedKVCache(bits=4, group_size=32)
    kept.extend(*batch.row(1))
    assert kept.offset == 4 and mx.array_equal(kept.keys[0][..., :3, :], rows[0].keys[0][..., :3, :]).item()
    with pytest.raises(ElmError, match="stores keys and values as"):
        batch.add(KVCache())


def test_a_stored_prefix_is_reused_with_quantized_kv_and_answers_are_unchanged(demo):
    model, tokenizer = demo
    kv = KVOptions(bits=8)
    preamble = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    prompts = [preamble + name for name in ("ROMEO:", "JULIET:\nO Romeo", "KING HENRY:")]
    expected = [alone(model, tokenizer, p, max_tokens=8, sampling=GREEDY, kv=kv) for p in prompts]
    results = batch_generate(model, tokenizer, prompts, max_tokens=8, sampling=GREEDY, kv=kv, prompt_cache=PromptStore(1 << 30))
    assert [r.tokens for r in results] == expected
    shared = len(tokenizer.encode(preamble))
    assert results[0].cached_tokens == 0
    assert all(shared - 2 <= r.cached_tokens < r.prompt_tokens for r in results[1:]), [r.cached_tokens for r in results]


def test_a_seeded_sampled_request_is_the_same_alone_and_batched_with_quantized_kv(demo):
    model, tokenizer = demo
    kv = KVOptions(bits=8)
    sampled = SamplingParams(temp=0.9)
    expected = alone(model, tokenizer, PROMPTS[1], max_tokens=20, sampling=sampled, seed=7, kv=kv)
    results = batch_generate(model, tokenizer, PROMPTS[:4], max_tokens=20, sampling=sampled, seeds=[3, 7, None, 11], kv=kv)
    assert results[1].tokens == expected
    assert alone(model, tokenizer, PROMPTS[1], max_tokens=20, sampling=sampled, seed=8, kv=kv) != expected  # the seed matters


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_bytes_are_the_quantized_shapes(demo, bits):
    """Per position, head and key or value: head_dim * bits / 8 bytes packed, and a float32 scale and bias per
    group of 32 (the demo's head size is 32), against head_dim * 4 bytes in float32."""
    model, tokenizer = demo
    head_dim, kv_heads = model.args.head_dim, sum(model.args.num_kv_heads)
    assert (head_dim, kv_heads) == (32, 19)
    engines = {}
    for name, kv in (("plain", None), ("quantized", KVOptions(bits=bits))):
        engine = engines[name] = BatchEngine(model, tokenizer, max_batch=4, kv=kv)
        for p in PROMPTS[:4]:
            engine.submit(Request(p, 8, GREEDY))
        engine.step()  # all four prefilled and joined, one decode step queued
        mx.eval([c.state for c in engine.cache])
    layout = engines["quantized"].cache[0]
    rows, columns = len(layout.padding), layout.keys[0].shape[2]
    assert rows == 4 and columns == engines["plain"].cache[0].keys.shape[2]
    per_position = head_dim * bits // 8 + 2 * 4 * head_dim // 32
    assert engines["quantized"].kv_bytes() == rows * columns * kv_heads * 2 * per_position
    assert engines["plain"].kv_bytes() == rows * columns * kv_heads * 2 * head_dim * 4
    ratio = engines["quantized"].kv_bytes() / engines["plain"].kv_bytes()
    assert ratio == {8: 0.3125, 4: 0.1875}[bits]


def test_kv_options_a_batch_cannot_follow_are_one_line_errors(demo):
    model, tokenizer = demo
    with pytest.raises(ElmError, match=r"max_kv_size\) serves one sequence at a time") as window:
        BatchEngine(model, tokenizer, kv=KVOptions(max_size=64))
    with pytest.raises(ElmError, match="kv_group_size 64 does not divide this model's head size 32") as group:
        batch_generate(model, tokenizer, ["ROMEO:"], kv=KVOptions(bits=8, group_size=64))
    with pytest.raises(ElmError, match="kv must be a KVOptions"):
        BatchEngine(model, tokenizer, kv={"bits": 8})
    assert "\n" not in str(window.value) and "\n" not in str(group.value)


def test_a_batching_server_with_kv_bits_answers_as_the_one_at_a_time_server(demo):
    pytest.importorskip("uvicorn")
    from test_server_batching import PROMPTS as SERVER_PROMPTS
    from test_server_batching import complete, health, serve

    from elm_mlx.server import BatchedEngine, Engine

    model, tokenizer = demo
    kv = KVOptions(bits=8)
    serial, stop_serial = serve(Engine(model, tokenizer, "demo", kv=kv))  # as `--max-batch 1 --kv-bits 8`
    engine = BatchedEngine(model, tokenizer, "demo", max_batch=4, prefill_step_size=64, kv=kv)
    batched, stop_batched = serve(engine)
    try:
        prompts = SERVER_PROMPTS[:6]
        expected = [complete(serial, p, max_tokens=12 + 3 * i)[0] for i, p in enumerate(prompts)]
        with PeakActive(engine) as watch, ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda i: complete(batched, prompts[i], stream=i % 2 == 1, max_tokens=12 + 3 * i)[0], range(6)))
        assert together == expected and watch.peak >= 3, watch.peak  # this test must really batch
        assert isinstance(engine.batch.cache[0], QuantizedBatchKVCache)
        preamble = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        complete(batched, preamble + "ROMEO:", max_tokens=6)
        text, _, usage = complete(batched, preamble + "JULIET:", max_tokens=10)
        assert usage["prompt_tokens_details"]["cached_tokens"] >= len(tokenizer.encode(preamble)) - 2  # the quantized store
        assert text == complete(serial, preamble + "JULIET:", max_tokens=10)[0]
        status = health(batched)
        assert status["kv_bytes"] == 0 and status["prompt_cache_entries"] > 0 and status["active"] == 0
    finally:
        stop_serial()
        stop_batched()


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_one_group_mixing_cut_stored_prefixes_short_rows_and_a_prompt_stored_whole(demo, bits):
    # One pass must serve rows that start from part of their stored prefix, a row whose stored prefix is all
    # recomputed, a left-padded new row; a prompt stored whole joins without it. Each row as stream_generate alone.
    import random

    model, tokenizer = demo
    kv = KVOptions(bits=bits) if bits else None
    rng = random.Random(0)
    fresh = lambda n: [rng.randrange(3, model.args.vocab_size) for _ in range(n)]  # noqa: E731
    shared = tokenizer.encode(PROMPTS[-1])[:30]
    earlier = shared + fresh(5)  # stored first: 35 tokens
    a = shared + fresh(11)  # prefills 40, 30 stored: 10 left
    c = shared + fresh(13)  # prefills 42, 30 stored: 12 left -> the pass is 12 wide; a keeps 28, c 30
    b = shared[:5] + fresh(8)  # prefills 12 = the width: its 5 stored tokens are recomputed (keeps 0)
    d = fresh(5)  # prefills 4: left-padded by 8 inside the pass
    prompts = [a, b, c, d, list(earlier)]  # the last is stored whole (its 34 tokens to prefill)
    expected = [alone(model, tokenizer, p, max_tokens=10, sampling=GREEDY, kv=kv) for p in prompts]
    store = PromptStore(1 << 30)
    batch_generate(model, tokenizer, [earlier], max_tokens=2, sampling=GREEDY, prompt_cache=store, kv=kv)
    counting = CountingModel(model)
    results = batch_generate(counting, tokenizer, prompts, max_tokens=10, sampling=GREEDY, prompt_cache=store, kv=kv)
    assert [r.tokens for r in results] == expected
    assert [shape for shape in counting.inputs if shape[1] > 1] == [(4, 12)]
    assert [r.cached_tokens for r in results] == [28, 0, 30, 0, 34]
