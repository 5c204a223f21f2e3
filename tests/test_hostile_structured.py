"""Hostile structured-output requests: every response_format, schema, regex and grammar a client can send.

Each one gets a one-line refusal (a 400 in OpenAI's error shape, a ConstraintError, a one-line CLI error)
or is served correctly; compiling is bounded by llguidance's own limits (elm_mlx.constrain.parser_limits:
the lexer's initial fuel, the grammar size, the lexer states) and runs off the event loop, so an ordinary
request is served while a large constraint compiles. The worst inputs run in a child with a memory cap.
"""

import json
import sys
import threading
import time

import pytest

from elm_mlx.constrain import Constraint, ConstraintError, compile_constraint
from hostile import python_code, run_limited

LOCAL = "http://localhost"  # the server's Host check refuses TestClient's default "testserver"
BOMB = "a{1000}{1000}{1000}"  # a billion 'a's: llguidance's default lexer fuel spent 2-5 s and ~300 MB on its first mask


def nested(depth: int) -> dict:
    schema = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"], "additionalProperties": False}
    return schema


def nested_text(depth: int) -> str:
    """A schema `depth` objects deep, as JSON text (deeper than Python's json.dumps recursion allows)."""
    return '{"type": "object", "properties": {"a": ' * depth + '{"type": "integer"}' + "}}" * depth


def huge_grammar(rules: int) -> str:
    return "start: " + " | ".join(f"r{i}" for i in range(rules)) + "\n" + "".join(f'r{i}: "t{i}"\n' for i in range(rules))


REFUSED = {  # input -> what the one-line message says
    "regex lookahead": (Constraint.regex("(?=a)a"), "look-around"),
    "regex backreference": (Constraint.regex(r"(a)\1"), "backreferences are not supported"),
    "regex anchor inside": (Constraint.regex("a$b"), "invalid regex"),
    "regex empty class": (Constraint.regex(r"[^\s\S]"), "cannot match any text"),
    "regex syntax": (Constraint.regex("a{2,1}"), "invalid regex"),
    "regex lone surrogate": (Constraint.regex("a\ud800"), "lone surrogate"),
    "grammar lone surrogate": (Constraint.grammar('start: "\udcff"'), "lone surrogate"),
    "grammar syntax": (Constraint.grammar('start: ((( "a"\n'), "invalid grammar"),
    "grammar undefined": (Constraint.grammar("start: x\n"), "invalid grammar"),
    "schema false": (Constraint.json_schema(False), "cannot match any text"),
    "schema list": (Constraint.json_schema([1]), "must be a JSON object"),
    "schema cyclic ref": (
        Constraint.json_schema({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}),
        "",
    ),
    "schema min > max": (Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 1}), "greater than maximum"),
    "schema 1e308": (Constraint.json_schema({"type": "number", "minimum": -1e308, "maximum": 1e308}), "invalid JSON schema"),
    "schema multipleOf 0": (Constraint.json_schema({"type": "number", "multipleOf": 0}), "multiple"),
    "schema 10^30": (Constraint.json_schema({"type": "integer", "minimum": -(10**30)}), "invalid JSON schema"),
    "schema minLength -1": (Constraint.json_schema({"type": "string", "minLength": -1}), "minLength"),
    "schema minLength 1.5": (Constraint.json_schema({"type": "string", "minLength": 1.5}), "minLength"),
    "schema minLength true": (Constraint.json_schema({"type": "string", "minLength": True}), "minLength"),
    "schema lookaround pattern": (Constraint.json_schema({"type": "string", "pattern": "(?!a)b"}), "look-around"),
    "schema unsupported keyword": (Constraint.json_schema({"type": "object", "dependentSchemas": {"a": {}}}), "dependentSchemas"),
    "schema surrogate NUL name": (
        Constraint.json_schema({"type": "object", "properties": {"\u00e9\ud800\x00" * 3000: {}}, "required": ["\u00e9\ud800\x00" * 3000]}),
        "invalid JSON schema",
    ),
    "schema text 100 deep": (Constraint.json_schema(nested_text(100)), "recursion limit"),
    "schema text 5000 deep": (Constraint.json_schema(nested_text(5000)), "not valid JSON"),
}

