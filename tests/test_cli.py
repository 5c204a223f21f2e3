"""python -m elm_mlx.generate as a user runs it: output, stats, and one-line errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import tiny_config


def cli(*args, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "elm_mlx.generate", *args], input=stdin, capture_output=True, text=True, timeout=120, env=env
    )


def prompt_tokens(stderr: str) -> int:
    return int(re.search(r"prompt: (\d+) tokens", stderr).group(1))


def test_generates_text_and_prints_stats(tiny_model_dir):
    result = cli("--model", str(tiny_model_dir), "--prompt", "the king", "--max-tokens", "12", "--temp", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert re.search(r"prompt: \d+ tokens, [\d.]+ tok/s \| generation: 12 tokens, [\d.]+ tok/s \| peak memory: [\d.]+ GB", result.stderr)


def test_prompt_from_stdin_equals_prompt_argument(tiny_model_dir):
    args = ("--model", str(tiny_model_dir), "--max-tokens", "8", "--temp", "0")
    assert cli(*args, "--prompt", "-", stdin="lord lady").stdout == cli(*args, "--prompt", "lord lady").stdout


def test_chat_formatting_is_automatic_for_instruct_models(tmp_path, tiny_model_dir):
    instruct = shutil.copytree(tiny_model_dir, tmp_path / "OpenELM-tiny-Instruct")
    common = ("--prompt", "the king", "--max-tokens", "2", "--temp", "0")
    raw = prompt_tokens(cli("--model", str(tiny_model_dir), *common).stderr)
    auto = prompt_tokens(cli("--model", str(instruct), *common).stderr)
    forced = prompt_tokens(cli("--model", str(tiny_model_dir), "--chat", *common).stderr)
    off = prompt_tokens(cli("--model", str(instruct), "--no-chat", *common).stderr)
    assert raw == off < auto == forced
    with_system = prompt_tokens(cli("--model", str(tiny_model_dir), "--system", "be kind", *common).stderr)
    assert with_system > forced


def write_broken_config(tmp_path, tiny_model_dir, **change):
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    (broken / "config.json").write_text(json.dumps(tiny_config(**change)))
    return str(broken)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp, good: ["--model", str(tmp / "missing"), "--prompt", "hi"], "does not exist"),
        (lambda tmp, good: ["--model", str(tmp), "--prompt", "hi"], "has no config.json"),
        (
            lambda tmp, good: ["--model", write_broken_config(tmp, good, num_query_heads=[4, 4]), "--prompt", "hi"],
            "num_query_heads has 2 entries",
        ),
        (lambda tmp, good: ["--model", str(good), "--prompt", "hi", "--temp", "-1"], "argument --temp: must be in [0, 2], got -1"),
        (lambda tmp, good: ["--model", str(good), "--prompt", "hi", "--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
        (lambda tmp, good: ["--model", str(good), "--prompt", "hi", "--max-tokens", "0"], "--max-tokens/-m: must be >= 1, got 0"),
        (lambda tmp, good: ["--model", str(good), "--prompt", ""], "prompt is empty"),
        (lambda tmp, good: ["--model", str(good), "--prompt", "hi", "--max-tokens", "ten"], "expected an integer, got 'ten'"),
        (lambda tmp, good: ["--model", "apple/OpenELM-270M", "--prompt", "hi"], "not in the local Hugging Face cache"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, tiny_model_dir, make_args, message):
    result = cli(*make_args(tmp_path, tiny_model_dir))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stdout == ""


def test_stop_option_cuts_the_output(tiny_model_dir):
    args = ("--model", str(tiny_model_dir), "--prompt", "the king", "--max-tokens", "30", "--temp", "0", "--no-verbose")
    full = cli(*args).stdout[:-1]  # the CLI ends its output with a newline
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert cli(*args, "--stop", stop).stdout[:-1] == full[: full.find(stop)]
