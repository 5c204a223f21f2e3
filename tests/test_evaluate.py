"""elm-mlx evaluate: perplexity against sums of token NLLs computed here from the model's logits, against
mlx-lm's OpenELM on the same windows, quantized variants compared, and bad input refused in one line."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import openelm as mlx_lm_openelm

from conftest import private_cache_env, random_weights, tiny_config
from elm_mlx.demo import DEMO_DIR
from elm_mlx.errors import ElmError
from elm_mlx.evaluate.compare import parse_variants
from elm_mlx.evaluate.perplexity import perplexity, read_tokens, windows
from elm_mlx.load import build_model, load, load_config, mlx_model_dir

REPO = Path(__file__).resolve().parents[1]
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n" * 20


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private conversion cache shared by the module's subprocesses and the in-process loads; no hub."""
    yield from private_cache_env(tmp_path_factory)


def evaluate(*args, env, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "elm_mlx", "evaluate", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config(max_context_length=64)
    model = build_model(config)
    model.load_weights(list(random_weights(config, seed=7).items()), strict=True)
    return model


def stream(n, seed=0):
    return np.random.default_rng(seed).integers(0, 384, size=n).tolist()


def nlls_given(model, history, targets):
    """-log p(target | history + earlier targets), each from one unbatched forward pass, log-softmax in float64."""
    ids = history + targets
    logits = np.asarray(model(mx.array([ids[:-1]])).astype(mx.float32), dtype=np.float64)[0]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    positions = np.arange(len(history) - 1, len(ids) - 1)
    return -log_probs[positions, np.asarray(ids)[positions + 1]]


def direct_mean_nll(model, tokens, context, stride):
    """Windows start at 0, stride, 2 stride, ... and hold up to `context` inputs; each scores the targets after
    the previous window's last (the usual strided perplexity, restated here apart from elm_mlx's windows())."""
    total, count, scored_to, begin = 0.0, 0, 0, 0
    while scored_to < len(tokens) - 1:
        end = min(begin + context, len(tokens) - 1)
        history, targets = tokens[begin : scored_to + 1], tokens[scored_to + 1 : end + 1]
        values = nlls_given(model, history, targets)
        total, count = total + values.sum(), count + values.size
        scored_to, begin = end, begin + stride
    assert count == len(tokens) - 1
    return total / count


# -- windows ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, context, stride", [(2, 8, 8), (9, 8, 8), (10, 8, 8), (100, 16, 16), (100, 16, 5), (37, 8, 1)])
def test_windows_score_every_target_once_with_at_least_context_minus_stride_history(n, context, stride):
    plan = windows(n, context, stride)
    scored = [w.begin + 1 + i for w in plan for i in range(w.first, w.end - w.begin)]
    assert scored == list(range(1, n))
    for w in plan:
        assert 0 < w.end - w.begin <= context
        if w.begin > 0:
            assert w.first >= context - stride


def test_windows_refuse_a_stride_beyond_the_context_and_a_text_of_one_token():
    with pytest.raises(ElmError, match="--stride must be between 1 and --context"):
        windows(100, 8, 9)
    with pytest.raises(ElmError, match="the text has 1 token; perplexity needs at least 2"):
        windows(1, 8)


# -- the numbers ------------------------------------------------------------------------------------------------------


def test_one_window_equals_the_direct_computation(tiny):
    tokens = stream(50)
    result = perplexity(tiny, tokens)  # default context: the model's 64
    assert result.windows == 1 and result.tokens == 49
    expected = direct_mean_nll(tiny, tokens, 64, 64)
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


@pytest.mark.parametrize("stride, batch_size", [(16, 3), (16, 1), (5, 4)])
def test_several_windows_batched_and_strided_equal_the_direct_computation(tiny, stride, batch_size):
    tokens = stream(101, seed=1)  # the last window is short, so batches are padded
    result = perplexity(tiny, tokens, context=16, stride=stride, batch_size=batch_size)
    assert result.tokens == 100 and result.windows == len(windows(101, 16, stride)) > 1
    assert result.nll == pytest.approx(direct_mean_nll(tiny, tokens, 16, stride), rel=1e-5)


def test_the_standard_error_is_over_per_token_nlls(tiny):
    tokens = stream(80, seed=2)
    result = perplexity(tiny, tokens, context=32)
    values = np.concatenate([nlls_given(tiny, tokens[b : b + 1], tokens[b + 1 : min(b + 32, 79) + 1]) for b in (0, 32, 64)])
    assert result.nll_se == pytest.approx(values.std(ddof=1) / math.sqrt(values.size), rel=1e-4)
    assert result.perplexity_se == pytest.approx(result.perplexity * result.nll_se)


def test_a_context_beyond_the_models_is_refused(tiny):
    with pytest.raises(ElmError, match="--context 65 is larger than the model's context length, 64 tokens"):
        perplexity(tiny, stream(10), context=65)


@pytest.mark.parametrize("context, stride", [(512, 512), (128, 128), (128, 48)])
def test_the_demo_model_equals_mlx_lms_openelm_on_the_same_windows(env, context, stride):
    ours, tokenizer = load(str(DEMO_DIR), dtype="float32", verbose=False)
    config = load_config(mlx_model_dir(str(DEMO_DIR), dtype="float32", verbose=False))
    theirs = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(config))
    theirs.load_weights(tree_flatten(ours.parameters()), strict=True)
    tokens = tokenizer.encode(TEXT)
    assert len(tokens) > 600
    a = perplexity(ours, tokens, context, stride, batch_size=4)
    b = perplexity(theirs, tokens, context, stride, batch_size=1)
    assert a.tokens == b.tokens == len(tokens) - 1
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-4)
    assert 1.0 < a.perplexity < 200  # far below 2048, a uniform guess over the vocabulary: the model knows the text's kind


