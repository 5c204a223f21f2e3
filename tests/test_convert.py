"""The converter, on checkpoints written by real torch and safetensors."""

import json
import os
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import openelm as mlx_lm_openelm

from conftest import REFERENCE_CONFIGS, need_shared, tiny_config
from convert.pipeline import convert_checkpoint
from elm_mlx import load
from elm_mlx.load import build_model

torch = pytest.importorskip("torch")  # the test extra installs it on Linux
from safetensors.torch import save_file  # noqa: E402

TOKENS = [[1, 40, 41, 300, 7, 99, 12, 5]]


def torch_state_dict(config: dict, seed: int = 0, dtype=torch.float32) -> "OrderedDict[str, torch.Tensor]":
    """Random weights in Apple's names, made with torch (norm gains near 1)."""
    generator = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for name, p in tree_flatten(build_model(config).parameters()):
        if name.endswith("norm.weight"):
            value = 1 + 0.2 * torch.randn(p.shape, generator=generator)
        else:
            value = torch.randn(p.shape, generator=generator) * (0.5 if "embeddings" in name else 0.08)
        state[name] = value.to(dtype)
    return state


def reference_logits(config: dict, state) -> mx.array:
    """mlx-lm's OpenELM with the torch tensors handed over directly, no converter involved."""
    model = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(config))
    model.load_weights([(k, mx.array(v.float().numpy())) for k, v in state.items()])
    return model(mx.array(TOKENS))


