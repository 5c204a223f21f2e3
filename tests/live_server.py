"""A Starlette app served by uvicorn on a free loopback port, in a thread: for tests that need real HTTP."""

import contextlib
import http.client
import json
import socket
import threading
import time

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """Yields the port; stops the server on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        assert thread.is_alive(), "server thread died"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def request(port: int, method: str, path: str, body=None, headers=None, timeout: float = 60):
    """(status, headers as a lower-case dict, body parsed as JSON when it is JSON) with exactly the headers given
    (a Host header in `headers` replaces the default one)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        found = {k.lower(): v for k, v in response.getheaders()}
        if found.get("content-type", "").startswith("application/json") and raw:
            return response.status, found, json.loads(raw)
        return response.status, found, raw
    finally:
        connection.close()
