"""HTTP: the Starlette app mapping OpenAI's endpoints onto the engine, and OpenAI's response shapes."""

import asyncio
import json
import time
import uuid
from typing import Any, Dict, List, Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..constrain import ConstraintError, model_vocab
from ..generation import GenerationResponse
from .engine import Engine, Job
from .origins import OriginGuard, WebPolicy
from .schemas import (
    Limits,
    RequestError,
    chat_prompt,
    completion_prompt,
    fit_to_context,
    parse_body,
    parse_common,
    parse_logprobs,
    parse_speculative,
    requested_max_tokens,
    typed,
)
from .structured import PARAM as RESPONSE_FORMAT
from .structured import compile_for_request, parse_response_format
from .web import page_routes

BODY_TIMEOUT_S = 30.0  # a body that trickles in slower than this is dropped (408)


def error_response(
    message: str, status: int, kind: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


async def read_json(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object. An oversized body is read on (up to a point) before the 413,
    so that the client gets the error instead of a broken pipe."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 16 * max_bytes:
        raise RequestError(f"request body over {max_bytes} bytes", status=413)
    body, size = bytearray(), 0

    async def receive() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size <= max_bytes:
                body.extend(chunk)
            elif size > 16 * max_bytes:
                return

    try:
        await asyncio.wait_for(receive(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s", status=408) from None
    if size > max_bytes:
        raise RequestError(f"request body over {max_bytes} bytes", status=413)
    return parse_body(bytes(body))


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """For answers sent in one piece: notice the client leaving while the worker computes.
    (A streamed answer notices by failing to send.)"""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancelled.set()
            return


def _usage(last: GenerationResponse) -> dict:
    usage = {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.generation_tokens,
        "total_tokens": last.prompt_tokens + last.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": last.prompt_cached_tokens},
    }
    if last.target_passes:  # speculative decoding: OpenAI's names for predicted tokens, and ours
        rejected = last.draft_tokens - last.accepted_tokens
        usage["completion_tokens_details"] = {"accepted_prediction_tokens": last.accepted_tokens, "rejected_prediction_tokens": rejected}
        usage["speculative"] = {
            "draft_tokens": last.draft_tokens,
            "accepted_tokens": last.accepted_tokens,
            "target_passes": last.target_passes,
            "acceptance_rate": round(last.acceptance_rate, 4),
            "tokens_per_pass": round(last.tokens_per_pass, 4),
        }
    return usage


class Formatter:
    """Turns generation responses into OpenAI's chat or text-completion JSON."""

    def __init__(self, chat: bool, engine: Engine, logprobs: int):
        self.chat, self.engine, self.logprobs = chat, engine, logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.offset = 0  # text offset, for completions' logprobs

    def _token_text(self, token: int) -> str:
        return (
            self.engine.tokenizer.token_bytes[token].decode("utf-8", errors="replace") if token < self.engine.tokenizer.vocab_size else ""
        )

    def logprob_entries(self, responses: List[GenerationResponse]) -> Optional[dict]:
        if not self.logprobs:
            return None
        entries = [r.logprobs for r in responses if r.logprobs is not None]
        if not entries:
            return None
        if self.chat:
            return {
                "content": [
                    {
                        "token": self._token_text(e["token"]),
                        "logprob": e["logprob"],
                        "bytes": list(self.engine.tokenizer.token_bytes[e["token"]]),
                        "top_logprobs": [
                            {"token": self._token_text(t), "logprob": lp, "bytes": list(self.engine.tokenizer.token_bytes[t])}
                            for t, lp in e["top"]
                        ],
                    }
                    for e in entries
                ]
            }
        tokens = [self._token_text(e["token"]) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{self._token_text(t): lp for t, lp in e["top"]} for e in entries],
            "text_offset": offsets,
        }

    def choice(self, text: str, finish: Optional[str], responses: List[GenerationResponse], delta: bool, first: bool = False) -> dict:
        choice: Dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": self.logprob_entries(responses)}
        if not self.chat:
            choice["text"] = text
        elif delta:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return choice

    def envelope(self, choices: list, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.engine.name, "choices": choices}


def _check_model(body: dict, engine: Engine) -> None:
    """Requests may leave `model` out; one that names a model must name the one served (as OpenAI answers 404)."""
    name = typed(body, "model", str, None, what="a string")
    if name is not None and name not in engine.aliases:
        raise RequestError(
            f"the model {name[:100]!r} does not exist here; this server serves {engine.name!r} (see /v1/models)",
            param="model",
            status=404,
            code="model_not_found",
        )


def make_app(engine: Engine, max_tokens_limit: int = 4096, limits: Optional[Limits] = None, web: Optional[WebPolicy] = None) -> Starlette:
    """The app; `web` says which browser origins and Host names are accepted (default: same-origin and loopback names only)."""
    limits = limits or Limits(max_tokens_limit=max_tokens_limit, context_length=engine.context_length)

    async def completions(request: Request, chat: bool):
        body = await read_json(request, limits.max_body_bytes)
        _check_model(body, engine)
        common = parse_common(body, limits.sampling)
        requested = requested_max_tokens(body, limits.max_tokens_limit)
        logprobs = parse_logprobs(body, chat)
        speculative = parse_speculative(body, engine.speculation_refused)
        constraint = parse_response_format(body)
        if constraint is not None and speculative:
            raise RequestError("'response_format' does not combine with 'prompt_lookup' (speculative decoding) yet", param="prompt_lookup")
        # Rendering and tokenizing a 1 MiB body takes ~0.5 s: in a worker thread, so other connections go on
        # (sentencepiece releases the GIL while it encodes; the tokenizers library's encode does not).
        prompt_ids = await run_in_threadpool(chat_prompt if chat else completion_prompt, body, engine.tokenizer)
        max_tokens = fit_to_context(len(prompt_ids), requested, limits)
        if constraint is not None:  # compiled here (a large grammar takes a while), so a bad one is a 400 before the queue
            constraint = await run_in_threadpool(_compiled, constraint, engine)
        job = Job(
            prompt_ids=prompt_ids, max_tokens=max_tokens, top_logprobs=logprobs, speculative=speculative, constraint=constraint, **common
        )
        fmt = Formatter(chat, engine, logprobs)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_events(engine, job, fmt, include_usage), media_type="text/event-stream")
        watcher = asyncio.ensure_future(_cancel_on_disconnect(request, job))
        try:
            responses = [r async for r in engine.run(job)]
        finally:
            watcher.cancel()
        if job.cancelled.is_set() and not responses:
            return error_response("client disconnected", 400)  # nobody reads it
        last = responses[-1]
        text = "".join(r.text for r in responses)
        result = fmt.envelope([fmt.choice(text, last.finish_reason, responses, delta=False)], chunk=False)
        result["usage"] = _usage(last)
        return JSONResponse(result)

    async def chat_completions(request: Request):
        return await completions(request, chat=True)

    async def text_completions(request: Request):
        return await completions(request, chat=False)

    async def models(request: Request):
        return JSONResponse(
            {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created, "owned_by": "elm-mlx"}]}
        )

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": engine.name, **engine.status()})

    async def on_request_error(request: Request, exc: RequestError):
        return error_response(str(exc), exc.status, exc.kind, exc.param, exc.code)

    async def on_http_error(request: Request, exc: HTTPException):
        return error_response(exc.detail, exc.status_code, "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    async def on_constraint_error(request: Request, exc: ConstraintError):  # the matcher failed mid-answer: 400, no partial text
        return error_response(str(exc), 400, param=RESPONSE_FORMAT)

    async def on_disconnect(request: Request, exc: ClientDisconnect):
        return error_response("client disconnected", 400)

    async def on_error(request: Request, exc: Exception):
        return error_response(f"internal error: {type(exc).__name__}: {exc}", 500, "server_error")

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        *page_routes(),
    ]
    handlers = {
        RequestError: on_request_error,
        ConstraintError: on_constraint_error,
        HTTPException: on_http_error,
        ClientDisconnect: on_disconnect,
        Exception: on_error,
    }
    guard = Middleware(OriginGuard, policy=web or WebPolicy())
    return Starlette(routes=routes, exception_handlers=handlers, middleware=[guard])


