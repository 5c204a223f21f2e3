"""PyTorch OpenELM checkpoint -> MLX model directory, in one function.

The output has the layout of mlx-community's OpenELM repos, so elm_mlx and
mlx-lm both load it: config.json (full per-layer lists, a `quantization`
block when quantized), model.safetensors (sharded above a size limit),
tokenizer files and a short model card.
"""

import json
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

import elm_mlx
from elm_mlx.dtypes import DTYPES, default_dtype
from elm_mlx.errors import ElmError
from elm_mlx.files import atomic_directory, refuse_existing, save_weights
from elm_mlx.models import architecture
from elm_mlx.progress import Progress
from elm_mlx.quantize import bits_per_weight, check_options, quantize_model

from .checkpoint import checked_weights, read_checkpoint
from .tokenizer_files import find_tokenizer, install_tokenizer


@dataclass
class ConversionSummary:
    output: Path
    parameters: int
    bytes_written: int
    dtype: str
    quantization: str
    seconds: float
    peak_memory_mb: float

    def __str__(self) -> str:
        return (
            f"wrote {self.output}: {self.parameters:,} parameters, {self.bytes_written / 1e6:,.1f} MB, "
            f"{self.dtype}, {self.quantization}, {self.seconds:.1f} s, peak memory {self.peak_memory_mb:,.0f} MB"
        )


def convert_checkpoint(
    source: str,
    mlx_path: Path,
    *,
    corenet_model: Optional[str] = None,
    corenet_config: Optional[Path] = None,
    tokenizer: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    q_recipe: Optional[str] = None,
    force: bool = False,
    max_shard_bytes: int = 5 << 30,
    progress: bool = True,
    name: Optional[str] = None,
) -> ConversionSummary:
    """Convert `source` (local path or Hub id) into the MLX directory `mlx_path`.

    `name` labels the model in its card and decides whether it gets the
    -Instruct chat template (default: the source's own name). With no `dtype`,
    elm_mlx.dtypes.default_dtype picks one for the device MLX runs on here.
    """
    start = time.perf_counter()
    mlx_path = Path(mlx_path)
    named = _named_paths(source, tokenizer, corenet_config)
    refuse_existing(mlx_path, force, named)  # before any slow work
    if quantize:
        check_options(q_bits, q_group_size, q_recipe)
    if dtype is not None and dtype not in DTYPES:
        raise ElmError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    mx.reset_peak_memory()

    checkpoint = read_checkpoint(source, corenet_model, corenet_config)
    checkpoint.name = name or checkpoint.name
    weights = checked_weights(checkpoint)
    tokenizer_files = find_tokenizer(tokenizer, checkpoint.directory, checkpoint.args.model_type)
    if dtype is None:
        dtype, why = default_dtype(checkpoint.args.preferred_dtype)
        if progress:
            print(f"dtype: {dtype} ({why}; --dtype to override)", file=sys.stderr)
    target = DTYPES[dtype]

    model = architecture(checkpoint.args.model_type).Model(checkpoint.args)
    model.load_weights([(k, v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()])
    parameters = sum(p.size for _, p in tree_flatten(model.parameters()))
    config = checkpoint.args.to_dict()
    quant_text = "not quantized"
    if quantize:
        config["quantization"] = quantize_model(model, q_bits, q_group_size, q_recipe)
        quant_text = f"{q_bits}-bit, group size {q_group_size}" + (f", recipe {q_recipe}" if q_recipe else "")
        quant_text += f" ({bits_per_weight(model):.2f} bits/weight)"

    output = dict(tree_flatten(model.parameters()))
    with Progress(len(output), "converting", "tensor", enabled=progress) as bar:  # a bar on a terminal, else plain lines
        for key in sorted(output):
            mx.eval(output[key])
            bar.update()
    del weights, checkpoint.weights

    keep = named + checkpoint.sources + list(tokenizer_files.values())
    with atomic_directory(mlx_path, force, keep) as staging:
        save_weights(staging, output, max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        install_tokenizer(tokenizer_files, staging, checkpoint.name)
        (staging / "README.md").write_text(_model_card(checkpoint.name, checkpoint.origin, parameters, dtype, quant_text))
    written = sum(f.stat().st_size for f in mlx_path.iterdir())
    return ConversionSummary(mlx_path, parameters, written, dtype, quant_text, time.perf_counter() - start, mx.get_peak_memory() / 1e6)


def _named_paths(*options) -> list:
    """The local paths among the user's options: --force must never replace them or a folder holding them."""
    return [Path(o).expanduser() for o in options if o is not None and Path(o).expanduser().exists()]


def _model_card(name: str, origin: str, parameters: int, dtype: str, quantization: str) -> str:
    return f"""# {name} (MLX)

Converted to MLX by elm-mlx {elm_mlx.__version__} on {date.today().isoformat()}.

- source: {origin}
- parameters: {parameters:,}
- dtype: {dtype}
- quantization: {quantization}

Run it:

    python -m elm_mlx.generate --model PATH_TO_THIS_DIRECTORY --prompt "Once upon a time"

The weights keep the licence of the original checkpoint (Apple's OpenELM models: the Apple Sample
Code License; the Llama-2 tokenizer they use: Meta's Llama 2 Community License).
"""