SERVED = {  # compiles, and a first mask allows something
    "regex counted bomb": Constraint.regex(BOMB),
    "regex (a|b){65535}": Constraint.regex("(a|b){65535}"),
    "regex 20000 alternatives": Constraint.regex("|".join(f"w{i}x" for i in range(20000))),
    "regex unicode classes": Constraint.regex(r"[\p{L}\p{N}]{1,50}\p{Han}"),
    "regex NUL": Constraint.regex("a\x00b"),
    "schema depth 30": Constraint.json_schema(nested(30)),
    "schema recursive ref": Constraint.json_schema(
        {"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}}
    ),
    "schema 20000 enum": Constraint.json_schema({"enum": [f"value-{i}" for i in range(20000)]}),
    "schema minItems 2^63": Constraint.json_schema({"type": "array", "minItems": 2**63, "items": {"type": "integer"}}),
    "schema maxLength 10^9": Constraint.json_schema({"type": "string", "maxLength": 10**9}),
    "schema maxItems 0": Constraint.json_schema({"type": "array", "maxItems": 0}),
    "schema pattern bomb": Constraint.json_schema({"type": "string", "pattern": BOMB}),
    "schema unknown keyword": Constraint.json_schema({"type": "string", "frobnicate": [1, {"x": None}]}),
    "schema true": Constraint.json_schema(True),
    "schema -0.0": Constraint.json_schema({"type": "number", "minimum": -0.0, "maximum": 0.0}),
    "grammar left recursion": Constraint.grammar('start: e\ne: e "+" "a" | "a"\n'),
    "grammar with no finite sentence": Constraint.grammar('start: a\na: "x" a\n'),
    "grammar 5000 rules": Constraint.grammar(huge_grammar(5000)),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_hostile_constraints_are_refused_in_one_line(demo, name):
    constraint, message = REFUSED[name]
    with pytest.raises(ConstraintError) as e:
        compile_constraint(constraint, demo[1], 1024)
    text = str(e.value)
    assert message in text and "\n" not in text and len(text) <= 700 and "Traceback" not in text


@pytest.mark.parametrize("name", list(SERVED))
def test_hostile_but_valid_constraints_compile(demo, name):
    matcher = compile_constraint(SERVED[name], demo[1], 1024)
    assert matcher.mask().any()


def test_a_grammar_with_no_finite_sentence_is_stopped_by_llguidance(demo):
    """Nothing it allows is ever complete and every token is forced: llguidance's item limit ends it in one line."""
    from elm_mlx import stream_generate

    model, tokenizer = demo
    with pytest.raises(ConstraintError, match="Too many items") as e:
        list(stream_generate(model, tokenizer, "ROMEO:", 6, constraint=SERVED["grammar with no finite sentence"]))
    assert "\n" not in str(e.value)


def test_counted_repetition_bomb_is_bounded_in_memory():
    """Regression: llguidance's default lexer fuel let the first mask of a{1000}{1000}{1000} grow ~250 MB (and 2-5 s).

    With parser_limits it grows well under 150 MB; the child runs under an address-space cap as well.
    """
    code = f"""
import resource
from elm_mlx.constrain import Constraint, ConstraintError, compile_constraint
from elm_mlx.demo import DEMO_DIR
from elm_mlx.tokenizer import load_tokenizer
tokenizer = load_tokenizer(DEMO_DIR)
compile_constraint(Constraint.regex("a"), tokenizer, 1024)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for source in ({BOMB!r}, "(a{{1000}}){{1000}}", "x{{100}}{{100}}{{100}}{{100}}"):
    try:
        compile_constraint(Constraint.regex(source), tokenizer, 1024)
    except ConstraintError as e:
        assert "\\n" not in str(e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    out = python_code(code, timeout=60, memory_bytes=3 << 30)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 150, out.stdout


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_client(demo):
    from starlette.testclient import TestClient

    from elm_mlx.server import Engine, make_app

    model, tokenizer = demo
    with TestClient(make_app(Engine(model, tokenizer, "demo"), max_tokens_limit=64), base_url=LOCAL) as client:
        yield client


def chat(client, response_format, **extra):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "response_format": response_format, **extra}
    # json.dumps escapes lone surrogates as \\ud800, as a hostile client may send them (httpx's json= cannot encode them)
    return client.post("/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "application/json"})


def schema_format(schema, **fields):
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, **fields}}


BAD_FORMATS = {
    "string": "json",
    "list": [{"type": "json_object"}],
    "no type": {},
    "type number": {"type": 1},
    "unknown type": {"type": "yaml"},
    "json_schema missing": {"type": "json_schema"},
    "json_schema a list": {"type": "json_schema", "json_schema": [1]},
    "name missing": {"type": "json_schema", "json_schema": {"schema": {}}},
    "name 65 chars": {"type": "json_schema", "json_schema": {"name": "a" * 65, "schema": {}}},
    "name with a space": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
    "name with a dot": {"type": "json_schema", "json_schema": {"name": "a.b", "schema": {}}},
    "name unicode": {"type": "json_schema", "json_schema": {"name": "n\u00e9", "schema": {}}},
    "name NUL": {"type": "json_schema", "json_schema": {"name": "a\x00", "schema": {}}},
    "name a number": {"type": "json_schema", "json_schema": {"name": 7, "schema": {}}},
    "strict a string": schema_format({}, strict="true"),
    "strict a number": schema_format({}, strict=1),
    "description a list": schema_format({}, description=["x"]),
    "schema a string": schema_format("{}"),
    "schema a number": schema_format(3),
    "regex missing": {"type": "regex"},
    "regex empty": {"type": "regex", "regex": ""},
    "regex a list": {"type": "regex", "regex": ["a"]},
    "grammar an object": {"type": "grammar", "grammar": {"start": "a"}},
    "regex bad syntax": {"type": "regex", "regex": "(("},
    "regex lookbehind": {"type": "regex", "regex": "(?<=a)b"},
    "grammar syntax": {"type": "grammar", "grammar": "start: ((("},
    "schema false": schema_format(False),
    "schema minimum > maximum": schema_format({"type": "integer", "minimum": 2, "maximum": 1}),
    "schema 8 deep with a bad leaf": schema_format(nested(7) | {"properties": {"a": {"type": "strin"}}}),
}
BODY_REFUSALS = {  # refused by the request reader before response_format is looked at (param null)
    "regex lone surrogate": ({"type": "regex", "regex": "\ud800"}, "surrogate"),
    "schema 31 deep": (schema_format(nested(31)), "deeper than 32 levels"),
}


@pytest.mark.parametrize("name", list(BAD_FORMATS))
def test_bad_response_formats_are_400_in_openai_shape(app_client, name):
    reply = chat(app_client, BAD_FORMATS[name])
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == "response_format" and "\n" not in error["message"] and "Traceback" not in error["message"]


@pytest.mark.parametrize("name", list(BODY_REFUSALS))
def test_bodies_the_reader_refuses_are_400(app_client, name):
    response_format, message = BODY_REFUSALS[name]
    reply = chat(app_client, response_format)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text


def test_served_oddities_and_combinations(app_client):
    """Extra fields are ignored as OpenAI does; strict false, logprobs, n=1 and stream work under a constraint."""
    ok = chat(app_client, {"type": "regex", "regex": "(yes|no)", "junk": {"deep": [1, {"x": None}]}}, seed=1)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] in ("yes", "no")
    fmt = schema_format({"enum": ["a", "b"]}, strict=False, description="pick")
    reply = chat(app_client, fmt, logprobs=True, top_logprobs=2, n=1, seed=2)
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["message"]["content"] in ('"a"', '"b"') and choice["finish_reason"] == "stop"
    assert all(-9999 < entry["logprob"] <= 0 for entry in choice["logprobs"]["content"])
    with app_client.stream(
        "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "response_format": fmt}
    ) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text in ('"a"', '"b"')
    for extra, param in (({"n": 2}, "n"), ({"prompt_lookup": 4}, "prompt_lookup")):
        reply = chat(app_client, fmt, **extra)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param


def test_an_ordinary_request_is_served_while_large_constraints_compile(app_client):
    """Six counted-repetition bombs compile (two at a time, off the event loop); a plain request is answered meanwhile.

    Each bomb's compile is bounded by the lexer fuel (~0.3 s); its answer may be served or refused ("too many
    expressions" once the lexer needs more) but never a 500.
    """
    done = []

    def hostile():
        reply = chat(app_client, {"type": "regex", "regex": BOMB}, max_tokens=1)
        done.append((time.monotonic(), reply.status_code))

    threads = [threading.Thread(target=hostile) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    start = time.monotonic()
    plain = app_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    finished = time.monotonic()
    assert plain.status_code == 200 and app_client.get("/health").status_code == 200
    for t in threads:
        t.join(120)
    assert len(done) == 6 and all(status in (200, 400) for _, status in done), done
    assert finished < max(when for when, _ in done), (finished - start, [when - start for when, _ in done])


def test_a_compile_past_the_deadline_is_refused_and_others_are_served(app_client, monkeypatch):
    """llguidance has no compile-time limit (a schema with thousands of properties takes seconds): the server's deadline."""
    from elm_mlx.server import structured

    monkeypatch.setattr(structured, "COMPILE_DEADLINE_S", 0.2)
    schema = {"type": "object", "properties": {f"p{i}": {} for i in range(10000)}}
    start = time.monotonic()
    reply = chat(app_client, schema_format(schema))
    refused = time.monotonic() - start
    assert reply.status_code == 400 and "took over 0.2 s to compile" in reply.json()["error"]["message"], reply.text
    assert reply.json()["error"]["param"] == "response_format" and refused < 5, refused
    ok = chat(app_client, {"type": "regex", "regex": "(yes|no)"}, seed=0)  # a slot is still free while that compile finishes
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] in ("yes", "no")


def test_compiles_beyond_the_slots_wait_and_then_get_503(demo, monkeypatch):
    from elm_mlx.server import structured

    monkeypatch.setattr(structured, "COMPILE_WAIT_S", 0.05)
    monkeypatch.setattr(structured, "_slots", threading.BoundedSemaphore(1))
    structured._slots.acquire()  # the one slot is busy
    try:
        with pytest.raises(structured.RequestError) as e:
            structured.compile_for_request(Constraint.regex("a"), demo[1], 1024)
        assert e.value.status == 503
    finally:
        structured._slots.release()
    assert structured.compile_for_request(Constraint.regex("a"), demo[1], 1024).mask().any()


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--regex", "a\udcff"], "lone surrogate"),  # undecodable bytes on a command line
        (["--json-schema", "false"], "is not a file"),
        (["--json-schema", '{"type": "string", "minLength": -1}'], "minLength"),
        (["--json-schema", "{" * 100000], "not valid JSON"),
        (["--regex", "(?=x)"], "look-around"),
    ],
)
def test_cli_hostile_constraints_are_one_line(capsys, args, message):
    from elm_mlx.cli import run_cli
    from elm_mlx.generate import main

    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(["--no-verbose", "-p", "x", *args]))
    out = capsys.readouterr()
    assert e.value.code in (1, 2) and out.out == "" and "Traceback" not in out.err
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.err


def test_cli_bytes_that_are_not_utf8_in_a_regex(tmp_path):
    """The real command with an undecodable byte in --regex: one line, exit 1 or 2 (was a UnicodeEncodeError)."""

    out = run_limited([sys.executable, "-m", "elm_mlx.generate", "--no-verbose", "-p", "x", "--regex", b"a\xff"], timeout=60)
    assert out.returncode in (1, 2)
    assert "lone surrogate" in out.one_line_error()
