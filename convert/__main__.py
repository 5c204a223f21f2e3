"""python -m convert: PyTorch OpenELM checkpoints to MLX model directories.

python -m convert --hf-path apple/OpenELM-270M-Instruct --mlx-path OpenELM-270M-Instruct-mlx
python -m convert --hf-path ./OpenELM-1_1B --mlx-path out -q   (4-bit; any --q-* option implies -q)
python -m convert --corenet-path checkpoint.pt --corenet-model OpenELM-450M --mlx-path out
"""

from pathlib import Path

import elm_mlx  # noqa: F401  (selects the BLAS before mlx loads)
from elm_mlx.cli import ArgumentParser, float_in, run_cli
from elm_mlx.dtypes import DTYPES
from elm_mlx.errors import ElmError
from elm_mlx.models.openelm import CORENET_SIZES
from elm_mlx.quantize import BITS, GROUP_SIZES, RECIPES

from .pipeline import convert_checkpoint
from .tokenizer_files import DEFAULT_TOKENIZER_REPO

DEFAULT_BITS, DEFAULT_GROUP = 4, 64


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m convert", description="Convert a PyTorch OpenELM checkpoint to an MLX model directory.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--hf-path",
        help="Hugging Face layout source: a local directory (config.json + model.safetensors or pytorch_model.bin, "
        "sharded or not) or a Hub id such as apple/OpenELM-270M-Instruct",
    )
    source.add_argument("--corenet-path", help="CoreNet checkpoint: a .pt state dict, or a directory holding one")
    p.add_argument("--mlx-path", required=True, type=Path, help="output directory (must not exist unless --force)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--corenet-model", choices=list(CORENET_SIZES), help="model size of a CoreNet checkpoint")
    size.add_argument(
        "--corenet-config", type=Path, help="CoreNet training YAML naming the size (model.language_modeling.general_gpt.model_name)"
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer.model file, directory or Hub id; default: the source's own, else "
        f"the Llama-2 tokenizer from {DEFAULT_TOKENIZER_REPO} (ELM_MLX_TOKENIZER_REPO overrides)",
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        help="weight dtype (default: for the device MLX runs on here: float32 on the CPU, where half precision is slow; "
        "float16 on the GPU, bfloat16 for 3B, which overflows float16)",
    )
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights (embeddings included); implied by the --q-* options")
    p.add_argument("--q-bits", type=int, choices=BITS, help=f"bits per weight; implies -q (default: {DEFAULT_BITS})")
    p.add_argument(
        "--q-group-size", type=int, choices=GROUP_SIZES, help=f"weights sharing one scale and bias; implies -q (default: {DEFAULT_GROUP})"
    )
    p.add_argument(
        "--q-recipe",
        choices=list(RECIPES),
        help="layer-wise mixed precision made for OpenELM; implies -q (mixed-4-6: 6 bits for the embedding, the edge layers "
        "and early FFN down-projections, 4 elsewhere)",
    )
    p.add_argument(
        "--max-shard-size-gb",
        type=float_in(0.001, 1024),
        default=5.0,
        help="split model.safetensors above this many GiB (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="replace --mlx-path if it exists")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.corenet_path and not (args.corenet_model or args.corenet_config):
        raise ElmError("--corenet-path needs --corenet-model (e.g. OpenELM-270M) or --corenet-config")
    if args.hf_path and (args.corenet_model or args.corenet_config):
        raise ElmError("--corenet-model/--corenet-config go with --corenet-path, not --hf-path")
    summary = convert_checkpoint(
        args.hf_path or args.corenet_path,
        args.mlx_path,
        corenet_model=args.corenet_model,
        corenet_config=args.corenet_config,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        quantize=args.quantize or any(o is not None for o in (args.q_bits, args.q_group_size, args.q_recipe)),
        q_bits=args.q_bits or DEFAULT_BITS,
        q_group_size=args.q_group_size or DEFAULT_GROUP,
        q_recipe=args.q_recipe,
        force=args.force,
        max_shard_bytes=int(args.max_shard_size_gb * (1 << 30)),
    )
    print(summary)


if __name__ == "__main__":
    run_cli(main)