def _compiled(constraint, engine: Engine):
    """The request's constraint compiled for the served model (a fresh matcher for its one sequence)."""
    return compile_for_request(constraint, engine.tokenizer, model_vocab(engine.model))


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, allow_nan=False)}\n\n"


async def _events(engine: Engine, job: Job, fmt: Formatter, include_usage: bool):
    """Server-sent events: a first chunk naming the role (chat), text chunks, a finish chunk, [DONE].

    A constraint that the matcher cannot follow mid-answer (llguidance's limits:
    a counted repetition like (x{1000}){1000} compiles, then its lexer gives up
    after the first token) is the client's error, as it is unstreamed (a 400,
    on_constraint_error): after the chunks already sent comes one error event,
    invalid_request_error with param response_format and the constraint's
    message, and no [DONE]. Both engines report it so (the batched one's
    finish_reason "error" becomes the same ConstraintError).
    """
    first = True
    last = None
    try:
        async for r in engine.run(job):
            last = r
            if r.finish_reason is None and not r.text and r.logprobs is None:
                continue  # nothing to say yet (a held-back stop prefix or a partial character)
            yield _sse(fmt.envelope([fmt.choice(r.text, r.finish_reason, [r], delta=True, first=first)], chunk=True))
            first = False
    except ConstraintError as e:  # the client's constraint failed mid-answer: its error, in-band (headers are sent)
        yield _sse({"error": {"message": str(e), "type": "invalid_request_error", "param": RESPONSE_FORMAT, "code": None}})
        return
    except Exception as e:  # headers are sent: report in-band, as OpenAI does
        yield _sse({"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error", "param": None, "code": None}})
        return
    if include_usage and last is not None:
        yield _sse({**fmt.envelope([], chunk=True), "usage": _usage(last)})
    yield "data: [DONE]\n\n"
