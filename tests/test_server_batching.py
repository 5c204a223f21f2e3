"""The server with continuous batching: concurrent requests decode together and each gets exactly what it gets alone."""

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

uvicorn = pytest.importorskip("uvicorn")

from conftest import PeakActive  # noqa: E402
from elm_mlx.server import BatchedEngine, Engine, make_app  # noqa: E402
from live_server import free_port, live_server  # noqa: E402

PROMPTS = [
    "ROMEO:",
    "JULIET:\nO Romeo, Romeo!",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "KING RICHARD III:\nNow is the winter",
    "HAMLET:",
    "MENENIUS:\nWhat work's, my countrymen, in hand? where go you\nWith bats and clubs?",
    "Second Servingman:",
    "DUKE VINCENTIO:\nOf government the properties to unfold,\nWould seem in me to affect speech and discourse;",
]


def serve(engine):
    """The app on a real socket in a thread; returns (base url, stop)."""
    stack = contextlib.ExitStack()
    port = stack.enter_context(live_server(make_app(engine, max_tokens_limit=512)))
    return f"http://127.0.0.1:{port}", stack.close


@pytest.fixture(scope="module")
def servers(demo):
    model, tokenizer = demo
    serial_url, stop_serial = serve(Engine(model, tokenizer, "demo"))
    batched_engine = BatchedEngine(model, tokenizer, "demo", max_batch=8, prefill_step_size=64)
    batched_url, stop_batched = serve(batched_engine)
    yield serial_url, batched_url, batched_engine
    stop_serial()
    stop_batched()


def complete(url, prompt, stream=False, **fields):
    """POST /v1/completions (stdlib only); the text, the finish reason, and the usage when not streamed."""
    body = json.dumps({"prompt": prompt, "max_tokens": 40, "temperature": 0, **fields, "stream": stream}).encode()
    request = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        assert reply.status == 200
        if not stream:
            answer = json.loads(reply.read())
            return answer["choices"][0]["text"], answer["choices"][0]["finish_reason"], answer["usage"]
        text, finish = "", None
        for raw in reply:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
        return text, finish, None


def health(url) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as reply:
        return json.loads(reply.read())


def test_eight_concurrent_requests_get_what_each_gets_alone(servers):
    serial, batched, engine = servers
    alone = [complete(serial, p, max_tokens=20 + 5 * i) for i, p in enumerate(PROMPTS)]
    with PeakActive(engine) as watch, ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda ip: complete(batched, ip[1], stream=ip[0] % 2 == 1, max_tokens=20 + 5 * ip[0]), enumerate(PROMPTS)))
    assert watch.peak >= 4, watch.peak  # this test must really batch
    for (text, finish, _), (got, got_finish, _) in zip(alone, together):
        assert got == text and got_finish == finish
    assert len({t for t, _, _ in alone}) == len(PROMPTS)  # recognisably different answers, so a mix-up would show
    assert engine.batch.active == 0 and engine.batch.kv_bytes() == 0  # every slot and its memory released


def test_a_seeded_sampled_request_is_the_same_alone_and_among_others(servers):
    serial, batched, _ = servers
    seeded = dict(temperature=0.9, seed=1234, max_tokens=30)
    alone = complete(batched, PROMPTS[0], **seeded)
    with ThreadPoolExecutor(8) as pool:
        others = [pool.submit(complete, batched, p, temperature=0.9, max_tokens=30) for p in PROMPTS[1:]]
        among = pool.submit(complete, batched, PROMPTS[0], **seeded).result()
        [f.result() for f in others]
    assert among[0] == alone[0]
    assert complete(serial, PROMPTS[0], **seeded)[0] == alone[0]  # the serial worker draws the same keys
    assert complete(batched, PROMPTS[0], **{**seeded, "seed": 4321})[0] != alone[0]  # the seed matters


def test_a_client_that_leaves_frees_its_slot_for_the_next_request(demo):
    model, tokenizer = demo
    engine = BatchedEngine(model, tokenizer, "demo", max_batch=1, prefill_step_size=64)
    url, stop = serve(engine)
    try:
        body = json.dumps({"prompt": "ROMEO:", "max_tokens": 400, "temperature": 0, "stream": True}).encode()
        s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        received = b""
        while received.count(b"data: ") < 3:  # tokens are streaming: the one slot is taken
            received += s.recv(4096)
        s.close()
        started = time.time()
        text, finish, _ = complete(url, "JULIET:", max_tokens=5)  # waits for the slot the leaver held
        assert finish in ("stop", "length") and time.time() - started < 30
        left = [f for f in engine.finished if f["cancelled"]]
        assert len(left) == 1 and left[0]["generated_tokens"] < 400, list(engine.finished)
    finally:
        stop()


