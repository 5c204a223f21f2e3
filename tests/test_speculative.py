"""Speculative decoding: the same text as plain greedy decoding, the target's distribution when sampling, refusals."""

import copy
import itertools

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from conftest import tiny_olmo
from elm_mlx.cache import KVOptions, PromptCache
from elm_mlx.errors import ElmError
from elm_mlx.generation import stream_generate
from elm_mlx.sample import SamplingParams
from elm_mlx.speculative import LookupProposer, PromptLookup, check_draft, draft_prompt_cache, verify

GREEDY = SamplingParams(temp=0)
PENALISED = SamplingParams(temp=0, repetition_penalty=1.3, repetition_context_size=20)


@pytest.fixture(scope="module")
def olmo(tmp_path_factory, tiny_sp_model):
    """A tiny OLMo sharing the tiny OpenELM's tokenizer, so either can draft for the other (a longer context than
    conftest's, for long speculative runs)."""
    shape = dict(intermediate_size=128, num_hidden_layers=2, max_position_embeddings=1024)
    return tiny_olmo(tmp_path_factory.mktemp("olmo"), tiny_sp_model, seed=5, **shape)


@pytest.fixture(scope="module")
def noisy_demo(demo):
    """The demo model with its weights perturbed: a draft that agrees with it often, not always."""
    model, _ = demo
    draft = copy.deepcopy(model)
    rng = np.random.default_rng(0)
    noisy = [
        (name, p * mx.array(1 + 0.3 * rng.standard_normal(p.shape).astype(np.float32))) for name, p in tree_flatten(draft.parameters())
    ]
    draft.update(tree_unflatten(noisy))
    mx.eval(draft.parameters())
    return draft


def run(model, tokenizer, prompt, **kwargs):
    """Every response as (text, token, finish_reason), and the last response."""
    responses = list(stream_generate(model, tokenizer, prompt, **kwargs))
    return [(r.text, r.token, r.finish_reason) for r in responses], responses[-1]


_plain = {}


def plain_run(model, tokenizer, prompt, max_tokens, sampling):
    """run() without speculation, computed once per model, prompt and settings (the tests compare many runs to it)."""
    key = (id(model), id(tokenizer), str(prompt), max_tokens, sampling)
    if key not in _plain:
        _plain[key] = run(model, tokenizer, prompt, max_tokens=max_tokens, sampling=sampling)[0]
    return _plain[key]


def assert_same_as_plain(model, tokenizer, prompt, max_tokens, sampling=GREEDY, **speculative):
    plain = plain_run(model, tokenizer, prompt, max_tokens, sampling)
    fast, last = run(model, tokenizer, prompt, max_tokens=max_tokens, sampling=sampling, **speculative)
    assert fast == plain
    assert last.target_passes > 0 and last.draft_tokens > 0
    return last


# --------------------------------------------------------------------------
# Greedy: token for token the plain text
# --------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [GREEDY, PENALISED], ids=["greedy", "repetition-penalty"])
def test_demo_prompt_lookup_and_drafts_write_the_plain_text(demo, noisy_demo, sampling):
    model, tokenizer = demo
    prompt = "ROMEO:\nWhat light through yonder window breaks?\nJULIET:\n"
    last = assert_same_as_plain(model, tokenizer, prompt, 60, sampling, prompt_lookup=10)
    assert last.accepted_tokens > 0  # the demo's greedy text repeats: lookup must have been right sometimes
    last = assert_same_as_plain(model, tokenizer, prompt, 60, sampling, draft_model=noisy_demo, num_draft_tokens=5, adaptive_draft=True)
    assert 0 < last.accepted_tokens < last.draft_tokens  # both accepted and rejected proposals were met


def test_the_model_drafting_for_itself_is_always_accepted(demo):
    model, tokenizer = demo
    last = assert_same_as_plain(model, tokenizer, "KING HENRY:", 23, draft_model=model, num_draft_tokens=4)
    assert last.accepted_tokens == last.draft_tokens == 18
    assert last.target_passes == 5  # 23 tokens, 5 per pass; the last pass proposes no more than are wanted (2)
    assert last.tokens_per_pass == pytest.approx(23 / 5) and last.acceptance_rate == 1.0


