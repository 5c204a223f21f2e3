"""Adapter directories: what training writes and what generation and fuse read.

A directory holds adapters.safetensors (the trained weights: A, B and m for
LoRA/DoRA, every weight for full fine-tuning) and adapter_config.json (how
to rebuild the adapted layers, plus the training settings for --resume).
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import ElmError
from .layers import add_adapters

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
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
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ElmError(f"{config_file} is not valid JSON ({e})") from None
    missing = [k for k in SHAPE_KEYS if k not in config]
    if missing:
        raise ElmError(f"{config_file} lacks {', '.join(missing)}")
    return config


def apply_adapters(model: nn.Module, adapter_dir: Path) -> dict:
    """Rebuild the adapted layers and load the trained weights; return the adapter config."""
    config = read_adapter_config(adapter_dir)
    if config["fine_tune_type"] != "full":
        add_adapters(model, config["fine_tune_type"], config["num_layers"], config["keys"], config["rank"], config["alpha"], 0.0)
    weights = mx.load(str(Path(adapter_dir) / ADAPTER_FILE))
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
