"""Prompt caches: the server's PromptStore inside BatchEngine, and prompt cache files (elm-mlx cache-prompt).

Every reuse is held to the path without it: the same tokens, and exactly the
number of reused tokens the prompts' common prefixes give.
"""

import importlib
import json
import re
import struct
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from conftest import TINY_VOCAB, CountingModel
from elm_mlx import ElmError, SamplingParams, load, stream_generate
from elm_mlx.batching import BatchEngine, Request, batch_generate
from elm_mlx.cache import PromptCache, PromptStore, default_prompt_cache_bytes, physical_memory
from elm_mlx.cache_prompt import kv_layout, load_prompt_cache, model_identity
from elm_mlx.demo import DEMO_DIR
from hostile import run_limited

cache_prompt = importlib.import_module("elm_mlx.cache_prompt")
generate = importlib.import_module("elm_mlx.generate")

GREEDY = SamplingParams(temp=0)

SYSTEM = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
)
QUESTIONS = ["ROMEO:", "JULIET:\nO Romeo", "KING HENRY:\nWhat say you", "All:\nResolved. resolved."]


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
    counting = CountingModel(model)
    cached = batch_generate(counting, tokenizer, prompts, max_tokens=24, sampling=GREEDY, prompt_cache=store)
    assert [r.tokens for r in cached] == [r.tokens for r in plain]
    ids = [tokenizer.encode(p) for p in prompts]
    ends = [len(i) - 1 for i in ids]  # what each prefills: all but its last token
    # The first computes the system prompt alone; the others wait for it, then prefill together in one pass as wide
    # as the longest of their parts not stored, each starting from the stored keys up to where its part begins.
    stored = [min(common_prefix(ids[i], ids[0]), ends[i]) for i in range(1, len(ids))]
    width = max(e - c for e, c in zip(ends[1:], stored))
    kept = [e - width for e in ends[1:]]
    assert [shape for shape in counting.inputs if shape[1] > 1] == [(1, ends[0]), (len(ids) - 1, width)]
    assert [r.cached_tokens for r in cached] == [0] + kept
    assert min(kept) >= len(tokenizer.encode(SYSTEM)) - width  # the system prompt is computed once, bar `width` tokens
    assert store.reused_tokens == sum(kept)


def test_a_conversation_resent_with_its_answer_reuses_prompt_and_answer(demo):
    model, tokenizer = demo
    first = [tokenizer.encode(SYSTEM + q) for q in QUESTIONS[:2]]
    store = PromptStore(64 << 20)
    answers = batch_generate(model, tokenizer, first, max_tokens=16, sampling=GREEDY, prompt_cache=store)
    follow_ups = [p + r.tokens + tokenizer.encode("\n\nROMEO:", add_bos=False) for p, r in zip(first, answers)]
    fresh = batch_generate(model, tokenizer, follow_ups, max_tokens=16, sampling=GREEDY)
    again = batch_generate(model, tokenizer, follow_ups, max_tokens=16, sampling=GREEDY, prompt_cache=store)
    assert [r.tokens for r in again] == [r.tokens for r in fresh]
    # Stored: prompt and the whole answer. Decoding is pipelined, so the step after the last token sampled was
    # already queued and fed that token to the model; its keys are stored with the rest.
    assert [r.cached_tokens for r in again] == [len(p) + len(r.tokens) for p, r in zip(first, answers)]
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


# ---- prompt cache files ------------------------------------------------------------------------

DOCUMENT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\nFirst Citizen:\n"


@pytest.fixture(scope="module")
def cache_file(demo, tmp_path_factory):
    """The document's prompt cache, written by the command (the demo in float32, as the `demo` fixture loads it)."""
    path = tmp_path_factory.mktemp("prompt-cache") / "doc.safetensors"
    cache_prompt.main(["--dtype", "float32", "--no-verbose", "--prompt", DOCUMENT, "--prompt-cache-file", str(path)])
    return path