def test_olmo_greedy_with_lookup_and_an_openelm_draft(olmo, tiny):
    model, tokenizer = olmo
    prompt = "the king speak now thou art my good friend the king speak now"
    assert_same_as_plain(model, tokenizer, prompt, 50, prompt_lookup=PromptLookup(6, min_ngram=1, max_ngram=4))
    assert_same_as_plain(model, tokenizer, prompt, 50, PENALISED, prompt_lookup=6)
    last = assert_same_as_plain(model, tokenizer, prompt, 50, draft_model=olmo[0], num_draft_tokens=6)
    assert last.acceptance_rate == 1.0
    assert_same_as_plain(model, tokenizer, prompt, 50, draft_model=tiny[0], num_draft_tokens=3)  # another architecture


def test_across_the_cache_growth_boundary(demo, noisy_demo):
    """KVCache grows in blocks of 256 positions: verify passes that cross it, and trims back across it."""
    model, tokenizer = demo
    prompt = tokenizer.encode("ROMEO:\nWhat light through yonder window breaks?\n" * 40)[:250]
    assert_same_as_plain(model, tokenizer, prompt, 20, prompt_lookup=12)
    assert_same_as_plain(model, tokenizer, prompt, 20, draft_model=noisy_demo, num_draft_tokens=7)
    last = assert_same_as_plain(model, tokenizer, prompt, 20, draft_model=model, num_draft_tokens=7)
    assert last.acceptance_rate == 1.0


def test_random_prompts_and_settings_on_the_tiny_models(tiny, olmo):
    """Greedy exactness over prompts and K drawn at random (seeded): OpenELM with lookup and an OLMo draft."""
    model, tokenizer = tiny
    rng = np.random.default_rng(0)
    words = "the king queen lord lady speak now thou art my good friend sir come hither night day love war".split()
    for _ in range(4):
        prompt = " ".join(rng.choice(words, size=int(rng.integers(3, 40))))
        n, k = int(rng.integers(5, 40)), int(rng.integers(1, 12))
        lookup = PromptLookup(k, min_ngram=int(rng.integers(1, 3)), max_ngram=int(rng.integers(3, 6)))
        assert_same_as_plain(model, tokenizer, prompt, n, prompt_lookup=lookup, adaptive_draft=bool(rng.integers(2)))
        assert_same_as_plain(model, tokenizer, prompt, n, draft_model=olmo[0], num_draft_tokens=k)


def test_olmo_across_the_growth_boundary_and_with_a_prompt_cache(olmo, tiny):
    model, tokenizer = olmo
    prompt = tokenizer.encode("the king speak now thou art my good friend " * 30)[:250]
    assert_same_as_plain(model, tokenizer, prompt, 20, prompt_lookup=9)
    assert_same_as_plain(model, tokenizer, prompt, 20, draft_model=tiny[0], num_draft_tokens=5)
    for speculative in ({"prompt_lookup": 9}, {"draft_model": tiny[0], "num_draft_tokens": 5}):
        texts = []
        for options in ({}, speculative):
            cache = PromptCache(model)
            one, _ = run(model, tokenizer, prompt[:240], max_tokens=12, sampling=GREEDY, prompt_cache=cache, **options)
            two, last = run(model, tokenizer, cache.tokens + prompt[240:], max_tokens=12, sampling=GREEDY, prompt_cache=cache, **options)
            assert last.prompt_cached_tokens >= 240
            texts.append((one, two, cache.tokens))
        assert texts[1] == texts[0]


def test_quantized_kv_cache(demo):
    model, tokenizer = demo
    kv = KVOptions(bits=8)
    plain, _ = run(model, tokenizer, "KING HENRY:", max_tokens=30, sampling=GREEDY, kv=kv)
    fast, last = run(model, tokenizer, "KING HENRY:", max_tokens=30, sampling=GREEDY, kv=kv, prompt_lookup=8)
    assert fast == plain and last.target_passes < 30