# -- data -------------------------------------------------------------------------------------------------------------


def test_jsonl_documents_are_concatenated_each_with_its_own_bos_and_eos(env, tmp_path):
    _, tokenizer = load(str(DEMO_DIR), dtype="float32", verbose=False)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "ROMEO: hi"}) + "\n\n" + json.dumps({"text": "JULIET: ho"}) + "\n")
    eos = min(tokenizer.eos_ids)
    assert read_tokens(data, tokenizer) == tokenizer.encode("ROMEO: hi") + [eos] + tokenizer.encode("JULIET: ho") + [eos]


def test_holdout_keeps_the_last_lines_of_a_text_file(env, tmp_path):
    _, tokenizer = load(str(DEMO_DIR), dtype="float32", verbose=False)
    data = tmp_path / "plays.txt"
    data.write_text("".join(f"line {i}\n" for i in range(100)))
    tail = read_tokens(data, tokenizer, holdout=0.1)
    assert tail == tokenizer.encode("".join(f"line {i}\n" for i in range(90, 100))) + [min(tokenizer.eos_ids)]


# -- the command ------------------------------------------------------------------------------------------------------


def test_the_command_prints_what_the_function_computes(env, tmp_path):
    data = tmp_path / "plays.txt"
    data.write_text(TEXT)
    result = evaluate("perplexity", "--data", str(data), "--dtype", "float32", "--context", "128", "--stride", "64", "--json",
                      "--no-verbose", env=env)  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    printed = json.loads(result.stdout)
    model, tokenizer = load(str(DEMO_DIR), dtype="float32", verbose=False)
    expected = perplexity(model, read_tokens(data, tokenizer), 128, 64)
    assert printed["tokens"] == expected.tokens and printed["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)


def test_compare_writes_a_table_and_its_files_and_quantization_costs_little(env, tmp_path):
    data = tmp_path / "plays.txt"
    data.write_text(TEXT)
    out = tmp_path / "quality"
    result = evaluate("compare", "--data", str(data), "--variants", "float32,q8,q4", "--context", "256", "--out", str(out),
                      "--no-verbose", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("| variant | perplexity |") and len(result.stdout.splitlines()) == 5
    assert sorted(p.name for p in out.iterdir()) == ["perplexity.png", "results.json", "results.md"]
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["float32"]["bits_per_weight"] == pytest.approx(32, rel=0.01)
    assert 8 < rows["q8"]["bits_per_weight"] < 9.5 and 4 < rows["q4"]["bits_per_weight"] < 5.5
    assert abs(rows["q8"]["perplexity"] / rows["float32"]["perplexity"] - 1) < 0.01
    again = evaluate("compare", "--data", str(data), "--out", str(out), env=env)
    assert again.returncode == 1 and error_lines(again) == [f"error: {out} already exists; pass --force to replace it"]


def test_variants_are_parsed_and_unknown_ones_refused_by_name():
    parsed = parse_variants("float32, q8,q4g32,mixed")
    assert [(v.name, v.dtype, v.bits, v.group_size, v.recipe) for v in parsed] == [
        ("float32", "float32", None, 64, None),
        ("q8", None, 8, 64, None),
        ("q4g32", None, 4, 32, None),
        ("mixed", None, 4, 64, "mixed-4-6"),
    ]
    for bad, message in [
        ("q7", "unknown variant 'q7'"),
        ("q4g48", "unknown variant 'q4g48'"),
        ("q8,q8", "named twice"),
        (",", "no variant"),
    ]:
        with pytest.raises(ElmError, match=message):
            parse_variants(bad)


@pytest.mark.parametrize(
    "content, args, code, message",
    [
        ("", (), 1, "error: {data} is empty"),
        ("  \n\n", (), 1, "error: {data} is empty"),
        ("ROMEO: hi\n", ("--context", "1000"), 1, "error: --context 1000 is larger than the model's context length, 512 tokens"),
        ("ROMEO: hi\n", ("--context", "8", "--stride", "9"), 1, "error: --stride 9 is larger than --context 8; it would skip tokens"),
        ("ROMEO: hi\n", ("--context", "0"), 2, "elm-mlx evaluate perplexity: error: argument --context: must be >= 1, got 0 (see --help)"),
    ],
)
def test_bad_text_input_is_one_line(env, tmp_path, content, args, code, message):
    data = tmp_path / "data.txt"
    data.write_text(content)
    result = evaluate("perplexity", "--data", str(data), *args, "--no-verbose", env=env)
    assert result.returncode == code and error_lines(result) == [message.format(data=data)], result.stderr


def test_a_bad_jsonl_line_is_named_by_file_and_line(env, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "ROMEO: hi"}) + "\n" + '{"text": "JULIET\n')
    result = evaluate("perplexity", "--data", str(data), "--no-verbose", env=env)
    assert result.returncode == 1 and len(error_lines(result)) == 1, result.stderr
    assert result.stderr.startswith(f"error: {data}:2: not valid JSON: the line ends mid-value"), result.stderr


