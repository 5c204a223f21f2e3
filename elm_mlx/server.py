"""An OpenAI-compatible HTTP server.

python -m elm_mlx.server --model DIR_OR_REPO [--host 127.0.0.1] [--port 8080]

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with
"stream": true as server-sent events ending in [DONE]), GET /v1/models,
GET /health. HTTP is Starlette on uvicorn; this module only maps requests to
elm_mlx generation.

One model runs one generation at a time: requests wait in arrival order in a
queue served by a single worker thread, so concurrent clients never share
model state. A client that disconnects mid-stream has its generation stopped
at the next token. The worker keeps the KV cache of the last conversation
(PromptCache): a request that resends that history only computes its new
tokens; `usage.prompt_tokens_details.cached_tokens` reports how many were
reused.
"""

import asyncio
import collections
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlx.core as mx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .cache import PromptCache
from .errors import ElmError
from .generation import GenerationResponse, stream_generate
from .sample import SamplingParams
from .tokenizer import Tokenizer

MAX_BODY_BYTES = 1 << 20
MAX_LOGPROBS = 20


class RequestError(Exception):
    """A 4xx answer in OpenAI's error shape."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def error_response(message: str, status: int, kind: str = "invalid_request_error", param: Optional[str] = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


# --------------------------------------------------------------------------
# Request parsing
# --------------------------------------------------------------------------


def _typed(body: dict, name: str, kinds, default=None, check=None, what: str = ""):
    """body[name] if present and of the right JSON type (bool is not a number), else default."""
    if name not in body or body[name] is None:
        return default
    value = body[name]
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)))
    if not ok or (check is not None and not check(value)):
        raise RequestError(f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name)
    return value


@dataclass
class Job:
    """One generation request, as the worker needs it."""

    prompt_ids: List[int]
    max_tokens: int
    sampling: SamplingParams
    stop: List[str]
    seed: Optional[int]
    top_logprobs: int
    emit: Any = None  # called from the worker thread with each GenerationResponse, then None
    cancelled: threading.Event = field(default_factory=threading.Event)


def parse_common(body: dict, max_tokens_limit: int) -> Dict[str, Any]:
    number = (int, float)
    defaults = SamplingParams()
    max_tokens = _typed(
        body, "max_completion_tokens", int, None, lambda v: 1 <= v <= max_tokens_limit, f"an integer in [1, {max_tokens_limit}]"
    )
    if max_tokens is None:
        max_tokens = _typed(body, "max_tokens", int, 256, lambda v: 1 <= v <= max_tokens_limit, f"an integer in [1, {max_tokens_limit}]")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of at most 16 strings", param="stop")
    if _typed(body, "n", int, 1) != 1:
        raise RequestError("only n = 1 is supported", param="n")
    _typed(body, "stream", bool, False, what="a boolean")
    _typed(body, "model", str, None, what="a string")
    _typed(body, "stream_options", dict, None, what="an object")
    for unsupported in ("presence_penalty", "frequency_penalty"):
        _typed(body, unsupported, number, 0, lambda v: v == 0, "0 (use repetition_penalty)")
    try:
        sampling = SamplingParams(
            temp=_typed(body, "temperature", number, defaults.temp, lambda v: 0 <= v <= 2, "a number in [0, 2]"),
            top_p=_typed(body, "top_p", number, defaults.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]"),
            top_k=_typed(body, "top_k", int, defaults.top_k, lambda v: v >= 0, "an integer >= 0"),
            min_p=_typed(body, "min_p", number, defaults.min_p, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
            repetition_penalty=_typed(
                body, "repetition_penalty", number, defaults.repetition_penalty, lambda v: v > 0, "a positive number"
            ),
        )
    except ElmError as e:
        raise RequestError(str(e)) from None
    seed = _typed(body, "seed", int, None, what="an integer")
    return dict(max_tokens=max_tokens, sampling=sampling, stop=stop, seed=seed)


def _message_text(message: Any, index: int) -> Dict[str, str]:
    if not isinstance(message, dict):
        raise RequestError(f"messages[{index}] must be an object", param="messages")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(f"messages[{index}].content: only text parts are supported", param="messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"messages[{index}].content must be a string", param="messages")
    return {"role": message.get("role"), "content": content}


def chat_prompt(body: dict, tokenizer: Tokenizer) -> List[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    try:
        text = tokenizer.apply_chat_template([_message_text(m, i) for i, m in enumerate(messages)], add_generation_prompt=True)
    except ElmError as e:
        raise RequestError(str(e), param="messages") from None
    return tokenizer.encode(text)


def completion_prompt(body: dict, tokenizer: Tokenizer) -> List[int]:
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


# --------------------------------------------------------------------------
# The worker: one generation at a time
# --------------------------------------------------------------------------


class Engine:
    def __init__(self, model, tokenizer: Tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.prompt_cache = PromptCache(model)
        self.jobs: "queue.Queue[Job]" = queue.Queue()
        self.created = int(time.time())
        self.finished: "collections.deque[dict]" = collections.deque(maxlen=64)  # recent jobs, for /health and tests
        self._thread = threading.Thread(target=self._serve, name="elm-mlx-generation", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if not job.cancelled.is_set():
                    self._run(job)
            except Exception as e:  # a bug must not kill the worker: report it to this client only
                job.emit(e)
            finally:
                job.emit(None)

    def _run(self, job: Job) -> None:
        last = None
        responses = stream_generate(
            self.model,
            self.tokenizer,
            job.prompt_ids,
            max_tokens=job.max_tokens,
            sampling=job.sampling,
            stop=job.stop,
            seed=job.seed,
            prompt_cache=self.prompt_cache,
        )
        try:
            for response in responses:
                if job.cancelled.is_set():
                    break
                last = response
                if job.top_logprobs and response.logprobs is not None:
                    response.logprobs = _top_logprobs(response.logprobs, response.token, job.top_logprobs)
                else:
                    response.logprobs = None
                job.emit(response)
        finally:
            responses.close()
            self.finished.append(
                {
                    "prompt_tokens": len(job.prompt_ids),
                    "generated_tokens": last.generation_tokens if last else 0,
                    "cached_tokens": last.prompt_cached_tokens if last else 0,
                    "cancelled": job.cancelled.is_set(),
                }
            )

    async def run(self, job: Job):
        """Queue the job; yield its responses as the worker produces them (an exception re-raises)."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        job.emit = lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item)
        self.jobs.put(job)
        try:
            while True:
                item = await inbox.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            job.cancelled.set()  # the client went away (or we are done): stop generating for it


