"""`response_format`: what the answer must be, as OpenAI's API asks for it, plus regex and grammar extensions.

OpenAI: {"type": "text"} (free text), {"type": "json_object"} (any JSON
object) and {"type": "json_schema", "json_schema": {"name", "schema",
"strict", "description"}}. elm-mlx adds {"type": "regex", "regex": PATTERN}
and {"type": "grammar", "grammar": LARK} (llguidance's Lark dialect). The
output always follows the schema, so "strict" changes nothing here.
"""

import re
from typing import Optional

from ..constrain import Constraint, ConstraintError, check_constraint
from .schemas import RequestError

PARAM = "response_format"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name


def parse_response_format(body: dict) -> Optional[Constraint]:
    """The request's constraint, or None for free text; RequestError (400) for a malformed or invalid one."""
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
    try:
        check_constraint(constraint)
    except ConstraintError as e:
        raise RequestError(str(e), param=PARAM) from None
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
