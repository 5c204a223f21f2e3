"""Structured output (issue 17): JSON schema, regex and Lark grammar constraints, checked by independent parsers.

Every answer the demo model gives under a constraint, sampled at temperature
1.0 over many seeds, is parsed with `json` and validated with `jsonschema`
(or matched with `re.fullmatch`, or parsed with `lark`), through the API, the
batch engine, the command line and the server with the official openai client.
"""

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
import pytest

from elm_mlx import SamplingParams, batch_generate, stream_generate
from elm_mlx.constrain import Constraint, ConstraintError, _Description, apply_token_masks, compile_constraint, ll_tokenizer
from elm_mlx.errors import ElmError

jsonschema = pytest.importorskip("jsonschema")

HOT = SamplingParams(temp=1.0, top_p=1.0, min_p=0.0)  # every allowed token can be drawn
PROMPT = "ROMEO:"

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "ok": {"type": "boolean"},
        },
        "required": ["person", "ok"],
        "additionalProperties": False,
    },
    "array_bounds": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2, "maxItems": 4}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    "enums": {
        "type": "object",
        "properties": {"mood": {"enum": ["happy", "sad", "angry"]}, "level": {"enum": [1, 2, 3, None]}},
        "required": ["mood", "level"],
        "additionalProperties": False,
    },
    "integer_ranges": {"type": "array", "items": {"type": "integer", "minimum": -20, "maximum": 300}, "minItems": 1, "maxItems": 5},
    "optional_fields": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "note": {"type": "string", "maxLength": 8},
            "flag": {"type": "boolean"},
        },
        "required": ["id"],
        "additionalProperties": False,
    },
    "patterns": {
        "type": "object",
        "properties": {
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
        },
        "required": ["date", "code"],
        "additionalProperties": False,
    },
    # JSON strings that must hold quotes, backslashes, newlines, tabs and non-ASCII text: escapes and UTF-8 both
    "escapes_and_unicode": {
        "type": "object",
        "properties": {"s": {"type": "string", "pattern": '^[a"\\\\\\n\\t é日本🙂]{3,8}$'}, "c": {"const": 'naïve "q"\\\n\t日本🙂'}},
        "required": ["s", "c"],
        "additionalProperties": False,
    },
}

REGEXES = [r"(yes|no), [a-z]{2,8}\.", r"[0-9]{3}-[0-9]{4}", r"[A-Z][a-z]+( [a-z]+){0,3}[.!?]", r"(ab|c[de])+x?"]

GRAMMAR = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""


