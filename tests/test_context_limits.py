"""The model's context length, enforced: the Python API and generate refuse, chat drops whole old turns, Ctrl-C stops a prefill."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import random_weights, tiny_config, write_model_dir
from elm_mlx.chat import ChatSession
from elm_mlx.demo import DEMO_DIR
from elm_mlx.errors import ElmError
from elm_mlx.generation import Cancelled, ContextLengthError, generate_step, stream_generate
from elm_mlx.load import load
from elm_mlx.sample import SamplingParams, make_sampler
from hostile import run_limited

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temp=0)


@pytest.fixture(scope="module")
def short_model(tmp_path_factory, tiny_sp_model):
    """A tiny model whose context is 160 tokens, so that a few chat turns outgrow it."""
    config = tiny_config(max_context_length=160)
    path = write_model_dir(tmp_path_factory.mktemp("short") / "OpenELM-short-Instruct", config, random_weights(config), tiny_sp_model)
    return load(str(path))


def test_stream_generate_refuses_before_any_work(short_model):
    model, tokenizer = short_model
    prompt = [5] * 150
    with pytest.raises(ContextLengthError) as refused:
        next(stream_generate(model, tokenizer, prompt, max_tokens=11, sampling=GREEDY))
    assert (refused.value.prompt_tokens, refused.value.max_tokens, refused.value.limit) == (150, 11, 160)
    assert "160" in str(refused.value) and "150" in str(refused.value)
    last = list(stream_generate(model, tokenizer, prompt, max_tokens=10, sampling=GREEDY))[-1]
    assert last.prompt_tokens + last.generation_tokens <= 160


def test_generate_step_stops_between_prefill_chunks_when_cancelled(short_model):
    model, _ = short_model
    asked = []

    def cancel():
        asked.append(1)
        return len(asked) == 3  # after two chunks

    with pytest.raises(Cancelled) as stopped:
        next(generate_step([5] * 100, model, make_sampler(GREEDY), prefill_step_size=16, cancel=cancel))
    assert (stopped.value.done, stopped.value.total) == (32, 100)


def test_chat_drops_the_oldest_whole_turns_and_keeps_the_system_prompt(short_model):
    model, tokenizer = short_model
    notices = []
    session = ChatSession(model, tokenizer, system="be brief", notice=notices.append)
    said = [f"turn {i}: the king speak now thou art my good friend" for i in range(8)]
    for text in said:
        prompt, budget = session.fitted_prompt(text, max_tokens=16)
        assert len(prompt) + budget <= 160 and budget >= 16
        list(session.ask(text, max_tokens=16, sampling=GREEDY))
    assert notices and all("dropped the oldest" in n for n in notices)
    assert session.messages[0] == {"role": "system", "content": "be brief"}
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == said[-len(users) :] and len(users) < len(said)  # whole turns, oldest first
    roles = [m["role"] for m in session.messages[1:]]
    assert roles == ["user", "assistant"] * len(users)


def test_chat_refuses_a_message_that_cannot_fit_alone_and_keeps_the_conversation(short_model):
    model, tokenizer = short_model
    session = ChatSession(model, tokenizer, system="be brief")
    list(session.ask("good night", max_tokens=4, sampling=GREEDY))
    before = list(session.messages)
    with pytest.raises(ElmError, match="160-token context"):
        list(session.ask("the king " * 200, max_tokens=16, sampling=GREEDY))
    assert session.messages == before


def test_generate_cli_refuses_a_prompt_over_the_context_in_one_line():
    words = "the king speak now " * 400
    out = run_limited([sys.executable, "-m", "elm_mlx.generate", "--model", str(DEMO_DIR), "--prompt", words, "--max-tokens", "8"])
    line = out.error_line()
    assert out.returncode == 1 and "context length is 512 tokens" in line and out.stdout == ""
    # Without --max-tokens the default shrinks to what room there is.
    prompt = "the king " * 100
    out = run_limited([sys.executable, "-m", "elm_mlx.generate", "--model", str(DEMO_DIR), "--prompt", prompt, "--temp", "0"])
    assert out.returncode == 0, out.stderr
    generated = int(out.stderr.split("generation: ")[1].split()[0])
    prompt_tokens = int(out.stderr.split("prompt: ")[1].split()[0])
    assert prompt_tokens + generated <= 512


@pytest.mark.parametrize(
    "argv, stdin, code, message",
    [
        (["--prompt", "-"], b"the king \xff\xfe", 1, "not valid UTF-8"),
        (["--prompt", "the", "--seed", "-1"], None, 2, "--seed: must be in [0, 18446744073709551615], got -1"),
        (["--prompt", "the", "--seed", str(1 << 64)], None, 2, "--seed: must be in [0, 18446744073709551615]"),
    ],
)
def test_generate_cli_bad_inputs_are_one_line(argv, stdin, code, message):
    out = run_limited([sys.executable, "-m", "elm_mlx.generate", "--model", str(DEMO_DIR), *argv], stdin=stdin)
    assert out.returncode == code and message in out.error_line()


def test_ctrl_c_during_a_long_prefill_stops_generate_at_the_next_chunk(tmp_path, tiny_sp_model):
    config = tiny_config(max_context_length=1 << 16)
    model_dir = write_model_dir(tmp_path / "OpenELM-long", config, random_weights(config), tiny_sp_model)
    prompt = " ".join(["the king speak now thou art"] * 4000)  # ~ 16k tokens: tens of seconds of prefill
    proc = subprocess.Popen(
        [sys.executable, "-m", "elm_mlx.generate", "--model", str(model_dir), "--prompt", "-", "--no-chat", "--prefill-step-size", "128"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    proc.stdin.write(prompt.encode())
    proc.stdin.close()
    time.sleep(6)  # loaded, and well into the prefill
    assert proc.poll() is None, proc.communicate()
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    stopped_after = time.time() - sent
    err = proc.stderr.read().decode()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert stopped_after < 10, stopped_after  # a chunk of 128 tokens, not the rest of the prefill
