"""Hostile config.json fields: every bad type or range gets one ConfigError naming the field.

The in-process cases cover each numeric, boolean and list field of both
architectures; the end-to-end ones write config.json text by hand (NaN,
1e999, a million layers) and run the CLIs in a child under a memory cap.
"""

import json
import sys

import pytest

from conftest import REFERENCE_CONFIGS, need_shared, random_weights, tiny_config, write_model_dir
from elm_mlx.errors import ConfigError
from elm_mlx.models import architecture, olmo, openelm
from hostile import run_limited

NAN, INF = float("nan"), float("inf")
# Values wrong for any integer field: bool, float, string, null, list, NaN, negative, zero, huge.
BAD_INTS = [True, 4.0, "4", None, [4], NAN, -1, 0, 10**9, 2**70]
BAD_FLOATS = [NAN, INF, -INF, -1.0, 0, "1e4", True, None, [1.0], 1e300]
BAD_BOOLS = ["yes", 1, 0, None, "true"]

OPENELM_INTS = ["vocab_size", "model_dim", "head_dim", "num_transformer_layers", "ffn_dim_divisor", "num_gqa_groups",
                "rope_max_length", "max_context_length"]  # fmt: skip
OPENELM_FLOATS = ["rope_freq_constant", "rms_norm_eps"]
OPENELM_BOOLS = ["ffn_with_glu", "normalize_qk_projections", "share_input_output_layers"]


