"""stream_generate / generate: streamed text, stop conditions, statistics."""

import pytest

from elm_mlx import ElmError, SamplingParams, generate, load, stream_generate

GREEDY = SamplingParams(temp=0)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(str(tiny_model_dir))


def run(model, tokenizer, prompt, **kwargs):
    responses = list(stream_generate(model, tokenizer, prompt, **kwargs))
    tokens = [r.token for r in responses if r.token is not None]
    return "".join(r.text for r in responses), tokens, responses[-1]


def test_streamed_text_continues_the_prompt_exactly(tiny):
    model, tokenizer = tiny
    prompt = "the king"
    text, tokens, last = run(model, tokenizer, prompt, max_tokens=30, sampling=GREEDY)
    prompt_ids = tokenizer.encode(prompt)
    assert tokenizer.decode(prompt_ids) + text == tokenizer.decode(prompt_ids + tokens)
    assert last.finish_reason == "length" and last.generation_tokens == 30 == len(tokens)
    assert last.prompt_tokens == len(prompt_ids)
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory_gb > 0


def test_generate_returns_the_streamed_text(tiny):
    model, tokenizer = tiny
    text, _, _ = run(model, tokenizer, "lord lady", max_tokens=12, sampling=GREEDY)
    assert generate(model, tokenizer, "lord lady", max_tokens=12, sampling=GREEDY) == text


def test_stop_string_ends_generation_before_it(tiny):
    model, tokenizer = tiny
    full, _, _ = run(model, tokenizer, "the queen", max_tokens=40, sampling=GREEDY)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3 and stop in full
    text, _, last = run(model, tokenizer, "the queen", max_tokens=40, sampling=GREEDY, stop=[stop, "never-appears"])
    assert text == full[: full.find(stop)]
    assert last.finish_reason == "stop"


def test_end_of_sequence_token_stops_and_is_not_printed(tiny):
    model, tokenizer = tiny
    _, tokens, _ = run(model, tokenizer, "good friend", max_tokens=10, sampling=GREEDY)
    tokenizer.eos_ids.add(tokens[3])
    try:
        text, got, last = run(model, tokenizer, "good friend", max_tokens=10, sampling=GREEDY)
    finally:
        tokenizer.eos_ids.discard(tokens[3])
    assert got == tokens[: tokens.index(tokens[3])]
    assert last.finish_reason == "stop"


def test_seed_makes_sampling_reproducible(tiny):
    model, tokenizer = tiny
    params = SamplingParams(temp=20.0, top_p=1.0, min_p=0.0)  # random weights are very peaked: flatten them
    a = run(model, tokenizer, "night day", max_tokens=20, sampling=params, seed=3)[1]
    b = run(model, tokenizer, "night day", max_tokens=20, sampling=params, seed=3)[1]
    c = run(model, tokenizer, "night day", max_tokens=20, sampling=params, seed=4)[1]
    assert a == b and a != c


def test_repetition_penalty_changes_greedy_output(tiny):
    model, tokenizer = tiny
    plain = run(model, tokenizer, "the king", max_tokens=30, sampling=GREEDY)[1]
    penalised = run(model, tokenizer, "the king", max_tokens=30, sampling=SamplingParams(temp=0, repetition_penalty=5.0))[1]
    assert plain != penalised
    assert len(set(penalised)) >= len(set(plain))


@pytest.mark.parametrize(
    "prompt, max_tokens, message", [("", 5, "prompt is empty"), ("   ", 5, "prompt is empty"), ("hi", 0, "max_tokens")]
)
def test_bad_requests(tiny, prompt, max_tokens, message):
    model, tokenizer = tiny
    with pytest.raises(ElmError, match=message):
        list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))


def test_zero_prefill_step_is_refused_instead_of_hanging(tiny):
    model, tokenizer = tiny
    with pytest.raises(ElmError, match="prefill_step_size must be >= 1"):
        list(stream_generate(model, tokenizer, "the king and the queen", prefill_step_size=0))
