"""Continuous batching (elm_mlx.batching) against the single-stream path, token for token.

The expected outputs always come from stream_generate (validated against
mlx-lm in test_model.py), never from the batch engine itself.
"""

import mlx.core as mx
import numpy as np
import pytest

from conftest import TINY_VOCAB, CountingModel
from elm_mlx import ElmError, SamplingParams, batch_generate, load, stream_generate
from elm_mlx.batching import BatchEngine, Request
from elm_mlx.cache import BatchKVCache, KVCache, PromptStore
from elm_mlx.demo import DEMO_DIR
from elm_mlx.generation import ContextLengthError, GenerationResponse, format_stats

GREEDY = SamplingParams(temp=0)
SAMPLED = SamplingParams(temp=0.8)

# Eight prompts of different lengths (1 to ~30 tokens), each continued differently by the demo model.
PROMPTS = [
    "ROMEO:",
    "To be, or not to be",
    "KING HENRY:\nWhat say you, lords",
    "O",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
    "Now is the winter",
    "JULIET:\nO Romeo, Romeo!",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
]


def alone(model, tokenizer, prompt, **kwargs):
    """(text, token ids, finish_reason) from the single-stream path."""
    responses = list(stream_generate(model, tokenizer, prompt, **kwargs))
    return "".join(r.text for r in responses), [r.token for r in responses if r.token is not None], responses[-1].finish_reason


def run_engine(engine):
    """Step until idle; every event, in order."""
    events = []
    while engine.active or engine.queued:
        events += engine.step()
    return events


def tokens_of(events, id):
    return [e.token for e in events if e.id == id and e.token is not None]


# ---- greedy: batched equals alone ---------------------------------------------------------


def test_eight_prompts_decoded_together_equal_each_alone(demo):
    model, tokenizer = demo
    expected = [alone(model, tokenizer, p, max_tokens=24, sampling=GREEDY) for p in PROMPTS]
    assert len({len(tokenizer.encode(p)) for p in PROMPTS}) == len(PROMPTS)  # all lengths differ
    assert len({tuple(tokens) for _, tokens, _ in expected}) == len(PROMPTS)  # every answer recognisable
    results = batch_generate(model, tokenizer, PROMPTS, max_tokens=24, sampling=GREEDY, prefill_step_size=8)
    for (text, tokens, finish), result in zip(expected, results):
        assert result.tokens == tokens
        assert (result.text, result.finish_reason) == (text, finish)
        assert result.generation_tokens == len(tokens) and result.prompt_tokens >= 1


def test_short_prompts_prefill_together_in_one_pass_and_equal_each_alone(demo):
    model, tokenizer = demo
    expected = [alone(model, tokenizer, p, max_tokens=12, sampling=GREEDY)[1] for p in PROMPTS]
    counting = CountingModel(model)
    results = batch_generate(counting, tokenizer, PROMPTS, max_tokens=12, sampling=GREEDY)
    assert [r.tokens for r in results] == expected
    prefills = [shape for shape in counting.inputs if shape[1] > 1]
    to_prefill = [len(tokenizer.encode(p)) - 1 for p in PROMPTS]  # the last prompt token is the first decode input
    assert prefills == [(sum(n > 0 for n in to_prefill), max(to_prefill))]  # all in one padded pass


