"""`elm-mlx evaluate`: perplexity of a model on a text, of its quantized variants side by side, and accuracy on lm-eval tasks.

elm-mlx evaluate perplexity --model M --data FILE [--context N] [--stride S] [--batch-size B]
elm-mlx evaluate compare --model M --data FILE --variants float32,q8,q4,mixed [--out DIR]
elm-mlx evaluate tasks --model M --tasks openelm|NAMES|YAML|DIR [--limit N] [--num-fewshot K] [--output FILE]
"""

import argparse
import json
import logging
import os
import platform
import re
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from ..cli import ArgumentParser, check_output_path, float_in, non_negative_int, positive_int, run_cli
from ..errors import ElmError
from ..options import add_model_options, add_verbose_option, blas_notice, load_from_args, resolve_model

DEFAULT_BATCH = 8
DEFAULT_VARIANTS = "float32,q8,q4,q4g32,mixed"
# The OpenELM paper's zero-shot suite and the metric each task is reported in (the paper's Table 3: normalized accuracy
# for ARC, HellaSwag and PIQA, plain accuracy for BoolQ, SciQ and WinoGrande).
OPENELM_TASKS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande"]
PAPER_METRIC = {"arc_challenge": "acc_norm", "arc_easy": "acc_norm", "boolq": "acc", "hellaswag": "acc_norm", "piqa": "acc_norm",
                "sciq": "acc", "winogrande": "acc"}  # fmt: skip
# Per-task zero-shot accuracy (%) in the order of OPENELM_TASKS, and the average, as Apple's model card
# (huggingface.co/apple/OpenELM, "Main Results / Zero-Shot") reports them.
PAPER = {
    "OpenELM-270M": ([26.45, 45.08, 53.98, 46.71, 69.75, 84.70, 53.91], 54.37),
    "OpenELM-270M-Instruct": ([30.55, 46.68, 48.56, 52.07, 70.78, 84.40, 52.72], 55.11),
    "OpenELM-450M": ([27.56, 48.06, 55.78, 53.97, 72.31, 87.20, 58.01], 57.56),
    "OpenELM-450M-Instruct": ([30.38, 50.00, 60.37, 59.34, 72.63, 88.00, 58.96], 59.95),
    "OpenELM-1_1B": ([32.34, 55.43, 63.58, 64.81, 75.57, 90.60, 61.72], 63.44),
    "OpenELM-1_1B-Instruct": ([37.97, 52.23, 70.00, 71.20, 75.03, 89.30, 62.75], 65.50),
    "OpenELM-3B": ([35.58, 59.89, 67.40, 72.44, 78.24, 92.70, 65.51], 67.39),
    "OpenELM-3B-Instruct": ([39.42, 61.74, 68.17, 76.36, 79.00, 92.50, 66.85], 69.15),
}
PAPER_AVERAGE = {name: average for name, (_, average) in PAPER.items()}
MISSING_EXTRA = "evaluate tasks needs lm-eval, an optional extra: pip install -e '.[eval]' (or pip install lm-eval)"
SE_NOTE = "s.e. over per-token NLLs (tokens taken as independent, as mlx_lm.perplexity does; an underestimate when they correlate)"


class _SubParser(ArgumentParser):
    """cli.ArgumentParser names every parser after the command; a subcommand keeps its own name."""

    def __init__(self, *args, **kwargs):
        prog = kwargs.get("prog")
        super().__init__(*args, **kwargs)
        if prog:
            self.prog = prog


