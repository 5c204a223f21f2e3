"""`elm-mlx evaluate`: perplexity of a model on a text, of its quantized variants side by side, and accuracy on lm-eval tasks.

elm-mlx evaluate perplexity --model M --data FILE [--context N] [--stride S] [--batch-size B]
elm-mlx evaluate compare --model M --data FILE --variants float32,q8,q4,mixed [--out DIR]
elm-mlx evaluate tasks --model M --tasks openelm|NAMES|YAML|DIR [--limit N] [--num-fewshot K] [--output FILE]
"""

import json
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
# The OpenELM paper's zero-shot suite, and its average accuracy over it per published model.
OPENELM_TASKS = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande"]
PAPER_AVERAGE = {
    "OpenELM-270M": 54.37,
    "OpenELM-450M": 57.56,
    "OpenELM-1_1B": 63.44,
    "OpenELM-3B": 67.39,
    "OpenELM-270M-Instruct": 55.11,
    "OpenELM-450M-Instruct": 59.95,
    "OpenELM-1_1B-Instruct": 65.50,
    "OpenELM-3B-Instruct": 69.15,
}
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
        required=True,
        help="comma-separated lm-eval task names, task YAML files or directories of them; openelm is the paper's seven "
        "zero-shot tasks (no default)",
    )
    tasks.add_argument("--limit", type=positive_int, default=None, help="at most this many examples per task (default: all)")
    tasks.add_argument(
        "--num-fewshot", type=non_negative_int, default=None, help="examples shown before each question (default: the task's)"
    )
    tasks.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH, help="requests per forward pass (default: %(default)s)")
    tasks.add_argument("--output", help="write lm-eval's results JSON to this file (default: none)")
    add_verbose_option(tasks, "print which model is used")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    {"perplexity": run_perplexity, "compare": run_compare, "tasks": run_tasks}[args.command](args)


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
    names, include = task_names(args.tasks)
    manager = TaskManager(include_path=include or None, verbosity="ERROR")
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ElmError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; `lm_eval ls tasks` lists them")
    model_name, model, tokenizer = load_from_args(args, verbose=args.verbose)
    lm = ElmMLX(loaded=(model, tokenizer), batch_size=args.batch_size)
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            task_manager=manager,
            log_samples=False,
            verbosity="ERROR",
        )
    except ConnectionError as e:  # the data sets come from the Hugging Face hub
        raise ElmError(f"could not fetch a task's data set ({e}); offline, only tasks with local data files run") from None
    sys.stdout.write(accuracy_table(results["results"], names, Path(model_name).name))
    if args.output is not None:
        from ..files import write_text_atomically

        write_text_atomically(Path(args.output), json.dumps(results, indent=2, default=str) + "\n")


def accuracy_table(results: dict, names: List[str], model: str) -> str:
    """acc and acc_norm per task (in percent, as the paper reports them) and their average over the tasks asked for."""
    lines = ["| task | acc | acc_norm |", "|---|---:|---:|"]
    accs = []
    for name in names:
        r = results.get(name, {})
        acc, norm = r.get("acc,none"), r.get("acc_norm,none")
        cell = lambda v: "" if v is None else f"{100 * v:.2f}"  # noqa: E731
        lines.append(f"| {name} | {cell(acc)} | {cell(norm)} |")
        if acc is not None:
            accs.append(100 * (norm if norm is not None else acc))
    if accs:
        paper = PAPER_AVERAGE.get(model) if names == OPENELM_TASKS else None
        lines.append(
            f"| average (acc_norm where there is one) | {sum(accs) / len(accs):.2f} | |" + (f" paper: {paper:.2f}" if paper else "")
        )
    return "\n".join(lines) + "\n"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    run_cli(main)
