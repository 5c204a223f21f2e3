"""python -m elm_mlx.demo.build: options and output paths checked before any work, the bundled model safe,
the corpus found the documented way (offline here), and progress that reads well in a log.

Everything runs on corpora made here and builds of a few steps; no network, no ../shared.
"""

import hashlib
import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from mlx.utils import tree_flatten

from elm_mlx.demo import DEMO_DIR, DRAFT_DIR
from elm_mlx.demo import build as demo_build
from elm_mlx.errors import ElmError
from elm_mlx.progress import Progress

# A build of a few seconds: 4 steps of 2 x 32 tokens, a 320-piece tokenizer.
TINY = ["--iters", "4", "--batch-size", "2", "--max-seq-length", "32", "--vocab-size", "320", "--val-batches", "2"]


def made_up_text(lines: int = 600) -> str:
    """Sentences of invented words: enough distinct pieces for a 320-piece BPE tokenizer."""
    rng = np.random.default_rng(0)
    syllables = "ka ro mi the an st or el ing qu ve lo ne sa ti um".split()
    words = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(400)]
    return "\n".join(" ".join(rng.choice(words, rng.integers(3, 10))).capitalize() + "." for _ in range(lines)) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(made_up_text())
    return path


def bundled_state() -> dict:
    return {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in DEMO_DIR.iterdir()}


def refused_quickly(argv, tmp_path, match) -> None:
    """main(argv) fails with a one-line ElmError within a second, before any file is written."""
    start = time.perf_counter()
    with pytest.raises(ElmError, match=match) as failure:
        demo_build.main(argv + ["--work", str(tmp_path / "work")])
    assert time.perf_counter() - start < 1.0
    assert "\n" not in str(failure.value)
    assert not (tmp_path / "work").exists()


# -- the command line ------------------------------------------------------------------


def test_every_option_has_help_with_its_default():
    parser = demo_build.build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        if action.nargs != 0:  # flags are off unless given
            assert "default:" in action.help, action.dest


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--iters", "10", "--warmup", "10"], "argument --warmup: must be fewer than --iters (10), got 10"),
        (["--iters", "10", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
        (["--warmup", "x"], "argument --warmup: expected an integer, got 'x'"),
        (["--iters", "1"], "argument --warmup: must be fewer than --iters (1), got 1"),  # the 5% default, at least 1
        (["--learning-rate", "nan"], "argument --learning-rate: expected a finite number"),
        (["--max-seq-length", "1024"], "argument --max-seq-length: must be in [2, 512], got 1024"),
        (["--vocab-size", "100"], "argument --vocab-size: must be in [300, 32000], got 100"),
        (["--draft", "--vocab-size", "320"], "argument --vocab-size: not with --draft, whose tokenizer is the bundled"),
        (["--draft", "--iters", "1"], "argument --warmup: must be fewer than --iters (1), got 1"),
        (["--draft", "--iters", "0"], "argument --iters: must be >= 1, got 0"),
    ],
)
def test_bad_numbers_are_one_usage_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        demo_build.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1 and message in err, err