def test_prompt_cache_reuse(demo, noisy_demo):
    """A conversation's second turn reuses the first's cache, which speculation left holding exactly the text."""
    model, tokenizer = demo
    first = tokenizer.encode("ROMEO:\nWhat light through yonder window breaks?\n")
    texts = {}
    for name, speculative in [("plain", {}), ("lookup", {"prompt_lookup": 8}), ("draft", {"draft_model": noisy_demo})]:
        cache = PromptCache(model)
        one, _ = run(model, tokenizer, first, max_tokens=24, sampling=GREEDY, prompt_cache=cache, **speculative)
        second = list(cache.tokens) + tokenizer.encode("JULIET:\n", add_bos=False)
        if name == "draft":  # the draft keeps its own cache beside the model's, holding a verified prefix of the text
            held = draft_prompt_cache(cache, noisy_demo).tokens
            assert len(first) < len(held) <= len(cache.tokens) and held == cache.tokens[: len(held)]
        two, last = run(model, tokenizer, second, max_tokens=24, sampling=GREEDY, prompt_cache=cache, **speculative)
        assert last.prompt_cached_tokens >= len(first)
        texts[name] = (one, two, list(cache.tokens))
        assert [c.offset for c in cache.cache] == [len(cache.tokens)] * len(cache.cache)
    assert texts["lookup"] == texts["plain"] and texts["draft"] == texts["plain"]


# --------------------------------------------------------------------------
# Ends inside an accepted run of tokens
# --------------------------------------------------------------------------


def test_max_tokens_inside_a_run(demo):
    model, tokenizer = demo
    for max_tokens in (2, 7, 13):
        last = assert_same_as_plain(model, tokenizer, "KING HENRY:", max_tokens, draft_model=model, num_draft_tokens=5)
        assert last.generation_tokens == max_tokens and last.finish_reason == "length"
    fast, last = run(model, tokenizer, "KING HENRY:", max_tokens=1, sampling=GREEDY, draft_model=model)
    assert fast == plain_run(model, tokenizer, "KING HENRY:", 1, GREEDY)
    assert last.draft_tokens == 0 and last.target_passes == 1  # one token: nothing to propose


def test_stop_string_and_eos_inside_a_run(demo):
    model, tokenizer = demo
    tokens = [t for _, t, _ in plain_run(model, tokenizer, "KING HENRY:", 30, GREEDY) if t is not None]
    text = tokenizer.decode(tokens)
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # text from the middle of the answer, perhaps across tokens
    plain, _ = run(model, tokenizer, "KING HENRY:", max_tokens=30, sampling=GREEDY, stop=[stop])
    for speculative in ({"draft_model": model, "num_draft_tokens": 8}, {"prompt_lookup": 8}):
        fast, last = run(model, tokenizer, "KING HENRY:", max_tokens=30, sampling=GREEDY, stop=[stop], **speculative)
        assert fast == plain and last.finish_reason == "stop"
    assert stop not in "".join(t for t, _, _ in plain)

    # The 17th generated token made an end-of-sequence token: the text ends just before it, as in plain decoding.
    ends = copy.copy(tokenizer)
    ends.eos_ids = {tokens[16]}
    plain, _ = run(model, ends, "KING HENRY:", max_tokens=30, sampling=GREEDY)
    fast, last = run(model, ends, "KING HENRY:", max_tokens=30, sampling=GREEDY, draft_model=model, num_draft_tokens=8)
    assert fast == plain and last.finish_reason == "stop" and last.generation_tokens == tokens.index(tokens[16])


# --------------------------------------------------------------------------
# Sampling: the target's distribution, reproducible
# --------------------------------------------------------------------------

