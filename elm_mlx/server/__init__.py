"""An OpenAI-compatible HTTP server.

python -m elm_mlx.server --model DIR_OR_REPO [--host 127.0.0.1] [--port 8080]

Endpoints: POST /v1/chat/completions, POST /v1/completions (both with
"stream": true as server-sent events ending in [DONE]), GET /v1/models,
GET /health. HTTP is Starlette on uvicorn. The package: `schemas` (requests
checked into jobs), `engine` (the one generation worker), `app` (endpoints
and response shapes), `connections` (timeouts and log throttling), and the
command line here.

Every limit a request meets is a flag: --max-tokens-limit, --max-prompt-tokens
(default: the model's context length), --max-body-bytes, --header-timeout,
--keep-alive-timeout. A request over the context length is refused with 400
`context_length_exceeded` before any work.
"""

import socket
import sys
from pathlib import Path

from ..errors import ElmError
from .app import make_app
from .engine import Engine, Job
from .schemas import Limits, RequestError

__all__ = ["Engine", "Job", "Limits", "RequestError", "make_app", "build_parser", "main"]


def build_parser():
    from ..cli import ArgumentParser
    from ..load import DTYPES
    from ..quantize import BITS

    p = ArgumentParser(prog="python -m elm_mlx.server", description="Serve a model behind an OpenAI-compatible HTTP API.")
    p.add_argument("--model", required=True, help="model directory or Hugging Face repo id")
    p.add_argument("--adapter-path", help="apply fine-tuned adapters from this directory")
    p.add_argument("--dtype", choices=list(DTYPES), help="convert the weights to this dtype first (cached)")
    p.add_argument("--q-bits", type=int, choices=BITS, help="quantize to this many bits first (cached)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="(default: %(default)s)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, help="most prompt tokens per request (default: the model's context length)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: %(default)s)")
    p.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per step; a client that leaves is noticed between steps (default: %(default)s)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a connection may take to send its request headers (default: %(default)s)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, help="seconds an idle keep-alive connection stays open (default: %(default)s)")
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


def _check_args(args) -> None:
    if not 0 < args.port < 65536:
        raise ElmError(f"--port must be in 1-65535, got {args.port}")
    for flag in ("max_tokens_limit", "max_prompt_tokens", "max_body_bytes", "prefill_step_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ElmError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    for flag in ("header_timeout", "keep_alive_timeout"):
        value = getattr(args, flag)
        if not 0 < value <= 3600:  # also refuses NaN
            raise ElmError(f"--{flag.replace('_', '-')} must be in (0, 3600] seconds, got {value}")


def main(argv=None) -> None:
    import uvicorn

    from ..load import load
    from .connections import protocol_with_header_timeout, raise_open_file_limit, throttle_logs

    args = build_parser().parse_args(argv)
    _check_args(args)
    check_port_free(args.host, args.port)
    model, tokenizer = load(args.model, dtype=args.dtype, q_bits=args.q_bits, adapter_path=args.adapter_path)
    local = Path(args.model).expanduser()
    name = local.resolve().name if local.exists() else args.model  # what /v1/models lists
    engine = Engine(model, tokenizer, name, aliases=[args.model], prefill_step_size=args.prefill_step_size)
    limits = Limits(
        max_tokens_limit=args.max_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens if args.max_prompt_tokens is not None else engine.context_length,
        context_length=engine.context_length,
        max_body_bytes=args.max_body_bytes,
    )
    raise_open_file_limit()
    throttle_logs()
    config = uvicorn.Config(
        make_app(engine, limits=limits),
        host=args.host,
        port=args.port,
        log_level="warning",
        http=protocol_with_header_timeout(args.header_timeout),
        timeout_keep_alive=args.keep_alive_timeout,
    )
    announce = f"serving {name} at http://{args.host}:{args.port}/v1"
    if engine.context_length:
        announce += f" (context {engine.context_length} tokens)"

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
