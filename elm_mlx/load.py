"""Loading an MLX model directory (local or from the Hugging Face Hub).

A model directory holds config.json, one or more *.safetensors files (with
Apple's weight names) and tokenizer files. A `quantization` block in
config.json ({"group_size": 64, "bits": 4}, optionally with per-layer
overrides keyed by module path) marks quantized weights, as in the
mlx-community OpenELM repos.
"""

import json
import re
from pathlib import Path
from typing import Tuple

import mlx.core as mx
import mlx.nn as nn

from .errors import ConfigError, ElmError
from .models import architecture
from .tokenizer import Tokenizer, load_tokenizer

# What a model directory needs; nothing else is downloaded.
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(path_or_repo: str) -> Path:
    """A local directory as is; a hub id ('org/name') downloaded into (or found in) the HF cache."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ElmError(f"{path} is a file; pass a model directory or a Hugging Face repo id")
        return path
    if not _REPO_ID.match(str(path_or_repo)):
        raise ElmError(f"model path {str(path_or_repo)!r} does not exist")
    return _download(str(path_or_repo))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILE_PATTERNS))
    except GatedRepoError:
        raise ElmError(f"{repo_id} is gated on the Hugging Face Hub; accept its licence there and run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ElmError(f"{repo_id!r} is neither a local directory nor a model on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        raise ElmError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached; "
            "connect to the internet once to download it, or pass a local model directory"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ElmError(f"downloading {repo_id} failed: {e}") from None


def load_config(model_dir: Path) -> dict:
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise ElmError(f"{model_dir} has no config.json; is it a model directory?")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ElmError(f"{config_file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ElmError(f"{config_file} must hold a JSON object")
    return config


def build_model(config: dict) -> nn.Module:
    """An uninitialised-weights model of the architecture and shape a config describes."""
    arch = architecture(config.get("model_type", "openelm"))
    return arch.Model(arch.ModelArgs.from_dict(config))


def _quantize_like_checkpoint(model: nn.Module, quantization: dict, weights: dict) -> None:
    """Swap in quantized layers wherever the checkpoint stores quantized weights."""

    def predicate(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        return override if isinstance(override, dict) else True

    try:
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            mode=quantization.get("mode", "affine"),
            class_predicate=predicate,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"invalid quantization block {quantization}: {e}") from None


def load_model(model_dir: Path, config: dict = None) -> nn.Module:
    model_dir = Path(model_dir)
    config = config if config is not None else load_config(model_dir)
    try:
        model = build_model(config)
    except ConfigError as e:
        raise ConfigError(f"{model_dir / 'config.json'}: {e}") from None

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ElmError(f"{model_dir} has no *.safetensors weights (a PyTorch checkpoint? convert it: python -m convert)")
    weights = {}
    for file in files:
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError, OSError) as e:
            raise ElmError(f"cannot read {file.name}: {e}") from None
    weights = model.sanitize(weights)

    if config.get("quantization"):
        _quantize_like_checkpoint(model, config["quantization"], weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ElmError(f"the weights in {model_dir} do not match its config.json: {e}") from None
    mx.eval(model.parameters())
    model.eval()
    return model


def load(path_or_repo: str) -> Tuple[nn.Module, Tokenizer]:
    """Load a model and its tokenizer from a local directory or a Hugging Face repo id."""
    model_dir = resolve_model_path(path_or_repo)
    config = load_config(model_dir)
    model = load_model(model_dir, config)
    tokenizer = load_tokenizer(model_dir)
    eos = config.get("eos_token_id")
    tokenizer.eos_ids |= set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return model, tokenizer