def test_bad_warmup_from_the_shell(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "elm_mlx.demo.build", "--iters", "5", "--warmup", "9"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--warmup" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


# -- output paths: refused before the corpus is read or anything trained ---------------


def test_existing_output_is_refused_before_training(corpus, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    args = ["--corpus", str(corpus), "--out", str(tmp_path / "out")] + TINY
    refused_quickly(args, tmp_path, "already exists; pass --force")
    refused_quickly(args + ["--force"], tmp_path, "'notes.txt', which is not an elm-mlx output file")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_unwritable_or_clashing_paths_are_refused_before_training(corpus, tmp_path):
    (tmp_path / "file").write_text("")
    args = ["--corpus", str(corpus)] + TINY
    refused_quickly(args + ["--out", str(tmp_path / "file")], tmp_path, "is a file; expected a directory")
    refused_quickly(args + ["--out", str(tmp_path / "work" / "model")], tmp_path, "must be separate directories")
    refused_quickly(["--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "m")], tmp_path, "is not a file")
    refused_quickly(["--corpus", str(tmp_path / "file"), "--out", str(tmp_path / "m")], tmp_path, r"named \*\.txt")


@pytest.mark.parametrize(
    "argv",
    [
        ["--out", str(DEMO_DIR)],
        ["--out", str(DEMO_DIR), "--force"],
        ["--out", str(DEMO_DIR / "inner")],
        ["--out", str(DEMO_DIR.parent), "--force"],
    ],
)
def test_bundled_model_is_never_replaced_without_replace_bundled(corpus, tmp_path, argv):
    before = bundled_state()
    refused_quickly(["--corpus", str(corpus)] + TINY + argv, tmp_path, "bundled demo model.*--replace-bundled")
    assert bundled_state() == before


@pytest.mark.parametrize(
    "argv",
    [
        ["--draft", "--out", str(DRAFT_DIR), "--force"],
        ["--draft", "--out", str(DRAFT_DIR / "inner")],
        ["--draft", "--out", str(DEMO_DIR), "--force"],
        ["--draft", "--replace-bundled", "--out", str(DEMO_DIR)],  # --replace-bundled with --draft names the draft only
        ["--out", str(DRAFT_DIR), "--force"],
    ],
)
def test_bundled_draft_and_demo_are_never_replaced_by_the_other_build(corpus, tmp_path, argv):
    before = bundled_state()
    refused_quickly(["--corpus", str(corpus)] + argv, tmp_path, "bundled (draft|demo) model|writes only the bundled model")
    assert bundled_state() == before


def test_replace_bundled_names_only_the_bundled_model(corpus, tmp_path):
    before = bundled_state()
    refused_quickly(["--corpus", str(corpus), "--replace-bundled", "--out", str(tmp_path / "m")], tmp_path, "writes only the bundled")
    with pytest.raises(ElmError, match="--work .* bundled demo model"):
        demo_build.main(["--corpus", str(corpus), "--out", str(tmp_path / "m"), "--work", str(DEMO_DIR)])
    assert bundled_state() == before


# -- a whole (tiny) build ------------------------------------------------------------------


def test_tiny_build_samples_validation_and_logs_plain_lines(corpus, tmp_path):
    out = tmp_path / "model"
    cmd = [sys.executable, "-m", "elm_mlx.demo.build", "--corpus", str(corpus), "--out", str(out), "--work", str(tmp_path / "w")]
    result = subprocess.run(cmd + TINY, capture_output=True, text=True, timeout=120)  # pipes: not a terminal
    assert result.returncode == 0, result.stderr
    log = result.stdout + result.stderr
    assert "\r" not in log and "\x1b" not in log  # no bar redraws in a log
    assert "validating on 2 of 16 held-out batches" in result.stdout
    assert "step 4: train loss" in result.stdout and "on all 32 held-out windows" in result.stdout
    assert "training: 4/4 steps in" in result.stderr  # the plain summary line that stands in for the bar
    assert sorted(f.name for f in out.iterdir()) == sorted(
        ["README.md", "config.json", "loss.png", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "training.json"]
    )
    facts = json.loads((out / "training.json").read_text())
    assert facts["training"]["val_batches"] == 2 and len(facts["val_curve"]) == 5  # steps 0..4, each on the sample
    assert facts["valid_tokens"] == 32 * 32  # the recorded figure: the whole held-out set
    assert "--corpus corpus.txt --iters 4" in (out / "README.md").read_text()

    # Run again: refused at once without --force; with it, an earlier build is what may be replaced.
    again = subprocess.run(cmd + TINY, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "already exists; pass --force" in again.stderr
    demo_build.check_paths(out, tmp_path / "w", corpus, force=True, replace_bundled=False)


def test_tiny_draft_build_copies_the_bundled_tokenizer(corpus, tmp_path):
    """--draft: the demo model's tokenizer byte for byte (no --vocab-size), the 2-layer shape, a model elm_mlx loads."""
    from elm_mlx.load import load

    out = tmp_path / "draft"
    before = bundled_state()
    demo_build.main(["--draft", "--corpus", str(corpus), "--out", str(out), "--work", str(tmp_path / "w")] + TINY[:6] + TINY[8:])
    assert bundled_state() == before
    assert (out / "tokenizer.model").read_bytes() == (DEMO_DIR / "tokenizer.model").read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["num_transformer_layers"] == 2 and config["model_dim"] == 192 and config["vocab_size"] == 2048
    assert "--draft --out DIR --corpus corpus.txt --iters 4" in (out / "README.md").read_text()
    model, tokenizer = load(str(out), verbose=False)
    assert tokenizer.vocab_size == 2048 and model.args.num_transformer_layers == 2


@pytest.mark.skipif(not DRAFT_DIR.is_dir(), reason="the bundled draft model is not built")
def test_bundled_draft_shares_the_demo_tokenizer_and_loads(demo):
    from elm_mlx.load import load

    assert (DRAFT_DIR / "tokenizer.model").read_bytes() == (DEMO_DIR / "tokenizer.model").read_bytes()
    draft, draft_tokenizer = load(str(DRAFT_DIR), dtype="float32", verbose=False)
    model, tokenizer = demo
    parameters = sum(v.size for _, v in tree_flatten(draft.parameters()))
    assert 0.8e6 < parameters < 1.3e6 and draft.args.vocab_size == model.args.vocab_size
    text = "ROMEO:\nWhat light through yonder window breaks?"
    assert draft_tokenizer.encode(text) == tokenizer.encode(text)
    facts = json.loads((DRAFT_DIR / "training.json").read_text())
    assert facts["parameters"] == parameters and facts["valid_loss"] < 5.0  # it learnt something (the demo: 4.0)


# -- the corpus ------------------------------------------------------------------------------


@pytest.fixture
def offline_corpus(tmp_path, monkeypatch):
    """A stand-in for tinyshakespeare's URL (a file:// URL) and hash, and a cache of this test's own."""
    source = tmp_path / "served.txt"
    source.write_text(made_up_text(50))
    monkeypatch.setattr(demo_build, "CORPUS_URL", source.as_uri())
    monkeypatch.setattr(demo_build, "CORPUS_SHA256", hashlib.sha256(source.read_bytes()).hexdigest())
    monkeypatch.setenv("ELM_MLX_CACHE", str(tmp_path / "cache"))
    return source


def test_corpus_is_downloaded_once_and_checked(offline_corpus, monkeypatch):
    said = []
    path = demo_build.find_corpus(said.append)
    assert path == demo_build.cached_corpus() and path.read_bytes() == offline_corpus.read_bytes()
    assert len(said) == 2 and "downloading" in said[0]
    offline_corpus.unlink()  # the cached copy is used from now on
    assert demo_build.find_corpus(said.append) == path and len(said) == 2
    path.write_text("something else")  # a damaged cached copy is fetched again, and refused if it still differs
    with pytest.raises(ElmError, match="could not be downloaded .* pass it with --corpus FILE"):
        demo_build.find_corpus(said.append)


def test_corpus_with_another_hash_is_refused(offline_corpus, monkeypatch):
    monkeypatch.setattr(demo_build, "CORPUS_SHA256", "0" * 64)
    with pytest.raises(ElmError, match="SHA-256 differs"):
        demo_build.find_corpus(lambda line: None)
    assert not demo_build.cached_corpus().exists()


def test_no_corpus_and_no_network_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_build, "CORPUS_URL", (tmp_path / "unreachable.txt").as_uri())
    monkeypatch.setenv("ELM_MLX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ElmError, match="could not be downloaded from .*; download that file yourself and pass it with --corpus FILE"):
        demo_build.main(["--out", str(tmp_path / "m"), "--work", str(tmp_path / "w")] + TINY)
    assert not (tmp_path / "m").exists()


# -- progress ------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_plain_periodic_lines_off_a_terminal():
    stream = io.StringIO()
    said = []
    with Progress(3, "training", "step", stream=stream, interval=0) as progress:
        for i in range(3):
            progress.update(1, f"loss {3 - i}.000")
        progress.note(said.append, "step 3: done")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 4
    assert lines[0].startswith("training: 1/3 steps (33%)") and "left" in lines[0] and lines[0].endswith("loss 3.000")
    assert lines[-1].startswith("training: 3/3 steps in ") and said == ["step 3: done"]


def test_progress_is_quiet_between_intervals_and_a_bar_on_a_terminal():
    stream = io.StringIO()
    with Progress(100, "converting", "tensor", stream=stream) as progress:  # default: a line a minute at most
        progress.update(100)
    assert stream.getvalue().count("\n") == 1 and "converting: 100/100 tensors in" in stream.getvalue()

    terminal = Terminal()
    with Progress(3, "training", "step", stream=terminal) as progress:
        progress.update(1)
        progress.note(lambda line: terminal.write(line + "\n"), "step 1: hello")
    assert "\r" in terminal.getvalue() and "step 1: hello\n" in terminal.getvalue()

    disabled = io.StringIO()
    with Progress(3, "training", "step", stream=disabled, enabled=False) as progress:
        progress.update(3)
    assert disabled.getvalue() == ""