def test_a_cache_file_continues_as_a_fresh_prefill_of_both_prompts(demo, cache_file):
    model, tokenizer = demo
    cached, cache = load_prompt_cache(cache_file, model)
    assert cached == tokenizer.encode(DOCUMENT)
    question = tokenizer.encode("You are all resolved rather to die than to famish?", add_bos=False)
    prompt_cache = PromptCache(model)
    prompt_cache.cache, prompt_cache.tokens = cache, list(cached)
    resumed = list(stream_generate(model, tokenizer, cached + question, 40, GREEDY, prompt_cache=prompt_cache))
    fresh = list(stream_generate(model, tokenizer, cached + question, 40, GREEDY))
    assert [r.token for r in resumed] == [r.token for r in fresh]
    assert resumed[-1].prompt_cached_tokens == len(cached)


def test_generate_with_a_cache_file_prints_the_fresh_text(demo, cache_file, capsys):
    model, tokenizer = demo
    question = "All:\nResolved. resolved."
    generate.main(["--dtype", "float32", "--no-verbose", "--temp", "0", "-m", "30", "--prompt-cache-file", str(cache_file), "-p", question])
    ids = tokenizer.encode(DOCUMENT) + tokenizer.encode(question, add_bos=False)
    assert capsys.readouterr().out == "".join(r.text for r in stream_generate(model, tokenizer, ids, 30, GREEDY)) + "\n"


def test_a_cache_file_is_refused_by_another_model(demo, tiny, cache_file):
    with pytest.raises(ElmError, match="made for another model"):
        load_prompt_cache(cache_file, tiny[0])
    model, _ = demo
    changed = load(str(DEMO_DIR), dtype="float32", verbose=False)[0]
    changed.update(tree_map(lambda p: p * 1.01, changed.parameters()))  # same shapes, other weights (a fine-tune)
    with pytest.raises(ElmError, match="made for another model"):
        load_prompt_cache(cache_file, changed)
    assert model_identity(model) == model_identity(load(str(DEMO_DIR), dtype="float32", verbose=False)[0])


def test_cache_prompt_refuses_to_overwrite_unless_forced_and_only_its_own(cache_file, tmp_path):
    args = ["--dtype", "float32", "--no-verbose", "--prompt", "ROMEO:", "--prompt-cache-file"]
    with pytest.raises(ElmError, match="already exists; pass --force"):
        cache_prompt.main(args + [str(cache_file)])
    foreign = tmp_path / "weights.safetensors"
    mx.save_safetensors(str(foreign), {"w": mx.zeros((2,))})
    with pytest.raises(ElmError, match="not a prompt cache file of ours"):
        cache_prompt.main(args + [str(foreign), "--force"])
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(cache_file.read_bytes())
    cache_prompt.main(args + [str(copy), "--force"])
    assert copy.stat().st_size < cache_file.stat().st_size and sorted(p.name for p in tmp_path.iterdir()) == [
        "copy.safetensors",
        "weights.safetensors",
    ]


def write_safetensors(path, tensors: dict, metadata: dict, header_length: int = None, data: bool = True):
    """A safetensors file written by hand, {name: (dtype, shape, nbytes)} with zero data (or none: a file
    claiming more than it holds); `header_length` may lie."""
    header, offset = {"__metadata__": metadata}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if header_length is None else header_length) + text + bytes(offset if data else 0))
    return path


