"""ModelArgs: both construction routes, parameter counts, and rejection of broken configs."""

import json

import pytest
from mlx.utils import tree_flatten

from conftest import REFERENCE_CONFIGS, need_shared, tiny_config
from elm_mlx.errors import ConfigError
from elm_mlx.models.openelm import Model, ModelArgs, make_divisible

SIZES = ["270M", "450M", "1_1B", "3B"]


@pytest.mark.parametrize("size", SIZES)
def test_corenet_name_gives_the_published_per_layer_lists(size):
    published = json.loads(need_shared(REFERENCE_CONFIGS / f"OpenELM-{size}.json").read_text())
    from_hf = ModelArgs.from_dict(published)
    from_corenet = ModelArgs.from_corenet_name(f"OpenELM-{size}")
    for field in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
        assert getattr(from_corenet, field) == published[field] == getattr(from_hf, field)
    for field in ("model_dim", "head_dim", "num_transformer_layers", "vocab_size"):
        assert getattr(from_corenet, field) == published[field]


@pytest.mark.parametrize(
    "size, expected",
    [("270M", 271_527_168), ("450M", 457_179_136), ("1_1B", 1_079_891_456), ("3B", 3_036_647_424)],
)
def test_parameter_counts_with_tied_embeddings(size, expected):
    # Modules are built lazily: counting never allocates the weights.
    model = Model(ModelArgs.from_corenet_name(f"OpenELM-{size}"))
    assert sum(p.size for _, p in tree_flatten(model.parameters())) == expected


def test_layerwise_rule_by_hand():
    # 270M, first layer: 0.5 * 1280 = 640 -> nearest multiple of 64*4 = 768 -> 12 heads, 3 kv heads;
    # FFN 0.5 * 1280 = 640 -> multiple of 256 -> 768.
    args = ModelArgs.from_corenet_name("OpenELM-270M")
    assert (args.num_query_heads[0], args.num_kv_heads[0], args.ffn_dim(0)) == (12, 3, 768)
    # last layer: 1.0 * 1280 = 1280 -> 20 heads; FFN 4.0 * 1280 = 5120.
    assert (args.num_query_heads[-1], args.num_kv_heads[-1], args.ffn_dim(15)) == (20, 5, 5120)
    assert make_divisible(100, 64) == 128 and make_divisible(95, 64) == 128 and make_divisible(60, 64) == 64


def test_untied_output_layer_adds_lm_head():
    tied = Model(ModelArgs.from_dict(tiny_config()))
    untied = Model(ModelArgs.from_dict(tiny_config(share_input_output_layers=False)))
    count = lambda m: sum(p.size for _, p in tree_flatten(m.parameters()))  # noqa: E731
    assert count(untied) - count(tied) == 64 * 384
    assert "lm_head" in untied and "lm_head" not in tied


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_query_heads": [4, 4, 8]}, "num_query_heads has 3 entries but num_transformer_layers is 4"),
        ({"num_kv_heads": [1, 1, 3, 2]}, "layer 2: num_query_heads (8) must be a positive multiple of num_kv_heads (3)"),
        ({"ffn_multipliers": [0.5, 1.0, -1.0, 2.0]}, "layer 2: ffn_multipliers entry must be positive"),
        ({"model_dim": 0}, "model_dim must be a positive integer"),
        ({"activation_fn_name": "gelu"}, "activation_fn_name 'gelu' is not supported"),
        ({"normalization_layer_name": "layer_norm"}, "normalization_layer_name 'layer_norm' is not supported"),
    ],
)
def test_contradictory_config_is_rejected(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelArgs.from_dict(tiny_config(**change))


def test_missing_field_is_named():
    config = tiny_config()
    del config["num_kv_heads"]
    with pytest.raises(ConfigError, match="missing required field.*num_kv_heads"):
        ModelArgs.from_dict(config)


def test_unknown_corenet_name():
    with pytest.raises(ConfigError, match="unknown OpenELM size 'OpenELM-7B'"):
        ModelArgs.from_corenet_name("OpenELM-7B")
