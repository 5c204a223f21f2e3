"""Fine-tune from the command line.

python -m elm_mlx.lora --model DIR_OR_REPO --data DATA --iters 600
mlx.launch -n 2 -- "$(which python)" -m elm_mlx.lora ...   (data parallel, one process per rank)
"""

import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten
from tqdm import tqdm

from ..cli import SEED, ArgumentParser, check_output_path, float_in, int_at_least, non_negative_int, positive_int
from ..errors import ElmError
from ..load import load
from ..options import add_model_options, blas_notice, quantize_from_args, resolve_model
from .adapters import ADAPTER_FILE, adapter_meta
from .data import load_datasets
from .layers import OPENELM_KEYS
from .trainer import FINE_TUNE_TYPES, Interrupted, TrainingConfig, prepare_model, train


def build_parser() -> ArgumentParser:
    d = TrainingConfig()
    p = ArgumentParser(prog="python -m elm_mlx.lora", description="Fine-tune an OpenELM model: LoRA, DoRA, QLoRA or all weights.")
    add_model_options(
        p,
        adapters=False,
        model_help="base model directory or Hugging Face repo id (default: the bundled Shakespeare demo model)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="directory with train.jsonl and valid.jsonl (test.jsonl optional; .txt files also work), or one .txt file",
    )
    p.add_argument("--adapter-path", default="adapters", help="where adapters and checkpoints are written (default: %(default)s)")
    p.add_argument(
        "--fine-tune-type",
        choices=FINE_TUNE_TYPES,
        default=d.fine_tune_type,
        help="lora, dora (LoRA with learned magnitudes) or full (all weights) (default: %(default)s)",
    )
    p.add_argument(
        "--num-layers", type=int_at_least(-1), default=d.num_layers, help="adapt the last N transformer blocks, -1 for all (default: all)"
    )
    p.add_argument(
        "--lora-keys",
        nargs="+",
        default=d.keys,
        choices=OPENELM_KEYS,
        metavar="KEY",
        help=f"layers to adapt (default: {' '.join(OPENELM_KEYS)})",
    )
    p.add_argument("--rank", type=positive_int, default=d.rank, help="adapter rank (default: %(default)s)")
    p.add_argument("--alpha", type=float_in(0, low_open=True), default=d.alpha, help="adapter scale is alpha / rank (default: %(default)s)")
    p.add_argument(
        "--dropout", type=float_in(0, 1, high_open=True), default=d.dropout, help="dropout on the adapter input (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=d.batch_size, help="sequences per micro-batch, over all processes (default: %(default)s)"
    )
    p.add_argument("--grad-accum", type=positive_int, default=d.grad_accum, help="micro-batches per optimizer step (default: %(default)s)")
    p.add_argument("--iters", type=positive_int, default=d.iters, help="optimizer steps (default: %(default)s)")
    p.add_argument(
        "--learning-rate", type=float_in(0, low_open=True), default=d.learning_rate, help="peak AdamW learning rate (default: %(default)s)"
    )
    p.add_argument("--warmup", type=non_negative_int, default=d.warmup, help="linear warmup steps (default: %(default)s)")
    p.add_argument(
        "--min-lr-ratio", type=float_in(0, 1), default=d.min_lr_ratio, help="cosine decay ends at lr * this (default: %(default)s)"
    )
    p.add_argument("--weight-decay", type=float_in(0), default=d.weight_decay, help="AdamW weight decay (default: %(default)s)")
    p.add_argument(
        "--grad-clip", type=float_in(0), default=d.grad_clip, help="clip the gradient norm to this, 0 = off (default: %(default)s)"
    )
    p.add_argument("--max-seq-length", type=int_at_least(2), default=d.max_seq_length, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--mask-prompt", action="store_true", help="train only on completions / assistant turns")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute activations in the backward pass to save memory")
    p.add_argument("--seed", type=SEED, default=d.seed, help="seed for initialisation, data order and dropout (default: %(default)s)")
    p.add_argument(
        "--steps-per-report", type=positive_int, default=d.report_every, help="print training loss every N steps (default: %(default)s)"
    )
    p.add_argument("--steps-per-eval", type=positive_int, default=d.eval_every, help="validate every N steps (default: %(default)s)")
    p.add_argument(
        "--val-batches",
        type=non_negative_int,
        default=d.val_batches,
        help="validation batches per evaluation, 0 = all (default: %(default)s)",
    )
    p.add_argument(
        "--save-every", type=positive_int, default=d.save_every, help="save adapters and a checkpoint every N steps (default: %(default)s)"
    )
    p.add_argument(
        "--valid-fraction",
        type=float_in(0, 1, low_open=True, high_open=True),
        default=0.1,
        help="for a single .txt: the last part held out (default: %(default)s)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run saved in --adapter-path (same settings)")
    p.add_argument("--force", action="store_true", help="replace adapters already in --adapter-path")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="PNG", help="plot losses to PNG (default: ADAPTER_PATH/loss.png)")
    return p


def config_from_args(args) -> TrainingConfig:
    renamed = {"keys": "lora_keys", "report_every": "steps_per_report", "eval_every": "steps_per_eval"}
    return TrainingConfig(**{f.name: getattr(args, renamed.get(f.name, f.name)) for f in fields(TrainingConfig)})


def check_outputs(out_dir: Path, plot: Optional[str]) -> None:
    """Training can take hours; an unwritable --adapter-path or --plot must fail before it starts."""
    check_output_path(out_dir, "--adapter-path")
    if plot:
        check_output_path(plot, "--plot", directory=False)


def _recorded_name(model_name: str) -> str:
    """What adapter_config.json names as the base model: a local directory as an absolute path, so that
    generate and fuse find it from any working directory; a Hub id as it is."""
    local = Path(model_name).expanduser()
    return str(local.resolve()) if local.exists() else model_name


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    config.check()
    out_dir = Path(args.adapter_path)
    if args.resume and args.force:
        raise ElmError("--resume and --force contradict each other")
    if (out_dir / ADAPTER_FILE).exists() and not (args.resume or args.force):
        raise ElmError(f"{out_dir} already holds adapters; pass --resume to continue that run or --force to replace it")
    check_outputs(out_dir, args.plot)

    rank0 = mx.distributed.init().rank() == 0
    model_name = resolve_model(args.model, verbose=rank0)
    if rank0:
        blas_notice()
    model, tokenizer = load(model_name, dtype=args.dtype, **quantize_from_args(args))
    datasets = load_datasets(args.data, tokenizer, config.max_seq_length, config.mask_prompt, args.valid_fraction)
    trainable = prepare_model(model, config)
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    say = tqdm.write if rank0 else (lambda *a, **k: None)  # one voice per run
    say(
        f"{config.fine_tune_type}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%); "
        + ", ".join(f"{k} {len(v.examples)} sequences" for k, v in datasets.items())
    )
    plot = None if args.plot is None else Path(args.plot or out_dir / "loss.png")
    meta = adapter_meta(asdict(config), _recorded_name(model_name))
    meta["title"] = f"{config.fine_tune_type} on {Path(model_name).name}"
    try:
        train(model, datasets, config, out_dir, meta, resume=args.resume, plot=plot, log=say)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(130)
    say(f"adapters saved to {out_dir}" + (f"; loss plot {plot}" if plot else ""))
