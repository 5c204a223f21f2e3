"""python -m bench: OpenELM against OLMo and against mlx-lm, with fused and naive norms, in one run.

python -m bench --quick                       # tiny shapes, a couple of minutes on 2 CPU cores
python -m bench --models openelm-1_1B olmo-1B --dtypes float32
python -m bench --model path/to/mlx-model     # a real checkpoint instead of random weights
python -m bench serve --help                  # the HTTP server under concurrent streams (bench/serve.py)
python -m bench speculative --help            # prompt lookup, draft model, compiled step (bench/speculative.py)
python -m bench structured --help             # constrained (JSON schema, regex, grammar) vs free decoding
"""

import os
import platform
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

import elm_mlx
from elm_mlx import cli
from elm_mlx._blas import slow_blas_notice
from elm_mlx.cli import ArgumentParser, int_at_least, positive_int, run_cli
from elm_mlx.errors import ElmError
from elm_mlx.files import atomic_directory
from elm_mlx.generation import generate_step
from elm_mlx.load import DTYPES, build_model, load_config, load_model, quantize_like, resolve_model_path
from elm_mlx.quantize import quantize_model
from elm_mlx.sample import SamplingParams, make_sampler

from . import output_dir
from .ablation import use_naive_norms
from .measure import bytes_read_per_token, measure_bandwidth, measure_case
from .report import ratio_table, table, write_outputs
from .shapes import DEFAULT_MODELS, QUICK_MODELS, SHAPES, shape_config