def _add_data_options(p: ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help='the text to score: a UTF-8 text file (one document), or .jsonl with one {"text": ...} per line (no default)',
    )
    p.add_argument(
        "--holdout",
        type=float_in(0, 1, low_open=True, high_open=True),
        default=None,
        metavar="FRACTION",
        help="score only the last FRACTION of a text file, cut at a line start as elm-mlx lora cuts its validation text (default: all)",
    )
    p.add_argument("--context", type=positive_int, default=None, help="tokens per window (default: the model's context length)")
    p.add_argument(
        "--stride",
        type=positive_int,
        default=None,
        help="slide each window this many tokens, scoring only the tokens not scored before; below --context, every token "
        "sees more history (default: --context, windows that do not overlap)",
    )
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH, help="windows per forward pass (default: %(default)s)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m elm_mlx.evaluate", description="Evaluate a model: perplexity, and what quantization costs.")
    sub = p.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_SubParser, help="perplexity or compare (no default)"
    )

    ppl = sub.add_parser("perplexity", help="perplexity of one model on a text", description="Perplexity of a model on a text.")
    add_model_options(ppl)
    _add_data_options(ppl)
    ppl.add_argument("--json", action="store_true", help="print the result as one JSON object instead of a line")
    add_verbose_option(ppl, "print which model is used and a progress bar")

    cmp = sub.add_parser(
        "compare", help="perplexity, size and speed of quantized variants", description="Perplexity, size and speed of quantized variants."
    )
    add_model_options(cmp, quantize=False, adapters=False)
    _add_data_options(cmp)
    cmp.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="comma-separated: float32/float16/bfloat16, qN (N-bit), qNgG (groups of G), mixed (recipe mixed-4-6) (default: %(default)s)",
    )
    cmp.add_argument("--out", help="also write results.md, results.json and perplexity.png into this directory (default: none)")
    cmp.add_argument("--force", action="store_true", help="replace --out if it is an earlier elm-mlx output")
    add_verbose_option(cmp, "print which model is used and a progress bar per variant")

    tasks = sub.add_parser(
        "tasks",
        help="accuracy on lm-evaluation-harness tasks",
        description="Accuracy on lm-evaluation-harness tasks (needs the [eval] extra).",
    )
    add_model_options(tasks)
    tasks.add_argument(
        "--tasks",
        "-t",
        required=True,
        nargs="+",
        help="lm-eval task names, task YAML files or directories of them, comma- or space-separated; openelm is the paper's "
        "seven zero-shot tasks (no default)",
    )
    tasks.add_argument(
        "--include_path",
        "--include-path",
        action="append",
        default=[],
        help="also look for task YAML files in this directory (default: none)",
    )
    tasks.add_argument(
        "--model_args",
        "--model-args",
        "-a",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help=f"lm-eval's way to set the model options: comma-separated {', '.join(MODEL_ARGS)} (default: none)",
    )
    tasks.add_argument(
        "--limit",
        "-L",
        type=_limit,
        default=None,
        help="at most this many examples per task, or this fraction of them if below 1 (default: all)",
    )
    tasks.add_argument(
        "--num-fewshot",
        "--num_fewshot",
        "-f",
        type=non_negative_int,
        default=None,
        help="examples shown before each question (default: the task's)",
    )
    tasks.add_argument(
        "--batch-size", "--batch_size", "-b", type=positive_int, default=None, help=f"requests per forward pass (default: {DEFAULT_BATCH})"
    )
    tasks.add_argument(
        "--output",
        "--output_path",
        "-o",
        help="write lm-eval's results JSON to this file (lm_eval's --output_path adds a timestamp to the name; this writes the "
        "name given) (default: none)",
    )
    add_verbose_option(tasks, "print which model is used")
    return p


# --model_args keys (lm-eval's spelling) and the options they stand for; `pretrained` is what lm-eval's hf model calls it.
MODEL_ARGS = {
    "model": "--model",
    "pretrained": "--model",
    "adapter_path": "--adapter-path",
    "dtype": "--dtype",
    "q_bits": "--q-bits",
    "q_group_size": "--q-group-size",
    "q_recipe": "--q-recipe",
    "batch_size": "--batch-size",
    "max_length": None,
    "max_gen_toks": None,
}