SAMPLING = SamplingParams(temp=1.5, top_k=6, top_p=1.0, min_p=0.0)
CHI2_BOUND = 20.5  # chi-square with 5 degrees of freedom (6 tokens): P(above) = 0.0005


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0  # never a token the target rules out
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def target_rows(model, tokens):
    """The model's log-probabilities after each of `tokens` (what plain decoding hands its sampler)."""
    logits = model(mx.array(tokens)[None])[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def top_k_tempered(logprobs: np.ndarray, k: int, temp: float) -> np.ndarray:
    """SAMPLING's distribution, computed here with numpy: the k most likely tokens, softmax(logprob / temp)."""
    keep = np.argsort(-logprobs)[:k]
    weights = np.zeros_like(logprobs, dtype=np.float64)
    weights[keep] = np.exp((logprobs[keep] - logprobs[keep].max()) / temp)
    return weights / weights.sum()


@pytest.mark.parametrize("proposal", ["draft", "lookup"])
def test_speculative_sampling_keeps_the_target_distribution(tiny, olmo, proposal):
    """verify() on the tiny model's real distributions: the first token is distributed as the target's filtered
    distribution p0 (not as the proposals), and the token drawn after an accepted proposal as p1."""
    model, tokenizer = tiny
    context = tokenizer.encode("my good friend")  # a context where the tiny model is unsure
    p0_row = target_rows(model, context)[-1]
    p0 = top_k_tempered(np.array(p0_row), SAMPLING.top_k, SAMPLING.temp)
    second = int(np.argsort(-p0)[1])
    p1_row = target_rows(model, context + [second])[-1]  # a second row unlike the first
    p1 = top_k_tempered(np.array(p1_row), SAMPLING.top_k, SAMPLING.temp)
    rows = mx.stack([p0_row, p1_row])
    # The draft: another model's distribution mixed with the target's, so that it is both wrong and often accepted.
    other = top_k_tempered(np.array(target_rows(olmo[0], context)[-1]), SAMPLING.top_k, SAMPLING.temp)
    top = np.argsort(-p0)[: SAMPLING.top_k]
    reversed_p0 = np.zeros_like(p0)
    reversed_p0[top] = p0[top[::-1]]  # the target's tokens, likeliest made least likely
    q = mx.array((0.3 * other + 0.7 * reversed_p0).astype(np.float32))[None]
    draws = 2000
    keys = mx.random.split(mx.random.key(1234), draws)
    first, after = np.zeros(p0.size), np.zeros(p0.size)
    for i in range(draws):
        key = mx.random.split(keys[i], 3)  # the draft's draw, the acceptance test, the replacement draw
        if proposal == "draft":
            d, probs = mx.random.categorical(mx.log(q[0]), key=key[0]).item(), q
        else:
            d, probs = second, None  # prompt lookup proposes the target's second choice every time
        accepted, token = verify(rows, [d], probs, SAMPLING, key[1:])
        first[d if accepted else token] += 1
        if accepted:
            after[token] += 1
    assert chi_square(first, p0) < CHI2_BOUND
    assert after.sum() > 250 and chi_square(after, p1) < CHI2_BOUND
    # The test tells distributions apart: what the proposals alone would give is far off.
    proposed = np.array(q[0]) if proposal == "draft" else np.eye(p0.size)[second]
    assert np.abs(proposed - p0).sum() > 0.5


def test_seeded_sampling_is_reproducible(demo, noisy_demo):
    model, tokenizer = demo
    sampling = SamplingParams(temp=0.9, repetition_penalty=1.1)
    for speculative in ({"prompt_lookup": 6}, {"draft_model": noisy_demo, "num_draft_tokens": 3}):
        once, last = run(model, tokenizer, "KING HENRY:", max_tokens=24, sampling=sampling, seed=7, **speculative)
        again, _ = run(model, tokenizer, "KING HENRY:", max_tokens=24, sampling=sampling, seed=7, **speculative)
        other, _ = run(model, tokenizer, "KING HENRY:", max_tokens=24, sampling=sampling, seed=8, **speculative)
        assert once == again and once != other and last.target_passes > 0


# --------------------------------------------------------------------------
# Prompt lookup's proposals, by hand
# --------------------------------------------------------------------------


def test_lookup_proposes_what_followed_the_latest_longest_match():
    text = [5, 6, 7, 8, 9, 5, 6, 1, 2, 3, 6, 7]
    # last 2 tokens (6, 7) occurred at 1: propose what followed; the 1-gram (7) would be the same place
    assert LookupProposer(PromptLookup(3, 1, 2), text).propose(3) == [8, 9, 5]
    assert LookupProposer(PromptLookup(3, 1, 2), text).propose(1) == [8]
    # 1-grams only: the last 6 occurred at 1, 6 and 10; the latest wins, and the text after it is shorter than K
    assert LookupProposer(PromptLookup(4, 1, 1), text + [6]).propose(4) == [7, 6]
    # up to 3-grams: (3, 6, 7) never recurs, (6, 7) does (at 1)
    assert LookupProposer(PromptLookup(2, 1, 3), text).propose(2) == [8, 9]
    assert LookupProposer(PromptLookup(4, 2, 3), [1, 2, 3, 4]).propose(4) == []  # nothing recurs
    proposer = LookupProposer(PromptLookup(2, 1, 3), [1, 2, 3])
    proposer.extend([1, 2])  # grows the buffer, and the text it searches
    assert proposer.propose(2) == [3, 1]


def test_lookup_pauses_after_rejections_and_comes_back():
    proposer = LookupProposer(PromptLookup(2, 1, 2), [1, 2, 3, 1, 2])
    for _ in range(2):
        proposer.feedback(2, 0)
        assert proposer.propose(2) == [3, 1]  # two passes with nothing accepted: still proposing
    proposer.feedback(2, 0)  # the third: pause for one pass
    assert proposer.propose(2) == [] and proposer.propose(2) == [3, 1]
    proposer.feedback(0, 0)  # a pass without proposals says nothing
    proposer.feedback(2, 0)  # the fourth: pause for two
    assert [proposer.propose(2) for _ in range(3)] == [[], [], [3, 1]]
    proposer.feedback(2, 1)  # something accepted: no more pauses
    proposer.feedback(2, 0)
    assert proposer.propose(2) == [3, 1]


# --------------------------------------------------------------------------
# Bad input: one line each
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_lookup": -1}, "prompt_lookup"),
        ({"prompt_lookup": 65}, r"\[1, 64\]"),
        ({"prompt_lookup": 2.5}, "prompt_lookup"),
        ({"prompt_lookup": True}, "prompt_lookup"),
        ({"num_draft_tokens": 0, "draft": True}, r"num_draft_tokens must be an integer in \[1, 64\]"),
        ({"num_draft_tokens": 65, "draft": True}, "num_draft_tokens"),
        ({"num_draft_tokens": 3}, "needs a draft model"),
        ({"prompt_lookup": 3, "draft": True}, "do not combine"),
        ({"adaptive_draft": True}, "adaptive_draft needs"),
        ({"prompt_lookup": 3, "kv": KVOptions(max_size=64)}, "rotating window"),
    ],
)
def test_bad_speculative_options_are_one_line(demo, kwargs, message):
    model, tokenizer = demo
    kwargs = dict(kwargs)
    if kwargs.pop("draft", False):
        kwargs["draft_model"] = model
    with pytest.raises(ElmError, match=message) as error:
        list(stream_generate(model, tokenizer, "KING", max_tokens=4, **kwargs))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "options", [{"num_tokens": 0}, {"num_tokens": 3, "min_ngram": 0}, {"num_tokens": 3, "min_ngram": 3, "max_ngram": 2}]
)
def test_bad_prompt_lookup_bounds(options):
    with pytest.raises(ElmError):
        PromptLookup(**options)


