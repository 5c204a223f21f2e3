"""Who may talk to the server through a browser: Host and Origin checks, CORS, and security headers.

A model served on 127.0.0.1 is still reachable from any web page the user
opens: the page's script can POST to http://127.0.0.1:8080 (a "simple"
text/plain POST needs no CORS preflight, and the server would run it even
though the page cannot read the answer). So:

- a request whose Origin header names another site is refused with 403
  unless `--cors-origin` lists that origin; CORS preflights are answered only
  for listed origins;
- a request without Origin that the browser marks as cross-site
  (Sec-Fetch-Site) is refused too, unless it is a top-level navigation;
- DNS rebinding (a hostile name that resolves to 127.0.0.1, making the page
  "same-origin") is stopped by the Host check: only IP literals, localhost,
  the --host name and names given with --allow-host are answered;
- every response carries a strict Content-Security-Policy, nosniff and
  no-framing headers. Clients that are not browsers send no Origin and are
  unaffected.
"""

import argparse
import ipaddress
import json
from dataclasses import dataclass, field
from typing import FrozenSet, Iterable, Optional, Tuple
from urllib.parse import urlsplit

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_origin(text: str) -> str:
    """An origin as browsers send it (scheme://host[:port], lower case, default port left out); ValueError if not one."""
    if text.strip() == "*":
        raise ValueError("'*' would let every web site you visit use the model; name each origin (like http://localhost:5173)")
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"{text[:100]!r} is not an origin like http://localhost:5173") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.username or parts.password:
        raise ValueError(f"{text[:100]!r} is not an origin like http://localhost:5173 (scheme http or https, a host)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{text[:100]!r} is not an origin: leave out the path (like http://localhost:5173)")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != DEFAULT_PORTS[parts.scheme] else "")


def _split_host(value: str) -> Tuple[str, Optional[int]]:
    """A Host header's name (lower case, IPv6 without brackets) and port (None when absent); ValueError if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
        if rest and port is None:
            raise ValueError(value)
    else:
        name, colon, port = value.partition(":")
        port = port if colon else None
    if not name or (port is not None and not (port.isdigit() and len(port) <= 5)):
        raise ValueError(value)
    return name, int(port) if port is not None else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def host_name(text: str) -> str:
    """A --allow-host value: a host name without scheme or port, lower case."""
    name = text.strip().lower().rstrip(".")
    if not name or any(c in name for c in "/:@ \t[]") or len(name) > 253:
        raise ValueError(f"{text[:100]!r} is not a host name (give the name alone, like mybox.local)")
    return name


@dataclass(frozen=True)
class WebPolicy:
    """The origins allowed to use the API from a browser, and the Host names the server answers to.

    IP literals, localhost and *.localhost are always answered: a rebinding attack needs a DNS name it controls.
    """

    cors_origins: FrozenSet[str] = field(default_factory=frozenset)
    hosts: FrozenSet[str] = field(default_factory=frozenset)

    @classmethod
    def make(cls, cors_origins: Iterable[str] = (), hosts: Iterable[str] = ()) -> "WebPolicy":
        return cls(frozenset(parse_origin(o) for o in cors_origins), frozenset(host_name(h) for h in hosts if h and not _is_ip(h)))

    def host_allowed(self, name: str) -> bool:
        name = name.rstrip(".")
        return _is_ip(name) or name == "localhost" or name.endswith(".localhost") or name in self.hosts


def _error(message: str, status: int = 403, code: str = "forbidden") -> Tuple[int, bytes]:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return status, json.dumps(body).encode()


class OriginGuard:
    """ASGI middleware applying a WebPolicy to every HTTP request and adding the security headers to every response."""

    def __init__(self, app, policy: WebPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        refusal, extra = self.check(scope["method"], headers)
        if refusal is not None:
            status, body = refusal
            return await self._respond(send, status, body, extra)
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers and "origin" in headers:
            return await self._respond(send, 204, b"", extra)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS, *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def check(self, method: str, headers: dict):
        """(refusal, extra headers): refusal is (status, body) or None; extra are the CORS headers for an allowed origin."""
        host = headers.get("host")
        if host is not None:
            try:
                name, port = _split_host(host)
            except ValueError:
                return _error(f"malformed Host header {host[:100]!r}", 400, "bad_host"), []
            if not self.policy.host_allowed(name):
                return _error(
                    f"this server does not answer to the host name {name[:100]!r} (a guard against DNS rebinding); "
                    f"start it with --allow-host {name[:100]} if that name is yours",
                    code="host_not_allowed",
                ), []
        origin = headers.get("origin")
        if origin is None:
            site, mode = headers.get("sec-fetch-site"), headers.get("sec-fetch-mode")
            if site in ("cross-site", "same-site") and mode != "navigate":
                return _error("cross-site requests to this server are refused"), []
            return None, []
        try:
            origin = parse_origin(origin)
        except ValueError:
            origin = None  # "null" (sandboxed frames, files) and anything odd: never allowed
        if origin is not None and origin in self.policy.cors_origins:
            return None, self._cors_headers(origin, method, headers)
        if origin is not None and host is not None and self._same_origin(origin, host):
            return None, []
        shown = headers["origin"][:100]
        advice = f"; start the server with --cors-origin {origin} to allow that page" if origin else " (not an origin that can be allowed)"
        return _error(f"requests from the web origin {shown!r} are refused{advice}", code="origin_not_allowed"), []

    @staticmethod
    def _same_origin(origin: str, host: str) -> bool:
        parts = urlsplit(origin)
        name, port = _split_host(host)
        return parts.hostname == name and (parts.port or DEFAULT_PORTS[parts.scheme]) == (port or DEFAULT_PORTS[parts.scheme])

    @staticmethod
    def _cors_headers(origin: str, method: str, headers: dict) -> list:
        extra = [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
        if method == "OPTIONS" and "access-control-request-method" in headers:
            requested = headers.get("access-control-request-headers", "")
            allowed = ", ".join(h.strip() for h in requested.split(",") if h.strip().replace("-", "").isalnum())[:2000]
            extra += [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", (allowed or "content-type").encode()),
                (b"access-control-max-age", b"600"),
            ]
            if headers.get("access-control-request-private-network") == "true":
                extra.append((b"access-control-allow-private-network", b"true"))
        return extra

    @staticmethod
    async def _respond(send, status: int, body: bytes, extra: list) -> None:
        headers = [*SECURITY_HEADERS, *extra, (b"content-length", str(len(body)).encode())]
        if body:
            headers.append((b"content-type", b"application/json"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def argparse_type(parse):
    """An argparse type from a parser that raises ValueError with a one-line reason."""

    def convert(text: str) -> str:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = parse.__name__
    return convert