def test_prompts_whose_start_is_stored_prefill_together_from_it(demo):
    # Requests sharing "ROMEO:" with an earlier one: one pass for all, as wide as the longest part not stored, each
    # row starting from the stored keys up to where its part of that width begins (not one pass each).
    model, tokenizer = demo
    prompts = [f"ROMEO:\n{line}" for line in ("What light through yonder window breaks?", "Is she not fair?", "Come, gentle night.")]
    expected = [alone(model, tokenizer, p, max_tokens=8, sampling=GREEDY)[1] for p in prompts]
    store = PromptStore(1 << 30)
    earlier = tokenizer.encode("ROMEO:\nGood morrow.")
    batch_generate(model, tokenizer, [earlier], max_tokens=4, sampling=GREEDY, prompt_cache=store)
    counting = CountingModel(model)
    results = batch_generate(counting, tokenizer, prompts, max_tokens=8, sampling=GREEDY, prompt_cache=store)
    assert [r.tokens for r in results] == expected
    ids = [tokenizer.encode(p) for p in prompts]
    ends = [len(i) - 1 for i in ids]
    stored = [next(k for k in range(len(i)) if k == len(earlier) - 1 or i[k] != earlier[k]) for i in ids]
    assert min(stored) >= 3  # BOS and "ROMEO:" at least
    width = max(e - c for e, c in zip(ends, stored))
    assert [shape for shape in counting.inputs if shape[1] > 1] == [(3, width)]
    assert [r.cached_tokens for r in results] == [max(0, e - width) for e in ends]
    # Alone, a prompt starts from everything stored of it.
    again = batch_generate(counting, tokenizer, prompts[:1], max_tokens=8, sampling=GREEDY, prompt_cache=store)
    assert again[0].tokens == expected[0] and again[0].cached_tokens == ends[0]
    # Prompts stored whole need no pass: sent together with others, they join as they are.
    twice = batch_generate(model, tokenizer, [prompts[0], prompts[0], prompts[1]], max_tokens=8, sampling=GREEDY, prompt_cache=store)
    assert [r.tokens for r in twice] == [expected[0], expected[0], expected[1]]
    assert [r.cached_tokens for r in twice] == ends[:1] * 2 + ends[1:2]


def test_a_store_that_keeps_nothing_does_not_make_prompts_wait_for_each_other(demo):
    # Waiting a step for another's stored keys gains nothing when the store keeps nothing: one pass, one step.
    model, tokenizer = demo
    preamble = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    prompts = [preamble + name for name in ("ROMEO:", "JULIET:", "KING HENRY:", "HAMLET:")]
    expected = [alone(model, tokenizer, p, max_tokens=4, sampling=GREEDY)[1] for p in prompts]
    for store in (None, PromptStore(0)):
        counting = CountingModel(model)
        results = batch_generate(counting, tokenizer, prompts, max_tokens=4, sampling=GREEDY, prompt_cache=store)
        assert [r.tokens for r in results] == expected
        ends = [len(tokenizer.encode(p)) - 1 for p in prompts]
        assert [shape for shape in counting.inputs if shape[1] > 1] == [(4, max(ends))], store


def test_prompts_arriving_together_with_one_preamble_compute_it_once(demo):
    model, tokenizer = demo
    preamble = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    prompts = [preamble + name for name in ("ROMEO:", "JULIET:", "KING HENRY:")] + ["To be, or not to be"]
    expected = [alone(model, tokenizer, p, max_tokens=8, sampling=GREEDY)[1] for p in prompts]
    results = batch_generate(model, tokenizer, prompts, max_tokens=8, sampling=GREEDY, prompt_cache=PromptStore(1 << 30))
    assert [r.tokens for r in results] == expected
    shared = len(tokenizer.encode(preamble))
    assert results[0].cached_tokens == 0 and results[3].cached_tokens == 0
    assert all(shared - 2 <= r.cached_tokens < r.prompt_tokens for r in results[1:3]), [r.cached_tokens for r in results]


def test_more_prompts_than_slots_wait_their_turn(demo):
    model, tokenizer = demo
    expected = [alone(model, tokenizer, p, max_tokens=8, sampling=GREEDY)[1] for p in PROMPTS[:5]]
    engine = BatchEngine(model, tokenizer, max_batch=2)
    ids = [engine.submit(Request(p, 8, GREEDY)) for p in PROMPTS[:5]]
    assert (engine.active, engine.queued) == (0, 5)
    first = engine.step()
    assert (engine.active, engine.queued) == (2, 3) and {e.id for e in first} == set(ids[:2])
    events = first + run_engine(engine)
    assert [tokens_of(events, i) for i in ids] == expected


def test_olmo_batched_equals_alone(olmo):
    model, tokenizer = olmo
    rng = np.random.default_rng(7)
    prompts = [rng.integers(3, TINY_VOCAB, size=n).tolist() for n in (1, 5, 17, 40, 9, 64, 2, 23)]
    expected = [alone(model, tokenizer, p, max_tokens=20, sampling=GREEDY)[1] for p in prompts]
    assert len({tuple(e) for e in expected}) == len(prompts)
    results = batch_generate(model, tokenizer, prompts, max_tokens=20, sampling=GREEDY, prefill_step_size=16)
    assert [r.tokens for r in results] == expected