def _top_logprobs(logprobs: mx.array, token: int, k: int) -> dict:
    """The chosen token's log-probability and the k most likely alternatives."""
    top = mx.argpartition(-logprobs, k - 1)[:k] if k < logprobs.size else mx.arange(logprobs.size)
    values = logprobs[top]
    order = mx.argsort(-values)
    return {
        "token": token,
        "logprob": logprobs[token].item(),
        "top": list(zip(top[order].tolist(), values[order].tolist())),
    }


# --------------------------------------------------------------------------
# Response shapes
# --------------------------------------------------------------------------


def _usage(last: GenerationResponse) -> dict:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.generation_tokens,
        "total_tokens": last.prompt_tokens + last.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": last.prompt_cached_tokens},
    }


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


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------


async def read_json(request: Request) -> dict:
    """The body as a JSON object. An oversized body is read to its end (up to a point) before the 413,
    so that the client gets the error instead of a broken pipe."""
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            body += chunk
        elif size > 16 * MAX_BODY_BYTES:
            break
    if size > MAX_BODY_BYTES:
        raise RequestError(f"request body over {MAX_BODY_BYTES} bytes", status=413)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    return data


def make_app(engine: Engine, max_tokens_limit: int = 4096) -> Starlette:
    async def completions(request: Request, chat: bool):
        body = await read_json(request)
        common = parse_common(body, max_tokens_limit)
        prompt_ids = chat_prompt(body, engine.tokenizer) if chat else completion_prompt(body, engine.tokenizer)
        if chat:
            logprobs = _typed(body, "top_logprobs", int, 0, lambda v: 0 <= v <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]")
            if _typed(body, "logprobs", bool, False, what="a boolean"):
                logprobs = max(logprobs, 1)
            elif logprobs:
                raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        else:
            logprobs = _typed(body, "logprobs", int, 0, lambda v: 0 <= v <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]")
        job = Job(prompt_ids=prompt_ids, top_logprobs=logprobs, **common)
        fmt = Formatter(chat, engine, logprobs)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_events(engine, job, fmt, include_usage), media_type="text/event-stream")
        responses = [r async for r in engine.run(job)]
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
        return JSONResponse({"status": "ok", "model": engine.name, "queued": engine.jobs.qsize()})

    async def on_request_error(request: Request, exc: RequestError):
        return error_response(str(exc), exc.status, exc.kind, exc.param)

    async def on_http_error(request: Request, exc: HTTPException):
        return error_response(exc.detail, exc.status_code, "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    async def on_disconnect(request: Request, exc: ClientDisconnect):
        return error_response("client disconnected", 400)

    async def on_error(request: Request, exc: Exception):
        return error_response(f"internal error: {type(exc).__name__}: {exc}", 500, "server_error")

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", text_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    handlers = {RequestError: on_request_error, HTTPException: on_http_error, ClientDisconnect: on_disconnect, Exception: on_error}
    return Starlette(routes=routes, exception_handlers=handlers)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _events(engine: Engine, job: Job, fmt: Formatter, include_usage: bool):
    """Server-sent events: a first chunk naming the role (chat), text chunks, a finish chunk, [DONE]."""
    first = True
    last = None
    try:
        async for r in engine.run(job):
            last = r
            if r.finish_reason is None and not r.text and r.logprobs is None:
                continue  # nothing to say yet (a held-back stop prefix or a partial character)
            yield _sse(fmt.envelope([fmt.choice(r.text, r.finish_reason, [r], delta=True, first=first)], chunk=True))
            first = False
    except Exception as e:  # headers are sent: report in-band, as OpenAI does
        yield _sse({"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error", "param": None, "code": None}})
        return
    if include_usage and last is not None:
        yield _sse({**fmt.envelope([], chunk=True), "usage": _usage(last)})
    yield "data: [DONE]\n\n"


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser():
    from .cli import ArgumentParser
    from .load import DTYPES
    from .quantize import BITS

    p = ArgumentParser(prog="python -m elm_mlx.server", description="Serve a model behind an OpenAI-compatible HTTP API.")
    p.add_argument("--model", required=True, help="model directory or Hugging Face repo id")
    p.add_argument("--adapter-path", help="apply fine-tuned adapters from this directory")
    p.add_argument("--dtype", choices=list(DTYPES), help="convert the weights to this dtype first (cached)")
    p.add_argument("--q-bits", type=int, choices=BITS, help="quantize to this many bits first (cached)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="(default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for (default: %(default)s)")
    return p


def main(argv=None) -> None:
    import uvicorn

    from .load import load

    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise ElmError(f"--port must be in 1-65535, got {args.port}")
    model, tokenizer = load(args.model, dtype=args.dtype, q_bits=args.q_bits, adapter_path=args.adapter_path)
    local = Path(args.model).expanduser()
    name = local.resolve().name if local.exists() else args.model  # what /v1/models lists

    app = make_app(Engine(model, tokenizer, name), args.max_tokens_limit)
    print(f"serving {name} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    except OSError as e:  # port taken, address not available
        raise ElmError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(main)
