"""The OpenAI-compatible server (driven by the official openai client) and the terminal chat."""

import json
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from conftest import random_weights, tiny_config, write_model_dir  # noqa: E402
from elm_mlx.cache import PromptCache  # noqa: E402
from elm_mlx.load import load  # noqa: E402
from elm_mlx.server import Engine, make_app  # noqa: E402
from live_server import live_server  # noqa: E402
from terminal import Terminal  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    model, tokenizer = load(str(tiny_model_dir))
    engine = Engine(model, tokenizer, "tiny")
    with live_server(make_app(engine, max_tokens_limit=2048)) as port:
        yield engine, f"http://127.0.0.1:{port}"


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=120)


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the king speak now"}]


def test_chat_completion_and_its_stream_agree(client):
    full = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 24 and full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=CHAT, temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_usage_counts_the_real_tokens(server, client):
    engine = server[0]
    prompt_ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True))
    r = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=7)
    assert r.usage.prompt_tokens == len(prompt_ids)
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 7


def test_text_completion_stream_and_logprobs(client):
    full = client.completions.create(model="tiny", prompt="thou art my", temperature=0, max_tokens=10, logprobs=3)
    chunks = list(client.completions.create(model="tiny", prompt="thou art my", temperature=0, max_tokens=10, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    lp = full.choices[0].logprobs
    assert len(lp.tokens) == full.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0
        assert abs(max(top.values()) - chosen) < 1e-4  # greedy: the chosen token is the most likely one


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    with urllib.request.urlopen(server[1] + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"


def test_eight_concurrent_streams_get_their_own_text(server):
    base = server[1] + "/v1"
    prompts = [f"{w} king thou art" for w in "the my good lord lady sir come night".split()]

    def run(prompt):
        c = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)
        stream = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=16, stream=True
        )
        return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    alone = [run(p) for p in prompts]
    assert len(set(alone)) > 1  # different prompts, different answers: a mix-up would show
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone


def test_shared_prefix_reuses_the_cache_and_matches_a_cold_run(server, client):
    engine = server[0]
    first = client.chat.completions.create(model="tiny", messages=CHAT, temperature=0, max_tokens=12)
    follow_up = CHAT + [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "good night"}]
    warm = client.chat.completions.create(model="tiny", messages=follow_up, temperature=0, max_tokens=12)
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 1  # at least the whole first prompt was reused
    assert engine.finished[-1]["cached_tokens"] == cached

    engine.prompt_cache = PromptCache(engine.model)  # cold: nothing cached
    cold = client.chat.completions.create(model="tiny", messages=follow_up, temperature=0, max_tokens=12)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == warm.choices[0].message.content


