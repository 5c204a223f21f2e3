"""The lm-eval backend run by lm-eval itself: local rolling-loglikelihood and generate_until tasks against figures
computed here from the model's logits, the batching core against one-by-one greedy decoding, mlx-lm's lm-eval model
on the same task and weights, lm_eval's command line against `elm-mlx evaluate tasks`, and --adapter-path."""

import json
import math
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_evaluate import TEXT, Request, nlls_given, write_choice_task

from conftest import private_cache_env
from elm_mlx.demo import DEMO_DIR
from elm_mlx.errors import ElmError
from elm_mlx.load import load, mlx_model_dir

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

REPO = Path(__file__).resolve().parents[1]
CHOICE_DOCS = [
    {"question": "ROMEO:", "choices": ["But soft", "zzzz qqq", "12345"], "answer": 0},
    {"question": "KING:", "choices": ["xylophone", "My lord", "Q"], "answer": 1},
    {"question": "JULIET:", "choices": ["O Romeo", "bzzt"], "answer": 1},
    {"question": "First Citizen:", "choices": ["Speak, speak.", "qwerty"], "answer": 0},
    {"question": "HAMLET:", "choices": ["To be", "7 7 7"], "answer": 1},
]
PAGES = [TEXT[:300].strip(), "KING HENRY:\nOnce more unto the breach, dear friends, once more;", "Now is the winter of our discontent"]
PROMPTS = ["ROMEO:", "JULIET:\nO Romeo, Romeo!", "KING:", "First Citizen:\nBefore we proceed any further, hear me speak."]
MAX_GEN = 24
STOP = ","


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private conversion cache for this module's loads and subprocesses; no hub."""
    yield from private_cache_env(tmp_path_factory)


@pytest.fixture(scope="module")
def backend(env):
    from elm_mlx.evaluate.lm_eval_backend import ElmMLX

    return ElmMLX(loaded=load(str(DEMO_DIR), dtype="float32", verbose=False), batch_size=3)


def greedy_text(model, tokenizer, prompt: str, n: int, stop: str) -> str:
    """Greedy decoding by hand: a full forward pass per token (no cache), argmax, the text up to `stop`."""
    ids = tokenizer.encode(prompt)
    start = len(ids)
    eos = set(tokenizer.eos_ids)
    for _ in range(n):
        nxt = int(mx.argmax(model(mx.array([ids]))[0, -1]).item())
        if nxt in eos:
            break
        ids.append(nxt)
    text = tokenizer.decode(ids)[len(tokenizer.decode(ids[:start])) :]
    return text.split(stop)[0]


@pytest.fixture(scope="module")
def tasks(backend, tmp_path_factory):
    """One folder of local tasks (multiple choice, rolling loglikelihood, generate_until) and a TaskManager that knows
    them; the generate_until answers are the hand-decoded greedy texts for docs 0 and 2, and wrong for doc 1."""
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("tasks")
    write_choice_task(folder, CHOICE_DOCS)
    (folder / "pages.jsonl").write_text("".join(json.dumps({"page": p}) + "\n" for p in PAGES))
    (folder / "rolling.yaml").write_text(
        f"task: elm_tiny_rolling\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'pages.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{page}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    answers = [greedy_text(backend.model, backend.tokenizer, p, MAX_GEN, STOP) for p in PROMPTS[:3]]
    answers[1] = answers[1] + " (not what the model says)"
    (folder / "until.jsonl").write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in zip(PROMPTS, answers)))
    (folder / "until.yaml").write_text(
        f"task: elm_tiny_until\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'until.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        f"generation_kwargs:\n  until: ['{STOP}']\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder, TaskManager(include_path=str(folder), include_defaults=False), answers


def run(model, manager, task, **kwargs):
    return lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=manager, **kwargs)


# -- tasks run by lm-eval itself ------------------------------------------------------------------------------------


