"""Requests as the server accepts them: JSON bodies checked field by field into what the engine needs.

Everything here may come from a hostile client, so each check answers with a
RequestError (a 4xx in OpenAI's error shape) naming the field, never an
exception from deeper down.
"""

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..errors import ElmError
from ..generation import answer_budget
from ..sample import SamplingParams
from ..tokenizer import Tokenizer

MAX_LOGPROBS = 20
MAX_JSON_DEPTH = 32  # OpenAI's request shapes nest 5 deep; 100k levels would exhaust the stack
DEFAULT_MAX_TOKENS = 256
SEED_RANGE = range(0, 1 << 64)  # what mx.random.seed takes


class RequestError(Exception):
    """A 4xx answer in OpenAI's error shape."""

    def __init__(
        self,
        message: str,
        param: Optional[str] = None,
        status: int = 400,
        kind: str = "invalid_request_error",
        code: Optional[str] = None,
    ):
        super().__init__(message)
        self.param, self.status, self.kind, self.code = param, status, kind, code


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server (its command-line flags)."""

    max_tokens_limit: int = 4096  # --max-tokens-limit: the largest max_tokens
    max_prompt_tokens: Optional[int] = None  # --max-prompt-tokens: default the context length
    context_length: Optional[int] = None  # the model's; prompt + max_tokens must fit
    max_body_bytes: int = 1 << 20  # --max-body-bytes
    sampling: SamplingParams = SamplingParams()  # --temp, --top-p, ...: for fields a request leaves out

    def __post_init__(self):
        for name in ("max_tokens_limit", "max_prompt_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ElmError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


# --------------------------------------------------------------------------
# The body
# --------------------------------------------------------------------------


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range")
    return value


def parse_body(body: bytes) -> dict:
    """The body as a JSON object of bounded depth whose strings are all valid Unicode."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise RequestError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:  # ValueError: NaN, 1e999, 5000-digit ints
        raise RequestError(f"the request body is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    _check_tree(data)
    return data


def _check_tree(data: Any) -> None:
    """Depth bound and no lone surrogates (json.loads lets "\\ud800" through; encoding it later would fail)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError("the request holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text") from None


# --------------------------------------------------------------------------
# Fields
# --------------------------------------------------------------------------


def typed(body: dict, name: str, kinds, default=None, check=None, what: str = ""):
    """body[name] if present and of the right JSON type (bool is not a number), else default."""
    if name not in body or body[name] is None:
        return default
    value = body[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok or (check is not None and not check(value)):
        raise RequestError(f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name)
    return value


def requested_max_tokens(body: dict, limit: int) -> Optional[int]:
    """The client's max_completion_tokens (or older max_tokens), None when it named none."""
    what = f"an integer in [1, {limit}]"
    value = typed(body, "max_completion_tokens", int, None, lambda v: 1 <= v <= limit, what)
    if value is None:
        value = typed(body, "max_tokens", int, None, lambda v: 1 <= v <= limit, what)
    return value


def parse_sampling(body: dict, defaults: Optional[SamplingParams] = None) -> SamplingParams:
    defaults = defaults or SamplingParams()
    number = (int, float)
    for unsupported in ("presence_penalty", "frequency_penalty"):
        typed(body, unsupported, number, 0, lambda v: v == 0, "0 (use repetition_penalty)")
    try:
        return SamplingParams(
            temp=typed(body, "temperature", number, defaults.temp, lambda v: 0 <= v <= 2, "a number in [0, 2]"),
            top_p=typed(body, "top_p", number, defaults.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]"),
            top_k=typed(body, "top_k", int, defaults.top_k, lambda v: v >= 0, "an integer >= 0"),
            min_p=typed(body, "min_p", number, defaults.min_p, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
            repetition_penalty=typed(body, "repetition_penalty", number, defaults.repetition_penalty, lambda v: v > 0, "a positive number"),
            repetition_context_size=defaults.repetition_context_size,
        )
    except (ElmError, ValueError) as e:
        raise RequestError(str(e)) from None


def parse_stop(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) for s in stop):
        return stop
    raise RequestError("'stop' must be a string or a list of at most 16 strings", param="stop")


def parse_common(body: dict, defaults: Optional[SamplingParams] = None) -> Dict[str, Any]:
    """The fields chat and text completions share, except max_tokens (that needs the prompt's length)."""
    if typed(body, "n", int, 1) != 1:
        raise RequestError("only n = 1 is supported", param="n")
    typed(body, "stream", bool, False, what="a boolean")
    typed(body, "stream_options", dict, None, what="an object")
    seed = typed(body, "seed", int, None, lambda v: v in SEED_RANGE, "an integer in [0, 2^64 - 1]")
    return dict(sampling=parse_sampling(body, defaults), stop=parse_stop(body), seed=seed)


def parse_speculative(body: dict, refused: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The extension field "prompt_lookup": K or {"num_tokens": K, "min_ngram": a, "max_ngram": b}, as stream_generate's
    keywords; `refused` says why this server cannot (engine.speculation_refused). Absent or null: None (the server's
    default, its --draft-model if any); 0: {} (plain decoding, even on a server that drafts)."""
    from ..speculative import MAX_DRAFT_TOKENS, PromptLookup

    value = body.get("prompt_lookup")
    if value is None:
        return None
    if value == 0 and isinstance(value, int) and not isinstance(value, bool):
        return {}
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"num_tokens", "min_ngram", "max_ngram"})
        if unknown:
            raise RequestError(
                f"'prompt_lookup' has no field {unknown[0][:40]!r} (num_tokens, min_ngram, max_ngram)", param="prompt_lookup"
            )
        try:
            fields = {name: typed(value, name, int, None, what="an integer") for name in ("num_tokens", "min_ngram", "max_ngram")}
            lookup = PromptLookup(**{name: v for name, v in fields.items() if v is not None})
        except (ElmError, RequestError) as e:
            raise RequestError(f"'prompt_lookup': {e}", param="prompt_lookup") from None
    else:
        k = typed(
            body, "prompt_lookup", int, None, lambda v: 0 <= v <= MAX_DRAFT_TOKENS, f"an integer in [0, {MAX_DRAFT_TOKENS}] or an object"
        )
        lookup = PromptLookup(num_tokens=k)
    if refused:
        raise RequestError(f"'prompt_lookup' (speculative decoding): {refused}", param="prompt_lookup")
    return {"prompt_lookup": lookup}


def parse_logprobs(body: dict, chat: bool) -> int:
    """How many alternatives per token to report (0: no logprobs)."""
    what = f"an integer in [0, {MAX_LOGPROBS}]"
    if not chat:
        return typed(body, "logprobs", int, 0, lambda v: 0 <= v <= MAX_LOGPROBS, what)
    top = typed(body, "top_logprobs", int, 0, lambda v: 0 <= v <= MAX_LOGPROBS, what)
    if typed(body, "logprobs", bool, False, what="a boolean"):
        return max(top, 1)
    if top:
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return 0


def fit_to_context(prompt_tokens: int, requested: Optional[int], limits: Limits) -> int:
    """max_tokens for this prompt: the client's, checked; or the default, shrunk to the room left."""
    param = "messages"
    if limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
        raise RequestError(
            f"the prompt has {prompt_tokens} tokens; this server takes at most {limits.max_prompt_tokens} (--max-prompt-tokens)",
            param=param,
            code="context_length_exceeded",
        )
    if requested is None:
        requested = answer_budget(prompt_tokens, min(DEFAULT_MAX_TOKENS, limits.max_tokens_limit), limits.context_length)
    if limits.context_length is not None and prompt_tokens + requested > limits.context_length:
        raise RequestError(
            f"this model's maximum context length is {limits.context_length} tokens, but {prompt_tokens + requested} were "
            f"requested ({prompt_tokens} in the prompt, {requested} for the completion); shorten the prompt or lower max_tokens",
            param=param,
            code="context_length_exceeded",
        )
    return requested


# --------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------


def _message(message: Any, index: int) -> Dict[str, str]:
    if not isinstance(message, dict):
        raise RequestError(f"messages[{index}] must be an object", param="messages")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise RequestError(f"messages[{index}].role must be a non-empty string", param="messages")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(f"messages[{index}].content: only text parts are supported", param="messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{index}].content must be a string", param="messages")
    return {"role": role, "content": content}


def chat_prompt(body: dict, tokenizer: Tokenizer) -> List[int]:
    """Token ids of the conversation: structure from the template, contents as plain text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    try:
        return tokenizer.encode_chat([_message(m, i) for i, m in enumerate(messages)], add_generation_prompt=True)
    except ElmError as e:
        raise RequestError(str(e), param="messages") from None


def completion_prompt(body: dict, tokenizer: Tokenizer) -> List[int]:
    """A raw prompt: text (special-token strings in it count, as in a completion API they should), or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("'prompt' is empty", param="prompt")
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not all(0 <= t < tokenizer.vocab_size for t in prompt):
            raise RequestError("'prompt' holds token ids outside the vocabulary", param="prompt")
        return list(prompt)
    raise RequestError("'prompt' must be a non-empty string, a list of one string, or a list of token ids", param="prompt")
