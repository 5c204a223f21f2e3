"""The commands as one tool: `elm-mlx COMMAND`, every option described, every command runnable with no
arguments on the bundled demo model, base models taken from adapter directories, chat in a terminal."""

import argparse
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from elm_mlx.commands import COMMANDS
from elm_mlx.demo import DEMO_NAME
from elm_mlx.load import load
from elm_mlx.lora.adapters import ADAPTER_FILE, CONFIG_FILE, adapter_meta
from elm_mlx.lora.layers import add_adapters
from terminal import Terminal

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "elm-mlx"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private conversion cache (the demo converts once for the module) and no hub access."""
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "ELM_MLX_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def elm_mlx(*args, env, cwd=None, stdin="", timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "elm_mlx", *args], input=stdin, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


# -- the entry point --------------------------------------------------------------------------------------------------


def test_the_console_script_lists_every_command(env):
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} is absent: run `pip install -e .` to install the elm-mlx console script")
    result = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in ("generate", "chat", "serve", "convert", "lora", "fuse", "bench", "cache-prompt", "evaluate"):
        assert re.search(rf"^  {name} +\S", result.stdout, re.M), result.stdout
    bare = subprocess.run([str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert bare.returncode == 2 and "commands:" in bare.stdout


def test_an_unknown_command_is_one_line_with_a_suggestion(env):
    result = elm_mlx("genrate", env=env)
    assert result.returncode != 0 and error_lines(result) == [
        "elm-mlx: error: unknown command 'genrate' (did you mean generate?); commands: " + ", ".join(COMMANDS)
    ]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_of_every_command_is_described(name, env):
    parser = importlib.import_module(COMMANDS[name][0]).build_parser()
    undescribed = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = re.sub(r"\(default:[^)]*\)", "", action.help or "").strip()
        if len(text.split()) < 2:  # a bare "(default: 3)" says nothing about what the option does
            undescribed.append("/".join(action.option_strings))
        elif action.nargs != 0 and action.default not in (None, [], argparse.SUPPRESS) and "default" not in (action.help or ""):
            undescribed.append("/".join(action.option_strings) + " (default not stated)")
    assert not undescribed, f"{name}: {undescribed}"
    result = elm_mlx(name, "--help", env=env)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: elm-mlx {name}"), result.stdout[:200] + result.stderr


def test_a_mistyped_flag_is_named_not_a_missing_required_one(env):
    result = elm_mlx("generate", "--promt", "hi", env=env)
    assert result.returncode == 2
    assert error_lines(result) == ["elm-mlx generate: error: unrecognized arguments: --promt hi (did you mean --prompt?) (see --help)"], (
        result.stderr
    )


# -- every command with no arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, code, needle",
    [
        ("generate", 2, "the following arguments are required: --prompt"),
        ("convert", 2, "the following arguments are required: --mlx-path"),
        ("lora", 2, "the following arguments are required: --data"),
        ("fuse", 1, "adapters is not an adapter directory"),
        ("cache-prompt", 2, "the following arguments are required: --prompt/-p, --prompt-cache-file"),
        ("evaluate", 2, "the following arguments are required: COMMAND"),
    ],
)
def test_commands_that_need_an_input_say_which_in_one_line(name, code, needle, env, tmp_path):
    result = elm_mlx(name, env=env, cwd=tmp_path)
    assert result.returncode == code and len(error_lines(result)) == 1 and needle in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_chat_with_no_arguments_talks_to_the_demo_model(env, tmp_path):
    result = elm_mlx("chat", env=env, cwd=tmp_path, stdin="/stats\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert f"using the bundled demo model {DEMO_NAME}" in result.stderr
    assert f"model: {DEMO_NAME}" in result.stderr and "context: 0 of 512 tokens used" in result.stderr


def test_generate_runs_on_the_demo_with_only_a_prompt_and_no_verbose_prints_only_text(env):
    loud = elm_mlx("generate", "--prompt", "ROMEO:", "-m", "8", "--seed", "1", env=env)
    quiet = elm_mlx("generate", "--prompt", "ROMEO:", "-m", "8", "--seed", "1", "--no-verbose", env=env)
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr + quiet.stderr
    assert f"using the bundled demo model {DEMO_NAME}" in loud.stderr and "generation: 8 tokens" in loud.stderr
    assert quiet.stderr == "" and quiet.stdout == loud.stdout and quiet.stdout.strip()


def _until(proc, marker: str, timeout: float) -> str:
    """Read the child's stderr line by line until `marker` appears (or it exits)."""
    seen, deadline = "", time.time() + timeout
    while marker not in seen and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    return seen