def test_a_rolling_task_gives_the_perplexities_of_the_direct_computation(backend, tasks):
    _, manager, _ = tasks
    got = run(backend, manager, "elm_tiny_rolling")["results"]["elm_tiny_rolling"]
    log_likelihood = 0.0
    for page in PAGES:
        ids = backend.tokenizer.encode(page)  # starts with BOS, which conditions the first word
        assert len(ids) < backend.max_length
        log_likelihood -= nlls_given(backend.model, ids[:1], ids[1:]).sum()
    words = sum(len(re.split(r"\s+", p)) for p in PAGES)
    size = sum(len(p.encode("utf-8")) for p in PAGES)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-log_likelihood / words), rel=1e-5)
    assert got["byte_perplexity,none"] == pytest.approx(math.exp(-log_likelihood / size), rel=1e-5)
    assert got["bits_per_byte,none"] == pytest.approx(-log_likelihood / size / math.log(2), rel=1e-5)


def test_a_generate_until_task_scores_the_hand_decoded_greedy_answers(backend, tasks):
    _, manager, answers = tasks
    assert all(a.strip() and STOP not in a for a in answers)  # each answer is some text that stopped before the stop
    got = run(backend, manager, "elm_tiny_until")["results"]["elm_tiny_until"]
    assert got["exact_match,none"] == pytest.approx(2 / 3)


def test_generate_until_decodes_in_batches_token_exact_with_one_by_one_greedy(backend, monkeypatch):
    from elm_mlx.evaluate import lm_eval_backend
    from elm_mlx.generation import generate
    from elm_mlx.sample import SamplingParams

    calls = []

    def counting(model, tokenizer, prompts, **kwargs):
        results = real(model, tokenizer, prompts, **kwargs)
        calls.append((len(prompts), kwargs["max_batch"], [r.tokens for r in results]))
        return results

    real = lm_eval_backend.batch_generate
    monkeypatch.setattr(lm_eval_backend, "batch_generate", counting)
    requests = [Request(p, {"until": [STOP], "max_gen_toks": 30}) for p in PROMPTS] + [
        Request("KING:", {"until": ["."], "max_gen_toks": 12})
    ]
    got = backend.generate_until(requests)
    assert sorted(c[0] for c in calls) == [1, 4] and {c[1] for c in calls} == {backend.batch_size}  # two groups, one batched
    for r, text in zip(requests, got):
        context, kwargs = r.args
        alone = generate(backend.model, backend.tokenizer, context, max_tokens=kwargs["max_gen_toks"], sampling=SamplingParams(temp=0))
        assert text.strip() and text == alone.split(kwargs["until"][0])[0]
    assert len({len(t) for c in calls for t in c[2]}) > 1  # rows of different lengths finished at different steps


# -- mlx-lm's lm-eval model on the same task and weights ------------------------------------------------------------


def test_mlx_lms_lm_eval_model_gives_the_same_loglikelihoods_and_results(backend, tasks, env):
    from mlx_lm.evaluate import MLXLM

    theirs = MLXLM(mlx_model_dir(str(DEMO_DIR), dtype="float32", verbose=False), batch_size=1)
    assert tree_flatten(theirs._model.parameters())[0][1].dtype == mx.float32
    requests = [Request(d["question"], " " + c) for d in CHOICE_DOCS for c in d["choices"]]
    requests += [Request(TEXT[:i], TEXT[i : i + 40]) for i in (100, 103, 400)]  # split mid-word ("ROM|EO", "s|oft") and at a line break
    ours, other = backend.loglikelihood(requests), theirs.loglikelihood(requests)
    # float32 sums of a few token log-probs (|values| < 40) computed in a different order and batch shape: 1e-4 absolute
    # is ~1e-5 relative, the rounding of float32 logits through six layers, and far below the gaps between choices
    np.testing.assert_allclose([s for s, _ in ours], [s for s, _ in other], atol=1e-4, rtol=0)
    assert [g for _, g in ours] == [bool(g) for _, g in other]
    _, manager, _ = tasks
    names = ["elm_tiny_choice", "elm_tiny_rolling", "elm_tiny_until"]
    a = lm_eval.simple_evaluate(model=backend, tasks=names, task_manager=manager)["results"]
    b = lm_eval.simple_evaluate(model=theirs, tasks=names, task_manager=manager)["results"]
    assert a["elm_tiny_choice"]["acc,none"] == b["elm_tiny_choice"]["acc,none"] and 0 < a["elm_tiny_choice"]["acc,none"] < 1
    assert a["elm_tiny_rolling"]["word_perplexity,none"] == pytest.approx(b["elm_tiny_rolling"]["word_perplexity,none"], rel=1e-5)
    assert a["elm_tiny_until"]["exact_match,none"] == b["elm_tiny_until"]["exact_match,none"] == pytest.approx(2 / 3)