def test_health_reports_active_and_queued_requests(demo):
    model, tokenizer = demo
    engine = BatchedEngine(model, tokenizer, "demo", max_batch=2, prefill_step_size=64)
    url, stop = serve(engine)
    try:
        with ThreadPoolExecutor(5) as pool:
            running = [pool.submit(complete, url, p, max_tokens=200) for p in PROMPTS[:5]]
            seen = {"active": 0, "queued": 0}
            while not all(f.done() for f in running):
                status = health(url)
                seen = {k: max(seen[k], status[k]) for k in seen}
                time.sleep(0.02)
        assert seen["active"] == 2 and seen["queued"] >= 1, seen
        final = health(url)
        assert final["active"] == 0 and final["queued"] == 0 and final["kv_bytes"] == 0
    finally:
        stop()


def test_a_shared_prefix_is_computed_once_and_reported_as_cached(servers):
    serial, batched, engine = servers
    preamble = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    complete(batched, preamble + "ROMEO:", max_tokens=12)
    text, _, usage = complete(batched, preamble + "JULIET:", max_tokens=12)
    shared = len(engine.tokenizer.encode(preamble))
    assert shared - 2 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"], (shared, usage)
    assert text == complete(serial, preamble + "JULIET:", max_tokens=12)[0]  # reuse changes nothing in the answer


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-batch", "0"], "argument --max-batch: must be in [1, 256], got 0"),
        (["--max-batch", "x"], "argument --max-batch: expected an integer"),
        (["--max-batch", "1e9"], "argument --max-batch: expected an integer"),
        (["--prompt-cache-bytes", "-1"], "argument --prompt-cache-bytes: must be >= 0, got -1"),
        (["--prompt-cache-bytes", str(1 << 62)], "is more than this machine's memory"),
    ],
)
def test_bad_batching_flags_are_one_line_at_start_up(flags, message):
    argv = [sys.executable, "-m", "elm_mlx.server", "--port", str(free_port()), *flags]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode in (1, 2) and len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert "serving" not in result.stderr


def test_a_bounded_kv_cache_serves_one_request_at_a_time_with_the_same_answer(demo):
    """--max-kv-size with --max-batch 1: while the window is not exceeded, the answers are the plain cache's."""
    from elm_mlx.cache import KVOptions

    model, tokenizer = demo
    plain_url, stop_plain = serve(Engine(model, tokenizer, "demo"))
    windowed = Engine(model, tokenizer, "demo", kv=KVOptions(max_size=256))
    window_url, stop_window = serve(windowed)
    try:
        assert all(type(layer).__name__ == "RotatingKVCache" for layer in windowed.prompt_cache.cache)
        for prompt in PROMPTS[:3]:
            assert complete(window_url, prompt, max_tokens=30)[0] == complete(plain_url, prompt, max_tokens=30)[0]
    finally:
        stop_plain()
        stop_window()


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--max-kv-size", "64"],
            "--max-kv-size needs --max-batch 1: a rotating window serves one request at a time (--kv-bits works with batching)",
        ),
        (["--kv-bits", "8", "--kv-group-size", "64"], "kv_group_size 64 does not divide this model's head size 32; use one that does"),
    ],
)
def test_kv_options_a_batch_cannot_follow_are_refused_in_one_line(flags, message):
    # --kv-bits itself batches (tests/test_batching_kv.py); the group size is checked against the loaded model.
    argv = [sys.executable, "-m", "elm_mlx.server", "--port", str(free_port()), *flags]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()  # the second one loads the demo model first, which says so
    assert result.returncode == 1 and lines[-1] == f"error: {message}" and "Traceback" not in result.stderr, result.stderr
    assert "serving" not in result.stderr


