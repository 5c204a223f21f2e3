"""Checkpoints as Apple's OpenELMForCausalLM saves them under transformers (issue 12, class 4).

Apple's modeling code makes `lm_head` None when share_input_output_layers is true
(OpenELMConfig's default is false); otherwise transformers ties lm_head to the
token embeddings whenever tie_word_embeddings is true, its default when the field
is absent. For untied configs OpenELMModel also creates a `classifier` that its
forward never uses, and save_pretrained writes it. Each case below is written as
save_pretrained would write it and the converted model's logits are compared with
a reference: mlx-lm's OpenELM trunk fed the test's own tensors, then the final
hidden state times the head Apple's code would use (named per case below).
"""

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import openelm as mlx_lm_openelm

from conftest import tiny_config
from convert.pipeline import convert_checkpoint
from elm_mlx import load
from elm_mlx.load import build_model
from elm_mlx.models import openelm

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

TOKENS = [[1, 40, 41, 300, 7, 99, 12, 5]]
EMB, HEAD, CLASSIFIER = "transformer.token_embeddings.weight", "lm_head.weight", "transformer.classifier.weight"
DROP_LINE = "dropping transformer.classifier.weight: unused by OpenELMForCausalLM"
ABSENT = "absent"

# (share_input_output_layers, tie_word_embeddings, which matrix Apple's model multiplies the final hidden state by)
CASES = [
    (True, True, "embeddings"),  # lm_head is None: F.linear(h, token_embeddings.weight)
    (True, False, "embeddings"),  # lm_head is None whatever tie_word_embeddings says
    (True, ABSENT, "embeddings"),
    (False, True, "embeddings"),  # lm_head exists but transformers ties it to the embeddings
    (False, ABSENT, "embeddings"),  # PretrainedConfig's default tie_word_embeddings=True applies
    (False, False, "lm_head"),  # the only truly untied case
]


def trunk_state(config: dict, seed: int) -> "OrderedDict[str, torch.Tensor]":
    """Random torch tensors for embeddings, layers and final norm (norm gains near 1)."""
    generator = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    trunk_config = {**config, "share_input_output_layers": True}  # names of everything but the head
    for name, p in tree_flatten(build_model(trunk_config).parameters()):
        scale = 0.5 if "embeddings" in name else 0.08
        value = 1 + 0.2 * torch.randn(p.shape, generator=generator) if name.endswith("norm.weight") else scale * torch.randn(p.shape, generator=generator)
        state[name] = value
    return state


def apple_checkpoint(share: bool, tie, with_classifier: bool, seed: int = 0):
    """(config.json dict, the model's state dict as Apple's model holds it after transformers ties weights)."""
    config = tiny_config(share_input_output_layers=share)
    if tie != ABSENT:
        config["tie_word_embeddings"] = tie
    state = trunk_state(config, seed)
    generator = torch.Generator().manual_seed(seed + 100)
    shape = state[EMB].shape
    if not share:
        tied = tie is not False
        state[HEAD] = state[EMB] if tied else 0.5 * torch.randn(shape, generator=generator)  # the same tensor when tied
        if with_classifier:
            state[CLASSIFIER] = 0.5 * torch.randn(shape, generator=generator)
    elif with_classifier:  # Apple's model would not have one; such a file still converts, without it
        state[CLASSIFIER] = 0.5 * torch.randn(shape, generator=generator)
    return config, state