def write_hf(directory: Path, config: dict, state, fmt: str) -> Path:
    """Hugging Face layout: safetensors or .bin, single or in two shards with an index."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    ext, save = {"safetensors": ("safetensors", save_file), "bin": ("bin", torch.save)}[fmt.split("-")[0]]
    stem = "model" if ext == "safetensors" else "pytorch_model"
    if not fmt.endswith("sharded"):
        save(dict(state), str(directory / f"{stem}.{ext}"))
        return directory
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, half in enumerate(halves, 1):
        file_name = f"{stem}-{i:05d}-of-00002.{ext}"
        save({k: state[k] for k in half}, str(directory / file_name))
        weight_map.update(dict.fromkeys(half, file_name))
    (directory / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture()
def tokenizer_file(tmp_path, tiny_sp_model) -> str:
    path = tmp_path / "tok" / "tokenizer.model"
    path.parent.mkdir()
    path.write_bytes(tiny_sp_model)
    return str(path)


def run_convert(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("fmt", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
def test_converted_model_matches_a_direct_forward_in_both_runtimes(tmp_path, tokenizer_file, fmt):
    from mlx_lm import load as mlx_lm_load

    config = tiny_config(num_kv_heads=[1, 2, 2, 8], num_query_heads=[4, 4, 8, 8])  # GQA 4, 2, 4, 1
    state = torch_state_dict(config)
    source = write_hf(tmp_path / "src", config, state, fmt)
    out = tmp_path / "mlx"
    summary = convert_checkpoint(str(source), out, tokenizer=tokenizer_file, dtype="float32", progress=False)

    expected = reference_logits(config, state)
    ours, _ = load(str(out))
    theirs, _ = mlx_lm_load(str(out))
    assert mx.abs(ours(mx.array(TOKENS)) - expected).max().item() <= 1e-4
    assert mx.abs(theirs(mx.array(TOKENS)) - expected).max().item() <= 1e-4

    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "openelm" and written["num_kv_heads"] == [1, 2, 2, 8]
    assert "float32" in (out / "README.md").read_text()
    assert summary.parameters == sum(v.numel() for v in state.values())


def test_corenet_checkpoint_with_model_name(tmp_path, tokenizer_file):
    """A CoreNet .pt (no 'transformer.' prefix) of the real 270M shape, stored in bfloat16."""
    config = json.loads(need_shared(REFERENCE_CONFIGS / "OpenELM-270M.json").read_text())
    state = torch_state_dict(config, seed=1, dtype=torch.bfloat16)
    corenet = OrderedDict((k.removeprefix("transformer."), v) for k, v in state.items())
    torch.save(corenet, tmp_path / "checkpoint_best.pt")
    out = tmp_path / "mlx"
    result = run_convert(
        "--corenet-path",
        str(tmp_path / "checkpoint_best.pt"),
        "--corenet-model",
        "OpenELM-270M",
        "--mlx-path",
        str(out),
        "--tokenizer",
        tokenizer_file,
        "--dtype",
        "float32",
    )
    assert result.returncode == 0, result.stderr
    assert "271,527,168 parameters" in result.stdout
    model, _ = load(str(out))
    assert mx.abs(model(mx.array(TOKENS)) - reference_logits(config, state)).max().item() <= 1e-4


def test_corenet_yaml_names_the_model(tmp_path):
    from convert.checkpoint import corenet_model_name

    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("model:\n  language_modeling:\n    name: general_gpt\n    general_gpt:\n      model_name: OpenELM-450M\n")
    assert corenet_model_name(yaml_file) == "OpenELM-450M"


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sources_convert_bit_exactly(tmp_path, tokenizer_file, fmt, dtype):
    config = tiny_config()
    state = torch_state_dict(config, dtype=dtype)
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    convert_checkpoint(
        str(write_hf(tmp_path / "src", config, state, fmt)), tmp_path / "mlx", tokenizer=tokenizer_file, dtype=name, progress=False
    )
    converted = mx.load(str(tmp_path / "mlx" / "model.safetensors"))
    assert set(converted) == set(state)
    for key, tensor in state.items():
        assert converted[key].dtype == getattr(mx, name)
        raw = np.array(converted[key].view(mx.uint16))
        assert np.array_equal(raw, tensor.view(torch.int16).numpy().view(np.uint16)), key


def test_pickle_with_a_forbidden_global_is_refused_and_nothing_runs(tmp_path, tokenizer_file):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    config = tiny_config()
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config))
    torch.save({"transformer.norm.weight": torch.ones(64), "evil": Payload()}, source / "pytorch_model.bin")
    result = run_convert("--hf-path", str(source), "--mlx-path", str(tmp_path / "out"), "--tokenizer", tokenizer_file)
    assert result.returncode != 0
    assert "posix.system" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def quantized_size_expected(state, bits: int, group_size: int) -> float:
    """Bytes the bits imply: quantized matrices at bits + 32/group_size (float16 scale and bias), norms in float16."""
    total = 0.0
    for tensor in state.values():
        per_weight = 2 * 8 if tensor.ndim == 1 else bits + 32 / group_size
        total += tensor.numel() * per_weight / 8
    return total


QUANT_CONFIG = tiny_config(model_dim=256, head_dim=32, ffn_dim_divisor=64)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_conversion_loads_generates_and_has_the_implied_size(tmp_path, tokenizer_file, bits):
    from elm_mlx import SamplingParams, generate

    state = torch_state_dict(QUANT_CONFIG)
    source = write_hf(tmp_path / "src", QUANT_CONFIG, state, "safetensors")
    convert_checkpoint(str(source), tmp_path / "q", tokenizer=tokenizer_file, dtype="float16", quantize=True, q_bits=bits, progress=False)

    model, tokenizer = load(str(tmp_path / "q"))
    assert model.layers[0].attn.qkv_proj.bits == bits
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == {"group_size": 64, "bits": bits}
    assert generate(model, tokenizer, "the king", max_tokens=8, sampling=SamplingParams(temp=0))
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert abs(size / quantized_size_expected(state, bits, 64) - 1) < 0.10


def test_8_bit_logits_stay_close_to_the_float_model(tmp_path, tokenizer_file):
    """Measured on this random model (float32, so only quantization differs): 8-bit mean |diff| = 2.6% of the
    logits' standard deviation (max 1.02 on logits up to 27), top-1 agreement 8/8; 4-bit: 36%, 4/8."""
    state = torch_state_dict(QUANT_CONFIG)
    source = write_hf(tmp_path / "src", QUANT_CONFIG, state, "safetensors")
    expected = reference_logits(QUANT_CONFIG, state)
    errors = {}
    for bits in (8, 4):
        out = tmp_path / f"q{bits}"
        convert_checkpoint(str(source), out, tokenizer=tokenizer_file, dtype="float32", quantize=True, q_bits=bits, progress=False)
        logits = load(str(out))[0](mx.array(TOKENS))
        agreement = (mx.argmax(logits, -1) == mx.argmax(expected, -1)).mean().item()
        errors[bits] = (mx.abs(logits - expected).mean().item() / expected.std().item(), agreement)
    assert errors[8][0] < 0.05 and errors[8][1] >= 7 / 8, errors
    assert errors[4][0] > 3 * errors[8][0], errors  # the check can tell precision levels apart


