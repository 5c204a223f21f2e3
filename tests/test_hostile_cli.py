"""Every command line, fed bad input as a careless or hostile user would: one line, the right exit code, nothing written.

Many bad inputs run in one child process (each child start costs about a
second): the child runs each module as `python -m` would, through runpy, and
reports exit code, stdout and stderr per case. A few cases that need a real
process of their own (stdout on a full device, file-size limits) run alone.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hostile import python_code, run_limited

RUNNER = r"""
import contextlib, io, json, runpy, sys
results = []
for module, argv, stdin in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [module, *argv]
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8", "surrogateescape")), encoding="utf-8")
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # the entry point let something through: report it as a traceback would look
            code, _ = 99, err.write(f"Traceback (escaped run_cli)\n{type(e).__name__}: {e}\n")
    results.append([code, out.getvalue(), err.getvalue()])
sys.__stdout__.write("\nRESULTS " + json.dumps(results))
"""

ENV = {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def run_batch(cases, cwd):
    """[(module, argv, stdin)] -> [(code, stdout, stderr)], all in one child under the memory cap."""
    outcome = run_limited([sys.executable, "-c", "import elm_mlx\n" + RUNNER, json.dumps(cases)], cwd=cwd, env=ENV, timeout=300)
    assert "RESULTS " in outcome.stdout, outcome.stderr[-3000:]
    results = json.loads(outcome.stdout.rsplit("RESULTS ", 1)[1])
    assert len(results) == len(cases)
    if os.environ.get("ELM_SHOW_REFUSALS"):
        for case, (code, _, stderr) in zip(cases, results):
            print(f"{case[0]} {' '.join(case[1])[-90:]} -> {code} {stderr.strip()[:160]}")
    return results


def tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_refused(case, result, code, needle):
    """Exactly one stderr line, no traceback, not an internal error, the right exit code and wording."""
    got_code, _, stderr = result
    lines = [line for line in stderr.splitlines() if line.strip()]
    where = f"{case[0]} {case[1]}: exit {got_code}, stderr {stderr[-1500:]!r}"
    assert "Traceback" not in stderr, where
    assert len(lines) == 1, where
    assert "internal error" not in lines[0], where
    assert got_code == code, where
    assert needle.lower() in lines[0].lower(), where


@pytest.fixture
def place(tmp_path, tiny_model_dir):
    """A scratch directory with a model, the usual wrong things, and a valid adapter dir to spoil."""
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (tmp_path / "afile.txt").write_text("not a directory\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "bad-utf8.txt").write_bytes(b"the king \xff\xfe\xc3 lord\n")
    (tmp_path / "empty.txt").write_bytes(b"")
    return tmp_path, model


def bad_adapter_dirs(root: Path, config_json: dict) -> dict:
    """Adapter directories that are wrong in one way each (generated here)."""
    made = {}

    def make(name, config, weights=b"\x00" * 16):
        d = root / name
        d.mkdir()
        (d / "adapter_config.json").write_bytes(config.encode() if isinstance(config, str) else config)
        (d / "adapters.safetensors").write_bytes(weights)
        made[name] = d

    good = json.dumps(config_json)
    make("ad-notjson", "{not json")
    make("ad-list", "[1, 2]")
    make("ad-missing-keys", json.dumps({"fine_tune_type": "lora"}))
    make("ad-rank-string", json.dumps({**config_json, "rank": "eight"}))
    make("ad-rank-huge", json.dumps({**config_json, "rank": 10**12}))
    make("ad-alpha-nan", good.replace('"alpha": 16.0', '"alpha": NaN'))
    make("ad-type", json.dumps({**config_json, "fine_tune_type": "magic"}))
    make("ad-utf8", b'{"fine_tune_type": "\xff"}')
    make("ad-deep", "[" * 100_000 + "]" * 100_000)
    make("ad-garbage-weights", good)
    (root / "ad-no-weights").mkdir()
    (root / "ad-no-weights" / "adapter_config.json").write_text(good)
    made["ad-no-weights"] = root / "ad-no-weights"
    return made


ADAPTER_SHAPE = {
    "base_model": "m",
    "fine_tune_type": "lora",
    "num_layers": 2,
    "keys": ["out_proj"],
    "rank": 4,
    "alpha": 16.0,
    "dropout": 0.0,
}

BAD_NUMBERS_LORA = [
    ("--rank", "0"),
    ("--rank", "-3"),
    ("--alpha", "nan"),
    ("--alpha", "0"),
    ("--dropout", "1"),
    ("--dropout", "nan"),
    ("--dropout", "-0.1"),
    ("--batch-size", "0"),
    ("--grad-accum", "0"),
    ("--iters", "0"),
    ("--iters", "x"),
    ("--learning-rate", "nan"),
    ("--learning-rate", "inf"),
    ("--learning-rate", "-1"),
    ("--warmup", "-1"),
    ("--min-lr-ratio", "nan"),
    ("--min-lr-ratio", "2"),
    ("--weight-decay", "nan"),
    ("--grad-clip", "-1"),
    ("--grad-clip", "inf"),
    ("--max-seq-length", "0"),
    ("--seed", "-1"),
    ("--seed", str(2**64)),
    ("--steps-per-report", "0"),
    ("--steps-per-eval", "-5"),
    ("--val-batches", "-1"),
    ("--save-every", "0"),
    ("--valid-fraction", "nan"),
    ("--valid-fraction", "1"),
    ("--num-layers", "-2"),
    ("--q-bits", "7"),
]


def jsonl_datasets(root: Path) -> dict:
    """Data directories whose train.jsonl is wrong in one way each; valid.jsonl is fine."""
    good = json.dumps({"text": "the king speaks to the queen " * 20})
    lines = {
        "not-json": "{oops",
        "array": "[1, 2, 3]",
        "wrong-keys": json.dumps({"question": "a", "answer": "b"}),
        "text-number": json.dumps({"text": 5}),
        "text-empty": json.dumps({"text": "   "}),
        "messages-string": json.dumps({"messages": "hi"}),
        "message-no-content": json.dumps({"messages": [{"role": "user"}]}),
        "message-number": json.dumps({"messages": [1, 2]}),
        "prompt-only": json.dumps({"prompt": "a"}),
        "completion-empty": json.dumps({"prompt": "a", "completion": ""}),
        "surrogate": '{"text": "the king \\ud800 speaks"}',
        "deep": "[" * 100_000 + "]" * 100_000,
        "blank-only": "\n\n   \n",
    }
    made = {}
    for name, line in lines.items():
        d = root / f"data-{name}"
        d.mkdir()
        (d / "train.jsonl").write_text(good + "\n" + line + "\n" if name != "blank-only" else line)
        (d / "valid.jsonl").write_text(good + "\n")
        made[name] = d
    d = root / "data-bad-utf8"
    d.mkdir()
    (d / "train.jsonl").write_bytes(good.encode() + b"\n" + b'{"text": "\xff\xfe"}\n')
    (d / "valid.jsonl").write_text(good + "\n")
    made["bad-utf8"] = d
    d = root / "data-no-valid"
    d.mkdir()
    (d / "train.jsonl").write_text(good + "\n")
    made["no-valid"] = d
    return made


JSONL_NEEDLES = {
    "not-json": "not valid JSON",
    "array": "expected a JSON object",
    "wrong-keys": "none of the known formats",
    "text-number": "'text' must be",
    "text-empty": "'text' must be",
    "messages-string": "'messages' must be",
    "message-no-content": "string 'role' and 'content'",
    "message-number": "string 'role' and 'content'",
    "prompt-only": "must both be strings",
    "completion-empty": "'completion' is empty",
    "surrogate": "lone surrogate",
    "deep": "nested too deeply",
    "blank-only": "is empty",
    "bad-utf8": "not UTF-8",
    "no-valid": "has no valid.jsonl",
}


def test_lora_refuses_bad_options_data_and_outputs_in_one_line(place):
    root, model = place
    data = jsonl_datasets(root)
    base = ["--model", str(model), "--iters", "2", "--batch-size", "1", "--max-seq-length", "16"]
    out = ["--adapter-path", str(root / "adapters")]
    cases, expect = [], []

    def add(argv, code, needle):
        cases.append(("elm_mlx.lora", argv, ""))
        expect.append((code, needle))

    good_data = ["--data", str(data["no-valid"].parent / "data-not-json")]  # data is never reached for option errors
    for option, value in BAD_NUMBERS_LORA:
        add(base + good_data + out + [option, value], 2, f"argument {option}")
    for name, directory in data.items():
        add(base + ["--data", str(directory)] + out, 1, JSONL_NEEDLES[name])
    add(base + ["--data", str(root / "missing")] + out, 1, "does not exist")
    add(base + ["--data", str(root / "adir")] + out, 1, "has no train.jsonl")
    add(base + ["--data", str(root / "bad-utf8.txt")] + out, 1, "not UTF-8")
    add(base + ["--data", str(root / "empty.txt")] + out, 1, "is empty")
    add(base + ["--data", str(root / "empty.txt"), "--model", str(root / "missing")] + out, 1, "does not exist")
    add(base + ["--data", str(root / "bad-utf8.txt"), "--adapter-path", str(root / "afile.txt")], 1, "is a file")
    add(base + ["--data", str(root / "bad-utf8.txt"), "--adapter-path", str(root / "afile.txt" / "sub")], 1, "is a file, not a directory")
    add(base + ["--data", str(root / "bad-utf8.txt"), "--plot", str(root / "adir")] + out, 1, "is a directory")
    add(base + ["--data", str(root / "bad-utf8.txt"), "--plot", str(root / "afile.txt" / "x.png")] + out, 1, "not a directory")

    before = tree(root)
    results = run_batch(cases, cwd=root)
    for case, result, (code, needle) in zip(cases, results, expect):
        assert_refused(case, result, code, needle)
    assert tree(root) == before  # no adapters dir, no plot, no temporaries


def test_lora_resume_from_a_damaged_checkpoint_is_one_line(place):
    root, model = place
    data = root / "data"
    data.mkdir()
    text = json.dumps({"text": "the king speaks to the queen " * 20}) + "\n"
    (data / "train.jsonl").write_text(text * 4)
    (data / "valid.jsonl").write_text(text)
    args = ["--model", str(model), "--data", str(data), "--iters", "1", "--batch-size", "1", "--max-seq-length", "16", "--val-batches", "1"]
    cases = [("elm_mlx.lora", args + ["--adapter-path", str(root / "run")], "")]
    damages = {
        "state.json": b"{truncated",
        "adapter_config.json": b"\xff\xfe",
        "adapters.safetensors": b"\x00" * 10,
    }
    for name in damages:
        cases.append(("elm_mlx.lora", args + ["--adapter-path", str(root / f"run-{name}"), "--resume"], ""))
    # First the healthy run (it makes the checkpoint the damaged copies come from), then the resumes.
    first = run_batch(cases[:1], cwd=root)[0]
    assert first[0] == 0, first[2][-2000:]
    for name, damage in damages.items():
        copy = shutil.copytree(root / "run", root / f"run-{name}")
        (copy / "checkpoint" / name).write_bytes(damage)
    for case, result in zip(cases[1:], run_batch(cases[1:], cwd=root)):
        assert_refused(case, result, 1, "checkpoint")


def test_fuse_and_adapter_paths_refuse_bad_directories(place):
    root, model = place
    adapters = bad_adapter_dirs(root, ADAPTER_SHAPE)
    needles = {
        "ad-notjson": "not valid JSON",
        "ad-list": "JSON object",
        "ad-missing-keys": "lacks",
        "ad-rank-string": "rank must be",
        "ad-rank-huge": "rank must be",
        "ad-alpha-nan": "alpha must be",
        "ad-type": "fine_tune_type must be",
        "ad-utf8": "not valid JSON",
        "ad-deep": "not valid JSON",
        "ad-garbage-weights": "cannot read",
        "ad-no-weights": "not an adapter directory",
    }
    cases, expect = [], []

    def add(module, argv, code, needle):
        cases.append((module, argv, ""))
        expect.append((code, needle))

    for i, (name, directory) in enumerate(adapters.items()):
        add(
            "elm_mlx.fuse",
            ["--model", str(model), "--adapter-path", str(directory), "--save-path", str(root / f"fused{i}")],
            1,
            needles[name],
        )
    for missing in (root / "missing", root / "afile.txt", root / "adir"):
        add(
            "elm_mlx.fuse", ["--model", str(model), "--adapter-path", str(missing), "--save-path", str(root / "fused")], 1, "not an adapter"
        )
    add(
        "elm_mlx.fuse",
        ["--model", str(root / "missing"), "--adapter-path", str(root / "adir"), "--save-path", str(root / "f")],
        1,
        "does not exist",
    )
    add(
        "elm_mlx.fuse",
        ["--model", str(model), "--adapter-path", str(root / "adir"), "--save-path", str(root / "adir")],
        1,
        "already exists",
    )
    add(
        "elm_mlx.fuse",
        ["--model", str(model), "--adapter-path", str(root / "adir"), "--save-path", str(root / "afile.txt"), "--force"],
        1,
        "afile.txt",
    )
    add(
        "elm_mlx.fuse",
        ["--model", str(model), "--adapter-path", str(root / "adir"), "--save-path", str(root / "afile.txt" / "x")],
        1,
        "not a directory",
    )
    add("elm_mlx.fuse", ["--model"], 2, "expected one argument")

    before = tree(root)
    for case, result, (code, needle) in zip(cases, run_batch(cases, cwd=root), expect):
        assert_refused(case, result, code, needle)
    assert tree(root) == before


def test_bench_refuses_zero_and_bad_numbers_as_usage_errors(tmp_path):
    (tmp_path / "afile.txt").write_text("x")
    cases, expect = [], []

    def add(argv, code, needle):
        cases.append(("bench", argv, ""))
        expect.append((code, needle))

    for option, value in [("--trials", "0"), ("--trials", "-1"), ("--gen-tokens", "0"), ("--prompt-lengths", "1"), ("--trials", "nan")]:
        add(["--quick", option, value], 2, f"argument {option}")
    add(["--quick", "--prompt-lengths", str(10**9)], 1, "context length")
    add(["--quick", "--models", "nonsense"], 1, "unknown model shape")
    add(["--quick", "--model", str(tmp_path / "missing")], 1, "does not exist")
    add(["--quick", "--out", str(tmp_path / "afile.txt")], 1, "already exists")
    add(["--quick", "--out", str(tmp_path / "afile.txt"), "--force"], 1, "afile.txt")
    add(["--quick", "--out", str(tmp_path / "afile.txt" / "x")], 1, "not a directory")
    before = tree(tmp_path)
    for case, result, (code, needle) in zip(cases, run_batch(cases, cwd=tmp_path), expect):
        assert_refused(case, result, code, needle)
    assert tree(tmp_path) == before


def read_only_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write into (for root, whom permission bits do not stop: /sys)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked
    if sys.platform != "linux":
        pytest.skip("running as root: permission bits do not stop root, and there is no /sys to write into")
    try:
        os.mkdir("/sys/elm-mlx-probe")
    except OSError:
        return Path("/sys")  # sysfs refuses new entries, even root's
    os.rmdir("/sys/elm-mlx-probe")
    pytest.skip("running as root and /sys accepts new entries: no directory refuses root here")


def test_unwritable_output_directories_are_refused_before_work(place):
    root, model = place
    locked = read_only_dir(root)
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"text": "the king " * 30}) + "\n")
    (data / "valid.jsonl").write_text(json.dumps({"text": "the king " * 30}) + "\n")
    cases = [
        ("elm_mlx.lora", ["--model", str(model), "--data", str(data), "--adapter-path", str(locked / "adapters")], ""),
        (
            "elm_mlx.lora",
            ["--model", str(model), "--data", str(data), "--adapter-path", str(root / "a"), "--plot", str(locked / "p.png")],
            "",
        ),
        ("elm_mlx.fuse", ["--model", str(model), "--adapter-path", str(root / "adir"), "--save-path", str(locked / "fused")], ""),
        ("bench", ["--quick", "--out", str(locked / "bench")], ""),
    ]
    before = tree(root)
    for case, result in zip(cases, run_batch(cases, cwd=root)):
        assert_refused(case, result, 1, "cannot be written")
    assert tree(root) == before
    assert not any(Path(locked, name).exists() for name in ("adapters", "p.png", "fused", "bench"))


def test_safety_net_maps_each_os_error_class_to_one_line(tmp_path):
    """Each OSError class raised inside an entry point: one line naming the path, exit 1; others are 'internal error'."""
    code = r"""