def test_batched_logits_are_the_alone_logits(demo):
    """Not only the argmax: each row's log-probabilities are the single-stream ones within float rounding."""
    model, tokenizer = demo
    prompts = PROMPTS[:4]
    expected = [
        [r.logprobs for r in stream_generate(model, tokenizer, p, max_tokens=6, sampling=GREEDY) if r.token is not None] for p in prompts
    ]
    engine = BatchEngine(model, tokenizer)
    ids = [engine.submit(Request(p, 6, GREEDY)) for p in prompts]
    events = run_engine(engine)
    for i, want in zip(ids, expected):
        got = [e.logprobs for e in events if e.id == i and e.token is not None]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert mx.abs(g - w).max().item() < 1e-4


# ---- sampling: own keys, own history ------------------------------------------------------


def test_seeded_request_gives_the_same_tokens_alone_and_among_seven_others(demo):
    model, tokenizer = demo
    prompt = "KING HENRY:\nWhat say you, lords"
    _, single, _ = alone(model, tokenizer, prompt, max_tokens=24, sampling=SAMPLED, seed=1234)
    (by_itself,) = batch_generate(model, tokenizer, [prompt], max_tokens=24, sampling=SAMPLED, seeds=[1234])
    others = PROMPTS[:7]
    crowd = batch_generate(
        model, tokenizer, [*others[:3], prompt, *others[3:]], max_tokens=24, sampling=SAMPLED, seeds=[1, None, 5, 1234, None, 9, 2, None]
    )
    assert by_itself.tokens == single == crowd[3].tokens
    _, other_seed, _ = alone(model, tokenizer, prompt, max_tokens=24, sampling=SAMPLED, seed=1235)
    assert other_seed != single  # the seed matters, so the equality above is not vacuous


def test_repetition_penalty_uses_each_sequences_own_history(olmo):
    model, tokenizer = olmo
    penalised = SamplingParams(temp=0, repetition_penalty=3.0, repetition_context_size=16)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [20, 21]]
    params = [penalised, penalised, GREEDY]
    expected = [alone(model, tokenizer, p, max_tokens=24, sampling=s)[1] for p, s in zip(prompts, params)]
    plain = alone(model, tokenizer, prompts[0], max_tokens=24, sampling=GREEDY)[1]
    assert expected[0] != plain  # the penalty changes this output, so whose history it sees matters
    results = batch_generate(model, tokenizer, prompts, max_tokens=24, sampling=params)
    assert [r.tokens for r in results] == expected


def test_greedy_sampled_and_penalised_rows_side_by_side_in_float16():
    """Rows with and without penalties and keys in one float16 batch: each still computes in its own dtype, as alone."""
    if not (DEMO_DIR / "model.safetensors").exists():
        pytest.skip("the demo model is not built")
    model, tokenizer = load(str(DEMO_DIR), dtype="float16")
    params = [
        SamplingParams(temp=0, repetition_penalty=1.3),
        GREEDY,
        SAMPLED,
        SamplingParams(temp=0.8, repetition_penalty=1.1),
        GREEDY,
    ]
    seeds = [None, None, 7, 8, None]
    prompts = PROMPTS[:5]
    expected = [alone(model, tokenizer, p, max_tokens=24, sampling=s, seed=seed)[1] for p, s, seed in zip(prompts, params, seeds)]
    results = batch_generate(model, tokenizer, prompts, max_tokens=24, sampling=params, seeds=seeds)
    assert [r.tokens for r in results] == expected


def test_stop_strings_per_sequence(demo):
    model, tokenizer = demo
    full, _, _ = alone(model, tokenizer, PROMPTS[0], max_tokens=30, sampling=GREEDY)
    stop = full[10:13]
    expected = [alone(model, tokenizer, p, max_tokens=30, sampling=GREEDY, stop=[stop]) for p in PROMPTS[:3]]
    assert expected[0][2] == "stop" and expected[0][0] == full[: full.find(stop)]
    results = batch_generate(model, tokenizer, PROMPTS[:3], max_tokens=30, sampling=GREEDY, stop=[stop])
    assert [(r.text, r.tokens, r.finish_reason) for r in results] == expected


# ---- join, leave, cancel --------------------------------------------------------------------


