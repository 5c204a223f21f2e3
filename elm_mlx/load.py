"""Loading an MLX model directory (local or from the Hugging Face Hub).

A model directory holds config.json, one or more *.safetensors files (with
Apple's weight names) and tokenizer files. A `quantization` block in
config.json ({"group_size": 64, "bits": 4}, optionally with per-layer
overrides keyed by module path) marks quantized weights, as in the
mlx-community OpenELM repos.

Anything else (Apple's PyTorch-layout repos, which lack a tokenizer, .bin
checkpoints, or a request for another dtype or quantization) is converted
once into a cache directory and loaded from there on every later run.
"""

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .dtypes import DTYPES, default_dtype  # noqa: F401  (DTYPES re-exported: the CLIs take their --dtype choices from here)
from .errors import ConfigError, ElmError
from .files import read_safetensors
from .hub import looks_like_repo_id, snapshot
from .models import architecture
from .tokenizer import Tokenizer, load_tokenizer


def resolve_model_path(path_or_repo: str) -> Path:
    """A local directory as is; a hub id ('org/name') downloaded into (or found in) the HF cache."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ElmError(f"{path} is a file; pass a model directory or a Hugging Face repo id")
        return path
    if not looks_like_repo_id(str(path_or_repo)):
        raise ElmError(f"model path {str(path_or_repo)!r} does not exist")
    return snapshot(str(path_or_repo))


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


def quantize_like(model: nn.Module, quantization: dict, weights: dict) -> None:
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
        weights.update(read_safetensors(file))
    weights = model.sanitize(weights)

    if config.get("quantization"):
        quantize_like(model, config["quantization"], weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise ElmError(f"the weights in {model_dir} do not match its config.json: {e}") from None
    mx.eval(model.parameters())
    model.eval()
    return model


def cache_root() -> Path:
    if os.environ.get("ELM_MLX_CACHE"):
        return Path(os.environ["ELM_MLX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "elm_mlx"


def needs_conversion(model_dir: Path) -> bool:
    """True for directories elm_mlx should not load as they are: no safetensors, no tokenizer,
    or weights written by PyTorch (Apple's layout, whose config and dtype the converter settles)."""
    weights = sorted(model_dir.glob("*.safetensors"))
    has_tokenizer = (model_dir / "tokenizer.model").is_file() or (model_dir / "tokenizer.json").is_file()
    return not (weights and has_tokenizer) or _written_by_pytorch(weights[0])


def _written_by_pytorch(file: Path) -> bool:
    """transformers stamps {"format": "pt"} into safetensors metadata; MLX writers use "mlx" or nothing."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            return (f.metadata() or {}).get("format") == "pt"
    except Exception:  # unreadable here: let the loader report it properly
        return False


def _args(model_dir: Path):
    """The ModelArgs a source's config.json describes (read as the converter reads it)."""
    config = load_config(model_dir)
    try:
        return architecture(config.get("model_type", "openelm")).ModelArgs.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ElmError(f"{model_dir / 'config.json'}: invalid config ({e})") from None


def _converted_copy(
    model_dir: Path,
    name: str,
    dtype: Optional[str],
    q_bits: Optional[int],
    q_group_size: int,
    q_recipe: Optional[str],
    verbose: bool = True,
) -> Path:
    """Convert once into the cache; the key covers the source's files and every option.

    The one place elm_mlx uses the converter, imported here and not at module
    level: convert depends on elm_mlx, never the other way round at import time.
    """
    from convert.pipeline import convert_checkpoint

    if dtype is None:  # named here, not by the converter, because the cache key holds it
        dtype, _ = default_dtype(_args(model_dir).preferred_dtype)
    fingerprint = hashlib.sha256(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.iterdir()):
        fingerprint.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    variant = dtype + (f"-q{q_bits}g{q_group_size}" + (f"-{q_recipe}" if q_recipe else "") if q_bits else "")
    target = cache_root() / "converted" / f"{name.replace('/', '--')}-{fingerprint.hexdigest()[:12]}-{variant}"
    if target.is_dir():
        if verbose:
            print(f"using the converted copy in {target}", file=sys.stderr)
        return target
    if verbose:
        print(f"converting {name} to MLX ({variant}) into {target}; later runs reuse it", file=sys.stderr)
    convert_checkpoint(
        str(model_dir),
        target,
        dtype=dtype,
        quantize=q_bits is not None,
        q_bits=q_bits or 4,
        q_group_size=q_group_size,
        q_recipe=q_recipe,
        progress=verbose,
        name=name.split("/")[-1],
    )
    return target


def mlx_model_dir(
    path_or_repo: str,
    dtype: Optional[str] = None,
    q_bits: Optional[int] = None,
    q_group_size: int = 64,
    q_recipe: Optional[str] = None,
    verbose: bool = True,
) -> Path:
    """A directory elm_mlx can load: the given one, or its converted copy in the cache.

    With `dtype` or `q_bits`, or for a directory that is not MLX-ready (e.g.
    apple/OpenELM-270M-Instruct), a converted copy is made in the cache once.
    """
    model_dir = resolve_model_path(path_or_repo)
    load_config(model_dir)  # a directory that is no model at all fails here, before any conversion
    if dtype is not None or q_bits is not None or needs_conversion(model_dir):
        local = Path(path_or_repo).expanduser().exists()
        name = model_dir.resolve().name if local else str(path_or_repo)
        model_dir = _converted_copy(model_dir, name, dtype, q_bits, q_group_size, q_recipe, verbose)
    return model_dir


def load(
    path_or_repo: str,
    dtype: Optional[str] = None,
    q_bits: Optional[int] = None,
    q_group_size: int = 64,
    q_recipe: Optional[str] = None,
    adapter_path: Optional[str] = None,
    verbose: bool = True,
) -> Tuple[nn.Module, Tokenizer]:
    """Load a model and its tokenizer from a local directory or a Hugging Face repo id.

    Conversion (see mlx_model_dir) happens once and is cached. `adapter_path`
    applies fine-tuned adapters (python -m elm_mlx.lora) on top. `verbose`
    says where the converted copy is and shows the conversion's progress.
    """
    model_dir = mlx_model_dir(path_or_repo, dtype, q_bits, q_group_size, q_recipe, verbose)
    config = load_config(model_dir)
    model = load_model(model_dir, config)
    if adapter_path is not None:
        from .lora.adapters import apply_adapters

        apply_adapters(model, Path(adapter_path).expanduser())
    tokenizer = load_tokenizer(model_dir)
    eos = config.get("eos_token_id")
    tokenizer.eos_ids |= set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return model, tokenizer