QUANTIZED = {"q4": 4, "q8": 8}
FAMILIES = {"openelm": "OpenELM", "olmo": "OLMo"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m bench",
        description="Throughput and memory of OpenELM and OLMo on MLX. `bench serve` measures the HTTP server under concurrent streams (see `bench serve --help`), "
        "`bench speculative` speculative decoding (see `bench speculative --help`).",
    )
    p.add_argument(
        "--models",
        nargs="+",
        metavar="SHAPE",
        help=f"model shapes with random weights (default: {' '.join(DEFAULT_MODELS)}); known: {', '.join(SHAPES)}",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="DIR",
        help="a model directory or hub id to benchmark with its real weights (repeatable)",
    )
    p.add_argument(
        "--dtypes", nargs="+", choices=[*DTYPES, *QUANTIZED], help="weight formats (default: float32 on a CPU-only MLX, else float16)"
    )
    p.add_argument(
        "--prompt-lengths", nargs="+", type=int_at_least(2), default=None, help="prompt lengths for prompt processing (default: 128 1024)"
    )
    p.add_argument("--gen-tokens", type=positive_int, default=None, help="tokens generated per trial, EOS ignored (default: 128)")
    p.add_argument("--trials", type=positive_int, default=None, help="timed trials after one warm-up (default: 3)")
    p.add_argument("--no-peer", action="store_true", help="skip the mlx-lm comparison")
    p.add_argument("--no-ablation", action="store_true", help="skip the naive-norm runs")
    p.add_argument("--quick", action="store_true", help="tiny shapes and short runs, for a smoke test")
    p.add_argument("--out", type=Path, help="output directory (default: bench-results/<time>); refused if it exists unless --force")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def machine_info(bandwidth: dict) -> dict:
    versions = {name: _version(name) for name in ("mlx", "mlx-lm", "elm-mlx")}
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9 if hasattr(os, "sysconf") else None
    device = str(mx.default_device())
    description = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {memory_gb:.0f} GB, MLX {versions['mlx']} on {device}, BLAS: {elm_mlx.BLAS}"
    return {
        "description": description,
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "memory_gb": memory_gb,
        "device": device,
        "blas": elm_mlx.BLAS,
        "python": platform.python_version(),
        "versions": versions,
        "bandwidth": bandwidth,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def prepare(config: dict, fmt: str, model_dir: Path = None):
    """The model in the requested weight format (random weights of the config's shape, or a directory's),
    its parameter count and its quantization block (None when not quantized)."""
    mx.random.seed(0)
    parameters = sum(p.size for _, p in tree_flatten(build_model(config).parameters()))  # lazy: no allocation
    model = load_model(model_dir, config) if model_dir else build_model(config)
    quantization = config.get("quantization")
    if fmt in QUANTIZED:
        model.set_dtype(mx.float32 if mx.default_device() == mx.cpu else mx.float16)
        quantization = quantize_model(model, QUANTIZED[fmt], 64)
    elif fmt in DTYPES:
        model.set_dtype(DTYPES[fmt])
    mx.eval(model.parameters())
    return model, parameters, quantization


def peer_model(model, config: dict, quantization: dict = None):
    """mlx-lm's OpenELM holding the very same weight arrays (no copy)."""
    from mlx_lm.models import openelm as peer

    theirs = peer.Model(peer.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    if quantization:
        quantize_like(theirs, quantization, weights)
    theirs.load_weights(list(weights.items()))
    return theirs


def step_factory(variant: str, model, sampler):
    """prompt ids -> endless token iterator, for our runtime or for mlx-lm's."""
    if variant == "mlx-lm":
        from mlx_lm.generate import generate_step as peer_step

        return lambda prompt: (token for token, _ in peer_step(mx.array(prompt), model, max_tokens=1 << 30, prefill_step_size=512))
    return lambda prompt: generate_step(prompt, model, sampler, prefill_step_size=512)


def check_fits_context(name: str, config: dict, tokens: int) -> None:
    """Refuse prompt + generated lengths the model was not built for (and memory would not hold)."""
    limit = config.get("max_context_length") or config.get("max_position_embeddings")
    if isinstance(limit, int) and tokens > limit:
        raise ElmError(f"{name}: the longest prompt plus --gen-tokens is {tokens} tokens, above its context length {limit}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from . import serve

        if cli.invoked_as is not None:
            cli.invoked_as += " serve"
        return serve.main(argv[1:])
    if argv[:1] == ["speculative"]:
        from . import speculative

        if cli.invoked_as is not None:
            cli.invoked_as += " speculative"
        return speculative.main(argv[1:])
    if argv[:1] == ["structured"]:
        from . import structured

        if cli.invoked_as is not None:
            cli.invoked_as += " structured"
        return structured.main(argv[1:])
    args = build_parser().parse_args(argv)
    quick = args.quick
    # Ranges are checked by the parser; None (not 0) means "the default".
    prompt_lengths = args.prompt_lengths if args.prompt_lengths is not None else ([64] if quick else [128, 1024])
    gen_tokens = args.gen_tokens if args.gen_tokens is not None else (16 if quick else 128)
    trials = args.trials if args.trials is not None else (2 if quick else 3)
    dtypes = args.dtypes or ["float32" if mx.default_device() == mx.cpu else "float16"]
    shapes = args.models if args.models is not None else ([] if args.model else (QUICK_MODELS if quick else DEFAULT_MODELS))
    cases = [(name, shape_config(name), None) for name in shapes]
    for path in args.model:
        model_dir = resolve_model_path(path)
        cases.append((model_dir.name if Path(path).exists() else path, load_config(model_dir), model_dir))
    for name, config, _ in cases:
        check_fits_context(name, config, max(prompt_lengths) + gen_tokens)
    out = output_dir(args.out, "", args.force)  # before minutes of measuring
    notice = slow_blas_notice()
    if notice:  # the figures below would be those of a slow BLAS (results.json and results.md name it too)
        print(notice, file=sys.stderr)

    with atomic_directory(out, args.force) as staging:
        print("measuring memory bandwidth ...", file=sys.stderr)
        bandwidth = measure_bandwidth(128 if quick else 1024)
        mx.clear_cache()
        machine = machine_info(bandwidth)
        print(machine["description"] + f", {bandwidth['gb_s']:.1f} GB/s", file=sys.stderr)
        greedy = make_sampler(SamplingParams(temp=0))
        rows = []
        for name, config, model_dir in cases:
            model_type = config.get("model_type", "openelm")
            for fmt in ["as stored"] if "quantization" in config else dtypes:
                model, parameters, quantization = prepare(config, fmt, model_dir)
                variants = [("fused", model)]
                if model_type == "openelm" and not args.no_peer and _version("mlx-lm") != "not installed":
                    variants.append(("mlx-lm", peer_model(model, config, quantization)))
                if not args.no_ablation:
                    variants.append(("naive", model))  # last: it rewires `model` itself
                for variant, runnable in variants:
                    if variant == "naive":
                        use_naive_norms(model)
                    make_steps = step_factory(variant, runnable, greedy)
                    started = time.perf_counter()
                    result = measure_case(make_steps, config["vocab_size"], prompt_lengths, gen_tokens, trials)
                    per_token = bytes_read_per_token(model, context=16 + gen_tokens // 2)
                    bound = bandwidth["gb_s"] * 1e9 / per_token
                    row = {
                        "model": name,
                        "family": FAMILIES.get(model_type, model_type),
                        "parameters": parameters,
                        "dtype": fmt,
                        "variant": variant,
                        **result,
                        "bytes_per_token": per_token,
                        "bound_tps": bound,
                        "fraction_of_bound": result["gen_tps"]["median"] / bound,
                    }
                    rows.append(row)
                    print(
                        f"{name} {fmt} {variant}: generation {row['gen_tps']['median']:.2f} tok/s, "
                        f"prompt {row['prompt_tps'][str(prompt_lengths[-1])]['median']:.1f} tok/s ({time.perf_counter() - started:.0f} s)",
                        file=sys.stderr,
                    )
                del model, variants
                mx.clear_cache()
        settings = {"prompt_lengths": prompt_lengths, "gen_tokens": gen_tokens, "trials": trials, "dtypes": dtypes, "quick": quick}
        write_outputs(staging, machine, settings, rows)
    print(table(rows))
    ratios_text = ratio_table(rows)
    if ratios_text:
        print("\n" + ratios_text)
    print(f"\nbandwidth {bandwidth['gb_s']:.1f} GB/s; results in {out}/ (results.json, results.md, tps_by_size.png, ablation.png)")


if __name__ == "__main__":
    run_cli(main)