def save_pretrained_layout(directory: Path, config: dict, state, layout: str) -> Path:
    """model.safetensors without the tensors that alias another (as save_pretrained removes them), or pytorch_model.bin."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    if layout == "safetensors":
        kept, seen = {}, set()
        for name, tensor in state.items():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                kept[name] = tensor.contiguous()
        save_file(kept, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(dict(state), directory / "pytorch_model.bin")  # aliasing tensors share one storage
    return directory


def reference_logits(config: dict, state, head: torch.Tensor) -> np.ndarray:
    """mlx-lm's OpenELM trunk with the test's tensors, then final hidden state @ head.T."""
    trunk = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict({**config, "share_input_output_layers": True}))
    trunk.load_weights([(k, mx.array(v.numpy())) for k, v in state.items() if k.startswith("transformer.") and k != CLASSIFIER])
    hidden = np.array(trunk.transformer(mx.array(TOKENS)))
    return hidden @ head.numpy().T


def max_diff(model, expected: np.ndarray) -> float:
    return float(np.abs(np.array(model(mx.array(TOKENS))) - expected).max())


@pytest.fixture()
def tokenizer_file(tmp_path, tiny_sp_model) -> str:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(tiny_sp_model)
    return str(path)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
@pytest.mark.parametrize("with_classifier", [True, False], ids=["classifier", "no-classifier"])
@pytest.mark.parametrize("share, tie, head", CASES, ids=[f"share={s}-tie={t}" for s, t, _ in CASES])
def test_head_is_the_one_apples_model_uses(tmp_path, tokenizer_file, capsys, share, tie, head, with_classifier, layout):
    config, state = apple_checkpoint(share, tie, with_classifier)
    source = save_pretrained_layout(tmp_path / "src", config, state, layout)
    out = tmp_path / "out"
    convert_checkpoint(str(source), out, tokenizer=tokenizer_file, dtype="float32", progress=False)
    stderr = capsys.readouterr().err

    model, _ = load(str(out))
    right = state[EMB] if head == "embeddings" else state[HEAD]
    assert max_diff(model, reference_logits(config, state, right)) <= 1e-4
    for name in (EMB, HEAD, CLASSIFIER):  # the check can fail: every other candidate head gives other logits
        if name in state and not torch.equal(state[name], right):
            assert max_diff(model, reference_logits(config, state, state[name])) > 0.1
    assert json.loads((out / "config.json").read_text())["share_input_output_layers"] is (head == "embeddings")
    assert stderr.count(DROP_LINE) == (1 if with_classifier else 0), stderr


def test_a_stored_lm_head_that_transformers_would_overwrite_is_not_used(tmp_path, tokenizer_file, capsys):
    """share false, tie_word_embeddings absent, yet a distinct lm_head.weight on disk: transformers ties it away."""
    config, state = apple_checkpoint(False, ABSENT, with_classifier=True)
    state[HEAD] = 0.5 * torch.randn(state[EMB].shape, generator=torch.Generator().manual_seed(7))
    source = save_pretrained_layout(tmp_path / "src", config, state, "bin")
    convert_checkpoint(str(source), tmp_path / "out", tokenizer=tokenizer_file, dtype="float32", progress=False)
    model, _ = load(str(tmp_path / "out"))
    assert max_diff(model, reference_logits(config, state, state[EMB])) <= 1e-4
    assert "dropping lm_head.weight" in capsys.readouterr().err


def test_untied_checkpoint_without_lm_head_is_refused_not_given_the_classifier(tmp_path, tokenizer_file):
    config, state = apple_checkpoint(False, False, with_classifier=True)
    del state[HEAD]
    source = save_pretrained_layout(tmp_path / "src", config, state, "safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "out"), "--tokenizer", tokenizer_file],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ") and "lm_head.weight" in lines[-1], result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_says_it_drops_the_unused_classifier(tmp_path, tokenizer_file):
    config, state = apple_checkpoint(False, False, with_classifier=True)
    source = save_pretrained_layout(tmp_path / "src", config, state, "safetensors")
    result = subprocess.run(
        [sys.executable, "-m", "convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "out"), "--tokenizer", tokenizer_file],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(DROP_LINE) == 1


def test_corenet_classifier_is_the_head(tmp_path, tokenizer_file, monkeypatch):
    """In a CoreNet .pt, classifier.weight is the untied output layer: kept, and used."""
    monkeypatch.setitem(openelm.CORENET_SIZES, "OpenELM-tiny", dict(num_transformer_layers=2, model_dim=64, head_dim=16))
    args = openelm.ModelArgs.from_corenet_name("OpenELM-tiny")
    generator = torch.Generator().manual_seed(3)
    state = OrderedDict()
    for name, p in tree_flatten(openelm.Model(args).parameters()):
        base = 1.0 if name.endswith("norm.weight") else 0.0
        state[name.removeprefix("transformer.")] = base + 0.1 * torch.randn(p.shape, generator=generator)
    state["classifier.weight"] = 0.5 * torch.randn(state["token_embeddings.weight"].shape, generator=generator)
    torch.save(dict(state), tmp_path / "checkpoint.pt")

    convert_checkpoint(str(tmp_path / "checkpoint.pt"), tmp_path / "out", corenet_model="OpenELM-tiny", tokenizer=tokenizer_file, dtype="float32", progress=False)
    model, _ = load(str(tmp_path / "out"))
    hidden = np.array(model.transformer(mx.array(TOKENS), None))
    logits = np.array(model(mx.array(TOKENS)))
    assert np.abs(logits - hidden @ state["classifier.weight"].numpy().T).max() <= 1e-4
    assert np.abs(logits - hidden @ state["token_embeddings.weight"].numpy().T).max() > 0.1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["share_input_output_layers"] is False