# -- the two command lines ------------------------------------------------------------------------------------------


def test_lm_evals_command_line_and_ours_take_the_same_arguments_and_agree(tasks, env, tmp_path, capsys):
    from elm_mlx.evaluate import cli

    folder, _, _ = tasks
    common = ["--tasks", "elm_tiny_choice", "--include_path", str(folder), "--num_fewshot", "1", "--limit", "3", "--batch_size", "2"]
    theirs = subprocess.run(
        [sys.executable, "-m", "elm_mlx.evaluate.lm_eval_backend", "run", "--model", "elm-mlx", "--model_args",
         f"model={DEMO_DIR},dtype=float32", *common, "--output_path", str(tmp_path / "lm_eval.json")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert theirs.returncode == 0, theirs.stderr[-2000:]
    (written,) = tmp_path.glob("lm_eval_*.json")  # lm_eval adds a timestamp
    cli.main(["tasks", *common, "--model_args", "dtype=float32", "--output_path", str(tmp_path / "ours.json"), "--no-verbose"])
    assert "| elm_tiny_choice |" in capsys.readouterr().out
    a, b = json.loads(written.read_text()), json.loads((tmp_path / "ours.json").read_text())
    for results in (a, b):
        assert results["n-shot"]["elm_tiny_choice"] == 1 and results["n-samples"]["elm_tiny_choice"]["effective"] == 3
    assert a["results"]["elm_tiny_choice"]["acc,none"] == b["results"]["elm_tiny_choice"]["acc,none"]


def test_the_entry_point_pyproject_declares_is_the_registered_model():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11 reads pyproject.toml")
    from lm_eval.api.registry import get_model

    import elm_mlx.evaluate.lm_eval_backend  # noqa: F401  (registers elm-mlx)

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["lm_eval.models"]
    (name, target), = declared.items()  # fmt: skip
    entry = metadata.EntryPoint(name=name, value=target, group="lm_eval.models")
    assert name == "elm-mlx" and entry.load() is get_model("elm-mlx")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model_args", "nonsense=1"], "--model_args: 'nonsense=1' is not KEY=VALUE with KEY one of model, pretrained"),
        (["--model_args", "dtype"], "--model_args: 'dtype' is not KEY=VALUE"),
        (["--model_args", "max_length=0"], "--model_args max_length= must be a positive integer, got '0'"),
        (["--dtype", "float32", "--model_args", "dtype=float16"], "--model_args dtype= and --dtype both set the dtype; give it once"),
        (["--include_path", "/nonexistent/tasks"], "--include_path /nonexistent/tasks is not a directory"),
    ],
)
def test_bad_model_args_and_include_paths_are_one_line(args, message):
    from elm_mlx.evaluate import cli

    with pytest.raises(ElmError) as raised:
        cli.main(["tasks", "--tasks", "openelm", *args])
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_the_lm_eval_model_refuses_a_misspelt_argument_instead_of_loading_the_demo():
    from lm_eval.api.registry import get_model

    import elm_mlx.evaluate.lm_eval_backend  # noqa: F401  (registers elm-mlx)

    with pytest.raises(TypeError, match="unexpected keyword argument 'modle'"):
        get_model("elm-mlx").create_from_arg_string("modle=apple/OpenELM-270M", {"batch_size": 2, "device": None})