def test_a_draft_with_another_vocabulary_or_tokenizer_is_refused(demo, tiny, olmo):
    model, tokenizer = demo
    with pytest.raises(ElmError, match="vocabulary has 384 tokens, the model's 2048"):
        list(stream_generate(model, tokenizer, "KING", max_tokens=4, draft_model=tiny[0]))
    with pytest.raises(ElmError, match="tokenizer differs"):
        check_draft(model, tokenizer, model, tiny[1])  # same vocabulary size, another tokenizer
    check_draft(olmo[0], olmo[1], tiny[0], tiny[1])  # the same tokenizer: fine


def test_draft_tokenizer_checked_at_load(demo, tiny_model_dir):
    from elm_mlx.speculative import load_draft

    model, tokenizer = demo
    with pytest.raises(ElmError, match="the draft model.s vocabulary has 384 tokens"):
        load_draft(str(tiny_model_dir), tokenizer, model, verbose=False)


# --------------------------------------------------------------------------
# Where users decode: the generate command and chat
# --------------------------------------------------------------------------


def test_generate_command_speculates_and_reports_it(capsys):
    from elm_mlx.demo import DEMO_DIR
    from elm_mlx.generate import main

    base = ["--prompt", "KING HENRY:", "--temp", "0", "-m", "20", "--no-chat"]
    main(base)
    plain = capsys.readouterr()
    assert "speculative" not in plain.err
    for extra, seen in (
        (["--prompt-lookup", "8", "--prompt-lookup-max-ngram", "4"], "acceptance"),
        (["--draft-model", str(DEMO_DIR)], "acceptance 100.0%"),
    ):
        main(base + extra)
        out = capsys.readouterr()
        assert out.out == plain.out and seen in out.err and "tokens per model pass" in out.err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt-lookup", "3", "--draft-model", "x"], "do not combine"),
        (["--num-draft-tokens", "3"], "needs --draft-model"),
        (["--adaptive-draft"], "needs --draft-model or --prompt-lookup"),
        (["--prompt-lookup", "3", "--max-kv-size", "64"], "rotating window"),
        (["--prompt-lookup", "3", "--prompt-lookup-min-ngram", "5"], "min n-gram"),
        (["--draft-model", "/nonexistent/draft"], "the draft model: "),
    ],
)
def test_generate_command_refuses_bad_combinations(extra, message):
    from elm_mlx.generate import main

    with pytest.raises(ElmError, match=message):
        main(["--prompt", "KING", "--no-verbose"] + extra)