def test_serve_with_no_arguments_serves_the_demo_model_on_localhost(env, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "elm_mlx", "serve"], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        seen = _until(proc, "serving", 120)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    if "cannot listen on 127.0.0.1:8080" in seen:  # the default port is taken on this machine: that too is one line
        assert len([line for line in seen.splitlines() if line.strip()]) == 1, seen
        return
    assert f"using the bundled demo model {DEMO_NAME}" in seen
    assert f"serving {DEMO_NAME} at http://127.0.0.1:8080/v1" in seen, seen


def test_bench_with_no_arguments_starts_and_a_ctrl_c_leaves_nothing_behind(env, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "elm_mlx", "bench"], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        seen = _until(proc, "measuring memory bandwidth", 120)
        assert "measuring memory bandwidth" in seen, seen
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    assert proc.returncode == 130
    assert not (tmp_path / "bench-results").exists() or not any((tmp_path / "bench-results").iterdir())


# -- the base model comes from the adapter directory ------------------------------------------------------------------


@pytest.fixture
def adapters(tmp_path, tiny_model_dir):
    """LoRA adapters with nonzero weights, recording the tiny model as their base (as elm-mlx lora does)."""
    model, _ = load(str(tiny_model_dir))
    shape = {"fine_tune_type": "lora", "num_layers": 2, "keys": ["qkv_proj", "proj_2"], "rank": 4, "alpha": 8.0, "dropout": 0.0}
    add_adapters(model, shape["fine_tune_type"], shape["num_layers"], shape["keys"], shape["rank"], shape["alpha"], 0.0)
    weights = {
        k: mx.random.normal(v.shape, key=mx.random.key(i)) * 0.5 for i, (k, v) in enumerate(tree_flatten(model.trainable_parameters()))
    }
    out = tmp_path / "adapters"
    out.mkdir()
    mx.save_safetensors(str(out / ADAPTER_FILE), weights)
    (out / CONFIG_FILE).write_text(json.dumps(adapter_meta({**shape, "seed": 0}, str(tiny_model_dir.resolve()))))
    return out


def test_fuse_and_generate_take_the_base_model_from_the_adapter_directory(adapters, tiny_model_dir, env, tmp_path):
    implicit = elm_mlx("fuse", "--adapter-path", str(adapters), "--save-path", str(tmp_path / "a"), env=env)
    explicit = elm_mlx("fuse", "--model", str(tiny_model_dir), "--adapter-path", str(adapters), "--save-path", str(tmp_path / "b"), env=env)
    assert implicit.returncode == 0 and explicit.returncode == 0, implicit.stderr + explicit.stderr
    assert f"using {tiny_model_dir.resolve()}, the base model {adapters} was trained on" in implicit.stderr
    a, b = mx.load(str(tmp_path / "a" / "model.safetensors")), mx.load(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)

    common = ["--prompt", "the king", "-m", "6", "--temp", "0", "--no-verbose"]
    base_only = elm_mlx("generate", "--model", str(tiny_model_dir), *common, env=env)
    with_adapters = elm_mlx("generate", "--adapter-path", str(adapters), *common, env=env)
    named = elm_mlx("generate", "--model", str(tiny_model_dir), "--adapter-path", str(adapters), *common, env=env)
    assert with_adapters.returncode == 0 and with_adapters.stdout == named.stdout, with_adapters.stderr
    assert with_adapters.stdout != base_only.stdout  # the adapters were applied, not just the base model


def test_an_adapter_directory_naming_no_base_model_asks_for_model(adapters, env):
    config = json.loads((adapters / CONFIG_FILE).read_text())
    config["base_model"] = ""
    (adapters / CONFIG_FILE).write_text(json.dumps(config))
    result = elm_mlx("generate", "--adapter-path", str(adapters), "--prompt", "hi", env=env)
    assert result.returncode == 1 and error_lines(result) == [f"error: {adapters} does not name its base model; pass --model"]


# -- chat in a terminal -----------------------------------------------------------------------------------------------


