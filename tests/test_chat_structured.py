"""The terminal chat with a constraint (--json-schema, --regex, --grammar): every answer of the session follows it.

Answers are checked by independent parsers (json + jsonschema, re.fullmatch), sampled at temperature 1.0.
"""

import json
import re
import sys

import pytest

from elm_mlx import SamplingParams
from elm_mlx.chat import ChatSession, session_stats
from elm_mlx.constrain import Constraint
from terminal import Terminal

jsonschema = pytest.importorskip("jsonschema")

HOT = SamplingParams(temp=1.0, top_p=1.0, min_p=0.0)  # every allowed token can be drawn
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["merry", "sad"]},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}


def test_every_turn_of_a_session_follows_the_schema(demo):
    model, tokenizer = demo
    import mlx.core as mx

    mx.random.seed(7)
    session = ChatSession(model, tokenizer, system="Answer in JSON.", constraint=Constraint.json_schema(SCHEMA))
    for turn, text in enumerate(("Who art thou?", "And thy mood, good sir?")):
        answer = "".join(r.text for r in session.ask(text, 120, HOT))
        jsonschema.validate(json.loads(answer), SCHEMA)
        assert session.last.finish_reason == "stop"
        if turn:  # the history (the first answer included) came from the cache: the constraint does not break reuse
            assert session.last.prompt_cached_tokens > 0
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert "every answer follows a JSON schema" in session_stats(session, "demo")


def _answers(term: Terminal, questions) -> list:
    out = []
    for q in questions:
        term.send(q + "\n")
        seen = term.read_until(">>> ").replace("\r\n", "\n")
        out.append(seen.split("\n", 1)[1].rsplit("\n", 1)[0])  # the echoed question, the answer, the next prompt
    return out


def test_chat_command_json_schema_and_regex_each_answer(tmp_path):
    from elm_mlx.demo import DEMO_DIR

    base = [sys.executable, "-m", "elm_mlx.chat", "--model", str(DEMO_DIR), "--dtype", "float32", "--no-verbose"]
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    regex = r"(Ay|Nay), [a-z]{2,8}[.!]"
    for extra, check in (
        (
            ["--json-schema", str(schema_file), "--temp", "1", "--seed", "3", "-m", "120"],
            lambda a: jsonschema.validate(json.loads(a), SCHEMA),
        ),
        (["--regex", regex, "--temp", "1", "--seed", "4"], lambda a: re.fullmatch(regex, a) or pytest.fail(f"{a!r} does not match")),
    ):
        term = Terminal(base + extra)
        try:
            term.read_until(">>> ")
            answers = _answers(term, ["Who art thou?", "Speak again."])
            term.send("/exit\n")
            assert term.proc.wait(30) == 0
        finally:
            if term.proc.poll() is None:
                term.proc.kill()
        assert len(answers) == 2
        for answer in answers:
            check(answer)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--regex", "a+", "--prompt-lookup", "4"], "do not combine with speculative decoding"),
        (["--json-schema", "{}", "--draft-model", "x"], "do not combine with speculative decoding"),
        (["--json-schema", '{"type": 7}'], "invalid JSON schema"),
        (["--regex", "a", "--grammar", "g.lark"], "not allowed with"),
    ],
)
def test_chat_command_refuses_what_generate_refuses(capsys, args, message):
    """Refused before the model loads, in one line, with generate's words (run in-process: no model work happens)."""
    from elm_mlx.chat import main
    from elm_mlx.cli import run_cli
    from elm_mlx.generate import main as generate

    said = []
    for command in (main, lambda a: generate(["-p", "x", *a])):
        with pytest.raises(SystemExit) as e:
            run_cli(lambda command=command: command(["--no-verbose", *args]))
        out = capsys.readouterr()
        assert e.value.code != 0 and out.out == ""
        lines = out.err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.err, out.err
        said.append(lines[0].split(": ", 1)[-1])
    assert said[0] == said[1]