@pytest.mark.parametrize(
    "fields, status",
    [
        ({"seed": 2**64 - 1, "temperature": 1.0}, 200),
        ({"seed": 0, "temperature": 2.0, "top_p": 5e-324}, 200),
        ({"seed": 2**64}, 400),
        ({"logprobs": 20, "temperature": 5e-324}, 200),
        ({"repetition_penalty": 1e-3, "logprobs": 5}, 200),
        ({"max_tokens": 509}, 200),  # 3 prompt tokens + 509 = the 512-token context
        ({"max_tokens": 510}, 400),
        ({"prompt": [1] * 511, "max_tokens": 1}, 200),
        ({"prompt": [99999]}, 400),
        ({"prompt": ""}, 400),
        ({"stop": ["\n"] * 16}, 200),
    ],
)
def test_values_at_the_edges_through_the_batching_worker(demo, fields, status):
    """The batched worker is the default: the request edges the serial worker is tested with hold here too."""
    from starlette.testclient import TestClient

    model, tokenizer = demo
    client = TestClient(make_app(BatchedEngine(model, tokenizer, "demo", max_batch=4), max_tokens_limit=512), base_url="http://localhost")
    reply = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5, **fields})
    assert reply.status_code == status, reply.text

    def refuse(constant):
        raise ValueError(f"non-finite number {constant} in JSON")

    body = json.loads(reply.text, parse_constant=refuse)
    assert ("choices" in body) == (status == 200) and ("error" in body) == (status == 400)


def _first_step_sizes(demo, step_seconds: float, gather_limit: float = 5.0, n: int = 6) -> list:
    """Put n jobs 5 ms apart into an idle batching worker; how many were waiting when its first step began.

    (Then the worker measures its own steps: the window is checked before the first one.)"""
    from elm_mlx.sample import SamplingParams
    from elm_mlx.server.engine import Job

    model, tokenizer = demo
    engine = BatchedEngine(model, tokenizer, "demo", max_batch=8, prefill_step_size=512)
    engine.step_seconds, engine.gather_limit = step_seconds, gather_limit  # as if it had measured decode steps this slow
    seen, step = [], engine.batch.step

    def spy():
        if not seen:
            seen.append(len(engine.batch.waiting))
        return step()

    engine.batch.step = spy
    done = threading.Semaphore(0)
    for i in range(n):
        ids = tokenizer.encode(PROMPTS[i])
        engine.jobs.put(Job(ids, 4, SamplingParams(temp=0.0), [], None, 0, emit=lambda item: item is None and done.release()))
        time.sleep(0.005)
    for _ in range(n):
        assert done.acquire(timeout=60)
    return seen


def test_requests_sent_together_to_an_idle_server_are_prefilled_together(demo):
    # An idle worker that took the first arrival at once would prefill it alone and make the others wait for it.
    assert _first_step_sizes(demo, step_seconds=1.0) == [6]  # a window of 0.25 s
    assert _first_step_sizes(demo, step_seconds=0.0)[0] < 6  # without a window the first one starts alone
    assert _first_step_sizes(demo, step_seconds=1.0, gather_limit=0.012)[0] < 6  # nor once the window has closed


def test_the_gather_window_follows_decode_steps_only(demo):
    # The worker's step_seconds (the window's measure) must come from steps that decoded, not from prefills: here
    # every prefilling step is made to take 0.4 s and every other step 0.02 s more than it does.
    from elm_mlx.sample import SamplingParams
    from elm_mlx.server.engine import Job

    model, tokenizer = demo
    engine = BatchedEngine(model, tokenizer, "demo", max_batch=4, prefill_step_size=8)
    step = engine.batch.step

    seen = []  # step_seconds before each step: what the window would have used

    def slowed():
        seen.append(engine.step_seconds)
        prefilling = bool(engine.batch.prefilling or engine.batch.waiting)
        events = step()
        time.sleep(0.4 if prefilling or any(e.prefilled is not None for e in events) else 0.02)
        return events

    engine.batch.step = slowed
    done = threading.Semaphore(0)
    for prompt in PROMPTS[:3]:
        ids = tokenizer.encode(prompt)
        engine.jobs.put(Job(ids, 12, SamplingParams(temp=0.0), [], None, 0, emit=lambda item: item is None and done.release()))
    for _ in range(3):
        assert done.acquire(timeout=60)
    assert 0.02 <= engine.step_seconds < 0.2 and max(seen) < 0.2, (engine.step_seconds, max(seen))
