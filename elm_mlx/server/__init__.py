"""An OpenAI-compatible HTTP server.

python -m elm_mlx.server --model DIR_OR_REPO [--host 127.0.0.1] [--port 8080]

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with
"stream": true as server-sent events ending in [DONE]), GET /v1/models,
GET /health, and a chat page at / (`web`, files in static/). HTTP is Starlette on uvicorn. The package: `schemas` (requests
checked into jobs), `engine` (the worker that serves one request at a time),
`batched` (the worker that decodes up to --max-batch requests together, the
default), `app` (endpoints and response shapes), `origins` (which browser pages
and Host names may use the API: --cors-origin, --allow-host), `connections` (timeouts and
log throttling), and the command line here.

Every limit a request meets is a flag: --max-tokens-limit, --max-prompt-tokens
(default: the model's context length), --max-body-bytes, --header-timeout,
--keep-alive-timeout. A request over the context length is refused with 400
`context_length_exceeded` before any work.
"""

import socket
import sys
from pathlib import Path

from ..cache import PromptStore
from ..errors import ElmError
from .app import make_app
from .batched import BatchedEngine
from .engine import Engine, Job
from .origins import WebPolicy, argparse_type, host_name, parse_origin
from .schemas import Limits, RequestError

__all__ = ["Engine", "BatchedEngine", "Job", "Limits", "RequestError", "WebPolicy", "make_app", "build_parser", "main"]


def build_parser():
    from ..cli import ArgumentParser, float_in, int_at_least, positive_int
    from ..options import (
        DEFAULT_PREFILL_STEP,
        add_kv_options,
        add_model_options,
        add_sampling_options,
        add_speculative_options,
        add_verbose_option,
    )

    p = ArgumentParser(prog="python -m elm_mlx.server", description="Serve a model behind an OpenAI-compatible HTTP API.")
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int_at_least(1, 65535), default=8080, help="port to listen on (default: %(default)s)")
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        type=argparse_type(parse_origin),
        metavar="ORIGIN",
        help="a web origin (like http://localhost:5173) whose pages may use the API from a browser; repeatable "
        "(default: only the server's own chat page)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        type=argparse_type(host_name),
        metavar="NAME",
        help="a host name the server answers to besides IP addresses, localhost and --host (a guard against DNS rebinding); repeatable",
    )
    p.add_argument(
        "--max-batch",
        type=int_at_least(1, 256),
        default=8,
        help="requests decoded together in one forward pass; more wait in arrival order. 1 serves one at a time and "
        "keeps the last conversation's cache for the next request (default: %(default)s)",
    )
    p.add_argument(
        "--prompt-cache-bytes",
        type=int_at_least(0),
        default=None,
        help="with batching: bytes of keys and values kept of earlier prompts, for reuse by any request sharing a prefix "
        "(least recently used dropped first; 0 keeps none) (default: a quarter of this machine's memory, at most 2 GiB)",
    )
    limits = p.add_argument_group("limits", "what one request may ask; a request beyond them gets a 4xx")
    limits.add_argument(
        "--max-tokens-limit", type=positive_int, default=4096, help="largest max_tokens a request may ask for (default: %(default)s)"
    )
    limits.add_argument(
        "--max-prompt-tokens", type=positive_int, help="most prompt tokens per request (default: the model's context length)"
    )
    limits.add_argument("--max-body-bytes", type=positive_int, default=1 << 20, help="largest request body in bytes (default: %(default)s)")
    limits.add_argument(
        "--prefill-step-size",
        type=positive_int,
        default=DEFAULT_PREFILL_STEP,
        help="prompt tokens per step; a client that leaves is noticed between steps (default: %(default)s)",
    )
    limits.add_argument(
        "--header-timeout",
        type=float_in(0, 3600, low_open=True),
        default=10.0,
        help="seconds a connection may take to send its request headers (default: %(default)s)",
    )
    limits.add_argument(
        "--keep-alive-timeout",
        type=float_in(0, 3600, low_open=True),
        default=5.0,
        help="seconds an idle keep-alive connection stays open (default: %(default)s)",
    )
    add_kv_options(p)
    add_speculative_options(p, prompt_lookup=False)  # prompt lookup is per request ("prompt_lookup")
    add_sampling_options(p, seed=False, title="sampling defaults (for requests that leave the field out)")
    add_verbose_option(p, "print which model is used and conversion notes to stderr")
    return p