def _limit(text: str):
    """lm-eval's --limit: a count of examples (an integer >= 1) or a fraction of them (0 < x < 1)."""
    value = float_in(0, low_open=True)(text)
    if value < 1:
        return value
    if value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number of examples or a fraction below 1, got {text}")
    return int(value)


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tasks":
        args = _apply_model_args(parser, args, list(sys.argv[1:] if argv is None else argv))
    {"perplexity": run_perplexity, "compare": run_compare, "tasks": run_tasks}[args.command](args)


def _apply_model_args(parser: ArgumentParser, args, argv: List[str]):
    """`--model_args model=M,q_bits=4` parsed as the options it names (`--model M --q-bits 4`), so their checks are the
    same; naming an option both ways is refused. max_length and max_gen_toks go to the lm-eval model as they are."""
    extra: List[str] = []
    lm_kwargs = {}
    for pair in (p.strip() for item in args.model_args or [] for p in item.split(",")):
        if not pair:
            continue
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or key not in MODEL_ARGS:
            raise ElmError(f"--model_args: {pair!r} is not KEY=VALUE with KEY one of {', '.join(MODEL_ARGS)}")
        option = MODEL_ARGS[key]
        if option is None:
            if not value.isdigit() or int(value) < 1:
                raise ElmError(f"--model_args {key}= must be a positive integer, got {value!r}")
            lm_kwargs[key] = int(value)
            continue
        dest = option.lstrip("-").replace("-", "_")
        if getattr(args, dest) is not None:
            raise ElmError(f"--model_args {key}= and {option} both set the {dest.replace('_', ' ')}; give it once")
        extra += [option, value]
    if extra:
        args = parser.parse_args(argv + extra)
    args.lm_kwargs = lm_kwargs
    return args


def _check_stride(args) -> None:
    """The stride against an explicit --context, before loading anything."""
    if args.stride is not None and args.context is not None and args.stride > args.context:
        raise ElmError(f"--stride {args.stride} is larger than --context {args.context}; it would skip tokens")


def run_perplexity(args) -> None:
    from .perplexity import perplexity, read_tokens

    _check_stride(args)
    _, model, tokenizer = load_from_args(args, verbose=args.verbose)
    tokens = read_tokens(Path(args.data), tokenizer, args.holdout)
    r = perplexity(model, tokens, args.context, args.stride, args.batch_size, progress=args.verbose)
    if args.json:
        print(json.dumps(r.as_dict()))
        return
    print(
        f"perplexity {r.perplexity:.4f} ± {r.perplexity_se:.4f} (mean NLL {r.nll:.5f} ± {r.nll_se:.5f} nats) over {r.tokens} tokens "
        f"in {r.windows} window{'s' if r.windows != 1 else ''}, {r.tokens_per_second:.0f} tok/s"
    )
    if args.verbose:
        print(SE_NOTE, file=sys.stderr)


def run_compare(args) -> None:
    from . import compare as c
    from .perplexity import read_tokens

    _check_stride(args)
    variants = c.parse_variants(args.variants)
    if args.out is not None:
        from ..files import refuse_existing

        refuse_existing(Path(args.out), args.force)  # before the slow part
        check_output_path(Path(args.out), "--out")
    model_name = resolve_model(args.model, verbose=args.verbose)
    if args.verbose:
        blas_notice()
    rows = c.compare(
        model_name,
        variants,
        lambda tokenizer: read_tokens(Path(args.data), tokenizer, args.holdout),
        args.context,
        args.stride,
        args.batch_size,
        verbose=args.verbose,
        say=lambda text: print(text, file=sys.stderr),
    )
    sys.stdout.write(c.table(rows))
    if args.out is not None:
        meta = {
            "model": model_name,
            "data": args.data,
            "holdout": args.holdout,
            "context": args.context or "model's context length",
            "stride": args.stride or "= context",
            "tokens": rows[0]["tokens"],
            "standard error": SE_NOTE,
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, load average {_load()}",
        }
        c.write(Path(args.out), rows, meta, args.force)
        print(f"wrote {args.out}", file=sys.stderr)