def test_chat_in_a_terminal_with_reset_stats_system_and_save(env, tmp_path):
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "elm_mlx"]
    term = Terminal([*command, "chat", "--temp", "0", "-m", "8"], env=env)
    try:
        term.read_until(">>> ")
        term.send("/help\n")
        assert "/stats" in term.read_until(">>> ") and "/save FILE" in term.seen
        term.send("the king\n")
        term.read_until(">>> ")
        term.send("/stats\n")
        stats = term.read_until(">>> ")
        used = int(re.search(r"context: (\d+) of 512 tokens used", stats).group(1))
        assert used > 8 and f"model: {DEMO_NAME}" in stats and re.search(r"last answer: .*generation: \d+ tokens?", stats), stats
        term.send("good night\n")
        term.read_until(">>> ")
        term.send("/stats\n")
        more = int(re.search(r"context: (\d+) of 512 tokens used", term.read_until(">>> ")).group(1))
        assert more > used  # the second turn added to the context
        term.send(f"/save {tmp_path / 'talk.json'}\n")
        assert "saved 4 messages" in term.read_until(">>> ")
        term.send("/reset\n")
        term.read_until(">>> ")
        term.send("/stats\n")
        assert "context: 0 of 512 tokens used" in term.read_until(">>> ")
        term.send("/system Speak as a king.\n")
        assert "system prompt set" in term.read_until(">>> ")
        term.send(f"/save {tmp_path / 'talk.json'}\n")  # our own earlier transcript may be replaced
        assert "saved 1 messages" in term.read_until(">>> ")
        (tmp_path / "notes.txt").write_text("mine")
        term.send(f"/save {tmp_path / 'notes.txt'}\n")  # anything else may not
        assert "already exists and is not a chat transcript" in term.read_until(">>> ")
        term.send("/exit\n")
        assert term.proc.wait(30) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    saved = json.loads((tmp_path / "talk.json").read_text())
    assert saved["format"] == "elm-mlx chat transcript" and saved["messages"] == [{"role": "system", "content": "Speak as a king."}]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "talk.json"]  # no temporaries left


def test_the_generate_command_module_does_not_shadow_the_generate_function():
    importlib.import_module("elm_mlx.generate")  # what `elm-mlx generate` does
    from elm_mlx import generate

    assert callable(generate) and generate.__module__ == "elm_mlx.generation"
    assert importlib.import_module("elm_mlx.generate").main  # the command is still there


def test_chat_takes_stop_strings_like_generate(env):
    common = ["chat", "--temp", "0", "-m", "60", "--no-verbose"]
    stopped = elm_mlx(*common, "--stop", "\\n", env=env, stdin="the king\n/exit\n")
    free = elm_mlx(*common, env=env, stdin="the king\n/exit\n")
    assert stopped.returncode == 0 and free.returncode == 0, stopped.stderr + free.stderr
    answer, full = stopped.stdout.split(">>> ")[1], free.stdout.split(">>> ")[1]
    assert answer.count("\n") == 1 and full.count("\n") > 1  # the answer ended at its first newline
    assert full.startswith(answer.rstrip("\n") + "\n")  # the same answer, cut where the stop string began


def test_chat_save_refuses_hostile_paths_in_one_line_and_the_session_goes_on(env, tmp_path):
    (tmp_path / "theirs.txt").write_text("theirs")
    (tmp_path / "link.json").symlink_to(tmp_path / "theirs.txt")
    commands = [
        f"/save {tmp_path / 'link.json'}",  # a symlink, even to a file we could write
        f"/save {tmp_path / 'theirs.txt'}",  # somebody else's file
        f"/save {tmp_path / 'missing' / 'x.json'}",  # a directory on the way is missing
        f"/save {tmp_path / ('a' * 300)}.json",  # a name too long for the file system
        f"/save {tmp_path}",  # a directory
        "/save a\x00b.json",  # a NUL byte
        f"/save {tmp_path / 'ok.json'}",  # and then a good one still works
        "/exit",
    ]
    result = elm_mlx("chat", "--no-verbose", env=env, cwd=tmp_path, stdin="\n".join(commands) + "\n")
    assert result.returncode == 0 and "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 6, result.stderr
    assert "not a chat transcript" in errors[0] and "not a chat transcript" in errors[1]
    assert errors[2] == f"error: {tmp_path / 'missing' / 'x.json'} does not exist (or a directory on its way is missing)"
    assert "file name too long" in errors[3] and "is a directory" in errors[4] and "NUL" in errors[5]
    assert (tmp_path / "theirs.txt").read_text() == "theirs" and (tmp_path / "link.json").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "ok.json", "theirs.txt"]  # nothing half-written
