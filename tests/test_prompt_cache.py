"""Prompt caches: the server's PromptStore inside BatchEngine, and prompt cache files (elm-mlx cache-prompt).

Every reuse is held to the path without it: the same tokens, and exactly the
number of reused tokens the prompts' common prefixes give.
"""

import mlx.core as mx
import numpy as np
import pytest

from conftest import TINY_VOCAB
from elm_mlx import ElmError, SamplingParams, load, stream_generate
from elm_mlx.batching import BatchEngine, Request, batch_generate
from elm_mlx.cache import PromptStore, default_prompt_cache_bytes, physical_memory
from elm_mlx.demo import DEMO_DIR

GREEDY = SamplingParams(temp=0)

SYSTEM = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
)
QUESTIONS = ["ROMEO:", "JULIET:\nO Romeo", "KING HENRY:\nWhat say you", "All:\nResolved. resolved."]


@pytest.fixture(scope="module")
def demo():
    if not (DEMO_DIR / "model.safetensors").exists():
        pytest.skip("the demo model is not built")
    return load(str(DEMO_DIR), dtype="float32", verbose=False)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(str(tiny_model_dir), verbose=False)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def kv(n: int, layers: int = 2, width: int = 4):
    """Per-layer keys and values of n positions: 2 * layers * n * width * 4 bytes."""
    return [(mx.full((1, 1, n, width), float(i)), mx.full((1, 1, n, width), -float(i))) for i in range(layers)]


# ---- the store in the engine ----------------------------------------------------------------


def test_a_shared_system_prompt_is_computed_once_and_answers_are_unchanged(demo):
    model, tokenizer = demo
    prompts = [SYSTEM + q for q in QUESTIONS]
    plain = batch_generate(model, tokenizer, prompts, max_tokens=24, sampling=GREEDY)
    store = PromptStore(64 << 20)
    cached = batch_generate(model, tokenizer, prompts, max_tokens=24, sampling=GREEDY, prompt_cache=store)
    assert [r.tokens for r in cached] == [r.tokens for r in plain]
    ids = [tokenizer.encode(p) for p in prompts]
    # The first computes the system prompt; each later one reuses its longest prefix among those before it.
    expected = [0] + [max(min(common_prefix(ids[i], ids[j]), len(ids[i]) - 1) for j in range(i)) for i in range(1, len(ids))]
    assert [r.cached_tokens for r in cached] == expected
    assert min(expected[1:]) >= len(tokenizer.encode(SYSTEM)) - 1
    assert store.reused_tokens == sum(expected)


def test_a_conversation_resent_with_its_answer_reuses_prompt_and_answer(demo):
    model, tokenizer = demo
    first = [tokenizer.encode(SYSTEM + q) for q in QUESTIONS[:2]]
    store = PromptStore(64 << 20)
    answers = batch_generate(model, tokenizer, first, max_tokens=16, sampling=GREEDY, prompt_cache=store)
    follow_ups = [p + r.tokens + tokenizer.encode("\n\nROMEO:", add_bos=False) for p, r in zip(first, answers)]
    fresh = batch_generate(model, tokenizer, follow_ups, max_tokens=16, sampling=GREEDY)
    again = batch_generate(model, tokenizer, follow_ups, max_tokens=16, sampling=GREEDY, prompt_cache=store)
    assert [r.tokens for r in again] == [r.tokens for r in fresh]
    # Stored: prompt and answer except the last token sampled, which was never fed to the model.
    assert [r.cached_tokens for r in again] == [len(p) + len(r.tokens) - 1 for p, r in zip(first, answers)]
    assert [r.cached_tokens for r in fresh] == [0, 0]