def task_names(spec: str) -> Tuple[List[str], List[str]]:
    """(task names, include paths) from --tasks: names as they are, `openelm` as its seven tasks,
    YAML files and directories as the tasks they define (their folders become lm-eval include paths)."""
    names, include = [], []
    for item in (i.strip() for i in spec.split(",")):
        path = Path(item).expanduser()
        if item == "openelm":
            names += OPENELM_TASKS
        elif path.is_dir() or path.suffix in (".yaml", ".yml"):
            if not path.exists():
                raise ElmError(f"task file {path} does not exist")
            files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
            found = [m.group(1) for f in files for m in [re.search(r"^task:\s*['\"]?([^'\"\s#]+)", f.read_text(), re.M)] if m]
            if not found:
                raise ElmError(f"{path} defines no task (no `task:` line)")
            names += found
            include.append(str(path if path.is_dir() else path.parent))
        elif item:
            names.append(item)
    if not names:
        raise ElmError("--tasks names no task")
    return names, include


def run_tasks(args) -> None:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from .lm_eval_backend import ElmMLX
    except ImportError:
        raise ElmError(MISSING_EXTRA) from None
    if args.output is not None:
        check_output_path(Path(args.output), "--output", directory=False)
    names, include = task_names(",".join(args.tasks))
    for folder in args.include_path:
        if not Path(folder).is_dir():
            raise ElmError(f"--include_path {folder} is not a directory")
    include += args.include_path
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # lm-eval's progress notes; errors still show
    manager = _task_manager(TaskManager, include, names)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ElmError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; `lm_eval ls tasks` lists them")
    model_name, model, tokenizer = load_from_args(args, verbose=args.verbose)
    lm = ElmMLX(loaded=(model, tokenizer), batch_size=args.batch_size or DEFAULT_BATCH, **args.lm_kwargs)
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            task_manager=manager,
            log_samples=False,
        )
    except ConnectionError as e:  # the data sets come from the Hugging Face hub
        raise ElmError(f"could not fetch a task's data set ({e}); offline, only tasks with local data files run") from None
    sys.stdout.write(accuracy_table(results["results"], names, Path(model_name).name))
    if args.output is not None:
        from ..files import write_text_atomically

        write_text_atomically(Path(args.output), json.dumps(results, indent=2, default=str) + "\n")


def _task_manager(TaskManager, include: List[str], names: List[str]):
    """lm-eval's task index: only the YAML folders given when they define every task asked for (indexing lm-eval's own
    thousands of tasks takes 5-20 s), else those folders and lm-eval's tasks."""
    if include:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    return TaskManager(include_path=include or None)


def accuracy_table(results: dict, names: List[str], model: str) -> str:
    """acc and acc_norm per task in percent; the metric the paper reports for its seven tasks (acc_norm where there is
    one for the others) with the paper's figure beside it when `model` is a published OpenELM; the average of that column."""
    paper = PAPER.get(model)
    lines = ["| task | acc | acc_norm | reported | paper |", "|---|---:|---:|---|---:|"]
    reported = []
    for name in names:
        r = results.get(name, {})
        acc, norm = r.get("acc,none"), r.get("acc_norm,none")
        metric = PAPER_METRIC.get(name, "acc_norm" if norm is not None else "acc")
        value = norm if metric == "acc_norm" else acc
        cell = lambda v: "" if v is None else f"{100 * v:.2f}"  # noqa: E731
        figure = f"{paper[0][OPENELM_TASKS.index(name)]:.2f}" if paper and name in OPENELM_TASKS else ""
        lines.append(f"| {name} | {cell(acc)} | {cell(norm)} | {metric + ' ' + cell(value) if value is not None else ''} | {figure} |")
        if value is not None:
            reported.append(100 * value)
    if reported:
        figure = f"{paper[1]:.2f}" if paper and sorted(names) == sorted(OPENELM_TASKS) else ""
        lines.append(f"| average | | | {sum(reported) / len(reported):.2f} | {figure} |")
    return "\n".join(lines) + "\n"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    run_cli(main)
