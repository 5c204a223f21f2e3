"""python -m bench speculative: a quick run end to end writes every figure, speculation writes the plain text, the
expected-speedup arithmetic matches hand-computed values, and bad input is one line with nothing written.

The speedups themselves are measured by the bench, never asserted here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import speculative as spec
from conftest import random_weights, write_model_dir
from elm_mlx.demo import DEMO_DIR
from elm_mlx.demo.build import DRAFT_SHAPE, demo_config
from elm_mlx.errors import ElmError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "ELM_MLX_BLAS_NOTICE": "0"}


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A draft of the bundled draft's shape with random weights and the demo's tokenizer: fast, and no bundled draft needed."""
    config = demo_config(shape=DRAFT_SHAPE)
    path = tmp_path_factory.mktemp("draft") / "draft"
    return write_model_dir(path, config, random_weights(config, seed=1), (DEMO_DIR / "tokenizer.model").read_bytes())


def bench(*args, env, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "bench", "speculative", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )


def test_quick_run_writes_every_figure_and_speculation_is_exact(tmp_path, env, draft_dir):
    out = tmp_path / "spec"
    result = bench("--quick", "--draft", str(draft_dir), "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "speedup.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["spec"]  # no staging directory left beside it
    results = json.loads((out / "results.json").read_text())
    methods = ["plain", "compiled", "lookup K=4", "lookup K=4 adaptive", "draft K=2"]
    rows = {(r["kind"], r["method"]): r for r in results["rows"]}
    assert set(rows) == {(kind, m) for kind in ("copy", "free") for m in methods}
    for row in rows.values():
        assert row["tokens"] == 8 and row["same_as_plain"], row  # greedy speculation and the compiled step write the plain text
        assert row["decode_tps"]["median"] > 0 and row["load_before"]
    # A random draft proposes 2 tokens a pass and the target takes few of them: acceptance is counted, passes are real.
    assert rows[("free", "draft K=2")]["acceptance"] is not None and 1 <= rows[("free", "draft K=2")]["tokens_per_pass"] <= 3
    assert {(e["kind"], e["method"]) for e in results["speedups"]} == set(rows)
    assert all(e["speedup"] == 1.0 for e in results["speedups"] if e["method"] == "plain")
    assert set(results["costs"]) == {"demo", "demo draft", "openelm-tiny (draft)", "openelm-tiny (target)"}
    assert set(results["costs"]["demo"]["steps"]["plain"]) == {"1", "3", "5"}  # 1 token, draft K=2 + 1, lookup K=4 + 1
    assert set(results["costs"]["openelm-tiny (target)"]["steps"]["compiled"]) == {"1", "3"}  # the shape pair: draft K=2 only
    assert [p["pair"] for p in results["predictions"]] == ["demo -> its draft"] + ["openelm-tiny <- openelm-tiny"] * 3
    markdown = (out / "results.md").read_text()
    assert "Speedup over plain greedy" in markdown and "lookup K=4" in markdown and "Expected draft-model speedup" in markdown

    again = bench("--quick", "--draft", str(draft_dir), "--out", str(out), env=env)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "already exists; pass --force" in again.stderr
    replaced = bench("--quick", "--draft", str(draft_dir), "--out", str(out), "--force", "--max-tokens", "4", env=env)
    assert replaced.returncode == 0, replaced.stderr  # --force replaces an earlier output of this bench (its PNG included)
    assert json.loads((out / "results.json").read_text())["settings"]["max_tokens"] == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pair", "openelm-9B", "openelm-270M"], "unknown model shape 'openelm-9B'"),
        (["--draft", "/nonexistent/draft"], "--draft /nonexistent/draft is not a model directory"),
        (["--lookup-tokens", "0"], "argument --lookup-tokens: must be in [1, 64], got 0"),
        (["--max-tokens", "1000"], "argument --max-tokens: must be in [4, 320], got 1000"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    with pytest.raises((ElmError, SystemExit)) as failure:
        spec.main(["--quick", "--out", str(tmp_path / "spec"), *args])
    said = str(failure.value) if failure.type is ElmError else capsys.readouterr().err.strip()
    assert "\n" not in said and message in said, said
    assert list(tmp_path.iterdir()) == []


def test_reachable_from_the_elm_mlx_command(env):
    result = subprocess.run(
        [sys.executable, "-m", "elm_mlx", "bench", "speculative", "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert result.returncode == 0 and "elm-mlx bench speculative" in result.stdout and "--lookup-tokens" in result.stdout


def test_expected_speedup_arithmetic():
    # k = 2, a = 0.5: 1 + 0.5 + 0.25 tokens a pass.
    assert spec.expected_tokens_per_pass(0.5, 2) == pytest.approx(1.75)
    assert spec.expected_tokens_per_pass(1.0, 4) == 5 and spec.expected_tokens_per_pass(0.0, 4) == 1
    assert spec.acceptance_from_tokens_per_pass(1.75, 2) == pytest.approx(0.5, abs=1e-9)
    costs = lambda **ms: {"plain": {n: {"median": t} for n, t in ms.items()}}  # noqa: E731
    target, draft = costs(**{"1": 10.0, "3": 14.0}), costs(**{"1": 2.0})
    # 1.75 tokens for 2 draft steps (4) and a 3-token verify (14), against 10 a token plainly: 17.5 / 18.
    assert spec.expected_speedup(0.5, 2, target, draft) == pytest.approx(17.5 / 18)
    # Compiled verify and draft steps, against plain decoding's 1-token step (10), not the compiled one (20).
    target["compiled"] = {"1": {"median": 20.0}, "3": {"median": 12.0}}
    draft["compiled"] = {"1": {"median": 1.0}}
    assert spec.expected_speedup(0.5, 2, target, draft, "compiled") == pytest.approx(17.5 / 14)
