"""OLMo against transformers' OlmoForCausalLM (PyTorch, CPU), and its KV cache."""

import json

import mlx.core as mx
import numpy as np
import pytest

from conftest import REFERENCE_CONFIGS, need_shared
from elm_mlx.cache import make_cache
from elm_mlx.errors import ConfigError
from elm_mlx.load import build_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = [[3, 17, 250, 9, 100, 42, 7, 199, 5]]


def small_config(**overrides) -> dict:
    config = {
        "model_type": "olmo",
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "clip_qkv": None,
    }
    config.update(overrides)
    return config


def reference_and_ours(config: dict, seed: int = 0):
    """A transformers OLMo with random weights of a useful scale, and ours holding the same weights."""
    torch.manual_seed(seed)
    hf_config = transformers.OlmoConfig(**{k: v for k, v in config.items() if k != "model_type"})
    reference = transformers.OlmoForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.5 if "embed" in name else 0.1))
    ours = build_model(config)
    weights = ours.sanitize({k: mx.array(v.numpy()) for k, v in reference.state_dict().items()})
    ours.load_weights(list(weights.items()), strict=True)
    return reference, ours


def hf_logits(reference, tokens) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": False}, {"clip_qkv": 0.5}, {"num_key_value_heads": 2}],
    ids=["tied", "untied", "clip_qkv", "gqa"],
)
def test_logits_match_transformers(overrides):
    reference, ours = reference_and_ours(small_config(**overrides))
    expected = hf_logits(reference, TOKENS)
    got = np.array(ours(mx.array(TOKENS)))
    assert np.abs(expected).max() > 1.0
    assert np.abs(got - expected).max() <= 1e-4


def test_clip_qkv_is_active_in_the_clipped_test():
    """The clipping variant must differ from the unclipped model, or the test above proves nothing about it."""
    _, clipped = reference_and_ours(small_config(clip_qkv=0.5))
    _, plain = reference_and_ours(small_config())
    tokens = mx.array(TOKENS)
    assert mx.abs(clipped(tokens) - plain(tokens)).max().item() > 0.1


def test_cached_decoding_equals_full_forward():
    reference, ours = reference_and_ours(small_config(), seed=1)
    sequence = mx.array(np.random.default_rng(0).integers(0, 256, size=(1, 40)))
    full = ours(sequence)
    cache = make_cache(ours)
    ours(sequence[:, :8], cache=cache)
    for t in range(8, 40):
        step = ours(sequence[:, t : t + 1], cache=cache)
        assert mx.abs(step[0, -1] - full[0, t]).max().item() <= 1e-4, t


def test_published_olmo_1b_shape():
    config = json.loads(need_shared(REFERENCE_CONFIGS / "OLMo-1B-hf.json").read_text())
    from mlx.utils import tree_flatten

    model = build_model(config)  # lazy: the weights are never allocated
    # embeddings 50304*2048 + 16 layers * (attention 4*2048^2 + SwiGLU 3*2048*8192), tied output
    assert sum(p.size for _, p in tree_flatten(model.parameters())) == 50304 * 2048 + 16 * (4 * 2048**2 + 3 * 2048 * 8192)
    assert model.args.head_dim == 128 and len(model.layers) == 16


def test_bad_olmo_config():
    with pytest.raises(ConfigError, match="hidden_size \\(64\\) must be divisible by num_attention_heads \\(5\\)"):
        build_model(small_config(num_attention_heads=5))


def test_converter_handles_an_olmo_checkpoint(tmp_path):
    """save_pretrained output (safetensors + config.json) plus a byte-level tokenizer.json, through python -m convert."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from convert.pipeline import convert_checkpoint
    from elm_mlx import load

    config = small_config(tie_word_embeddings=False)
    reference, _ = reference_and_ours(config, seed=2)
    source = tmp_path / "OLMo-small-hf"
    reference.save_pretrained(source)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["the cat sat on the mat"] * 20,
        trainers.BpeTrainer(vocab_size=256, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.save(str(source / "tokenizer.json"))
    (source / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))

    summary = convert_checkpoint(str(source), tmp_path / "mlx", dtype="float32", progress=False)
    model, tokenizer = load(str(tmp_path / "mlx"))
    assert summary.dtype == "float32" and type(model).__module__ == "elm_mlx.models.olmo"
    assert np.abs(np.array(model(mx.array(TOKENS))) - hf_logits(reference, TOKENS)).max() <= 1e-4
    assert tokenizer.add_bos is False and tokenizer.eos_ids == {0, config.get("eos_token_id", 50279)}  # tokenizer's and config's
    # with no dtype asked for: float32 where MLX computes on the CPU (half precision is slow there), else bfloat16 (OLMo's own)
    expected = "float32" if mx.default_device() == mx.cpu else "bfloat16"
    assert convert_checkpoint(str(source), tmp_path / "default", progress=False).dtype == expected