def test_mixed_recipe_records_per_layer_bits(tmp_path, tokenizer_file):
    config = tiny_config(num_transformer_layers=8, num_query_heads=[4] * 8, num_kv_heads=[1] * 8, ffn_multipliers=[1.0] * 8)
    source = write_hf(tmp_path / "src", config, torch_state_dict(config), "safetensors")
    convert_checkpoint(
        str(source), tmp_path / "q", tokenizer=tokenizer_file, dtype="float32", quantize=True, q_recipe="mixed-4-6", progress=False
    )
    quantization = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    six = {path for path, params in quantization.items() if isinstance(params, dict) and params["bits"] == 6}
    assert "transformer.token_embeddings" in six
    assert "transformer.layers.0.attn.qkv_proj" in six and "transformer.layers.7.ffn.proj_1" in six
    assert "transformer.layers.1.ffn.proj_2" in six and "transformer.layers.5.ffn.proj_2" not in six
    assert "transformer.layers.3.attn.qkv_proj" not in six
    model, _ = load(str(tmp_path / "q"))
    assert model.layers[0].attn.qkv_proj.bits == 6 and model.layers[3].attn.qkv_proj.bits == 4


def corrupt(kind: str, source: Path, state) -> None:
    if kind == "truncated safetensors":
        data = (source / "model.safetensors").read_bytes()
        (source / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "truncated pt":
        (source / "model.safetensors").unlink()
        torch.save(dict(state), source / "pytorch_model.bin")
        data = (source / "pytorch_model.bin").read_bytes()
        (source / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    elif kind == "missing shard":
        (source / "model.safetensors").unlink()
        (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    elif kind == "shape mismatch":
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, "ffn_multipliers": [0.5, 1.0, 1.5, 3.0]}))
    elif kind == "unknown weight":
        save_file({**state, "transformer.extra.weight": torch.zeros(3)}, str(source / "model.safetensors"))


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated safetensors", "cannot read model.safetensors"),
        ("truncated pt", "pytorch_model.bin is not a PyTorch zip checkpoint"),
        ("missing shard", "missing shard model-00001-of-00002.safetensors"),
        ("shape mismatch", "but the config implies"),
        ("unknown weight", "unknown weight name 'transformer.extra.weight'"),
    ],
)
def test_bad_sources_fail_cleanly(tmp_path, tokenizer_file, kind, message):
    config = tiny_config()
    state = torch_state_dict(config)
    source = write_hf(tmp_path / "src", config, state, "safetensors")
    corrupt(kind, source, state)
    result = run_convert("--hf-path", str(source), "--mlx-path", str(tmp_path / "out"), "--tokenizer", tokenizer_file)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "tok"]  # no output, no partial directory


def test_existing_output_is_refused_unless_forced(tmp_path, tokenizer_file):
    config = tiny_config()
    source = write_hf(tmp_path / "src", config, torch_state_dict(config), "safetensors")
    out = tmp_path / "out"
    first = run_convert("--hf-path", str(source), "--mlx-path", str(out), "--tokenizer", tokenizer_file)
    assert first.returncode == 0, first.stderr
    before = (out / "model.safetensors").stat().st_mtime_ns
    result = run_convert("--hf-path", str(source), "--mlx-path", str(out), "--tokenizer", tokenizer_file)
    assert result.returncode != 0 and "already exists; pass --force" in result.stderr
    assert (out / "model.safetensors").stat().st_mtime_ns == before  # untouched
    result = run_convert("--hf-path", str(source), "--mlx-path", str(out), "--tokenizer", tokenizer_file, "--force")
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").is_file() and (out / "model.safetensors").stat().st_mtime_ns != before
    assert "parameters" in result.stdout and "MB" in result.stdout
    (out / "keep.txt").write_text("mine")  # something of the user's: --force no longer replaces the directory
    result = run_convert("--hf-path", str(source), "--mlx-path", str(out), "--tokenizer", tokenizer_file, "--force")
    assert result.returncode != 0 and "not an elm-mlx output file" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the default for MLX's CPU device")
def test_default_dtype_on_the_cpu_is_float32_and_said(tmp_path, tokenizer_file):
    """Half precision is emulated on MLX's CPU backend and several times slower there."""
    source = write_hf(tmp_path / "src", tiny_config(), torch_state_dict(tiny_config()), "safetensors")
    result = run_convert("--hf-path", str(source), "--mlx-path", str(tmp_path / "out"), "--tokenizer", tokenizer_file)
    assert result.returncode == 0, result.stderr
    assert "dtype: float32 (MLX runs on the CPU here; --dtype to override)" in result.stderr
    assert "float32" in result.stdout and "- dtype: float32" in (tmp_path / "out" / "README.md").read_text()
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.float32}

    result = run_convert("--hf-path", str(source), "--mlx-path", str(tmp_path / "half"), "--tokenizer", tokenizer_file, "--dtype", "float16")
    assert result.returncode == 0 and "dtype: " not in result.stderr, result.stderr  # named, so nothing to explain
    assert {v.dtype for v in mx.load(str(tmp_path / "half" / "model.safetensors")).values()} == {mx.float16}