def check_port_free(host: str, port: int) -> None:
    """Fail before loading the model and before saying "serving" when the address cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ElmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as e:
            raise ElmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def web_policy(args) -> WebPolicy:
    """Browser pages allowed to use the API (--cors-origin) and the Host names answered (--host, --allow-host)."""
    return WebPolicy.make(args.cors_origin, [args.host, *args.allow_host])


def main(argv=None) -> None:
    import uvicorn

    from ..options import check_speculative_args, kv_from_args, load_from_args, sampling_from_args, speculative_from_args
    from .connections import protocol_with_header_timeout, raise_open_file_limit, throttle_logs

    args = build_parser().parse_args(argv)
    sampling = sampling_from_args(args)
    kv = kv_from_args(args)
    if kv is not None and kv.max_size is not None and args.max_batch > 1:
        raise ElmError("--max-kv-size needs --max-batch 1: a rotating window serves one request at a time (--kv-bits works with batching)")
    check_speculative_args(args)
    if args.draft_model is not None and args.max_batch > 1:
        raise ElmError("--draft-model needs --max-batch 1: speculative decoding serves one request at a time")
    check_port_free(args.host, args.port)
    if args.max_batch > 1:
        PromptStore(args.prompt_cache_bytes)  # refuses a size beyond this machine's memory before the model loads
    model_name, model, tokenizer = load_from_args(args, verbose=args.verbose)
    speculative = speculative_from_args(args, model, tokenizer, verbose=args.verbose)
    local = Path(model_name).expanduser()
    name = local.resolve().name if local.exists() else model_name  # what /v1/models lists
    if args.max_batch > 1:
        engine = BatchedEngine(
            model,
            tokenizer,
            name,
            [model_name],
            args.prefill_step_size,
            max_batch=args.max_batch,
            prompt_cache_bytes=args.prompt_cache_bytes,
            kv=kv,
        )
    else:
        engine = Engine(
            model, tokenizer, name, aliases=[model_name], prefill_step_size=args.prefill_step_size, kv=kv, speculative=speculative
        )
    limits = Limits(
        max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens if args.max_prompt_tokens is not None else engine.context_length,
        context_length=engine.context_length,
        max_body_bytes=args.max_body_bytes,
        sampling=sampling,
    )
    raise_open_file_limit()
    throttle_logs()
    config = uvicorn.Config(
        make_app(engine, limits=limits, web=web_policy(args)),
        host=args.host,
        port=args.port,
        log_level="warning",
        http=protocol_with_header_timeout(args.header_timeout),
        timeout_keep_alive=args.keep_alive_timeout,
    )
    details = [f"context {engine.context_length} tokens"] if engine.context_length else []
    details.append(f"up to {args.max_batch} requests at once")
    if kv is not None and kv.bits is not None:
        details.append(f"keys and values in {kv.bits} bits")
    elif kv is not None and kv.max_size is not None:
        details.append(f"a {kv.max_size}-token KV window")
    if args.draft_model is not None:
        details.append(f"drafting with {args.draft_model}, {speculative['num_draft_tokens']} tokens a pass")
    url = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{args.port}"
    announce = f"serving {name} at {url}/v1 ({', '.join(details)}), chat page at {url}/"

    class AnnouncingServer(uvicorn.Server):
        """Says "serving" only once the socket is bound."""

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                print(f"{announce}; Ctrl-C stops", file=sys.stderr, flush=True)

    try:
        AnnouncingServer(config).run()
    except SystemExit:  # uvicorn's own exit on a bind failure (lost a race with check_port_free)
        raise ElmError(f"cannot listen on {args.host}:{args.port}") from None
