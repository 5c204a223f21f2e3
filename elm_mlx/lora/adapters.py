"""Adapter directories: what training writes and what generation and fuse read.

A directory holds adapters.safetensors (the trained weights: A, B and m for
LoRA/DoRA, every weight for full fine-tuning) and adapter_config.json (how
to rebuild the adapted layers, plus the training settings for --resume).
"""

import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import ElmError
from ..files import read_safetensors
from .layers import add_adapters

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
FINE_TUNE_TYPES = ("lora", "dora", "full")
SHAPE_KEYS = ("fine_tune_type", "num_layers", "keys", "rank", "alpha", "dropout")


def adapter_meta(training: dict, base_model: str) -> dict:
    """adapter_config.json contents: the adapter's shape on top, then the full training settings."""
    return {"base_model": base_model, **{k: training[k] for k in SHAPE_KEYS}, "training": training}


def read_adapter_config(adapter_dir: Path) -> dict:
    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / CONFIG_FILE, adapter_dir / ADAPTER_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise ElmError(f"{adapter_dir} is not an adapter directory (needs {CONFIG_FILE} and {ADAPTER_FILE})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nesting
        raise ElmError(f"{config_file} is not valid JSON ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(config, dict):
        raise ElmError(f"{config_file} must hold a JSON object")
    missing = [k for k in SHAPE_KEYS if k not in config]
    if missing:
        raise ElmError(f"{config_file} lacks {', '.join(missing)}")
    problem = _shape_problem(config)
    if problem:
        raise ElmError(f"{config_file}: {problem}")
    return config


def _shape_problem(config: dict):
    """What is wrong with the adapter shape fields, if anything (they size the layers built from them)."""

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if config["fine_tune_type"] not in FINE_TUNE_TYPES:
        return f"fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)}, got {config['fine_tune_type']!r}"
    if not is_int(config["num_layers"]) or config["num_layers"] < -1:
        return f"num_layers must be an integer >= -1, got {config['num_layers']!r}"
    if not isinstance(config["keys"], list) or not all(isinstance(k, str) for k in config["keys"]):
        return "keys must be a list of layer names"
    if not is_int(config["rank"]) or not 1 <= config["rank"] <= 1 << 16:
        return f"rank must be an integer in [1, 65536], got {config['rank']!r}"
    for name in ("alpha", "dropout"):
        value = config[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"{name} must be a finite number, got {value!r}"
    return None


def apply_adapters(model: nn.Module, adapter_dir: Path) -> dict:
    """Rebuild the adapted layers and load the trained weights; return the adapter config."""
    config = read_adapter_config(adapter_dir)
    if config["fine_tune_type"] != "full":
        add_adapters(model, config["fine_tune_type"], config["num_layers"], config["keys"], config["rank"], config["alpha"], 0.0)
    weights = read_safetensors(Path(adapter_dir) / ADAPTER_FILE)
    own = dict(tree_flatten(model.parameters()))
    foreign = [k for k in weights if k not in own or own[k].shape != weights[k].shape]
    if foreign:
        k = foreign[0]
        found = f"shape {tuple(weights[k].shape)}, the model has {tuple(own[k].shape)}" if k in own else "the model has no such weight"
        raise ElmError(f"the adapters in {adapter_dir} do not fit this model: {k} ({found}); were they trained on another base?")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    return config