def test_model_args_are_checked_as_the_options_they_name():
    from elm_mlx.evaluate import cli

    with pytest.raises(SystemExit) as raised:
        cli.main(["tasks", "--tasks", "openelm", "--model_args", "q_bits=7"])
    assert raised.value.code == 2


def test_the_report_puts_the_papers_metric_and_figure_beside_ours():
    from elm_mlx.evaluate.cli import OPENELM_TASKS, accuracy_table

    results = {t: {"acc,none": 0.5, "acc_norm,none": 0.25} for t in OPENELM_TASKS}
    results["boolq"] = {"acc,none": 0.625}
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in accuracy_table(results, OPENELM_TASKS, "OpenELM-270M").splitlines()[2:]
    }
    assert rows["arc_easy"] == ["50.00", "25.00", "acc_norm 25.00", "45.08"]
    assert rows["sciq"] == ["50.00", "25.00", "acc 50.00", "84.70"]
    assert rows["boolq"] == ["62.50", "", "acc 62.50", "53.98"]
    # arc_c, arc_e, hellaswag, piqa in acc_norm (25); sciq, winogrande in acc (50); boolq 62.5
    assert rows["average"] == ["", "", f"{(4 * 25 + 2 * 50 + 62.5) / 7:.2f}", "54.37"]


# -- adapters -------------------------------------------------------------------------------------------------------


def test_adapter_path_scores_with_the_adapters(tasks, env, tmp_path, capsys):
    """A rolling task through `evaluate tasks --adapter-path`: the perplexity of a direct computation with the adapters
    loaded by elm_mlx.load, and not that of the base model."""
    from elm_mlx.evaluate import cli
    from elm_mlx.lora import add_adapters
    from elm_mlx.lora.adapters import ADAPTER_FILE, CONFIG_FILE, adapter_meta
    from elm_mlx.lora.trainer import adapter_weights

    model, tokenizer = load(str(DEMO_DIR), dtype="float32", verbose=False)
    model.freeze()
    shape = {"fine_tune_type": "lora", "num_layers": 2, "keys": ["qkv_proj", "proj_2"], "rank": 4, "alpha": 16.0, "dropout": 0.0}
    add_adapters(model, "lora", num_layers=2, keys=shape["keys"], rank=4)
    rng = np.random.default_rng(3)  # stand-in for training: non-zero B matrices
    model.load_weights([(n, p + mx.array(rng.standard_normal(p.shape).astype(np.float32) * 0.3)) for n, p in tree_flatten(model.trainable_parameters())], strict=False)  # fmt: skip
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    mx.save_safetensors(str(adapters / ADAPTER_FILE), adapter_weights(model))
    (adapters / CONFIG_FILE).write_text(json.dumps(adapter_meta(shape, str(DEMO_DIR))))

    folder, _, _ = tasks
    scores = {}
    for name, extra in (("adapted", ["--adapter-path", str(adapters)]), ("base", [])):
        out = tmp_path / f"{name}.json"
        cli.main(["tasks", "--tasks", str(folder / "rolling.yaml"), "--dtype", "float32", *extra, "--output", str(out), "--no-verbose"])
        scores[name] = json.loads(out.read_text())["results"]["elm_tiny_rolling"]["word_perplexity,none"]
    capsys.readouterr()

    adapted, _ = load(str(DEMO_DIR), dtype="float32", adapter_path=str(adapters), verbose=False)
    base, _ = load(str(DEMO_DIR), dtype="float32", verbose=False)
    words = sum(len(re.split(r"\s+", p)) for p in PAGES)

    def word_perplexity(m):
        return math.exp(sum(nlls_given(m, ids[:1], ids[1:]).sum() for ids in map(tokenizer.encode, PAGES)) / words)

    assert scores["adapted"] == pytest.approx(word_perplexity(adapted), rel=1e-5)
    assert scores["base"] == pytest.approx(word_perplexity(base), rel=1e-5)
    assert abs(scores["adapted"] / scores["base"] - 1) > 0.01  # the adapters changed the scores