def test_default_dtype_on_the_gpu_is_the_models_half_precision(monkeypatch):
    from elm_mlx.dtypes import default_dtype
    from elm_mlx.models.openelm import ModelArgs

    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert default_dtype(ModelArgs.from_corenet_name("OpenELM-270M").preferred_dtype) == ("float16", "MLX runs on the GPU here")
    assert default_dtype(ModelArgs.from_corenet_name("OpenELM-3B").preferred_dtype)[0] == "bfloat16"
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    assert default_dtype("bfloat16") == ("float32", "MLX runs on the CPU here")


@pytest.mark.parametrize(
    "options, block",
    [
        (["--q-bits", "8"], {"group_size": 64, "bits": 8}),
        (["--q-group-size", "32"], {"group_size": 32, "bits": 4}),
        (["-q"], {"group_size": 64, "bits": 4}),
    ],
)
def test_any_quantization_option_quantizes(tmp_path, tokenizer_file, options, block):
    """--q-bits without -q once converted silently unquantized."""
    source = write_hf(tmp_path / "src", QUANT_CONFIG, torch_state_dict(QUANT_CONFIG), "safetensors")
    result = run_convert("--hf-path", str(source), "--mlx-path", str(tmp_path / "q"), "--tokenizer", tokenizer_file, *options)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == block
    assert f"{block['bits']}-bit, group size {block['group_size']}" in result.stdout
    model, _ = load(str(tmp_path / "q"))
    assert model.layers[0].attn.qkv_proj.bits == block["bits"]


def test_missing_tokenizer_offline_says_what_to_pass(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    config = tiny_config()
    source = write_hf(tmp_path / "src", config, torch_state_dict(config), "safetensors")
    with pytest.raises(Exception, match="pass --tokenizer /path/to/tokenizer.model"):
        convert_checkpoint(str(source), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_generate_converts_a_pytorch_directory_once_and_reuses_it(tmp_path, tokenizer_file):
    config = tiny_config()
    source = write_hf(tmp_path / "OpenELM-tiny", config, torch_state_dict(config), "bin")
    (source / "tokenizer.model").write_bytes(Path(tokenizer_file).read_bytes())
    env = {**os.environ, "ELM_MLX_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "elm_mlx.generate", "--model", str(source), "--prompt", "the king", "--max-tokens", "5", "--temp", "0"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    assert "converting OpenELM-tiny to MLX (float32)" in first.stderr
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert "using the converted copy" in second.stderr and "converting" not in second.stderr
    assert first.stdout == second.stdout
    quantized = subprocess.run(command + ["--q-bits", "8", "--q-group-size", "32"], capture_output=True, text=True, env=env, timeout=120)
    assert quantized.returncode == 0 and "float32-q8g32" in quantized.stderr, quantized.stderr
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 2


def seed_hub_cache(hub: Path, repo_id: str, files: dict) -> None:
    """Lay out a repo in a Hugging Face cache as huggingface_hub itself does, so it resolves offline."""
    commit = "1" * 40
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_quickstart_path_apple_repo_id_offline_from_the_cache(tmp_path, tiny_sp_model):
    """`--model apple/...-Instruct`: an Apple-layout repo without tokenizer converts, fetching the tokenizer repo."""
    config = tiny_config()
    source = write_hf(tmp_path / "src", config, torch_state_dict(config), "safetensors")
    hub = tmp_path / "hub"
    seed_hub_cache(hub, "apple/OpenELM-tiny-Instruct", {f.name: f.read_bytes() for f in source.iterdir()})
    seed_hub_cache(hub, "someone/llama-tokenizer", {"tokenizer.model": tiny_sp_model})
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "ELM_MLX_CACHE": str(tmp_path / "cache"),
        "ELM_MLX_TOKENIZER_REPO": "someone/llama-tokenizer",
    }
    command = [sys.executable, "-m", "elm_mlx.generate", "--model", "apple/OpenELM-tiny-Instruct", "--prompt", "hi", "--max-tokens", "4"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    (converted,) = (tmp_path / "cache" / "converted").iterdir()
    assert converted.name.startswith("apple--OpenELM-tiny-Instruct-")
    assert "<|assistant|>" in json.loads((converted / "tokenizer_config.json").read_text())["chat_template"]
    assert "# OpenELM-tiny-Instruct (MLX)" in (converted / "README.md").read_text()
    # chat formatting was on: the prompt is far longer than "hi" with BOS
    assert int(re.search(r"prompt: (\d+) tokens", result.stderr).group(1)) > 5