@pytest.mark.parametrize("value", ["0", "65", "-2", "x"])
def test_generate_command_refuses_bad_k(value, capsys):
    from elm_mlx.generate import main

    for flag in ("--prompt-lookup", "--num-draft-tokens"):
        with pytest.raises(SystemExit) as exit:
            main(["--prompt", "KING", flag, value])
        assert exit.value.code == 2 and flag in capsys.readouterr().err


def test_chat_turns_with_speculation_match_plain_chat(demo):
    from elm_mlx.chat import ChatSession

    model, tokenizer = demo
    answers = {}
    for name, speculative in (("plain", None), ("lookup", {"prompt_lookup": 6})):
        session = ChatSession(model, tokenizer, speculative=speculative)
        answers[name] = ["".join(r.text for r in session.ask(text, 16, GREEDY)) for text in ("Who art thou?", "Speak again.")]
        answers[name].append(session.tokens)
        if speculative:
            assert session.last.target_passes > 0
    assert answers["lookup"] == answers["plain"]


class PositionModel:
    """A stand-in model whose logits depend on the position alone (row t of `table`), over 6 of the tiny
    vocabulary's ids: each generated token is then independent of the others, with a known distribution."""

    class args:
        vocab_size = 384

    def __init__(self, table: np.ndarray):
        self.table, self.layers = mx.array(table), [None]  # one layer: one KVCache, which counts positions

    def __call__(self, tokens, cache=None, mask=None):
        layer, n = cache[0], tokens.shape[1]
        rows = self.table[mx.minimum(mx.arange(layer.offset, layer.offset + n), self.table.shape[0] - 1)]
        layer.update_and_fetch(mx.zeros((1, 1, n, 1)), mx.zeros((1, 1, n, 1)))
        return rows[None]


CHI2_BOUNDS = {3: 17.73, 15: 39.72}  # chi-square by degrees of freedom: P(above) = 0.0005


@pytest.mark.parametrize("proposal", ["draft", "lookup"])
def test_every_position_keeps_the_distribution_through_whole_runs(tiny, proposal):
    """stream_generate end to end, over many passes with trims and per-position keys: each of the first three
    generated tokens is distributed as the target's row for its position, and the 2nd and 3rd independently
    of each other (the target ignores the text), by chi-square over 800 seeds."""
    tokenizer = tiny[1]
    rng = np.random.default_rng(0)
    ids = np.arange(100, 104)

    def table():
        t = np.full((16, 384), -1e9, np.float32)
        t[:, ids] = 0.7 * rng.standard_normal((16, len(ids)))
        return t

    def probs(t, position):
        row = np.exp(t[position, ids] - t[position, ids].max())
        return row / row.sum()

    target, draft = table(), table()
    speculative = {"draft_model": PositionModel(draft), "num_draft_tokens": 2} if proposal == "draft" else {"prompt_lookup": 2}
    sampling = SamplingParams(temp=1.0, top_p=1.0, min_p=0.0)
    runs, texts = 800, []
    for seed in range(runs):
        responses = stream_generate(
            PositionModel(target), tokenizer, [1, 100, 101, 100], max_tokens=3, sampling=sampling, seed=seed, **speculative
        )
        texts.append([r.token - 100 for r in responses if r.token is not None])
    texts = np.array(texts)
    for position in range(3):  # the prompt's last token is at position 3
        expected = probs(target, 3 + position)
        assert chi_square(np.bincount(texts[:, position], minlength=len(ids)), expected) < CHI2_BOUNDS[3]
        if proposal == "draft":  # the draft alone would be far off
            assert chi_square(np.round(probs(draft, 3 + position) * runs), expected) > 3 * CHI2_BOUNDS[3]
    pairs = np.bincount(texts[:, 1] * len(ids) + texts[:, 2], minlength=len(ids) ** 2)
    assert chi_square(pairs, np.outer(probs(target, 4), probs(target, 5)).ravel()) < CHI2_BOUNDS[15]


