"""Fine-tuning: adapters, data formats and masks, the trainer, resume, data parallelism, fuse."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import SHARED, tiny_config, write_model_dir
from elm_mlx.errors import ElmError
from elm_mlx.files import save_weights
from elm_mlx.load import load, load_model
from elm_mlx.lora import add_adapters, fuse_adapters
from elm_mlx.lora.adapters import adapter_meta
from elm_mlx.lora.cli import main as lora_main
from elm_mlx.lora.data import Batches, load_datasets, parse_line
from elm_mlx.lora.trainer import Interrupted, TrainingConfig, prepare_model, token_losses, train
from elm_mlx.quantize import quantize_model
from elm_mlx.tokenizer import SentencePieceTokenizer

CORPUS = SHARED / "corpus" / "tinyshakespeare.txt"


def corpus_text(chars: int = 12000) -> str:
    """Shakespeare from ../shared when present, else text made here (the tests never need ../shared)."""
    if CORPUS.exists():
        return CORPUS.read_text()[:chars]
    rng = np.random.default_rng(0)
    words = "the king queen lord lady speak now thou art my good friend sir come hither night day love war".split()
    return "\n".join(" ".join(rng.choice(words, rng.integers(4, 12))) for _ in range(chars // 40))


def smooth_weights(config: dict, seed: int = 0) -> dict:
    """Random weights with small logits, so a few training steps show a clear, stable loss drop."""
    from elm_mlx.load import build_model

    rng = np.random.default_rng(seed)
    weights = {}
    for name, p in tree_flatten(build_model(config).parameters()):
        value = np.ones(p.shape) if name.endswith("norm.weight") else rng.standard_normal(p.shape) * 0.05
        weights[name] = mx.array(value.astype(np.float32))
    return weights


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_sp_model) -> Path:
    config = tiny_config()
    return write_model_dir(tmp_path_factory.mktemp("lora") / "base", config, smooth_weights(config), tiny_sp_model)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory, base_dir) -> Path:
    model = load_model(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    config["quantization"] = quantize_model(model, bits=4, group_size=32)
    out = tmp_path_factory.mktemp("lora") / "base-4bit"
    out.mkdir()
    save_weights(out, dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(base_dir / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(corpus_text())
    return path


def tokens(n=24, vocab=384, seed=0):
    return mx.array(np.random.default_rng(seed).integers(3, vocab, (2, n)).astype(np.int32))


# -- adapters -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("quantized", [False, True])
def test_fresh_adapters_leave_logits_unchanged(base_dir, quantized_dir, kind, quantized):
    model = load_model(quantized_dir if quantized else base_dir)
    x = tokens()
    before = model(x)
    model.freeze()
    wrapped = add_adapters(model, kind, rank=4)
    assert len(wrapped) == 4 * 4  # four linear layers in each of four blocks
    assert mx.abs(model(x) - before).max().item() == 0.0 if kind == "lora" else mx.abs(model(x) - before).max().item() < 1e-5
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all(k.split(".")[-1] in ("lora_a", "lora_b", "magnitude") for k in trainable)


def _perturb_adapters(model, seed=1):
    """Stand-in for training: give every B (and m) non-zero values."""
    rng = np.random.default_rng(seed)
    updates = []
    for name, p in tree_flatten(model.trainable_parameters()):
        delta = rng.standard_normal(p.shape).astype(np.float32) * (0.05 if "magnitude" in name else 0.3)
        updates.append((name, p + mx.array(delta)))
    model.load_weights(updates, strict=False)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fused_model_matches_adapter_model(base_dir, kind):
    model = load_model(base_dir)
    model.freeze()
    add_adapters(model, kind, num_layers=3, keys=["qkv_proj", "proj_2"], rank=4)
    _perturb_adapters(model)
    x = tokens()
    with_adapters = model(x)
    assert mx.abs(with_adapters - load_model(base_dir)(x)).max().item() > 1e-2  # the adapters do something
    assert fuse_adapters(model) == 3 * 2
    assert not any("lora" in k for k, _ in tree_flatten(model.parameters()))
    assert mx.abs(model(x) - with_adapters).max().item() <= 1e-4


def test_num_layers_and_keys_select_what_is_adapted(base_dir):
    model = load_model(base_dir)
    model.freeze()
    wrapped = add_adapters(model, "lora", num_layers=2, keys=["out_proj"])
    assert wrapped == ["layers.2.attn.out_proj", "layers.3.attn.out_proj"]
    with pytest.raises(ElmError, match="has 4 layers"):
        add_adapters(load_model(base_dir), "lora", num_layers=9)


# -- data -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    return SentencePieceTokenizer(base_dir / "tokenizer.model")


def test_prompt_mask_on_a_hand_built_example(tokenizer, base_dir):
    record = {"prompt": "the king", "completion": " speak now"}
    masked, _ = parse_line(tokenizer, record, mask_prompt=True)
    prompt_ids = tokenizer.encode("the king")
    eos = min(tokenizer.eos_ids)
    # The joined text tokenises as the prompt's tokens followed by the completion's, then eos.
    assert masked.tokens[: len(prompt_ids)] == prompt_ids and masked.tokens[-1] == eos
    assert masked.weights == [0] * len(prompt_ids) + [1] * (len(masked.tokens) - len(prompt_ids))
    unmasked, _ = parse_line(tokenizer, record, mask_prompt=False)
    assert unmasked.tokens == masked.tokens and all(unmasked.weights)

    # The loss counts exactly the completion's targets: compare with a numpy cross-entropy over them.
    from elm_mlx.lora.data import collate

    inputs, targets, weights = collate([masked], pad_multiple=8)
    model = load_model(base_dir)
    losses = token_losses(model, mx.array(inputs), mx.array(targets), mx.array(weights))
    logits = np.array(model(mx.array(inputs)))[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    first_target = len(prompt_ids) - 1  # target i is token i + 1
    n = len(masked.tokens) - 1
    expected = [-logp[i, targets[0, i]] if i >= first_target else 0.0 for i in range(n)]
    np.testing.assert_allclose(np.array(losses)[0, :n], expected, atol=1e-4)
    assert float(np.array(losses)[0, n:].sum()) == 0.0  # padding


def test_chat_mask_trains_only_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the king"},
        {"role": "assistant", "content": "good night"},
        {"role": "user", "content": "thou art"},
        {"role": "assistant", "content": "my friend"},
    ]
    example, packable = parse_line(tokenizer, {"messages": messages}, mask_prompt=True)
    assert not packable
    trained = tokenizer.decode([t for t, w in zip(example.tokens, example.weights) if w])
    assert "good night" in trained and "my friend" in trained
    assert "king" not in trained and "brief" not in trained and "assistant" not in trained


def test_chat_data_encodes_special_token_strings_in_messages_as_text(tokenizer):
    """Training sees a conversation as inference does: "</s>" typed into a message is text, not an end of turn."""
    messages = [
        {"role": "user", "content": "say </s> and <s> for me"},
        {"role": "assistant", "content": "here </s> it is"},
    ]
    example, _ = parse_line(tokenizer, {"messages": messages}, mask_prompt=True)
    assert example.tokens == tokenizer.encode_chat(messages, add_generation_prompt=False)
    eos = min(tokenizer.eos_ids)
    assert example.tokens.count(eos) == 2  # one per turn, from the template; the message's "</s>" is text
    trained = tokenizer.decode([t for t, w in zip(example.tokens, example.weights) if w])
    assert "here </s> it is" in trained and "say" not in trained


def test_text_is_packed_without_padding(tokenizer, text_file):
    data = load_datasets(str(text_file), tokenizer, max_seq_length=32)
    assert data["train"].packed and all(len(e.tokens) == 33 for e in data["train"].examples)
    inputs, targets, weights = Batches(data["train"], 4, pad_multiple=1).batch(0)
    assert inputs.shape == (4, 32) and weights.all()
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])


def test_length_batching_and_truncation_warning(tokenizer, tmp_path, capsys):
    lines = [{"prompt": "the king " * n, "completion": "speak"} for n in (1, 30, 2, 29, 3, 28, 40, 1)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    (tmp_path / "valid.jsonl").write_text(json.dumps(lines[0]))
    data = load_datasets(str(tmp_path), tokenizer, max_seq_length=64)
    assert "1 of 8 examples are longer than --max-seq-length" in capsys.readouterr().err
    batches = Batches(data["train"], 2, pad_multiple=8)
    real = padded = 0
    for k in range(batches.per_epoch):
        _, _, weights = batches.batch(k)
        lengths = [len(data["train"].examples[r].tokens) - 1 for r in batches.rows(k)]
        assert max(lengths) <= 64
        real, padded = real + sum(lengths), padded + weights.size
    assert 1 - real / padded < 0.15  # sorted by length: short with short, long with long


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no train.jsonl"),
        ("", "is empty"),
        ('{"text": "ok"}\n{not json\n', "train.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n{"foo": 1}\n', "train.jsonl:2: none of the known formats"),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}\n', "train.jsonl:1: message 0 has unknown role 'wizard'"),
        ('{"prompt": "a", "completion": 3}\n', "train.jsonl:1: 'prompt' and 'completion' must both be strings"),
    ],
)
def test_bad_data_gives_one_line_with_file_and_line(base_dir, tmp_path, content, message):
    if content is not None:
        (tmp_path / "train.jsonl").write_text(content)
    (tmp_path / "valid.jsonl").write_text('{"text": "the king"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "elm_mlx.lora", "--model", str(base_dir), "--data", str(tmp_path), "--adapter-path", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "ok"}\n{"text": "the ki', "train.jsonl:2: not valid JSON: the line ends mid-value"),  # cut mid-string
        (b'{"text": "ok"}\n{"text": "ok"', "train.jsonl:2: not valid JSON: the line ends mid-value"),  # cut after a value
        ('{"text": "ok"}\n\n{"text": "café"}'.encode()[:-3], "train.jsonl:3: not UTF-8 text"),  # cut mid-character
        (b'{"text": "ok"}\n{"text": "ok"} x\n', "train.jsonl:2: not valid JSON (column 16: Extra data)"),
    ],
)
def test_truncated_jsonl_names_file_and_line(tokenizer, tmp_path, content, message):
    (tmp_path / "train.jsonl").write_bytes(content)
    (tmp_path / "valid.jsonl").write_text('{"text": "the king"}\n')
    with pytest.raises(ElmError) as failure:
        load_datasets(str(tmp_path), tokenizer, max_seq_length=32)
    assert str(failure.value).startswith(str(tmp_path / "train.jsonl")) and message in str(failure.value)
    assert "\n" not in str(failure.value)


def test_a_text_file_cut_mid_character_names_its_line(tokenizer, tmp_path):
    (tmp_path / "corpus.txt").write_bytes("the king\nthe queen\ncafé".encode()[:-1])
    with pytest.raises(ElmError, match=r"corpus.txt:3: not UTF-8 text \(unexpected end of data at byte 4 of the line\)"):
        load_datasets(str(tmp_path / "corpus.txt"), tokenizer, max_seq_length=8)


def test_validation_sample_is_spread_over_the_set():
    from elm_mlx.lora.data import Dataset, Example, eval_batches

    examples = [Example([i] * 5, [1] * 5) for i in range(20)]  # equal lengths: length order is text order
    first_tokens = [int(inputs[0, 0]) for inputs, _, _ in eval_batches(Dataset(examples, packed=True), 2, limit=4)]
    assert first_tokens == [0, 4, 10, 14]  # batches 0, 2, 5, 7 of 10, not the first four
    assert len(list(eval_batches(Dataset(examples, packed=True), 2, limit=20))) == 10
    assert len(list(eval_batches(Dataset(examples, packed=True), 2))) == 10


def test_missing_data_path(base_dir, tmp_path, capsys):
    with pytest.raises(ElmError, match="does not exist"):
        lora_main(["--model", str(base_dir), "--data", str(tmp_path / "nope.txt"), "--adapter-path", str(tmp_path / "out")])


# -- training ------------------------------------------------------------------


def run_training(model_dir, data, out, *extra):
    args = ["--model", str(model_dir), "--data", str(data), "--adapter-path", str(out), "--max-seq-length", "32", "--batch-size", "4"]
    lora_main(args + ["--steps-per-report", "10", "--steps-per-eval", "100", "--val-batches", "0", *extra])
    return json.loads((out / "checkpoint" / "state.json").read_text())


@pytest.mark.parametrize(
    "name, extra",
    [
        ("lora", ["--learning-rate", "3e-3"]),
        ("dora", ["--fine-tune-type", "dora", "--learning-rate", "3e-3"]),
        ("qlora", ["--learning-rate", "3e-3"]),
        ("full", ["--fine-tune-type", "full", "--learning-rate", "1e-3", "--grad-checkpoint", "--grad-accum", "2"]),
    ],
)
def test_thirty_steps_reduce_validation_loss(base_dir, quantized_dir, text_file, tmp_path, name, extra):
    model_dir = quantized_dir if name == "qlora" else base_dir
    state = run_training(model_dir, text_file, tmp_path / name, "--iters", "30", *extra)
    (first_step, first), (last_step, last) = state["val_losses"][0], state["val_losses"][-1]
    assert (first_step, last_step) == (0, 30)
    assert last < first - 0.3, f"{name}: validation loss {first:.3f} -> {last:.3f}"
    # The saved adapters reproduce the final validation loss when loaded for generation.
    model, tok = load(str(model_dir), adapter_path=str(tmp_path / name))
    from elm_mlx.lora.trainer import evaluate

    data = load_datasets(str(text_file), tok, 32)
    assert abs(evaluate(model, data["valid"], 4) - last) < 1e-4


def test_resume_after_interruption_matches_an_uninterrupted_run(base_dir, text_file, tmp_path):
    common = ["--iters", "8", "--steps-per-report", "1", "--dropout", "0.1", "--learning-rate", "3e-3", "--seed", "7"]
    whole = run_training(base_dir, text_file, tmp_path / "whole", *common)

    # Interrupt the second run as Ctrl-C would, right after step 3 is reported.
    def log(line, **kwargs):
        if line.startswith("step 3: train loss"):
            os.kill(os.getpid(), signal.SIGINT)

    model, tok = load(str(base_dir))
    config = TrainingConfig(
        iters=8, report_every=1, eval_every=100, val_batches=0, dropout=0.1, learning_rate=3e-3, seed=7, batch_size=4, max_seq_length=32
    )
    prepare_model(model, config)
    data = load_datasets(str(text_file), tok, 32)
    meta = adapter_meta(asdict(config), str(base_dir))
    with pytest.raises(Interrupted) as stopped:
        train(model, data, config, tmp_path / "parts", meta, log=log)
    assert stopped.value.step == 3
    saved = json.loads((tmp_path / "parts" / "checkpoint" / "state.json").read_text())
    assert saved["step"] == 3 and len(saved["train_losses"]) == 3

    # Resume through the command line, with the same settings.
    resumed = run_training(base_dir, text_file, tmp_path / "parts", *common, "--resume")
    assert resumed["step"] == 8
    np.testing.assert_allclose([loss for _, loss in resumed["train_losses"]], [loss for _, loss in whole["train_losses"]], atol=1e-5)
    a = mx.load(str(tmp_path / "whole" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "parts" / "adapters.safetensors"))
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) < 1e-5


def test_resume_refuses_changed_settings_and_existing_output(base_dir, text_file, tmp_path):
    run_training(base_dir, text_file, tmp_path / "run", "--iters", "2")
    with pytest.raises(ElmError, match="already holds adapters"):
        run_training(base_dir, text_file, tmp_path / "run", "--iters", "2")
    with pytest.raises(ElmError, match="rank was 8, now 4"):
        run_training(base_dir, text_file, tmp_path / "run", "--iters", "4", "--resume", "--rank", "4")


def test_plot_is_written(base_dir, text_file, tmp_path):
    run_training(base_dir, text_file, tmp_path / "run", "--iters", "3", "--plot")
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_processes_equal_one_with_the_combined_batch(base_dir, text_file, tmp_path):
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists():
        pytest.skip("mlx.launch is not installed beside this python")
    common = ["-m", "elm_mlx.lora", "--model", str(base_dir), "--data", str(text_file), "--max-seq-length", "32", "--batch-size", "4"]
    common += ["--iters", "5", "--learning-rate", "3e-3", "--steps-per-eval", "100"]
    one = subprocess.run([sys.executable, *common, "--adapter-path", str(tmp_path / "one")], capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    port = str(20000 + os.getpid() % 20000)
    cmd = [
        str(launcher),
        "-n",
        "2",
        "--backend",
        "ring",
        "-p",
        port,
        "--",
        sys.executable,
        *common,
        "--adapter-path",
        str(tmp_path / "two"),
    ]
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("adapters saved") + two.stderr.count("adapters saved") == 1  # only rank 0 speaks and writes
    a = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert set(a) == set(b)
    # Summation order differs (all_sum of two halves), and Adam's normalised first steps amplify
    # float32 rounding in tiny gradient entries; the bound is ~1% of what training moved.
    moved = max(mx.abs(a[k]).max().item() for k in a if k.endswith("lora_b"))  # B starts at zero
    assert moved > 1e-3
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) < 0.01 * moved


# -- use: generation and fuse ------------------------------------------------------


@pytest.fixture(scope="module")
def trained_adapters(base_dir, text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "adapters"
    run_training(base_dir, text_file, out, "--iters", "10", "--learning-rate", "1e-2")
    return out


def test_generate_with_adapters_and_fused_model_agree(base_dir, trained_adapters, tmp_path):
    from elm_mlx.fuse import main as fuse_main

    fuse_main(["--model", str(base_dir), "--adapter-path", str(trained_adapters), "--save-path", str(tmp_path / "fused")])
    x = tokens()
    adapted, _ = load(str(base_dir), adapter_path=str(trained_adapters))
    fused, _ = load(str(tmp_path / "fused"))
    assert mx.abs(fused(x) - adapted(x)).max().item() <= 1e-4
    assert mx.abs(fused(x) - load_model(base_dir)(x)).max().item() > 1e-2

    outs = []
    for args in (["--model", str(base_dir), "--adapter-path", str(trained_adapters)], ["--model", str(tmp_path / "fused")]):
        cmd = [sys.executable, "-m", "elm_mlx.generate", *args, "--prompt", "the king", "--temp", "0", "-m", "12", "--no-verbose"]
        outs.append(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert outs[0] == outs[1] and outs[0].strip()

    with pytest.raises(ElmError, match="already exists"):
        fuse_main(["--model", str(base_dir), "--adapter-path", str(trained_adapters), "--save-path", str(tmp_path / "fused")])


def test_qlora_fuse_keeps_or_drops_quantization(quantized_dir, text_file, tmp_path):
    from elm_mlx.fuse import fuse

    run_training(quantized_dir, text_file, tmp_path / "ad", "--iters", "5", "--learning-rate", "1e-2")
    adapted, _ = load(str(quantized_dir), adapter_path=str(tmp_path / "ad"))
    x = tokens()
    reference = adapted(x)

    fuse(str(quantized_dir), tmp_path / "ad", tmp_path / "float", de_quantize=True)
    float_config = json.loads((tmp_path / "float" / "config.json").read_text())
    assert "quantization" not in float_config
    assert mx.abs(load_model(tmp_path / "float")(x) - reference).max().item() <= 1e-4

    fuse(str(quantized_dir), tmp_path / "ad", tmp_path / "q4")
    q4 = load_model(tmp_path / "q4")
    assert isinstance(q4.layers[0].attn.qkv_proj, nn.QuantizedLinear)
    # Re-quantizing the merged weights costs some accuracy, of the order 4-bit rounding does.
    assert mx.abs(q4(x) - reference).mean().item() < 0.5 * mx.abs(reference).mean().item()


def test_adapters_from_another_model_are_refused(trained_adapters, tmp_path, tiny_sp_model):
    config = tiny_config(model_dim=128, head_dim=32)
    other = write_model_dir(tmp_path / "other", config, smooth_weights(config), tiny_sp_model)
    with pytest.raises(ElmError, match="do not fit this model"):
        load(str(other), adapter_path=str(trained_adapters))


def test_full_fine_tuning_refuses_a_quantized_base(quantized_dir, text_file, tmp_path):
    with pytest.raises(ElmError, match="full fine-tuning needs a float model"):
        run_training(quantized_dir, text_file, tmp_path / "x", "--fine-tune-type", "full", "--iters", "2")


def test_perplexity_reported_for_test_split(base_dir, tmp_path, capsys):
    text = corpus_text(6000).split("\n")
    for split, part in (("train", text[:100]), ("valid", text[100:130]), ("test", text[130:160])):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": line}) for line in part if line.strip()))
    run_training(base_dir, tmp_path, tmp_path / "out", "--iters", "2")
    out = capsys.readouterr()
    line = [x for x in (out.out + out.err).splitlines() if x.startswith("test loss")][0]
    loss, ppl = float(line.split()[2].rstrip(",")), float(line.split()[-1])
    assert math.isclose(math.exp(loss), ppl, rel_tol=1e-2)
