"""python -m bench serve: a quick run end to end writes every figure and leaves no server behind; bad input is one line.

The figures themselves (batched vs serial vs mlx_lm.server) are measured by the bench, never asserted here.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.serve import build_parser

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "ELM_MLX_BLAS_NOTICE": "0"}


def bench(*args, env, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "bench", "serve", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def servers_running(ports):
    """Processes (of this user) serving on one of these ports, found by their command lines."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if any(m in text for m in ("elm_mlx.server", "mlx_lm.server", "mlx_lm")) and "--port" in text:
            if int(text[text.index("--port") + 1]) in ports:
                found.append((entry.name, " ".join(text)))
    return found


def port_open(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_each_burst_of_prompts_shares_a_new_preamble_of_the_words_asked():
    from bench.serve import Prompts

    plain, reference, shared = Prompts(), Prompts(), Prompts(shared_words=30)
    assert plain.burst(3) == [reference.next() for _ in range(3)]  # distinct prompts, nothing shared
    first, second = shared.burst(4), shared.burst(2)
    preambles = {p.split("\n\n", 1)[0] for p in first}
    assert len(preambles) == 1 and len(preambles.pop().split()) == 2 + 30  # "Scene 1." and the words
    assert len(set(first)) == 4 and second[0].split("\n\n", 1)[0] != first[0].split("\n\n", 1)[0]


def test_quick_run_writes_every_figure_and_stops_its_servers(tmp_path, env):
    out = tmp_path / "serve"
    result = bench("--quick", "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"results.json", "results.md", "aggregate_tps.png"}
    assert (out / "aggregate_tps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert {"machine", "model", "settings", "servers", "rows", "ratios", "skipped", "load_average"} <= set(results)
    assert results["machine"]["blas"] and results["machine"]["cpu_count"]
    assert results["settings"]["concurrency"] == [1, 2] and results["settings"]["quick"]
    assert set(results["servers"]) == {"batched", "serial"}  # --quick: our two servers only
    rows = {(r["server"], r["concurrency"]): r for r in results["rows"]}
    assert set(rows) == {(s, n) for s in ("batched", "serial") for n in (1, 2)}
    max_tokens = results["settings"]["max_tokens"]
    for (_, n), row in rows.items():
        assert row["requests"] == row["completed"] == n and row["error_count"] == 0, row
        assert 0 < row["tokens"] <= n * max_tokens and all(0 < t <= max_tokens for t in row["tokens_per_request"])
        assert row["aggregate_tps"] > 0 and row["wall_s"] > 0 and row["per_stream_tps_median"] > 0
        assert 0 < row["ttft_median_s"] <= row["ttft_p90_s"] <= row["ttft_max_s"] < row["wall_s"] + 1e-9
        assert row["prompt_tokens"] and min(row["prompt_tokens"]) > 1
    ratios = {r["concurrency"]: r for r in results["ratios"]}
    assert ratios[1]["batched vs 1 stream"] == pytest.approx(1.0) and ratios[2]["batched/serial"] > 0
    assert ratios[1]["ours/mlx-lm"] is None
    markdown = (out / "results.md").read_text()
    assert "| elm-mlx --max-batch 8 | 2 |" in markdown and "batched/serial" in markdown and results["machine"]["description"] in markdown
    assert re.search(r"elm-mlx --max-batch 1, 2 streams: \d+ tokens", result.stderr)
    ports = [s["port"] for s in results["servers"].values()]
    assert not servers_running(ports) and not any(port_open(p) for p in ports)
    assert [p.name for p in tmp_path.iterdir()] == ["serve"]  # no staging directory left beside it

    again = bench("--quick", "--out", str(out), env=env)
    assert again.returncode == 1 and lines(again.stderr) == [f"error: {out} already exists; pass --force to replace it"]
    assert json.loads((out / "results.json").read_text()) == results

    (out / "mine.txt").write_text("not a bench output")
    foreign = bench("--quick", "--force", "--out", str(out), env=env)
    assert foreign.returncode == 1 and "--force will not replace" in foreign.stderr and len(lines(foreign.stderr)) == 1
    (out / "mine.txt").unlink()
    replaced = bench("--quick", "--force", "--concurrency", "2", "--shared-prefix", "40", "--no-serial", "--out", str(out), env=env)
    assert replaced.returncode == 0, replaced.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["concurrency"] == [2] and results["settings"]["shared_prefix_words"] == 40
    (row,) = results["rows"]
    # Two prompts sent together with a new 40-word preamble: the batching server computes it once, for the first
    # (which reuses only what earlier bursts' prompts share with it: the start of "Scene N.").
    assert sorted(row["cached_tokens"])[0] < 10 and sorted(row["cached_tokens"])[1] >= 40, row["cached_tokens"]
    assert [p.name for p in tmp_path.iterdir()] == ["serve"]


def test_ctrl_c_stops_the_server_and_writes_nothing(tmp_path, env):
    out = tmp_path / "serve"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench",
            "serve",
            "--out",
            str(out),
            "--concurrency",
            "8",
            "--max-tokens",
            "400",
            "--no-peer",
            "--trials",
            "50",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    port = None
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        seen.append(line)
        match = re.match(r"starting .* on port (\d+)", line)
        port = int(match.group(1)) if match else port
        if "ready in" in line:
            break
    assert port is not None and "ready in" in seen[-1], "".join(seen)
    time.sleep(0.5)  # the streams are running
    assert servers_running([port])
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 130, rest
    assert not servers_running([port]) and not port_open(port)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["--concurrency", "0"], 2, "argument --concurrency: must be in [1, 256], got 0"),
        (["--concurrency", "1", "x"], 2, "argument --concurrency: expected an integer, got 'x'"),
        (["--max-tokens", "1"], 2, "argument --max-tokens: must be in [2, 4096], got 1"),
        (["--model", "no-such-dir/"], 1, "no-such-dir"),
        (["--shape", "openelm-9B"], 1, "unknown model shape 'openelm-9B'"),
        (["--model", "x", "--shape", "openelm-tiny"], 2, "not allowed with argument"),
        (["--max-tokens", "500"], 1, "--max-tokens 500 leaves no room for the prompts"),
        (["--shared-prefix", "-1"], 2, "argument --shared-prefix: must be in [0, 100000], got -1"),
        (["--shared-prefix", "1000000"], 2, "argument --shared-prefix: must be in [0, 100000], got 1000000"),
        (["--shared-prefix", "5000"], 1, "--shared-prefix 5000 does not fit OpenELM-Shakespeare's context of 512 tokens"),
        (["--shared-prefix", "200", "--max-tokens", "200"], 1, "--max-tokens 200 leaves no room for the prompts"),
    ],
)
def test_bad_input_is_one_line(args, code, needle, env, tmp_path):
    result = bench(*args, "--no-peer", "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == code and len(lines(result.stderr)) == 1 and needle in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_busy_port_is_one_line(env, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = bench("--port", str(port - 1), "--quick", "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 1 and len(lines(result.stderr)) == 1 and "is not free" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_every_option_is_described_with_its_default(env):
    for action in build_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert len(re.sub(r"\(default:[^)]*\)", "", action.help or "").split()) >= 2, action.option_strings
        if action.nargs != 0:
            assert "default" in action.help, action.option_strings
    for command in ([sys.executable, "-m", "bench", "serve", "--help"], [sys.executable, "-m", "elm_mlx", "bench", "serve", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        assert result.returncode == 0 and "--concurrency" in result.stdout, result.stderr
    assert "usage: elm-mlx bench serve" in result.stdout