def olmo_config(**overrides) -> dict:
    config = dict(model_type="olmo", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip
    return {**config, **overrides}


OLMO_INTS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings"]  # fmt: skip
OLMO_FLOATS = ["rope_theta", "layer_norm_eps"]
OLMO_BOOLS = ["attention_bias", "tie_word_embeddings"]


def cases(fields, bad_values, make):
    allowed = ("num_key_value_heads", None)  # OLMo: null means one kv head per query head
    return [pytest.param(make(**{f: v}), f, id=f"{f}={v!r:.20}") for f in fields for v in bad_values if (f, v) != allowed]


# The per-layer lists, entry by entry and as a whole.
LAYER_CASES = [
    pytest.param(tiny_config(**{name: value}), name, id=f"{name}={value!r:.24}")
    for name, good in (("num_query_heads", [4, 4, 8, 8]), ("num_kv_heads", [1, 1, 2, 2]), ("ffn_multipliers", [0.5, 1.0, 1.5, 2.0]))
    for value in ("4,4,8,8", 4, None, good[:3], good * 2, {"0": 4}, good[:3] + [True], good[:3] + ["8"], good[:3] + [NAN],
                  good[:3] + [-2], good[:3] + [10**9], good[:3] + [None])  # fmt: skip
]
OTHER_CASES = [
    pytest.param(tiny_config(qkv_multipliers=value), "qkv_multipliers", id=f"qkv_multipliers={value!r:.20}")
    for value in ("0.5", [NAN, 1.0], [0.5, -1.0], [], [0.5, 1.0, 2.0], [True, 1.0], 1e300)
] + [
    pytest.param(tiny_config(**{name: value}), name, id=f"{name}={value!r:.20}")
    for name in ("bos_token_id", "eos_token_id")
    for value in (-1, "2", 2.0, True, [1, "2"], list(range(100)), 2**40)
] + [
    pytest.param(tiny_config(num_transformer_layers=2000), "num_transformer_layers", id="layers-2000"),
    pytest.param(olmo_config(num_hidden_layers=2000), "num_hidden_layers", id="olmo-layers-2000"),
    pytest.param(tiny_config(activation_fn_name=["swish"]), "activation_fn_name", id="activation-list"),
    pytest.param(tiny_config(normalization_layer_name=None), "normalization_layer_name", id="norm-null"),
    pytest.param(olmo_config(clip_qkv=NAN), "clip_qkv", id="clip_qkv=nan"),
    pytest.param(olmo_config(clip_qkv=-1), "clip_qkv", id="clip_qkv=-1"),
    pytest.param(olmo_config(clip_qkv="8"), "clip_qkv", id="clip_qkv=str"),
    pytest.param(olmo_config(hidden_act=["silu"]), "hidden_act", id="hidden_act-list"),
]
ALL_CASES = (
    cases(OPENELM_INTS, BAD_INTS, tiny_config) + cases(OPENELM_FLOATS, BAD_FLOATS, tiny_config)
    + cases(OPENELM_BOOLS, BAD_BOOLS, tiny_config) + cases(OLMO_INTS, BAD_INTS, olmo_config)
    + cases(OLMO_FLOATS, BAD_FLOATS, olmo_config) + cases(OLMO_BOOLS, BAD_BOOLS, olmo_config) + LAYER_CASES + OTHER_CASES
)  # fmt: skip


@pytest.mark.parametrize("config, field", ALL_CASES)
def test_each_bad_field_is_refused_naming_it(config, field):
    module = architecture(config["model_type"])
    with pytest.raises(ConfigError) as caught:
        module.ModelArgs.from_dict(config)
    message = str(caught.value)
    assert field in message and "\n" not in message and len(message) < 300, message


@pytest.mark.parametrize("config", [[1, 2], "openelm", None, 5])
@pytest.mark.parametrize("module", [openelm, olmo])
def test_a_config_that_is_not_an_object_is_refused(module, config):
    with pytest.raises(ConfigError, match="must be a JSON object"):
        module.ModelArgs.from_dict(config)


@pytest.mark.parametrize("model_type", [["openelm"], {"a": 1}, 5, None, "x" * 10_000])
def test_a_model_type_that_is_not_a_known_string_is_refused(model_type):
    with pytest.raises(ConfigError, match="unsupported model_type") as caught:
        architecture(model_type)
    assert len(str(caught.value)) < 200


def test_good_configs_still_pass():
    """The tiny test configs, the per-layer forms with floats where allowed, and several eos ids."""
    openelm.ModelArgs.from_dict(tiny_config(rope_freq_constant=500000.0, rms_norm_eps=1e-5, eos_token_id=[2, 7], bos_token_id=None))
    olmo.ModelArgs.from_dict(olmo_config(clip_qkv=8.0, rope_theta=10000, num_key_value_heads=None))
    olmo.ModelArgs.from_dict(olmo_config(rope_parameters={"rope_theta": 500000.0}))


@pytest.mark.parametrize("name", ["OpenELM-270M", "OpenELM-450M", "OpenELM-1_1B", "OpenELM-3B", "OLMo-1B-hf"])
def test_published_configs_still_load(name):
    config = json.loads((need_shared(REFERENCE_CONFIGS) / f"{name}.json").read_text())
    args = architecture(config.get("model_type", "openelm")).ModelArgs.from_dict(config)
    assert args.vocab_size == config["vocab_size"]


# --------------------------------------------------------------------------
# End to end: config.json text written by hand, the CLIs in a capped child
# --------------------------------------------------------------------------


def config_text(**overrides) -> str:
    """tiny_config as JSON, with overrides spliced in as raw JSON text (NaN, 1e999, ...)."""
    config = tiny_config(**{k: f"@{k}@" for k in overrides})
    text = json.dumps(config)
    for key, raw in overrides.items():
        text = text.replace(f'"@{key}@"', raw)
    return text


MILLION = ",".join(["4"] * 10**6)
END_TO_END = [
    ('{"num_transformer_layers": 1000000, "num_query_heads": [%s], "num_kv_heads": [%s], "ffn_multipliers": [%s]}'
     % (MILLION, MILLION.replace("4", "1"), MILLION.replace("4", "1.0")), "num_transformer_layers"),
    ({"rms_norm_eps": "NaN"}, "rms_norm_eps"),
    ({"rope_freq_constant": "1e999"}, "rope_freq_constant"),
    ({"model_dim": "true"}, "model_dim"),
    ({"vocab_size": "\"32000\""}, "vocab_size"),
    ({"head_dim": "99999999999999999999999"}, "head_dim"),
]  # fmt: skip


def write_source(directory, spec, tokenizer_model: bytes) -> None:
    """A good tiny model directory (weights, tokenizer) whose config.json is then replaced by the bad text."""
    write_model_dir(directory, tiny_config(), random_weights(tiny_config()), tokenizer_model)
    if isinstance(spec, str):  # a whole override of the layer fields
        config = tiny_config()
        config.update(json.loads(spec))
        text = json.dumps(config)
    else:
        text = config_text(**spec)
    (directory / "config.json").write_text(text)


@pytest.mark.parametrize("spec, field", END_TO_END, ids=["million-layers", "eps-nan", "rope-inf", "dim-true", "vocab-str", "head-huge"])
@pytest.mark.parametrize("cli", ["convert", "generate"])
def test_bad_config_files_give_one_line_in_the_clis(tmp_path, tiny_sp_model, spec, field, cli):
    source = tmp_path / "src"
    write_source(source, spec, tiny_sp_model)
    if cli == "convert":
        argv = [sys.executable, "-m", "convert", "--hf-path", str(source), "--mlx-path", str(tmp_path / "out")]
    else:
        argv = [sys.executable, "-m", "elm_mlx.generate", "--model", str(source), "--prompt", "hi"]
    result = run_limited(argv, memory_bytes=1500 << 20, timeout=120, cwd=str(tmp_path))
    line = result.one_line_error()
    assert result.returncode == 1 and line.startswith("error: ") and field in line and "config.json" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
