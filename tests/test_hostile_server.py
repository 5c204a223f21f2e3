"""The server under hostile and oversized requests: context limits, cancellation, timeouts, JSON at the edges."""

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest

uvicorn = pytest.importorskip("uvicorn")

from conftest import random_weights, tiny_config, write_model_dir  # noqa: E402
from elm_mlx.demo import DEMO_DIR  # noqa: E402
from elm_mlx.load import load  # noqa: E402
from elm_mlx.server import Engine, Limits, make_app  # noqa: E402
from elm_mlx.server.connections import OncePerInterval, protocol_with_header_timeout  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _refuse(constant):
    raise AssertionError(f"the server wrote {constant}, which is not JSON")


def strict_json(text):
    """json.loads refusing NaN and Infinity (which Python's json writes and reads by default)."""
    return json.loads(text, parse_constant=_refuse)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """An app on a uvicorn thread in this process."""

    def __init__(self, engine: Engine, limits: Limits, header_timeout: float = 10.0):
        self.engine, self.port = engine, free_port()
        config = uvicorn.Config(
            make_app(engine, limits=limits),
            host="127.0.0.1",
            port=self.port,
            log_level="error",
            http=protocol_with_header_timeout(header_timeout),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    def post(self, path: str, body, timeout: float = 120):
        """(status, parsed JSON) for a POST; the body is sent as given when it is bytes."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(
                b"POST " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
            )
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        head, _, payload = raw.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        if b"text/event-stream" in head:
            return status, _events(payload)
        return status, strict_json(payload) if payload else None

    def get(self, path: str, timeout: float = 30):
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        head, _, payload = raw.partition(b"\r\n\r\n")
        return int(head.split()[1]), strict_json(payload)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def _events(payload: bytes) -> list:
    """The JSON events of a server-sent-event stream (chunked transfer encoding undone), strictly parsed."""
    body, rest = b"", payload
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        body, rest = body + rest[:n], rest[n + 2 :]
    lines = [line[len(b"data: ") :] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert lines and lines[-1] == b"[DONE]", body[-500:]
    return [strict_json(line) for line in lines[:-1]]


@pytest.fixture(scope="module")
def demo():
    """The bundled demo model (context 512) behind the app."""
    model, tokenizer = load(str(DEMO_DIR))
    engine = Engine(model, tokenizer, "demo")
    served = Served(engine, Limits(max_tokens_limit=2048, context_length=engine.context_length))
    yield served
    served.stop()


def test_a_prompt_over_the_context_gets_400_within_a_second(demo):
    assert demo.engine.context_length == 512
    words = "the king speak now " * 400  # about 1,600 tokens
    start = time.perf_counter()
    status, body = demo.post("/v1/completions", {"prompt": words, "max_tokens": 8})
    elapsed = time.perf_counter() - start
    assert status == 400 and elapsed < 1.0, (status, elapsed)
    error = body["error"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"
    prompt_tokens = len(demo.engine.tokenizer.encode(words))
    assert "512" in error["message"] and str(prompt_tokens) in error["message"]
    assert not [j for j in demo.engine.finished if j["prompt_tokens"] == prompt_tokens]  # no work was done

    status, body = demo.post("/v1/chat/completions", {"messages": [{"role": "user", "content": words}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def test_tokenizing_a_1_mib_prompt_does_not_stall_other_connections(demo):
    words = ("the king speak now thou art " * 40000)[: (1 << 20) - 100]  # ~0.5 s of tokenizing, ~240k tokens
    reply = {}
    big = threading.Thread(target=lambda: reply.update(r=demo.post("/v1/chat/completions", {"messages": [{"role": "user", "content": words}]})))
    start = time.perf_counter()
    big.start()
    latencies = []
    while big.is_alive():
        asked = time.perf_counter()
        status, body = demo.get("/health")
        latencies.append(time.perf_counter() - asked)
        assert status == 200 and body["status"] == "ok"
    big.join()
    status, body = reply["r"]
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert time.perf_counter() - start < 10
    assert len(latencies) >= 3 and max(latencies) < 0.3, latencies


def test_explicit_max_tokens_must_fit_and_the_default_shrinks_to_the_room_left(demo):
    prompt = list(range(3, 3 + 500))  # 500 token ids
    status, body = demo.post("/v1/completions", {"prompt": prompt, "max_tokens": 20})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded" and "520" in body["error"]["message"]
    status, body = demo.post("/v1/completions", {"prompt": prompt, "temperature": 0, "stop": None})
    assert status == 200, body
    usage = body["usage"]
    assert usage["prompt_tokens"] == 500 and usage["completion_tokens"] <= 12


@pytest.fixture(scope="module")
def no_eos(tmp_path_factory, tiny_sp_model):
    """A tiny model that can never end by itself: its final norm is zero, so every logit is 0 and greedy
    decoding always picks token 0 (argmax takes the first of equals), never the end-of-sequence token 2."""
    config = tiny_config(max_context_length=64)
    weights = random_weights(config)
    weights["transformer.norm.weight"] = mx.zeros_like(weights["transformer.norm.weight"])
    model, tokenizer = load(str(write_model_dir(tmp_path_factory.mktemp("noeos") / "OpenELM-no-eos", config, weights, tiny_sp_model)))
    engine = Engine(model, tokenizer, "no-eos")
    served = Served(engine, Limits(context_length=engine.context_length))
    yield served
    served.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_reaching_the_end_of_the_context_stops_with_length(no_eos, stream):
    prompt = list(range(3, 3 + 60))  # 4 tokens of room left in the 64-token context; no max_tokens
    status, body = no_eos.post("/v1/completions", {"prompt": prompt, "temperature": 0, "stream": stream, "logprobs": 3})
    assert status == 200, body
    if stream:
        assert [e["choices"][0]["finish_reason"] for e in body if e["choices"]] == [None] * 4 + ["length"]
        tokens = [t for e in body if e["choices"] and e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["tokens"]]
    else:
        choice = body["choices"][0]
        assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 4
        tokens = choice["logprobs"]["tokens"]
    assert len(tokens) == 4 and len(set(tokens)) == 1  # token 0 each time, never an end-of-sequence token


def test_max_tokens_reached_mid_answer_stops_with_length(no_eos):
    status, body = no_eos.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "the king"}], "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 3


def test_max_prompt_tokens_is_a_budget_of_its_own(demo):
    model, tokenizer = demo.engine.model, demo.engine.tokenizer
    engine = Engine(model, tokenizer, "demo")
    served = Served(engine, Limits(max_prompt_tokens=10, context_length=512))
    try:
        status, body = served.post("/v1/completions", {"prompt": list(range(3, 14)), "max_tokens": 1})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded" and "--max-prompt-tokens" in body["error"]["message"]
        status, body = served.post("/v1/completions", {"prompt": list(range(3, 13)), "max_tokens": 1})
        assert status == 200
    finally:
        served.stop()


def _nested(depth: int) -> bytes:
    return b'{"prompt": "x", "extra": ' + b"[" * depth + b"]" * depth + b"}"


HOSTILE_BODIES = {
    "lone surrogate in a message": b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
    "lone surrogate in a prompt": b'{"prompt": "\\udfff"}',
    "lone surrogate in a stop string": b'{"prompt": "the", "stop": ["\\ud83d"]}',
    "100k-deep nesting": _nested(100_000),
    "40-deep nesting": _nested(40),
    "NaN temperature": b'{"prompt": "the", "temperature": NaN}',
    "Infinity top_p": b'{"prompt": "the", "top_p": Infinity}',
    "1e999 min_p": b'{"prompt": "the", "min_p": 1e999}',
    "5000-digit max_tokens": b'{"prompt": "the", "max_tokens": ' + b"9" * 5000 + b"}",
    "seed -1": b'{"prompt": "the", "seed": -1}',
    "seed 2^64": b'{"prompt": "the", "seed": 18446744073709551616}',
    "seed as a float": b'{"prompt": "the", "seed": 1.5}',
    "max_tokens 0": b'{"prompt": "the", "max_tokens": 0}',
    "max_tokens over the limit": b'{"prompt": "the", "max_tokens": 4097}',
    "max_tokens true": b'{"prompt": "the", "max_tokens": true}',
    "invalid UTF-8": b'{"prompt": "\xff\xfe"}',
    "not an object": b"[1, 2, 3]",
    "truncated JSON": b'{"prompt": "the',
    "role not a string": b'{"messages": [{"role": 7, "content": "hi"}]}',
    "content an object": b'{"messages": [{"role": "user", "content": {"a": 1}}]}',
    "negative token id": b'{"prompt": [1, -5]}',
    "token id past the vocabulary": b'{"prompt": [1, 99999999999]}',
    "temperature a string": b'{"prompt": "the", "temperature": "hot"}',
    "repetition_penalty 0": b'{"prompt": "the", "repetition_penalty": 0}',
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_hostile_bodies_get_400_in_openais_shape(demo, name):
    path = "/v1/chat/completions" if b"messages" in HOSTILE_BODIES[name] else "/v1/completions"
    status, body = demo.post(path, HOSTILE_BODIES[name], timeout=30)
    assert status == 400, (status, body)
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["type"] == "invalid_request_error"
    assert "\n" not in body["error"]["message"] and len(body["error"]["message"]) < 400


def test_an_unknown_model_is_404_and_the_served_one_is_listed(demo):
    status, body = demo.post("/v1/completions", {"model": "gpt-4o", "prompt": "the", "max_tokens": 1})
    assert status == 404 and body["error"]["code"] == "model_not_found" and "demo" in body["error"]["message"]
    status, body = demo.post("/v1/completions", {"model": "demo", "prompt": "the", "max_tokens": 1})
    assert status == 200


def test_sampling_at_the_edges_behaves_as_its_limit_and_stays_valid_json(demo):
    base = {"prompt": "the king", "max_tokens": 8, "logprobs": 5}
    _, greedy = demo.post("/v1/completions", {**base, "temperature": 0})
    for edge in ({"temperature": 1e-40}, {"temperature": 5e-324}, {"temperature": 1.0, "top_p": 5e-324}):
        status, body = demo.post("/v1/completions", {**base, **edge, "seed": 7})
        assert status == 200 and body["choices"][0]["text"] == greedy["choices"][0]["text"], edge
    status, body = demo.post("/v1/completions", {**base, "temperature": 0, "repetition_penalty": 1e-300})
    assert status == 400 and "repetition_penalty" in body["error"]["message"]
    status, body = demo.post("/v1/completions", {**base, "temperature": 0, "repetition_penalty": 1e-3})
    assert status == 200  # demo.post parsed it strictly: no NaN or -Infinity anywhere
    for logprob in body["choices"][0]["logprobs"]["token_logprobs"]:
        assert logprob > -1e5


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("edge", [{"repetition_penalty": 1e-3}, {"top_k": 1}, {"min_p": 0.99}, {"top_p": 5e-324}, {"temperature": 5e-324}])
def test_logprobs_of_filtered_tokens_stay_finite_json(demo, edge, stream):
    """Tokens that top_k, min_p or top_p rule out have -inf log-probabilities; the server writes finite numbers."""
    chat = {"messages": [{"role": "user", "content": "the king"}], "logprobs": True, "top_logprobs": 20}
    for path, body in (("/v1/completions", {"prompt": "the king", "logprobs": 20}), ("/v1/chat/completions", chat)):
        status, reply = demo.post(path, {**body, **edge, "max_tokens": 4, "seed": 3, "stream": stream})  # parsed strictly
        assert status == 200, reply
        events = reply if stream else [reply]
        entries = [e["choices"][0]["logprobs"] for e in events if e["choices"] and e["choices"][0]["logprobs"]]
        assert entries
        for entry in entries:
            numbers = (
                [t["logprob"] for t in entry["content"]] + [a["logprob"] for t in entry["content"] for a in t["top_logprobs"]]
                if "content" in entry
                else entry["token_logprobs"] + [lp for top in entry["top_logprobs"] for lp in top.values()]
            )
            assert numbers and all(-1e6 < x <= 0 for x in numbers), numbers


def _big_context_engine(tmp_path_factory, tokenizer_model, prefill_step_size):
    """A tiny model with a long context, so that a prefill of many chunks takes seconds."""
    config = tiny_config(max_context_length=1 << 16)
    model_dir = write_model_dir(tmp_path_factory.mktemp("long") / "OpenELM-long", config, random_weights(config), tokenizer_model)
    model, tokenizer = load(str(model_dir))
    return Engine(model, tokenizer, "long", prefill_step_size=prefill_step_size)


STEP = 128  # prefill chunk: small, so that "within one chunk" is a tight bound


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_leaving_during_prefill_frees_the_worker_at_the_next_chunk(tmp_path_factory, tiny_sp_model, stream):
    engine = _big_context_engine(tmp_path_factory, tiny_sp_model, prefill_step_size=STEP)
    served = Served(engine, Limits(context_length=engine.context_length))
    try:
        prompt = [3 + (i * 7) % 300 for i in range(12_000)]  # about 18 s of prefill on 2 busy cores
        data = json.dumps({"prompt": prompt, "max_tokens": 4, "stream": stream}).encode()
        s = socket.create_connection(("127.0.0.1", served.port))
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data)
            + data
        )
        deadline = time.time() + 30
        while engine.prompt_cache.cache[0].offset < 4 * STEP:  # the worker is some chunks into the prefill
            assert time.time() < deadline
            time.sleep(0.02)
        s.close()
        at_disconnect = engine.prompt_cache.cache[0].offset
        status, body = served.post("/v1/completions", {"prompt": "the", "max_tokens": 2}, timeout=60)
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
        left = [j for j in engine.finished if j["prompt_tokens"] == len(prompt)]
        assert left and left[0]["cancelled"] and left[0]["generated_tokens"] == 0
        done = left[0]["cancelled_in_prefill_after"]
        # It stopped inside the prefill, at most one chunk after the one computing when the client left.
        assert done is not None and at_disconnect <= done <= at_disconnect + STEP, (at_disconnect, done)
    finally:
        served.stop()


def test_the_log_filter_lets_one_line_per_distinct_error_per_interval():
    now = [0.0]
    log_filter = OncePerInterval(interval=60, clock=lambda: now[0])

    def record(message, exc=None):
        r = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, (type(exc), exc, None) if exc else None)
        return r if log_filter.filter(r) else None

    first = record("socket.accept() out of system resource\nsocket: <socket fd=3>", OSError(24, "Too many open files"))
    assert first.getMessage() == "socket.accept() out of system resource: OSError: [Errno 24] Too many open files"
    assert first.exc_info is None
    assert all(
        record("socket.accept() out of system resource\nsocket: <socket fd=3>", OSError(24, "Too many open files")) is None
        for _ in range(10_000)
    )
    assert record("another error") is not None
    now[0] = 61.0
    again = record("socket.accept() out of system resource\nsocket: <socket fd=3>", OSError(24, "Too many open files"))
    assert "(and 10000 more like it in the last 60 s)" in again.getMessage()


# --------------------------------------------------------------------------
# The real command line, in a child process
# --------------------------------------------------------------------------


def _start_server(port: int, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "elm_mlx.server", "--model", str(DEMO_DIR), "--port", str(port), *flags],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the server did not start")


def test_idle_and_slow_connections_are_closed_and_the_server_still_answers():
    port = free_port()
    proc = _start_server(port, "--header-timeout", "1", "--keep-alive-timeout", "1")
    sockets = []
    try:
        _wait_listening(port, proc)
        for i in range(1000):
            s = socket.create_connection(("127.0.0.1", port))
            if i % 10 == 0:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n")  # headers never finished (slow loris)
            sockets.append(s)
        time.sleep(2.5)
        closed = 0
        for s in sockets:
            s.settimeout(5)
            try:
                closed += s.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == 1000
        request = json.dumps({"prompt": "the king", "max_tokens": 2}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(request)
                + request
            )
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200")
    finally:
        for s in sockets:
            s.close()
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert len(err.splitlines()) < 10, err  # no flood


def test_a_taken_port_is_one_line_and_serving_is_never_claimed():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = _start_server(port)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: cannot listen on 127.0.0.1:") and "Traceback" not in err
    assert "serving" not in out + err


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-tokens-limit", "0"],
        ["--max-prompt-tokens", "-1"],
        ["--max-body-bytes", "0"],
        ["--header-timeout", "nan"],
        ["--port", "70000"],
    ],
)
def test_bad_limits_are_refused_at_start_up_in_one_line(flags):
    proc = _start_server(free_port(), *flags)
    out, err = proc.communicate(timeout=60)
    # Usage errors, found by the parser before anything loads: exit 2, one line naming the flag.
    assert proc.returncode == 2 and len(err.strip().splitlines()) == 1 and f"argument {flags[0]}" in err, err
    assert "serving" not in out + err
