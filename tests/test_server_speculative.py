"""The server's speculative decoding: per-request prompt lookup, a server-wide draft model, stats in usage."""

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from elm_mlx.generation import stream_generate  # noqa: E402
from elm_mlx.sample import SamplingParams  # noqa: E402
from elm_mlx.server import BatchedEngine, Engine, make_app  # noqa: E402

PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"
LOCAL = "http://localhost"  # the server's Host check refuses TestClient's default "testserver"


@pytest.fixture(scope="module")
def serial(demo):
    model, tokenizer = demo
    return TestClient(make_app(Engine(model, tokenizer, "demo"), max_tokens_limit=512), base_url=LOCAL)


def complete(client, **fields):
    return client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 30, "temperature": 0, **fields})


def test_prompt_lookup_per_request_gives_the_plain_text_and_its_stats(demo, serial):
    model, tokenizer = demo
    expected = "".join(r.text for r in stream_generate(model, tokenizer, PROMPT, max_tokens=30, sampling=SamplingParams(temp=0)))
    plain = complete(serial).json()
    assert plain["choices"][0]["text"] == expected and "speculative" not in plain["usage"]
    for value in (8, {"num_tokens": 8, "min_ngram": 2, "max_ngram": 4}):
        reply = complete(serial, prompt_lookup=value).json()
        assert reply["choices"][0]["text"] == expected
        usage, stats = reply["usage"], reply["usage"]["speculative"]
        assert usage["completion_tokens"] == 30
        assert (
            stats["draft_tokens"]
            == usage["completion_tokens_details"]["accepted_prediction_tokens"]
            + usage["completion_tokens_details"]["rejected_prediction_tokens"]
        )
        assert 0 < stats["target_passes"] < 30 and stats["tokens_per_pass"] == pytest.approx(30 / stats["target_passes"], abs=1e-4)
    streamed = serial.post(
        "/v1/completions",
        json={
            "prompt": PROMPT,
            "max_tokens": 30,
            "temperature": 0,
            "prompt_lookup": 8,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert '"speculative"' in streamed.text and streamed.text.rstrip().endswith("[DONE]")


@pytest.mark.parametrize(
    "value", [-1, 65, 2.5, True, "8", [8], {"num_tokens": 0}, {"num_tokens": 4, "min_ngram": 5}, {"k": 4}, {"num_tokens": "4"}]
)
def test_bad_prompt_lookup_is_a_400_in_openai_shape(serial, value):
    reply = complete(serial, prompt_lookup=value)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and "\n" not in error["message"] and error["param"] == "prompt_lookup"


def test_a_draft_model_for_the_whole_server(demo):
    model, tokenizer = demo
    client = TestClient(
        make_app(Engine(model, tokenizer, "demo", speculative={"draft_model": model, "num_draft_tokens": 4}), max_tokens_limit=512),
        base_url=LOCAL,
    )
    reply = complete(client).json()
    stats = reply["usage"]["speculative"]
    assert stats["acceptance_rate"] == 1.0 and stats["target_passes"] == 6  # 30 tokens, 5 per pass
    assert complete(client, prompt_lookup=None).json()["usage"]["speculative"] == stats  # null: the server's default
    off = complete(client, prompt_lookup=0).json()  # 0: this request decodes plainly
    assert "speculative" not in off["usage"] and off["usage"]["completion_tokens"] == 30
    expected = "".join(r.text for r in stream_generate(model, tokenizer, PROMPT, max_tokens=30, sampling=SamplingParams(temp=0)))
    assert reply["choices"][0]["text"] == expected and off["choices"][0]["text"] == expected


def test_a_batching_server_refuses_speculation_and_still_batches(demo):
    model, tokenizer = demo
    client = TestClient(make_app(BatchedEngine(model, tokenizer, "demo", max_batch=4), max_tokens_limit=512), base_url=LOCAL)
    reply = complete(client, prompt_lookup=8)
    assert reply.status_code == 400 and "--max-batch 1" in reply.json()["error"]["message"]
    assert complete(client, max_tokens=4, prompt_lookup=0).status_code == 200


@pytest.mark.parametrize(
    "args, message",
    [
        (["--draft-model", "somewhere"], "--draft-model needs --max-batch 1"),
        (["--max-batch", "1", "--num-draft-tokens", "3"], "needs --draft-model"),
        (["--max-batch", "1", "--draft-model", "somewhere", "--max-kv-size", "64"], "rotating window"),
    ],
)
def test_serve_refuses_speculation_it_cannot_do_before_loading(args, message):
    from elm_mlx.errors import ElmError
    from elm_mlx.server import main

    with pytest.raises(ElmError, match=message):
        main(["--port", "1"] + args)  # refused before the port or the model is looked at
