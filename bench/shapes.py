"""The model shapes the benchmark knows by name, as config.json dicts (weights are random)."""

from elm_mlx.errors import ElmError
from elm_mlx.models.openelm import CORENET_SIZES, ModelArgs

# allenai/OLMo-1B-hf's config.json (transformers-native OLMo).
OLMO_1B = {
    "model_type": "olmo",
    "vocab_size": 50304,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
    "clip_qkv": None,
}

# Small stand-ins for --quick: layer-wise scaled OpenELM and a uniform OLMo.
OPENELM_TINY = {
    "model_type": "openelm",
    "vocab_size": 2048,
    "model_dim": 256,
    "head_dim": 32,
    "num_transformer_layers": 4,
    "num_query_heads": [4, 4, 8, 8],
    "num_kv_heads": [1, 1, 2, 2],
    "ffn_multipliers": [0.5, 1.0, 1.5, 2.0],
    "ffn_dim_divisor": 64,
    "max_context_length": 2048,
}
OLMO_TINY = {
    **OLMO_1B,
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}


def _openelm(name: str) -> dict:
    return ModelArgs.from_corenet_name(name).to_dict()


SHAPES = {
    **{f"openelm-{name.split('-', 1)[1]}": (lambda n=name: _openelm(n)) for name in CORENET_SIZES},
    "olmo-1B": lambda: dict(OLMO_1B),
    "openelm-tiny": lambda: dict(OPENELM_TINY),
    "olmo-tiny": lambda: dict(OLMO_TINY),
}
DEFAULT_MODELS = ["openelm-270M", "openelm-450M", "openelm-1_1B", "openelm-3B", "olmo-1B"]
QUICK_MODELS = ["openelm-tiny", "olmo-tiny"]


def shape_config(name: str) -> dict:
    if name not in SHAPES:
        raise ElmError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)} (or pass a model directory)")
    return SHAPES[name]()