import errno, sys
from elm_mlx.cli import run_cli
kind = sys.argv[1]
def main():
    if kind == "enospc": raise OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors")
    if kind == "erofs": raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out")
    if kind == "eacces": raise PermissionError(errno.EACCES, "Permission denied", "/root/secret")
    if kind == "missing": open("/no/such/file")
    if kind == "isdir": open("/")
    if kind == "notdir": open("/etc/passwd/x")
    if kind == "utf8": b"\xff".decode("utf-8")
    if kind == "memory": raise MemoryError
    if kind == "mlx": raise RuntimeError("[save_safetensors] Failed to open file /sys/x.safetensors")
    if kind == "bug": raise KeyError("oops\nsecond line")
run_cli(main)
"""
    script = tmp_path / "net.py"
    script.write_text(code)
    expected = {
        "enospc": "no space left on device writing /data/out/model.safetensors",
        "erofs": "cannot write /mnt/ro/out: read-only file system",
        "eacces": "cannot access /root/secret: permission denied",
        "missing": "/no/such/file does not exist",
        "isdir": "/ is a directory",
        "notdir": "/etc/passwd/x: a part of this path is a file",
        "utf8": "not valid UTF-8",
        "memory": "out of memory",
        "mlx": "cannot write /sys/x.safetensors",
        "bug": "internal error: KeyError",
    }
    for kind, needle in expected.items():
        outcome = run_limited([sys.executable, str(script), kind])
        line = outcome.one_line_error()
        assert outcome.returncode == 1 and needle in line, (kind, line)
    debug = run_limited([sys.executable, str(script), "bug"], env={"ELM_DEBUG": "1"})
    assert "Traceback" in debug.stderr and debug.returncode == 1


def test_full_stdout_and_file_size_limit_are_one_line(place):
    root, model = place
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "elm_mlx.generate", "--model", str(model), "--prompt", "the king", "-m", "4", "--no-verbose"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env={**os.environ, **ENV},
        )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and "no space left on device" in lines[0], result.stderr

    # A file-size limit makes the weights write fail partway, as a full disk does: one line, no partial output.
    adapters = root / "adapters"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text(json.dumps(ADAPTER_SHAPE))
    import mlx.core as mx

    mx.save_safetensors(str(adapters / "adapters.safetensors"), {})
    fused = root / "fused"
    code = f"""
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
sys.argv = ["fuse", "--model", {str(model)!r}, "--adapter-path", {str(adapters)!r}, "--save-path", {str(fused)!r}]
runpy.run_module("elm_mlx.fuse", run_name="__main__")
"""
    before = tree(root)
    outcome = python_code(code, env=ENV)
    line = outcome.one_line_error()
    assert outcome.returncode == 1 and ("file too large" in line or "failed partway" in line), line
    assert tree(root) == before


def test_generate_chat_server_convert_bad_paths_and_numbers_survey(place):
    """The other entry points: bad paths, numbers and bytes end in one line naming the input (stdin holds raw byte 0xff)."""
    root, model = place
    cases = [
        ("elm_mlx.generate", ["--model", str(root / "missing"), "--prompt", "hi"], 1, "does not exist"),
        ("elm_mlx.generate", ["--model", str(root / "adir"), "--prompt", "hi"], 1, "config.json"),
        ("elm_mlx.generate", ["--model", str(model), "--prompt", "hi", "--adapter-path", str(root / "missing")], 1, "not an adapter"),
        ("elm_mlx.generate", ["--model", str(model), "--prompt", "-", "-m", "2"], 1, "not valid UTF-8", "the \udcff king"),
        ("elm_mlx.chat", ["--model", str(root / "missing")], 1, "does not exist"),
        ("elm_mlx.chat", ["--model", str(model), "--max-tokens", "0"], 2, "--max-tokens"),
        ("elm_mlx.server", ["--model", str(model), "--port", "70000"], 2, "--port"),
        ("elm_mlx.server", ["--model", str(model), "--q-bits", "7"], 2, "--q-bits"),
        ("convert", ["--hf-path", str(root / "missing"), "--mlx-path", str(root / "out")], 1, ""),
        ("convert", ["--hf-path", str(root / "adir"), "--mlx-path", str(root / "out")], 1, ""),
    ]
    before = tree(root)
    results = run_batch([(c[0], c[1], c[4] if len(c) > 4 else "") for c in cases], cwd=root)
    for (module, argv, code, needle, *_), result in zip(cases, results):
        assert_refused((module, argv), result, code, needle)
    assert tree(root) == before