def test_requests_join_and_leave_mid_batch_and_each_keeps_its_own_stream(demo):
    model, tokenizer = demo
    a, b, c, d, e = PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[4], PROMPTS[6]
    want = {p: alone(model, tokenizer, p, max_tokens=30, sampling=GREEDY)[1] for p in (a, b, c, d, e)}
    assert len({tuple(t) for t in want.values()}) == 5
    short = alone(model, tokenizer, c, max_tokens=5, sampling=GREEDY)[1]

    engine = BatchEngine(model, tokenizer, prefill_step_size=8)
    ids = {a: engine.submit(Request(a, 30, GREEDY)), b: engine.submit(Request(b, 30, GREEDY))}
    events = []
    for _ in range(4):
        events += engine.step()
    ids[c] = engine.submit(Request(c, 5, GREEDY))  # will finish on max_tokens while others run
    ids[d] = engine.submit(Request(d, 30, GREEDY))
    for _ in range(6):
        events += engine.step()
    engine.cancel(ids[b])
    ids[e] = engine.submit(Request(e, 30, GREEDY))
    events += run_engine(engine)

    for p in (a, d, e):
        assert tokens_of(events, ids[p]) == want[p]
    assert tokens_of(events, ids[c]) == short
    cancelled = tokens_of(events, ids[b])
    assert 0 < len(cancelled) < 30 and cancelled == want[b][: len(cancelled)]
    finishes = {e.id: e.finish_reason for e in events if e.finish_reason}
    assert finishes == {ids[a]: "length", ids[b]: "cancelled", ids[c]: "length", ids[d]: "length", ids[e]: "length"}
    assert engine.kv_bytes() == 0 and engine.cache[0].keys is None  # every row's memory went with it


def test_a_finished_rows_memory_is_released_at_once(demo):
    model, tokenizer = demo
    engine = BatchEngine(model, tokenizer)
    long_id = engine.submit(Request(PROMPTS[4], 40, GREEDY))
    engine.submit(Request(PROMPTS[3], 3, GREEDY))
    engine.step()
    with_both = engine.kv_bytes()
    while len(engine.decoding) == 2:
        engine.step()
    assert engine.kv_bytes() == with_both // 2  # one of two rows of the same width
    assert engine.padding_fraction() == 0.0  # the shorter row's padding left with it
    engine.cancel(long_id)
    assert engine.step()[0].finish_reason == "cancelled"
    assert engine.kv_bytes() == 0 and (engine.active, engine.queued) == (0, 0)


def test_cancel_while_waiting_or_prefilling(tiny):
    model, tokenizer = tiny
    engine = BatchEngine(model, tokenizer, max_batch=1, prefill_step_size=16)
    first = engine.submit(Request([5] * 100, 4, GREEDY))
    waiting = engine.submit(Request([6] * 10, 4, GREEDY))
    engine.step()
    assert engine.prefilling and engine.queued == 1
    engine.cancel(first)
    engine.cancel(waiting)
    events = engine.step()
    assert {(e.id, e.finish_reason) for e in events} == {(first, "cancelled"), (waiting, "cancelled")}
    assert (engine.active, engine.queued) == (0, 0)