def test_missing_data_and_no_subcommand_are_usage_errors(env, tmp_path):
    bare = evaluate(env=env)
    assert bare.returncode == 2 and error_lines(bare) == [
        "elm-mlx evaluate: error: the following arguments are required: COMMAND (see --help)"
    ]
    missing = evaluate("perplexity", "--data", str(tmp_path / "nope.txt"), "--no-verbose", env=env)
    assert missing.returncode == 1 and error_lines(missing) == [f"error: data file {tmp_path / 'nope.txt'} does not exist"]


# -- the lm-eval backend ----------------------------------------------------------------------------------------------


class Request:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def backend(env):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")
    from elm_mlx.evaluate.lm_eval_backend import ElmMLX

    return ElmMLX(loaded=load(str(DEMO_DIR), dtype="float32", verbose=False), batch_size=3)


def continuation_log_prob(model, tokenizer, context, continuation, keep=None):
    """log p(continuation | context) from one unbatched forward pass; `keep` cuts the oldest tokens first."""
    ctx = tokenizer.encode(context)
    cont = tokenizer.encode(context + continuation)[len(ctx) :]
    ids = (ctx + cont)[-keep:] if keep else ctx + cont
    return -nlls_given(model, ids[: len(ids) - len(cont)], cont).sum()


def test_loglikelihood_sums_the_continuations_log_probs_in_any_batch_order(backend):
    pairs = [
        ("ROMEO:", " But soft"),
        ("JULIET:\nO Romeo, Romeo,", " wherefore art thou"),
        ("KING:", " Now"),
        ("First Citizen:\n", "Speak, speak."),
    ]
    got = backend.loglikelihood([Request(*p) for p in pairs])
    for (context, continuation), (log_prob, _) in zip(pairs, got):
        assert log_prob == pytest.approx(continuation_log_prob(backend.model, backend.tokenizer, context, continuation), rel=1e-5)


