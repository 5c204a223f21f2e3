"""`response_format`: what the answer must be, as OpenAI's API asks for it, plus regex and grammar extensions.

OpenAI: {"type": "text"} (free text), {"type": "json_object"} (any JSON
object) and {"type": "json_schema", "json_schema": {"name", "schema",
"strict", "description"}}. elm-mlx adds {"type": "regex", "regex": PATTERN}
and {"type": "grammar", "grammar": LARK} (llguidance's Lark dialect). The
output always follows the schema, so "strict" changes nothing here.

Every constraint is hostile input: it is compiled (with llguidance's limits,
elm_mlx.constrain.parser_limits) in a worker thread, never on the event loop,
at most COMPILE_SLOTS at once and for at most COMPILE_DEADLINE_S, so a flood of
large constraints holds bounded CPU and memory while other requests go on.
"""

import re
import threading
from typing import Optional

from ..constrain import Constraint, ConstraintError, compile_constraint
from .schemas import RequestError

PARAM = "response_format"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name
COMPILE_SLOTS = 2  # constraints compiled at once (the machine's cores do the rest no faster)
COMPILE_WAIT_S = 60.0  # how long a request waits for a free slot before it is refused with 503
# llguidance has no limit on compile time: a JSON schema with 20000 properties (400 KB) compiles for ~8 s. A request
# waits this long and is then refused; the compile cannot be interrupted, so it finishes in its thread and keeps its
# slot until then (CPU and memory stay bounded by COMPILE_SLOTS). Ordinary schemas compile in well under 0.1 s.
COMPILE_DEADLINE_S = 10.0
_slots = threading.BoundedSemaphore(COMPILE_SLOTS)


def compile_for_request(constraint: Constraint, tokenizer, n_vocab: Optional[int]):
    """The request's matcher (call it in a worker thread); RequestError 400 for a constraint the compiler refuses
    or that takes over COMPILE_DEADLINE_S, 503 when every compile slot stays busy for COMPILE_WAIT_S."""
    if not _slots.acquire(timeout=COMPILE_WAIT_S):
        raise RequestError("too many structured-output requests are being compiled; try again later", param=PARAM, status=503)
    outcome: list = []

    def work():
        try:
            outcome.append(compile_constraint(constraint, tokenizer, n_vocab))
        except ConstraintError as e:
            outcome.append(RequestError(str(e), param=PARAM))
        except Exception as e:  # noqa: BLE001 - reported to the waiting request, which answers 500
            outcome.append(e)
        finally:
            _slots.release()

    worker = threading.Thread(target=work, name="elm-mlx-compile", daemon=True)
    worker.start()
    worker.join(COMPILE_DEADLINE_S)
    if not outcome:
        raise RequestError(
            f"the {PARAM} took over {COMPILE_DEADLINE_S:g} s to compile; make the schema, regex or grammar smaller", param=PARAM
        )
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def parse_response_format(body: dict) -> Optional[Constraint]:
    """The request's constraint, or None for free text; RequestError (400) for a malformed one (compile_for_request checks the rest)."""
    spec = body.get(PARAM)
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise RequestError("'response_format' must be an object with a string 'type'", param=PARAM)
    kind = spec["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        constraint = Constraint.json_object()
    elif kind == "json_schema":
        constraint = Constraint.json_schema(_json_schema(spec.get("json_schema")))
    elif kind in ("regex", "grammar"):
        text = spec.get(kind)
        if not isinstance(text, str) or not text:
            raise RequestError(f"'response_format.{kind}' must be a non-empty string", param=PARAM)
        constraint = Constraint(kind, text)
    else:
        raise RequestError(
            f"'response_format.type' must be one of text, json_object, json_schema, regex, grammar; got {kind[:40]!r}", param=PARAM
        )
    return constraint


def _json_schema(spec) -> object:
    if not isinstance(spec, dict):
        raise RequestError("'response_format.json_schema' must be an object", param=PARAM)
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RequestError("'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'", param=PARAM)
    for field, kinds in (("strict", bool), ("description", str)):
        if spec.get(field) is not None and not isinstance(spec[field], kinds):
            raise RequestError(f"'response_format.json_schema.{field}' must be a {kinds.__name__}", param=PARAM)
    schema = spec.get("schema", {})  # OpenAI: without a schema, any JSON
    if not isinstance(schema, (dict, bool)):
        raise RequestError("'response_format.json_schema.schema' must be a JSON schema object", param=PARAM)
    return schema