def valid_json(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


# --------------------------------------------------------------------------
# The pieces, against independent references
# --------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [64, 2048, 2049, 32003])
def test_mask_on_logits_equals_llguidance_numpy_reference(vocab):
    """apply_token_masks (MLX ops) against llguidance's own numpy implementation, rows and vocab sizes not multiples of 32."""
    from llguidance.numpy import apply_token_bitmask_inplace

    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((3, vocab)).astype(np.float32)
    words = rng.integers(-(2**31), 2**31, size=(3, (vocab + 31) // 32), dtype=np.int64).astype(np.int32)
    expected = logits.copy()
    apply_token_bitmask_inplace(expected, words)
    got = np.array(apply_token_masks(mx.array(logits), words))
    np.testing.assert_array_equal(got, expected)


def test_tokenize_gives_exactly_the_bytes_asked_for(demo):
    """llguidance needs the text's tokens as they appear mid-answer: same bytes, no SentencePiece leading space."""
    _, tokenizer = demo
    description = _Description(tokenizer, tokenizer.vocab_size)
    for text in ["{", '"name": "x"', " leading space", "two\nlines\ttab", "café 日本語 🙂", "   ", "\\u00e9 \\n"]:
        ids = description(text.encode())
        assert b"".join(tokenizer.token_bytes[i] for i in ids) == text.encode(), text
    ids = description("é".encode()[:1])  # half a character: spelled byte by byte
    assert b"".join(tokenizer.token_bytes[i] for i in ids) == "é".encode()[:1]
    assert description.tokens[tokenizer.bos_id].startswith(b"\xff") and description.tokens[0].startswith(b"\xff")  # <s>, <unk>


def test_padded_vocab_tokens_are_never_allowed(demo):
    """A model with more logits than the tokenizer has tokens: the extra ones are masked out."""
    _, tokenizer = demo
    matcher = compile_constraint(Constraint.regex("[a-z]+"), tokenizer, n_vocab=tokenizer.vocab_size + 40)
    row = matcher.mask()
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    assert bits[: tokenizer.vocab_size].any() and not bits[tokenizer.vocab_size :].any()
    assert ll_tokenizer(tokenizer, tokenizer.vocab_size + 40).vocab_size == tokenizer.vocab_size + 40


def _byte_level_dir(path):
    """A byte-level BPE tokenizer.json (GPT-2 style, no byte fallback pieces) with special tokens, trained here."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from conftest import _training_text

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_training_text(500), trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|endoftext|>"}))
    return path


@pytest.mark.parametrize("kind", ["demo sentencepiece", "tiny sentencepiece", "byte-level tokenizer.json"])
def test_random_walks_through_the_masks_are_valid(kind, demo, tiny_sp_model, tmp_path):
    """Any path through the allowed tokens (drawn uniformly, end of sequence included) spells valid JSON, for each tokenizer kind."""
    from elm_mlx.tokenizer import load_tokenizer

    if kind.startswith("demo"):
        tokenizer = demo[1]
    elif kind.startswith("tiny"):
        (tmp_path / "tokenizer.model").write_bytes(tiny_sp_model)
        tokenizer = load_tokenizer(tmp_path)
    else:
        tokenizer = load_tokenizer(_byte_level_dir(tmp_path))
    [eos] = tokenizer.eos_ids
    rng = np.random.default_rng(0)
    for name in ("nested", "escapes_and_unicode", "enums"):
        for _ in range(3):
            matcher = compile_constraint(Constraint.json_schema(SCHEMAS[name]), tokenizer)
            ids = []
            for _ in range(400):
                bits = np.unpackbits(matcher.mask().view(np.uint8), bitorder="little")[: tokenizer.vocab_size]
                token = int(rng.choice(np.flatnonzero(bits)))
                if token == eos:
                    break
                assert bits[eos] == 0 or matcher.accepting
                matcher.consume(token)
                ids.append(token)
            else:
                pytest.fail(f"{name}: no end after 400 tokens")
            valid_json(b"".join(tokenizer.token_bytes[i] for i in ids).decode("utf-8"), SCHEMAS[name])


# --------------------------------------------------------------------------
# Outputs, over many seeds at temperature 1.0
# --------------------------------------------------------------------------


def test_batched_json_outputs_validate_and_equal_alone(demo):
    """Every schema, six seeds each, decoded together: all complete ("stop"), all valid; each the same as alone."""
    model, tokenizer = demo
    names = list(SCHEMAS)
    prompts, constraints, seeds = [], [], []
    for name in names:
        for seed in range(6):
            prompts.append(PROMPT)
            constraints.append(Constraint.json_schema(SCHEMAS[name]))
            seeds.append(1000 * names.index(name) + seed)
    results = batch_generate(model, tokenizer, prompts, max_tokens=120, sampling=HOT, seeds=seeds, constraint=constraints, max_batch=16)
    for result, constraint, seed in zip(results, constraints, seeds):
        assert result.finish_reason == "stop", (seed, result.text)
        valid_json(result.text, constraint.source)
    parsed = [json.loads(r.text) for r in results]
    assert parsed[names.index("escapes_and_unicode") * 6]["c"] == 'naïve "q"\\\n\t日本🙂'
    assert len({r.text for r in results}) > len(names) * 3  # the seeds give different answers
    for i in (0, 13, 40):  # the single-stream path (its own overlapped loop) gives the same tokens
        alone = "".join(r.text for r in stream_generate(model, tokenizer, PROMPT, 120, HOT, seed=seeds[i], constraint=constraints[i]))
        assert alone == results[i].text


def test_regex_and_grammar_outputs_match(demo):
    lark = pytest.importorskip("lark")
    model, tokenizer = demo
    parser = lark.Lark(GRAMMAR, parser="earley")
    prompts = [PROMPT] * (len(REGEXES) * 4 + 6)
    constraints = [Constraint.regex(r) for r in REGEXES for _ in range(4)] + [Constraint.grammar(GRAMMAR)] * 6
    results = batch_generate(model, tokenizer, prompts, 40, HOT, seeds=list(range(len(prompts))), constraint=constraints, max_batch=16)
    for result, constraint in zip(results, constraints):
        if constraint.kind == "regex":
            assert result.finish_reason == "stop" and re.fullmatch(constraint.source, result.text), (constraint.source, result.text)
        elif result.finish_reason == "stop":  # an expression may run on past 40 tokens
            parser.parse(result.text)
    assert sum(r.finish_reason == "stop" for r in results[-6:]) >= 3


def test_max_tokens_cuts_with_length_and_no_claim(demo):
    model, tokenizer = demo
    schema = {"type": "object", "properties": {"a": {"type": "string", "minLength": 30}}, "required": ["a"]}
    pieces = list(stream_generate(model, tokenizer, PROMPT, 9, HOT, seed=1, constraint=Constraint.json_schema(schema)))
    assert pieces[-1].finish_reason == "length" and pieces[-1].generation_tokens == 9
    text = "".join(p.text for p in pieces)
    assert text.startswith('{"a": "')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    [batched] = batch_generate(model, tokenizer, [PROMPT], 9, HOT, seeds=[1], constraint=Constraint.json_schema(schema))
    assert (batched.finish_reason, batched.text) == ("length", text)


def test_tokenizer_without_end_token_still_stops_when_complete(demo):
    """With no end-of-sequence token to draw, a complete constraint ends the answer itself ("stop"), alone and batched."""
    import copy

    model, tokenizer = demo
    no_eos = copy.copy(tokenizer)
    no_eos.eos_ids = set()
    pieces = list(stream_generate(model, no_eos, PROMPT, 30, HOT, seed=1, constraint=Constraint.regex("(yes|no)!")))
    text = "".join(p.text for p in pieces)
    assert pieces[-1].finish_reason == "stop" and text in ("yes!", "no!") and pieces[-1].generation_tokens < 30
    results = batch_generate(model, no_eos, [PROMPT] * 3, 30, HOT, seeds=[1, 2, 3], constraint=Constraint.regex("(yes|no)!"))
    assert all(r.finish_reason == "stop" and r.text in ("yes!", "no!") for r in results)


def test_a_failing_matcher_ends_only_its_own_sequence(demo):
    """A matcher that fails mid-answer (llguidance's resource limits, say) ends its request with "error"; the others go on."""
    from elm_mlx.batching import BatchEngine, Request

    model, tokenizer = demo

    class Failing:
        """A real matcher that gives up at its fourth mask."""

        def __init__(self, inner):
            self.inner, self.words, self.masks = inner, inner.words, 0

        def fill_mask(self, row):
            self.masks += 1
            if self.masks == 4:
                raise ConstraintError("the constraint could not be followed: too complex")
            self.inner.fill_mask(row)

        def consume(self, token):
            self.inner.consume(token)

    failing = Failing(compile_constraint(Constraint.regex("[a-z]{10,20}"), tokenizer))
    engine = BatchEngine(model, tokenizer)
    ok = engine.submit(Request(PROMPT, 40, HOT, seed=1, constraint=Constraint.regex("(yes|no)!")))
    bad = engine.submit(Request(PROMPT, 40, HOT, seed=2))
    engine.waiting[-1].matcher = failing
    events = []
    while engine.active or engine.queued:
        events += engine.step()
    ends = {e.id: e for e in events if e.finish_reason}
    assert ends[bad].finish_reason == "error" and "too complex" in ends[bad].error and ends[bad].generation_tokens == 3
    assert ends[ok].finish_reason == "stop" and "".join(e.text for e in events if e.id == ok) in ("yes!", "no!")


def test_a_compiled_matcher_serves_one_sequence(demo):
    """A Matcher is one sequence's state: two prompts (or a second call) sharing it would both fail; it is refused instead."""
    from elm_mlx.chat import ChatSession

    model, tokenizer = demo
    shared = compile_constraint(Constraint.regex("(yes|no)!"), tokenizer)
    with pytest.raises(ElmError, match="serves one sequence; pass the Constraint"):
        batch_generate(model, tokenizer, [PROMPT, "JULIET:"], 20, HOT, seeds=[1, 2], constraint=shared)

    once = compile_constraint(Constraint.regex("(yes|no)!"), tokenizer)
    pieces = list(stream_generate(model, tokenizer, PROMPT, 20, HOT, seed=1, constraint=once))
    assert pieces[-1].finish_reason == "stop" and "".join(p.text for p in pieces) in ("yes!", "no!")
    with pytest.raises(ElmError, match="serves one sequence; pass the Constraint"):
        list(stream_generate(model, tokenizer, PROMPT, 20, HOT, seed=2, constraint=once))
    with pytest.raises(ElmError, match="serves one sequence; pass the Constraint"):
        ChatSession(model, tokenizer, constraint=compile_constraint(Constraint.regex("a+"), tokenizer))


def test_compiling_a_constraint_does_not_keep_its_tokenizer_alive(demo):
    """The llguidance tokenizer cache is keyed weakly on the tokenizer; what it holds must not hold the tokenizer back."""
    import gc
    import weakref

    from elm_mlx.demo import DEMO_DIR
    from elm_mlx.tokenizer import load_tokenizer

    model, _ = demo
    tokenizer = load_tokenizer(DEMO_DIR)
    matcher = compile_constraint(Constraint.json_schema(SCHEMAS["optional_fields"]), tokenizer)
    pieces = list(stream_generate(model, tokenizer, PROMPT, 40, HOT, seed=3, constraint=matcher))
    valid_json("".join(p.text for p in pieces), SCHEMAS["optional_fields"])
    alive = weakref.ref(tokenizer)
    del tokenizer, matcher, pieces
    gc.collect()
    assert alive() is None


def test_a_constraint_is_compiled_once_for_many_sequences(demo, monkeypatch):
    """Several prompts, chat turns or calls under one Constraint compile it once; each sequence follows its own copy."""
    from elm_mlx import constrain

    model, tokenizer = demo
    compiles = []
    real = constrain._ll_matcher
    monkeypatch.setattr(constrain, "_ll_matcher", lambda *a: compiles.append(1) or real(*a))
    constraint = Constraint.regex("(yes|no|maybe)! [a-z]{2,6}")  # a pattern no other test compiles
    results = batch_generate(model, tokenizer, [PROMPT, "JULIET:", "KING:"], 30, HOT, seeds=[1, 2, 3], constraint=constraint)
    alone = [list(stream_generate(model, tokenizer, PROMPT, 30, HOT, seed=s, constraint=constraint)) for s in (1, 2)]
    assert len(compiles) == 1
    assert all(r.finish_reason == "stop" and re.fullmatch(constraint.source, r.text) for r in results)
    assert "".join(p.text for p in alone[0]) == results[0].text  # copies start where the template is, not where a sequence left it


def test_constraints_and_speculative_decoding_are_refused_together(demo):
    model, tokenizer = demo
    with pytest.raises(ElmError, match="does not combine with speculative decoding"):
        list(stream_generate(model, tokenizer, PROMPT, 8, constraint=Constraint.regex("a+"), prompt_lookup=4))


BAD = [
    (Constraint.json_schema('{"type": "object",'), "not valid JSON"),
    (Constraint.json_schema({"type": "strin"}), "invalid JSON schema"),
    (Constraint.json_schema({"type": "string", "format": "no-such-format"}), "no-such-format"),
    (Constraint.json_schema({"$ref": "#/definitions/missing"}), "invalid JSON schema"),
    (Constraint.regex("a(b"), "unclosed group"),
    (Constraint.regex(r"[^\x00-\x{10FFFF}]"), "cannot match any text"),
    (Constraint.grammar('start: "a" undefined_rule'), "undefined_rule"),
    (Constraint.grammar("start: (("), "invalid grammar"),
    (Constraint("xml", "<a/>"), "unknown constraint kind"),
]


@pytest.mark.parametrize("constraint, message", BAD, ids=[m for _, m in BAD])
def test_bad_constraints_are_one_line_errors(demo, constraint, message):
    model, tokenizer = demo
    with pytest.raises(ConstraintError) as e:
        list(stream_generate(model, tokenizer, PROMPT, 8, constraint=constraint))
    assert message in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


def generate_cli(*args):
    from elm_mlx.demo import DEMO_DIR

    cmd = [sys.executable, "-m", "elm_mlx.generate", "--model", str(DEMO_DIR), "--dtype", "float32", "--no-verbose", "-p", PROMPT, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cli_json_schema_regex_and_grammar(tmp_path):
    """The command as a user runs it: a schema file, an inline schema, a regex, a grammar file."""
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS["nested"]))
    out = generate_cli("--json-schema", str(schema_file), "--temp", "1", "--top-p", "1", "--min-p", "0", "--seed", "1", "-m", "120")
    assert out.returncode == 0, out.stderr
    valid_json(out.stdout, SCHEMAS["nested"])
    out = generate_cli("--json-schema", json.dumps(SCHEMAS["escapes_and_unicode"]), "--temp", "1", "--seed", "3", "-m", "120")
    assert out.returncode == 0, out.stderr
    valid_json(out.stdout, SCHEMAS["escapes_and_unicode"])
    out = generate_cli("--regex", REGEXES[0], "--temp", "1", "--seed", "4")
    assert out.returncode == 0 and re.fullmatch(REGEXES[0], out.stdout.rstrip("\n")), out
    grammar = tmp_path / "expr.lark"
    grammar.write_text(GRAMMAR)
    out = generate_cli("--grammar", str(grammar), "--temp", "0")
    assert out.returncode == 0, out.stderr
    pytest.importorskip("lark").Lark(GRAMMAR).parse(out.stdout.rstrip("\n"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--json-schema", '{"type": 7}'], "invalid JSON schema"),
        (["--json-schema", "missing.json"], "missing.json is not a file"),
        (["--regex", "(("], "invalid regex"),
        (["--regex", "a", "--json-schema", "{}"], "not allowed with"),
        (["--grammar", __file__], "invalid grammar"),  # a Python file is no grammar
        (["--regex", "a+", "--prompt-lookup", "4"], "do not combine with speculative decoding"),
    ],
)
def test_cli_bad_constraint_is_one_line(capsys, args, message):
    """Refused before the model loads, in one line (run in-process: no model work happens)."""
    from elm_mlx.cli import run_cli
    from elm_mlx.generate import main

    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(["--no-verbose", "-p", PROMPT, *args]))
    out = capsys.readouterr()
    assert e.value.code != 0 and out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.err


# --------------------------------------------------------------------------
# The server, with the official openai client
# --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["batched", "serial"])
def server(request, demo):
    pytest.importorskip("uvicorn")
    from elm_mlx.server import Engine, make_app
    from elm_mlx.server.batched import BatchedEngine
    from live_server import live_server

    model, tokenizer = demo
    engine = BatchedEngine(model, tokenizer, "demo", max_batch=8) if request.param == "batched" else Engine(model, tokenizer, "demo")
    with live_server(make_app(engine)) as port:
        yield request.param, f"http://127.0.0.1:{port}/v1"


@pytest.fixture()
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0, timeout=120)


def ask(client, response_format, seed, stream=False, max_tokens=120):
    messages = [{"role": "user", "content": "Tell me of the king."}]
    kwargs = dict(model="demo", messages=messages, temperature=1.0, top_p=1.0, seed=seed, max_tokens=max_tokens)
    if not stream:
        reply = client.chat.completions.create(response_format=response_format, **kwargs)
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    chunks = list(client.chat.completions.create(response_format=response_format, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def test_server_json_schema_over_seeds(server, client):
    """OpenAI's response_format, concurrent requests (batched together on the batching engine), streamed and not."""
    seeds = range(4) if server[0] == "batched" else range(1)
    jobs = [(name, seed, seed % 2 == 1) for name in SCHEMAS for seed in seeds]
    fmt = lambda name: {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}  # noqa: E731
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda job: ask(client, fmt(job[0]), job[1], stream=job[2]), jobs))
    for (name, seed, streamed), (text, finish) in zip(jobs, replies):
        assert finish == "stop", (name, seed, streamed, text)
        valid_json(text, SCHEMAS[name])


def test_server_json_object_regex_and_grammar(server, client):
    lark = pytest.importorskip("lark")
    text, finish = ask(client, {"type": "json_object"}, 0, max_tokens=40)
    if finish == "stop":  # any object: it may run past 40 tokens
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length" and text.startswith("{")
    for seed in range(2):
        text, finish = ask(client, {"type": "regex", "regex": REGEXES[2]}, seed, stream=seed == 1)
        assert finish == "stop" and re.fullmatch(REGEXES[2], text)
    text, finish = ask(client, {"type": "grammar", "grammar": GRAMMAR}, 0, max_tokens=60)
    if finish == "stop":
        lark.Lark(GRAMMAR).parse(text)
    text, finish = ask(client, {"type": "text"}, 0, max_tokens=5)
    assert finish == "length"
    # the extension on /v1/completions, and log-probabilities: those of the masked distribution, finite
    reply = client.completions.create(
        model="demo",
        prompt=PROMPT,
        max_tokens=20,
        temperature=1.0,
        seed=2,
        logprobs=3,
        extra_body={"response_format": {"type": "regex", "regex": "(yes|no)!"}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.text in ("yes!", "no!")
    assert "".join(choice.logprobs.tokens) == choice.text and all(-9999 < lp <= 0 for lp in choice.logprobs.token_logprobs)


def test_server_length_cut_is_reported(client):
    schema = {"type": "object", "properties": {"a": {"type": "string", "minLength": 40}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "long", "schema": schema}}
    for stream in (False, True):
        text, finish = ask(client, fmt, 5, stream=stream, max_tokens=5)
        assert finish == "length" and text.startswith('{"a":')


@pytest.mark.parametrize(
    "response_format, message",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "invalid JSON schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "nope"}}}, "nope"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "schema"),
        ({"type": "regex", "regex": "a(b"}, "unclosed group"),
        ({"type": "regex", "regex": r"[^\x00-\x{10FFFF}]"}, "cannot match any text"),
        ({"type": "grammar", "grammar": "start: nothing_here"}, "nothing_here"),
        ({"type": "yaml"}, "response_format.type"),
        ("json", "response_format"),
    ],
)
def test_server_bad_response_format_is_400_and_it_keeps_serving(client, response_format, message):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], response_format=response_format)
    error = e.value.body
    assert e.value.status_code == 400 and message in error["message"] and error["param"] == "response_format"
    assert error["type"] == "invalid_request_error"
    text, finish = ask(client, {"type": "regex", "regex": "(yes|no)"}, 0)
    assert finish == "stop" and text in ("yes", "no")


@pytest.mark.parametrize("regex", ["(x{1000}){1000}", "a{1000}{1000}{1000}"])
def test_server_constraint_failing_mid_answer_is_the_clients_error(server, regex):
    """These compile, then llguidance's lexer gives up after the first token: a 400 unstreamed, an in-band
    invalid_request_error on response_format streamed (not "internal error"/server_error), on both engines."""
    import urllib.error
    import urllib.request

    def post(body):
        request = urllib.request.Request(f"{server[1]}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "response_format": {"type": "regex", "regex": regex}}
    status, text = post(body)
    assert status == 400, text
    error = json.loads(text)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "response_format"
    assert "too many expressions" in error["message"] and "internal error" not in error["message"]
    status, text = post({**body, "stream": True})
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert status == 200 and "[DONE]" not in events, text
    error = json.loads(events[-1])["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "response_format"
    assert "too many expressions" in error["message"] and "internal error" not in error["message"]


def test_server_refuses_response_format_with_prompt_lookup(server, client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_object"},
            extra_body={"prompt_lookup": 4},
        )
    assert e.value.body["param"] == "prompt_lookup"  # the batching server refuses prompt lookup on its own
    assert server[0] == "batched" or "does not combine" in e.value.body["message"]


def test_bench_structured_quick_writes_results(tmp_path):
    """`python -m bench structured --quick`: every variant measured, results written once and not overwritten."""
    from bench.__main__ import main as bench_main
    from elm_mlx.errors import ElmError

    out = tmp_path / "structured"
    bench_main(["structured", "--quick", "--gen-tokens", "12", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    [demo_rows] = [m["rows"] for m in results["models"]]
    assert [r["variant"] for r in demo_rows] == ["free", "json_schema", "regex", "grammar", "grammar, no overlap"]
    assert all(r["tps"] > 0 and 2 <= r["tokens"][0] <= 12 for r in demo_rows)
    assert "| json_schema |" in (out / "results.md").read_text()
    with pytest.raises(ElmError, match="already exists"):
        bench_main(["structured", "--quick", "--out", str(out)])
