"""The chat page's serving and the browser-facing guard: headers, package data, Origin/CORS and Host checks.

Fast and without a browser (tests/test_web_browser.py drives the page itself). Requests go over real HTTP
to a uvicorn server on loopback, with the exact headers a browser (or an attacker's page) would send.
"""

import re
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

from elm_mlx.server import Engine, build_parser, make_app, web_policy  # noqa: E402
from elm_mlx.server.origins import WebPolicy  # noqa: E402
from elm_mlx.server.web import STATIC  # noqa: E402
from live_server import live_server, request  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = "http://localhost:5173"
CHAT = {"messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def engine(demo):
    model, tokenizer = demo
    return Engine(model, tokenizer, "demo")


@pytest.fixture(scope="module")
def default_port(engine):
    """A server as `serve` starts it without --cors-origin or --allow-host."""
    with live_server(make_app(engine, max_tokens_limit=64)) as port:
        yield port


@pytest.fixture(scope="module")
def open_port(engine):
    """A server started with --cors-origin http://localhost:5173 --allow-host mybox.local."""
    with live_server(make_app(engine, max_tokens_limit=64, web=WebPolicy.make([ALLOWED], ["mybox.local"]))) as port:
        yield port


def post(port, body=CHAT, **headers):
    headers.setdefault("Content-Type", "application/json")
    return request(port, "POST", "/v1/chat/completions", body, {k.replace("_", "-"): v for k, v in headers.items()})


def assert_refused(reply, code: str, status: int = 403):
    got, headers, body = reply
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == code, body
    assert "access-control-allow-origin" not in headers
    return body["error"]["message"]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.inline_script = [], False
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_script = True


def test_the_page_is_served_with_a_strict_policy(default_port):
    status, headers, body = request(default_port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    csp = dict(part.strip().split(" ", 1) for part in headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'self'" and csp["script-src"] == "'self'" and csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'" and csp["object-src"] == "'none'"
    assert "unsafe" not in headers["content-security-policy"] and "http" not in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
    # The page itself obeys that policy: scripts only from files, no inline handlers, no other origin.
    tags = _Tags()
    tags.feed(body.decode())
    assert not tags.inline_script
    scripts = [a.get("src") for t, a in tags.tags if t == "script"]
    assert scripts == ["/static/chat.js"]
    assert not [(t, k) for t, a in tags.tags for k in a if k.startswith("on") or k == "style"]
    assert not re.search(r"(src|href)=\"(https?:)?//", body.decode())
    status, headers, script = request(default_port, "GET", "/static/chat.js")
    assert status == 200 and "javascript" in headers["content-type"] and headers["x-content-type-options"] == "nosniff"
    assert b"innerHTML" not in script and b"insertAdjacentHTML" not in script and b"eval(" not in script
    # The API's answers carry the headers too; the static mount serves its own folder only.
    assert request(default_port, "GET", "/v1/models")[1]["x-frame-options"] == "DENY"
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/nothing.js"):
        status, _, body = request(default_port, "GET", path)
        assert status == 404, (path, body)


def test_the_page_is_package_data_and_complete():
    """Every file of static/ is matched by pyproject's package-data globs, and every file the page loads exists."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["elm_mlx"]
    files = sorted(p.relative_to(ROOT / "elm_mlx").as_posix() for p in STATIC.iterdir())
    assert files and all(any(fnmatch(f, g) for g in globs) for f in files), (files, globs)
    index = (STATIC / "index.html").read_text()
    loaded = re.findall(r'(?:src|href)="/static/([^"]+)"', index)
    for script in STATIC.glob("*.js"):
        loaded += re.findall(r'from "\./([^"]+)"', script.read_text())
    assert {"chat.js", "chat.css", "markdown.js"} <= set(loaded)
    assert all((STATIC / name).is_file() for name in loaded), loaded
    assert "markdown.js" not in index  # imported by chat.js, not loaded twice
    for script in STATIC.glob("*.js"):  # model text only becomes text nodes
        assert "innerHTML" not in script.read_text() and "outerHTML" not in script.read_text(), script


def test_a_foreign_page_cannot_drive_the_model(engine, default_port):
    """Without --cors-origin: a cross-site POST is refused before any work, including the CORS-"simple" text/plain
    POST a hostile page can send without a preflight, a foreign GET, a sandboxed frame's "null" origin, and a
    request the browser marks cross-site but sends without Origin."""
    jobs = len(engine.finished)
    message = assert_refused(post(default_port, Origin="https://evil.example", Content_Type="text/plain"), "origin_not_allowed")
    assert "'https://evil.example'" in message and "--cors-origin https://evil.example" in message
    assert_refused(post(default_port, Origin="https://evil.example"), "origin_not_allowed")
    message = assert_refused(post(default_port, Origin="null", Content_Type="text/plain"), "origin_not_allowed")
    assert "'null'" in message and "--cors-origin" not in message  # a sandboxed frame or a file: nothing to allow
    assert_refused(post(default_port, Origin=f"http://localhost:{default_port + 1}"), "origin_not_allowed")  # another port
    assert_refused(request(default_port, "GET", "/v1/models", headers={"Origin": "https://evil.example"}), "origin_not_allowed")
    cross_site = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Content-Type": "text/plain"}
    assert_refused(request(default_port, "POST", "/v1/completions", b'{"prompt": "a"}', cross_site), "forbidden")
    assert len(engine.finished) == jobs  # nothing ran
    # A preflight from a foreign origin gets no CORS grant.
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    assert_refused(request(default_port, "OPTIONS", "/v1/chat/completions", headers=preflight), "origin_not_allowed")
    # Clients that are not browsers send no Origin; the page's own requests are same-origin; a link from another
    # site still opens the page.
    assert post(default_port)[0] == 200
    assert post(default_port, Origin=f"http://127.0.0.1:{default_port}")[0] == 200
    assert post(default_port, Origin=f"http://localhost:{default_port}", Host=f"localhost:{default_port}")[0] == 200
    navigate = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert request(default_port, "GET", "/", headers=navigate)[0] == 200


def test_cors_origin_lets_that_page_in_and_no_other(open_port):
    status, headers, body = post(open_port, Origin=ALLOWED)
    assert status == 200 and body["choices"][0]["message"]["content"] is not None
    assert headers["access-control-allow-origin"] == ALLOWED and headers["vary"] == "Origin"
    status, headers, body = post(open_port, body={**CHAT, "stream": True}, Origin=ALLOWED, Content_Type="text/plain")
    assert status == 200 and body.endswith(b"data: [DONE]\n\n") and headers["access-control-allow-origin"] == ALLOWED
    preflight = {
        "Origin": ALLOWED,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization, x-stainless-os",
        "Access-Control-Request-Private-Network": "true",
    }
    status, headers, _ = request(open_port, "OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 204 and headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "content-type, authorization, x-stainless-os"
    assert headers["access-control-allow-private-network"] == "true"
    assert_refused(post(open_port, Origin="http://localhost:5174"), "origin_not_allowed")
    assert_refused(post(open_port, Origin="https://localhost:5173"), "origin_not_allowed")  # the scheme counts
    evil = {**preflight, "Origin": "https://evil.example"}
    assert_refused(request(open_port, "OPTIONS", "/v1/chat/completions", headers=evil), "origin_not_allowed")


def test_host_check_stops_dns_rebinding(default_port, open_port):
    """A rebinding page at http://evil.example:PORT (its name now resolving to 127.0.0.1) is same-origin with itself:
    only the Host header gives it away. IP literals and localhost names are always answered."""
    for port in (default_port, open_port):
        rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        message = assert_refused(post(port, **rebound), "host_not_allowed")
        assert "'evil.example'" in message and "--allow-host evil.example" in message
        assert_refused(request(port, "GET", "/", headers={"Host": f"evil.example:{port}"}), "host_not_allowed")
        for host in (f"localhost:{port}", f"[::1]:{port}", f"192.168.1.20:{port}", "app.localhost", "LOCALHOST."):
            assert request(port, "GET", "/v1/models", headers={"Host": host})[0] == 200, host
        assert_refused(request(port, "GET", "/v1/models", headers={"Host": "a:b:c"}), "bad_host", 400)
    assert_refused(request(default_port, "GET", "/", headers={"Host": "mybox.local:80"}), "host_not_allowed")
    assert request(open_port, "GET", "/", headers={"Host": "MyBox.local:80"})[0] == 200  # --allow-host mybox.local


def test_command_line_options():
    args = build_parser().parse_args(
        [
            "--cors-origin",
            "HTTP://LocalHost:5173/",
            "--cors-origin",
            "https://a.example:443",
            "--allow-host",
            "MyBox.Local",
            "--host",
            "box",
        ]
    )
    policy = web_policy(args)
    assert policy.cors_origins == {"http://localhost:5173", "https://a.example"}
    assert policy.hosts == {"mybox.local", "box"}
    assert web_policy(build_parser().parse_args([])) == WebPolicy()  # 127.0.0.1: nothing beyond IPs and localhost


@pytest.mark.parametrize(
    "option, value",
    [
        ("--cors-origin", "*"),
        ("--cors-origin", "localhost:5173"),
        ("--cors-origin", "http://a.example/app"),
        ("--cors-origin", "ftp://a.example"),
        ("--cors-origin", "http://a.example:99999"),
        ("--cors-origin", "null"),
        ("--allow-host", "http://mybox"),
        ("--allow-host", "mybox:8080"),
        ("--allow-host", ""),
    ],
)
def test_bad_options_are_one_line_errors(capsys, option, value):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args([option, value])
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert option in error and "Traceback" not in error, error
