"""Loading model directories: float, quantized (as mlx-lm writes them), broken ones."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import openelm as mlx_lm_openelm
from mlx_lm.utils import quantize_model

from conftest import random_weights, tiny_config, write_model_dir
from elm_mlx import load
from elm_mlx.errors import ElmError

TOKENS = mx.array([[1, 30, 31, 200, 5, 77, 12]])


def mlx_lm_quantized(config, weights, **kwargs):
    model = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(config))
    model.load_weights(list(weights.items()))
    return quantize_model(model, config, **kwargs)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_directory_written_by_mlx_lm_loads_and_matches(tmp_path, tiny_sp_model, bits):
    config = tiny_config()
    reference, qconfig = mlx_lm_quantized(config, random_weights(config), group_size=32, bits=bits)
    model_dir = write_model_dir(tmp_path / "q", qconfig, dict(tree_flatten(reference.parameters())), tiny_sp_model)

    model, _ = load(str(model_dir))
    assert isinstance(model.layers[0].attn.qkv_proj, nn.QuantizedLinear)
    assert isinstance(model.transformer.token_embeddings, nn.QuantizedEmbedding)
    assert model.layers[0].attn.qkv_proj.bits == bits
    assert mx.abs(model(TOKENS) - reference(TOKENS)).max().item() <= 1e-4


def test_mixed_precision_quantization_block(tmp_path, tiny_sp_model):
    config = tiny_config()
    eight_bit_first_layer = lambda path, module: {"group_size": 32, "bits": 8} if ".layers.0." in path else True  # noqa: E731
    reference, qconfig = mlx_lm_quantized(config, random_weights(config), group_size=32, bits=4, quant_predicate=eight_bit_first_layer)
    assert any(isinstance(v, dict) for v in qconfig["quantization"].values())  # per-layer entries were written
    model_dir = write_model_dir(tmp_path / "mixed", qconfig, dict(tree_flatten(reference.parameters())), tiny_sp_model)

    model, _ = load(str(model_dir))
    assert model.layers[0].ffn.proj_1.bits == 8 and model.layers[1].ffn.proj_1.bits == 4
    assert mx.abs(model(TOKENS) - reference(TOKENS)).max().item() <= 1e-4


def test_sharded_weights_and_config_eos_are_used(tmp_path, tiny_sp_model):
    config = tiny_config(eos_token_id=[2, 7])
    weights = random_weights(config)
    names = sorted(weights)
    model_dir = write_model_dir(tmp_path / "sharded", config, {}, tiny_sp_model)
    (model_dir / "model.safetensors").unlink()
    mx.save_safetensors(str(model_dir / "model-00001-of-00002.safetensors"), {k: weights[k] for k in names[::2]})
    mx.save_safetensors(str(model_dir / "model-00002-of-00002.safetensors"), {k: weights[k] for k in names[1::2]})
    model, tokenizer = load(str(model_dir))
    assert tokenizer.eos_ids == {2, 7}
    assert mx.array_equal(model.layers[3].ffn.proj_2.weight, weights["transformer.layers.3.ffn.proj_2.weight"])


def test_hub_id_is_found_in_the_local_cache_offline(tmp_path, tiny_model_dir, monkeypatch):
    """A repo already in the Hugging Face cache loads with the hub unreachable (HF_HUB_OFFLINE)."""
    import huggingface_hub.constants as hf_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--OpenELM-tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    model, tokenizer = load("someone/OpenELM-tiny")
    assert model.args.num_query_heads == [4, 4, 8, 8]


def test_hub_id_not_cached_and_offline_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ElmError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set; unset it to download"):
        load("apple/OpenELM-270M-Instruct")


def test_broken_directories(tmp_path, tiny_model_dir):
    with pytest.raises(ElmError, match="does not exist"):
        load(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(ElmError, match="has no config.json"):
        load(str(tmp_path))

    bad = shutil.copytree(tiny_model_dir, tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ElmError, match="not valid JSON"):
        load(str(bad))

    (bad / "config.json").write_text(json.dumps(tiny_config(num_kv_heads=[1, 1, 2])))
    with pytest.raises(ElmError, match="config.json: num_kv_heads has 3 entries"):
        load(str(bad))

    (bad / "config.json").write_text(json.dumps(tiny_config(model_dim=32)))
    with pytest.raises(ElmError, match="do not match its config.json"):
        load(str(bad))

    (bad / "config.json").write_text(json.dumps(tiny_config()))
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ElmError, match="cannot read model.safetensors"):
        load(str(bad))