def test_cached_prefix_then_chunked_prefill_equals_stream_generate(tiny):
    """Reused prefix and the rest prefilled in chunks from where it ends: the single-stream tokens."""
    model, tokenizer = tiny
    rng = np.random.default_rng(1)
    shared = rng.integers(3, TINY_VOCAB, size=150).tolist()
    prompts = [shared + rng.integers(3, TINY_VOCAB, size=n).tolist() for n in (1, 40, 90)]
    store = PromptStore(16 << 20)
    engine = BatchEngine(model, tokenizer, prefill_step_size=32, prompt_cache=store)
    ids = [engine.submit(Request(p, 12, GREEDY)) for p in prompts]
    events = []
    while engine.active or engine.queued:
        events += engine.step()
    for i, prompt in zip(ids, prompts):
        expected = [r.token for r in stream_generate(model, tokenizer, prompt, 12, GREEDY, prefill_step_size=32) if r.token is not None]
        assert [e.token for e in events if e.id == i and e.token is not None] == expected
    assert [next(e.cached_tokens for e in events if e.id == i) for i in ids] == [0, 150, 150]


def test_a_cancelled_prefill_leaves_what_it_computed(tiny):
    model, tokenizer = tiny
    prompt = np.random.default_rng(2).integers(3, TINY_VOCAB, size=100).tolist()
    store = PromptStore(16 << 20)
    engine = BatchEngine(model, tokenizer, prefill_step_size=32, prompt_cache=store)
    first = engine.submit(Request(prompt, 4, GREEDY))
    engine.step()
    engine.step()
    engine.cancel(first)
    engine.step()
    assert store.lookup(prompt)[0] == 64
    again = engine.submit(Request(prompt, 4, GREEDY))
    events = engine.step()
    assert events[0].id == again and events[0].cached_tokens == 64 and events[0].prefilled == 96


# ---- the store itself ------------------------------------------------------------------------


def test_least_recently_used_entries_go_first_within_the_byte_budget():
    one = 2 * 2 * 10 * 4 * 4  # an entry of 10 positions
    store = PromptStore(2 * one)
    assert store.store(list(range(10)), kv(10))
    assert store.store(list(range(100, 110)), kv(10))
    assert store.lookup(list(range(10)) + [7])[0] == 10  # touches the first: the second is now the oldest
    assert store.store(list(range(200, 210)), kv(10))
    assert (len(store), store.nbytes) == (2, 2 * one)
    assert store.lookup(list(range(100, 110)))[0] == 0
    assert store.lookup(list(range(5)))[0] == 5
    assert store.lookup(list(range(200, 210)), limit=9)[0] == 9


def test_an_extension_replaces_its_prefix_and_a_prefix_is_not_stored_again():
    store = PromptStore(1 << 20)
    assert store.store([1, 2, 3], kv(3))
    assert store.store([1, 2, 3, 4, 5], kv(5))
    assert len(store) == 1 and store.nbytes == sum(k.nbytes + v.nbytes for k, v in kv(5))
    assert not store.store([1, 2, 3, 4], kv(4))
    assert store.store([1, 2, 9], kv(3))
    assert len(store) == 2
    reused, layers = store.lookup([1, 2, 3, 4, 5, 6])
    assert reused == 5 and [k.shape for k, _ in layers] == [(1, 1, 5, 4)] * 2


def test_what_cannot_fit_is_not_kept():
    store = PromptStore(100)
    assert not store.store(list(range(10)), kv(10))
    assert not PromptStore(0).store([1], kv(1))
    assert not store.store([], [])
    assert not store.store([1, 2], kv(3))  # arrays that do not hold these tokens
    assert (len(store), store.nbytes) == (0, 0)


def test_the_default_budget_is_a_quarter_of_memory_at_most_two_gib():
    ram = physical_memory()
    assert default_prompt_cache_bytes() == min(ram // 4, 2 << 30)
    assert PromptStore().max_bytes == default_prompt_cache_bytes()


@pytest.mark.parametrize("size", [-1, 1.5, "1G", True, 1 << 62])
def test_a_bad_budget_is_one_clear_error(size):
    with pytest.raises(ElmError, match="prompt cache"):
        PromptStore(size)


def test_the_engine_takes_only_a_prompt_store(tiny):
    model, tokenizer = tiny
    with pytest.raises(ElmError, match="PromptStore"):
        BatchEngine(model, tokenizer, prompt_cache={})