def test_loglikelihood_says_when_greedy_decoding_gives_the_continuation(backend):
    tokens = backend.tokenizer.encode("ROMEO:")
    greedy = int(mx.argmax(backend.model(mx.array([tokens]))[0, -1]).item())
    continuation = backend.tokenizer.decode(tokens + [greedy])[len(backend.tokenizer.decode(tokens)) :]
    ((_, is_greedy),) = backend.loglikelihood([Request("ROMEO:", continuation)])
    ((_, other),) = backend.loglikelihood([Request("ROMEO:", " zzzz")])
    assert is_greedy and not other


def test_a_context_longer_than_the_window_loses_its_oldest_tokens(backend):
    context = TEXT[:2000]
    saved = backend.max_length
    backend.max_length = 64
    try:
        ((log_prob, _),) = backend.loglikelihood([Request(context, " JULIET")])
    finally:
        backend.max_length = saved
    assert log_prob == pytest.approx(continuation_log_prob(backend.model, backend.tokenizer, context, " JULIET", keep=65), rel=1e-5)


def test_rolling_loglikelihood_is_minus_the_sum_of_every_tokens_nll(backend):
    text = TEXT[:1500]
    tokens = backend.tokenizer.encode(text)
    assert len(tokens) > backend.max_length  # more than one window
    (got,) = backend.loglikelihood_rolling([Request(text)])
    assert got == pytest.approx(
        -direct_mean_nll(backend.model, tokens, backend.max_length, backend.max_length) * (len(tokens) - 1), rel=1e-5
    )


def test_generate_until_stops_before_the_stop_sequence(backend):
    from elm_mlx.generation import generate
    from elm_mlx.sample import SamplingParams

    free = generate(backend.model, backend.tokenizer, "ROMEO:", max_tokens=40, sampling=SamplingParams(temp=0))
    assert "\n" in free.strip("\n")
    stop = "\n"
    (got,) = backend.generate_until([Request("ROMEO:", {"until": [stop], "max_gen_toks": 40})])
    assert got == free.split(stop)[0] and stop not in got


def write_choice_task(folder: Path, docs) -> Path:
    data = folder / "choice.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "choice.yaml").write_text(
        "task: elm_tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: answer\n"
        "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n"
    )
    return folder / "choice.yaml"


def test_a_local_multiple_choice_task_scores_what_the_loglikelihoods_say(backend, env, tmp_path):
    docs = [
        {"question": "ROMEO:", "choices": ["But soft", "zzzz qqq", "12345"], "answer": 0},
        {"question": "KING:", "choices": ["xylophone", "My lord", "Q"], "answer": 1},
        {"question": "JULIET:", "choices": ["O Romeo", "bzzt"], "answer": 1},
    ]
    task = write_choice_task(tmp_path, docs)
    expected = []
    for d in docs:
        # lm-eval puts a space between the question and each choice
        scores = [continuation_log_prob(backend.model, backend.tokenizer, d["question"], " " + c) for c in d["choices"]]
        expected.append(float(np.argmax(scores) == d["answer"]))
    output = tmp_path / "results.json"
    result = evaluate("tasks", "--tasks", str(task), "--dtype", "float32", "--output", str(output), "--no-verbose", env=env)
    assert result.returncode == 0, result.stderr
    acc = json.loads(output.read_text())["results"]["elm_tiny_choice"]["acc,none"]
    assert acc == pytest.approx(np.mean(expected)) and 0 < acc < 1
    assert "| elm_tiny_choice |" in result.stdout


def test_an_unknown_task_is_one_line(backend, env):
    result = evaluate("tasks", "--tasks", "no_such_task_anywhere", "--no-verbose", env=env)
    assert result.returncode == 1 and error_lines(result) == ["error: unknown task no_such_task_anywhere; `lm_eval ls tasks` lists them"], (
        result.stderr
    )


def test_without_lm_eval_the_tasks_command_says_which_extra_to_install(monkeypatch):
    from elm_mlx.evaluate import cli

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # an import of it now fails, installed or not
    monkeypatch.delitem(sys.modules, "elm_mlx.evaluate.lm_eval_backend", raising=False)
    with pytest.raises(ElmError, match=r"needs lm-eval, an optional extra: pip install -e '\.\[eval\]'"):
        cli.main(["tasks", "--tasks", "openelm"])
