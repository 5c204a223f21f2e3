"""Merge fine-tuned adapters into a new model directory.

elm-mlx fuse [--model BASE] --adapter-path adapters --save-path fused [--de-quantize]

The result loads like any model directory (elm-mlx and mlx-lm) and runs at
the base model's speed. A quantized base stays quantized with the same
settings (each fused weight is re-quantized) unless --de-quantize asks for
float weights.
"""

import json
import shutil
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .cli import ArgumentParser, check_output_path, run_cli
from .files import atomic_directory, refuse_existing, save_weights
from .load import load_config, load_model, mlx_model_dir
from .lora.adapters import apply_adapters
from .lora.layers import fuse_adapters
from .options import add_verbose_option, resolve_model
from .quantize import dequantize_model
from .tokenizer import TOKENIZER_FILES


def fuse(model_path: str, adapter_path: Path, save_path: Path, de_quantize: bool = False, force: bool = False) -> Path:
    save_path = Path(save_path)
    refuse_existing(save_path, force)  # before loading anything
    check_output_path(save_path, "--save-path")
    model_dir = mlx_model_dir(model_path)  # Apple's PyTorch layout is converted (and cached) first
    config = load_config(model_dir)
    model = load_model(model_dir, config)
    adapter_config = apply_adapters(model, adapter_path)
    fuse_adapters(model, dequantize=de_quantize)
    if de_quantize:
        dequantize_model(model)
        config.pop("quantization", None)

    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    with atomic_directory(save_path, force) as staging:
        save_weights(staging, weights)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, staging / name)
        (staging / "README.md").write_text(
            f"# {save_path.name}\n\n{Path(str(model_path)).name} with {adapter_config['fine_tune_type']} adapters from "
            f"{Path(adapter_path).name} fused in by elm-mlx"
            + (" (de-quantized)" if de_quantize else "")
            + '.\n\nRun it:\n\n    python -m elm_mlx.generate --model PATH_TO_THIS_DIRECTORY --prompt "..."\n'
        )
    return save_path


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m elm_mlx.fuse", description="Merge fine-tuned adapters into a new model directory.")
    p.add_argument(
        "--model",
        help="the base model the adapters were trained on, directory or repo id (default: the one adapter_config.json names)",
    )
    p.add_argument("--adapter-path", default="adapters", help="adapter directory (default: %(default)s)")
    p.add_argument("--save-path", default="fused_model", help="new model directory (default: %(default)s)")
    p.add_argument("--de-quantize", action="store_true", help="write float weights even if the base is quantized")
    p.add_argument("--force", action="store_true", help="replace --save-path if it is an earlier elm-mlx output")
    add_verbose_option(p, "print which base model is used")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    model = resolve_model(args.model, args.adapter_path, verbose=args.verbose)
    out = fuse(model, Path(args.adapter_path), Path(args.save_path), args.de_quantize, args.force)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