def test_whole_runs_keep_the_distribution_with_penalty_top_p_min_p_and_temperature(tiny):
    """The joint distribution of three sampled tokens, with a repetition penalty over a 3-token window, top-p,
    min-p and a temperature, matches the one computed here in numpy, plain and speculative alike (chi-square
    over 1500 seeds). The position model's rows are fixed, so only the filters make a token depend on the text."""
    tokenizer = tiny[1]
    rng = np.random.default_rng(1)
    ids = np.arange(100, 104)
    penalty, window, top_p, min_p, temp = 3.0, 3, 0.8, 0.1, 0.7

    def table():
        t = np.full((16, 384), -1e9, np.float32)
        t[:, ids] = 0.7 * rng.standard_normal((16, len(ids))) + 0.5  # positive and negative logits: both penalty rules
        return t

    target, draft, prompt = table(), table(), [1, 100, 101, 100]

    def filtered(history, position, filters=True):
        """The next token's distribution over `ids`: penalty on the raw logits, log-softmax, top-p, min-p, temperature."""
        logits = target[position].astype(np.float64)
        if filters:
            for token in set(history[-window:]):
                logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
        logprobs = logits[ids] - np.log(np.exp(logits[ids] - logits[ids].max()).sum()) - logits[ids].max()
        keep = np.ones(len(ids), bool)
        if filters:
            p = np.exp(logprobs)
            order = np.argsort(-p)
            mass_before = np.cumsum(p[order]) - p[order]
            keep[:] = False
            keep[order[(mass_before < top_p) | (np.arange(len(ids)) == 0)]] = True
            keep &= logprobs >= logprobs.max() + np.log(min_p)
        weights = np.where(keep, np.exp((logprobs - logprobs.max()) / temp), 0.0)
        return weights / weights.sum()

    def joint(filters=True):
        out = np.zeros(len(ids) ** 3)
        for a, b, c in itertools.product(range(len(ids)), repeat=3):
            history = prompt + [int(ids[a])]
            pa = filtered(prompt, 3, filters)[a]
            pb = filtered(history, 4, filters)[b]
            pc = filtered(history + [int(ids[b])], 5, filters)[c]
            out[(a * len(ids) + b) * len(ids) + c] = pa * pb * pc
        return out

    expected, unfiltered = joint(), joint(filters=False)
    dof = int((expected > 0).sum()) - 1
    assert dof == 34  # some outcomes are ruled out by the filters; the bound below is for this many
    bound = 67.80  # chi-square with 34 degrees of freedom: P(above) = 0.0005
    sampling = SamplingParams(temp=temp, top_p=top_p, min_p=min_p, repetition_penalty=penalty, repetition_context_size=window)
    runs = 1500
    for speculative in ({}, {"prompt_lookup": 2}, {"draft_model": PositionModel(draft), "num_draft_tokens": 2}):
        counts = np.zeros(len(ids) ** 3)
        for seed in range(runs):
            responses = stream_generate(PositionModel(target), tokenizer, prompt, max_tokens=3, sampling=sampling, seed=seed, **speculative)
            a, b, c = [r.token - 100 for r in responses if r.token is not None]
            counts[(a * len(ids) + b) * len(ids) + c] += 1
        assert chi_square(counts, expected) < bound, speculative
    assert np.abs(unfiltered - expected).sum() > 0.5  # without the filters the distribution is far off