def test_hostile_cache_files_are_one_line_errors(demo, cache_file, tmp_path):
    """Foreign, truncated, lying or absurd files: refused from their header, before any tensor is read."""
    model, _ = demo
    n = len(load_prompt_cache(cache_file, model)[0])
    ours = {"format": "elm-mlx prompt cache", "version": "1", "model": model_identity(model), "tokens": str(n)}
    layout = {"tokens": ("I32", (n,), 4 * n)}
    for i, (heads, dim, _) in enumerate(kv_layout(model)):
        for part in ("keys", "values"):
            layout[f"layers.{i}.{part}"] = ("F32", (1, heads, n, dim), 4 * heads * n * dim)
    keys0 = layout["layers.0.keys"]
    (tmp_path / "truncated.safetensors").write_bytes(cache_file.read_bytes()[:-100])
    mx.save_safetensors(str(tmp_path / "foreign.safetensors"), {"w": mx.zeros((2,))}, metadata={"format": "mlx"})
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "text.safetensors").write_bytes(b"hello, world: not a tensor file at all")
    (tmp_path / "folder.safetensors").mkdir()
    billion = {"tokens": ("I32", (10**9,), 4 * 10**9)}
    cases = {
        "truncated": "truncated or padded",
        "foreign": "not an elm-mlx prompt cache",
        "empty": "not a prompt cache file",
        "text": "not a prompt cache file",
        "folder": "directory",
        "missing": "does not exist",
        write_safetensors(tmp_path / "h.safetensors", layout, ours, header_length=1 << 60): "no safetensors header",
        write_safetensors(tmp_path / "old.safetensors", layout, {**ours, "version": "0"}): "another version",
        write_safetensors(tmp_path / "other.safetensors", layout, {**ours, "model": "0" * 64}): "made for another model",
        write_safetensors(tmp_path / "b.safetensors", billion, {**ours, "tokens": str(10**9)}, data=False): "leaving no room",
        write_safetensors(tmp_path / "t.safetensors", layout, {**ours, "tokens": "1e9"}): "does not state how many",
        write_safetensors(tmp_path / "ctx.safetensors", layout, {**ours, "tokens": "600"}): "leaving no room",
        write_safetensors(
            tmp_path / "f16.safetensors", {**layout, "layers.0.keys": ("F16", keys0[1], keys0[2] // 2)}, ours
        ): "layers.0.keys is",
        write_safetensors(tmp_path / "s.safetensors", {**layout, "layers.1.values": ("F32", (1, 99, n, 32), 4 * 99 * n * 32)}, ours): (
            "expected F32 [1, 3,"
        ),
        write_safetensors(tmp_path / "l.safetensors", {k: v for k, v in layout.items() if k != "layers.5.values"}, ours): (
            "missing: ['layers.5.values']"
        ),
        write_safetensors(tmp_path / "o.safetensors", {**layout, "tokens": ("I32", (n,), 4 * n + 8)}, ours): "bytes of data",
        write_safetensors(tmp_path / "short.safetensors", layout, ours, data=False): "truncated or padded",
    }
    for path, needle in cases.items():
        path = tmp_path / f"{path}.safetensors" if isinstance(path, str) else path
        with pytest.raises(ElmError, match=re.escape(needle)) as refusal:
            load_prompt_cache(path, model)
        assert "\n" not in str(refusal.value)


def test_generate_refuses_a_bad_cache_file_in_one_line_in_bounded_memory(cache_file, tmp_path):
    """The command in a child capped at 1.5 GB: a file claiming four gigabytes of tokens is one line, no traceback."""
    path = write_safetensors(
        tmp_path / "big.safetensors", {"tokens": ("I32", (10**9,), 4 * 10**9)}, {"format": "elm-mlx prompt cache"}, data=False
    )
    for file, needle in ((path, "another version"), (cache_file, None)):
        result = run_limited(
            [sys.executable, "-m", "elm_mlx.generate", *"--dtype float32 --no-verbose -m 2 -p x --prompt-cache-file".split(), str(file)],
            env={"ELM_MLX_BLAS_NOTICE": "0"},
        )
        if needle:
            assert result.returncode == 1 and needle in result.one_line_error()
        else:
            assert result.returncode == 0 and result.stdout.strip(), result.stderr


def test_cache_file_options_that_do_not_combine_are_refused(cache_file):
    base = ["--no-verbose", "-p", "x", "--prompt-cache-file", str(cache_file)]
    for extra, needle in ((["--kv-bits", "8"], "do not apply"), (["--max-kv-size", "64"], "do not apply"), (["--chat"], "drop --chat")):
        with pytest.raises(ElmError, match=needle):
            generate.main(base + extra)