def test_a_long_prompt_prefills_between_decode_steps(tiny):
    """While a 2000-token prompt prefills in 256-token chunks, the running streams get a token at every step."""
    model, tokenizer = tiny
    long_prompt = np.random.default_rng(0).integers(3, TINY_VOCAB, size=2000).tolist()
    expected_long = alone(model, tokenizer, long_prompt, max_tokens=4, sampling=GREEDY, prefill_step_size=256)[1]
    engine = BatchEngine(model, tokenizer, prefill_step_size=256)
    running = [engine.submit(Request(p, 40, GREEDY)) for p in ("the king", "lord lady speak")]
    for _ in range(2):
        engine.step()
    late = engine.submit(Request(long_prompt, 4, GREEDY))
    events = run_engine(engine)

    chunks = [i for i, e in enumerate(events) if e.id == late and e.prefilled is not None]
    assert [events[i].prefilled for i in chunks] == [256 * k for k in range(1, 8)] + [1999]
    for start, end in zip(chunks, chunks[1:]):
        between = [e.id for e in events[start:end] if e.token is not None]
        assert all(r in between for r in running)  # nobody waited for the whole prompt
    assert tokens_of(events, late) == expected_long


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts="the king"), "list of prompts"),
        (dict(prompts=[]), "prompts is empty"),
        (dict(prompts=["the king", "  "]), "prompt is empty"),
        (dict(prompts=[[]]), "prompt is empty"),
        (dict(prompts=[[5, "x"]]), "string or a list of token ids"),
        (dict(prompts=[[5, TINY_VOCAB]]), "token ids must be in"),
        (dict(prompts=[[5, -1]]), "token ids must be in"),
        (dict(max_tokens=0), "max_tokens must be >= 1"),
        (dict(max_tokens=2.5), "max_tokens must be an integer"),
        (dict(sampling=[GREEDY]), "one per prompt"),
        (dict(sampling="greedy"), "one per prompt"),
        (dict(sampling=[GREEDY, {"temp": 0}]), "SamplingParams"),
        (dict(seeds=[1]), "one per prompt"),
        (dict(seeds=[1, -2]), "seed must be"),
        (dict(seeds=[1, True]), "seed must be an integer"),
        (dict(stop="x"), "stop must be a list"),
        (dict(stop=["x", 3]), "stop must be a list"),
        (dict(prefill_step_size=0), "prefill_step_size must be"),
        (dict(max_batch=0), "max_batch must be"),
        (dict(prompts=[[5] * 2040], max_tokens=10), "context length is 2048"),
    ],
)
def test_bad_input_is_one_clear_error(tiny, kwargs, message):
    model, tokenizer = tiny
    kwargs = {"prompts": ["the king", "lord lady"], **kwargs}
    with pytest.raises(ElmError, match=message):
        batch_generate(model, tokenizer, **kwargs)


def test_a_refused_request_leaves_the_engine_as_it_was(tiny):
    model, tokenizer = tiny
    engine = BatchEngine(model, tokenizer)
    with pytest.raises(ContextLengthError):
        engine.submit(Request([5] * 2048, 1, GREEDY))
    assert (engine.active, engine.queued) == (0, 0)
    engine.cancel(12345)  # unknown ids are ignored
    assert engine.step() == []


# ---- the pieces -----------------------------------------------------------------------------


def test_batch_cache_aligns_rows_right_with_their_own_positions():
    def alone_cache(length: int, value: float) -> KVCache:
        cache = KVCache()
        cache.update_and_fetch(mx.full((1, 2, length, 4), value), mx.full((1, 2, length, 4), -value))
        return cache

    batch = BatchKVCache()
    batch.add(alone_cache(3, 1.0))
    batch.add(alone_cache(5, 2.0))  # longer: the first row gets more padding
    batch.add(KVCache())  # a one-token prompt: nothing prefilled yet
    assert (batch.padding, batch.size, batch.offset.tolist()) == ([2, 0, 5], 5, [3, 5, 0])
    assert batch.mask()[:, 0, 0].tolist() == [[False, False, True, True, True, True], [True] * 6, [False] * 5 + [True]]
    keys, _ = batch.update_and_fetch(mx.zeros((3, 2, 1, 4)), mx.zeros((3, 2, 1, 4)))
    assert keys[:, 0, :, 0].tolist() == [[0, 0, 1, 1, 1, 0], [2, 2, 2, 2, 2, 0], [0, 0, 0, 0, 0, 0]]
    batch.keep([2, 0])  # the longest row leaves: the columns only it used go
    assert (batch.padding, batch.size, batch.offset.tolist()) == ([3, 0], 4, [1, 4])
    assert batch.keys[:, 0, :4, 0].tolist() == [[0, 0, 0, 0], [1, 1, 1, 0]]


def test_format_stats_says_one_token_and_no_rate_it_cannot_measure():
    def response(prompt_tokens, prompt_tps, generated, tps):
        return GenerationResponse("", None, None, prompt_tokens, prompt_tps, generated, tps, 0.5)

    assert format_stats(response(1, 12.0, 1, 0.0)) == "prompt: 1 token, 12.0 tok/s | generation: 1 token, - tok/s | peak memory: 0.500 GB"
    assert "generation: 2 tokens, 30.0 tok/s" in format_stats(response(5, 1.0, 2, 30.0))
