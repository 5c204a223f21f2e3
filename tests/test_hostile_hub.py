"""The Hugging Face Hub out of reach: one line on stderr, exit 1, in seconds; the cache used when it has the model.

Every command that takes a model may be given a hub id. Here the Hub is a
closed local port, a server that answers 503, or one that never answers, and
HF_HOME is an empty directory (or a cache made by the test); nothing leaves
this machine.
"""

import http.server
import shutil
import socket
import sys
import threading
import time

import pytest

from hostile import run_limited

COMMANDS = {  # {model} stands for the hub id
    "generate": ["generate", "--model", "{model}", "-p", "hi", "-m", "2"],
    "chat": ["chat", "--model", "{model}"],
    "serve": ["serve", "--model", "{model}", "--port", "{port}"],
    "convert": ["convert", "--hf-path", "{model}", "--mlx-path", "{out}"],
}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def run(command, model, tmp_path, endpoint, **env):
    """An elm-mlx command with the Hub at `endpoint` and empty caches; (outcome, seconds)."""
    home = tmp_path / "hf_home"
    home.mkdir(exist_ok=True)
    full_env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(home),
        "ELM_MLX_CACHE": str(tmp_path / "elm_cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        **env,
    }
    full_env = {k: v for k, v in full_env.items() if v is not None}
    words = {"model": model, "port": str(closed_port()), "out": str(tmp_path / "converted")}
    argv = [sys.executable, "-m", "elm_mlx", *(w.format(**words) for w in COMMANDS[command])]
    start = time.perf_counter()
    outcome = run_limited(argv, timeout=60, stdin="", env={"HF_HUB_OFFLINE": "0", **full_env})
    return outcome, time.perf_counter() - start


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unreachable_hub_is_one_line_and_quick(tmp_path, command):
    outcome, seconds = run(command, "some-org/some-model", tmp_path, f"http://127.0.0.1:{closed_port()}")
    line = outcome.one_line_error()
    assert outcome.returncode == 1 and seconds < 15, (outcome.returncode, seconds)
    assert line.startswith("error: cannot reach the Hugging Face Hub and no cached copy of some-org/some-model: ")
    assert line.endswith("(HF_HUB_OFFLINE=1 uses only the cache)") and "refused" in line.lower()
    assert outcome.stdout == "" and not list((tmp_path / "hf_home").rglob("*.safetensors"))
    assert not (tmp_path / "converted").exists()


class _Unavailable(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture()
def hub_503():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def hub_silent():
    """Accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_a_hub_that_answers_503_is_one_line_without_retries(tmp_path, hub_503):
    outcome, seconds = run("generate", "some-org/some-model", tmp_path, hub_503)
    line = outcome.one_line_error()
    assert outcome.returncode == 1 and seconds < 15 and "503" in line, (line, seconds)
    assert line.startswith("error: cannot reach the Hugging Face Hub and no cached copy of some-org/some-model")


def test_a_hub_that_never_answers_times_out_in_one_line(tmp_path, hub_silent):
    outcome, seconds = run("generate", "some-org/some-model", tmp_path, hub_silent, HF_HUB_ETAG_TIMEOUT="2")
    line = outcome.one_line_error()
    assert outcome.returncode == 1 and seconds < 12, (line, seconds)
    assert line.startswith("error: cannot reach the Hugging Face Hub and no cached copy of some-org/some-model")


def test_offline_mode_without_a_cached_copy_says_so(tmp_path):
    outcome, seconds = run("generate", "some-org/some-model", tmp_path, f"http://127.0.0.1:{closed_port()}", HF_HUB_OFFLINE="1")
    assert outcome.returncode == 1 and seconds < 15
    assert outcome.one_line_error() == (
        "error: some-org/some-model is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; unset it to download"
    )


def test_an_unreachable_hub_uses_the_cached_copy(tmp_path, tiny_model_dir):
    """A model downloaded earlier still loads when the Hub is gone (the cache laid out as huggingface_hub writes it)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--some-org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    outcome, seconds = run("generate", "some-org/tiny", tmp_path, f"http://127.0.0.1:{closed_port()}")
    assert outcome.returncode == 0 and outcome.stdout.strip(), outcome.stderr[-2000:]
    assert "Hugging Face Hub" not in outcome.stderr and "Traceback" not in outcome.stderr and seconds < 30


def test_a_source_without_a_tokenizer_and_no_hub_says_what_to_pass(tmp_path):
    """The converter fetches the Llama-2 tokenizer a source lacks; with the Hub out of reach, one line naming --tokenizer."""
    from elm_mlx.demo import DEMO_DIR

    source = tmp_path / "source"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(DEMO_DIR / name, source / name)
    home = tmp_path / "hf_home"
    home.mkdir()
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(home), "HF_HUB_OFFLINE": "0"}
    argv = [sys.executable, "-m", "elm_mlx", "convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "out")]
    start = time.perf_counter()
    outcome = run_limited(argv, timeout=60, stdin="", env=env)
    line = outcome.one_line_error()
    assert outcome.returncode == 1 and time.perf_counter() - start < 15, (outcome.returncode, line)
    assert line.startswith("error: no tokenizer: the source has none and ") and "cannot reach the Hugging Face Hub" in line
    assert line.endswith("pass --tokenizer /path/to/tokenizer.model (Meta's Llama-2 tokenizer)")
    assert not (tmp_path / "out").exists()