def test_disconnect_mid_stream_stops_generation_and_others_continue(server, client):
    engine = server[0]
    request = urllib.request.Request(
        server[1] + "/v1/completions",
        data=json.dumps({"prompt": "the king", "max_tokens": 2000, "stream": True, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"},
    )
    response = urllib.request.urlopen(request)
    for _ in range(3):
        assert response.readline()  # the stream has started
    response.close()  # the client goes away
    after = client.completions.create(model="tiny", prompt="good night", temperature=0, max_tokens=5)
    assert after.choices[0].text is not None
    deadline = time.time() + 30
    while not any(j["cancelled"] for j in engine.finished):
        assert time.time() < deadline
        time.sleep(0.1)
    stopped = [j for j in engine.finished if j["cancelled"]][-1]
    assert stopped["generated_tokens"] < 2000


def _post(url: str, body: bytes):
    """A raw POST to the test server on loopback (no network): lets a test send bodies the openai client would refuse."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("chat/completions", b"{not json", None),
        ("chat/completions", b"[1, 2]", None),
        ("chat/completions", json.dumps({"messages": []}).encode(), "messages"),
        ("chat/completions", json.dumps({"messages": "hello"}).encode(), "messages"),
        ("chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), "messages"),
        ("chat/completions", json.dumps({"messages": CHAT, "max_tokens": -5}).encode(), "max_tokens"),
        ("chat/completions", json.dumps({"messages": CHAT, "max_tokens": 10**9}).encode(), "max_tokens"),
        ("chat/completions", json.dumps({"messages": CHAT, "max_tokens": "12"}).encode(), "max_tokens"),
        ("chat/completions", json.dumps({"messages": CHAT, "temperature": "hot"}).encode(), "temperature"),
        ("chat/completions", json.dumps({"messages": CHAT, "stream": "yes"}).encode(), "stream"),
        ("chat/completions", json.dumps({"messages": CHAT, "stop": 5}).encode(), "stop"),
        ("chat/completions", json.dumps({"messages": CHAT, "top_p": 0}).encode(), "top_p"),
        ("completions", json.dumps({"prompt": ""}).encode(), "prompt"),
        ("completions", json.dumps({"prompt": "x", "logprobs": 99}).encode(), "logprobs"),
        ("completions", json.dumps({"prompt": "x", "seed": 1.5}).encode(), "seed"),
    ],
)
def test_bad_requests_get_openai_shaped_4xx(server, client, path, body, param):
    status, data = _post(f"{server[1]}/v1/{path}", body)
    assert status == 400
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["type"] == "invalid_request_error"
    assert data["error"]["param"] == param and data["error"]["message"]
    assert client.completions.create(model="tiny", prompt="the", max_tokens=2).choices  # still serving


def test_oversized_body_and_unknown_route(server, client):
    status, data = _post(f"{server[1]}/v1/completions", json.dumps({"prompt": "a" * (2 << 20)}).encode())
    assert status == 413 and "error" in data
    status, data = _post(f"{server[1]}/v1/nothing", b"{}")
    assert status == 404 and data["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=0)
    assert client.completions.create(model="tiny", prompt="the", max_tokens=2).choices


def test_server_binds_loopback_by_default():
    from elm_mlx.server import build_parser

    assert build_parser().parse_args(["--model", "x"]).host == "127.0.0.1"


# -- chat REPL ---------------------------------------------------------------------


def test_chat_repl_keeps_its_cache_across_turns(tiny_model_dir):
    term = Terminal([sys.executable, "-m", "elm_mlx.chat", "--model", str(tiny_model_dir), "--temp", "0", "-m", "6", "--stats"])
    try:
        term.read_until(">>> ")
        term.send("the king speak now\n")
        first = term.read_until(">>> ")
        term.send("thou art my good friend\n")
        second = term.read_until(">>> ")
        term.send("/reset\n")
        term.read_until(">>> ")
        term.send("good night\n")
        third = term.read_until(">>> ")
        term.send("/exit\n")
        assert term.proc.wait(30) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    stats = re.compile(r"\[(\d+) new prompt tokens, (\d+) from cache\] prompt: (\d+) tokens, .* generation: (\d+) tokens")
    new1, cached1, total1, gen1 = map(int, stats.search(first).groups())
    new2, cached2, total2, gen2 = map(int, stats.search(second).groups())
    assert cached1 == 0 and new1 == total1
    # Turn two computes only its own tokens: everything of turn one (prompt and answer) came from the cache.
    ended_with_eos = gen1 < 6  # else max_tokens cut it, and the eos was never generated
    assert cached2 == total1 + gen1 + (1 if ended_with_eos else 0)
    # ...and the new tokens are exactly the new turn, as the Zephyr template writes it after the last answer's eos.
    from elm_mlx.tokenizer import load_tokenizer

    turn = "\n<|user|>\nthou art my good friend</s>\n<|assistant|>\n"
    assert new2 == len(load_tokenizer(tiny_model_dir).encode(turn, add_bos=False)) + (0 if ended_with_eos else 1)
    new3, cached3, _, _ = map(int, stats.search(third).groups())
    assert new3 > 0  # after /reset the history is gone (only the shared template start may be reused)


def test_chat_repl_ctrl_c_stops_the_answer_not_the_program(tmp_path, tiny_sp_model):
    # A long context, so that the answer of up to 100k tokens is still being written when Ctrl-C comes.
    config = tiny_config(max_context_length=1 << 17)
    model_dir = write_model_dir(tmp_path / "OpenELM-long", config, random_weights(config), tiny_sp_model)
    term = Terminal([sys.executable, "-m", "elm_mlx.chat", "--model", str(model_dir), "--temp", "0", "-m", "100000"])
    try:
        term.read_until(">>> ")
        term.send("the king\n")
        time.sleep(1.5)
        term.send("\x03")  # Ctrl-C
        out = term.read_until(">>> ", timeout=60)
        assert "[stopped]" in out
        term.send("good night\n")
        time.sleep(0.5)
        term.send("\x03")
        term.read_until(">>> ", timeout=60)
        term.send("\x04")  # Ctrl-D quits
        assert term.proc.wait(30) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
