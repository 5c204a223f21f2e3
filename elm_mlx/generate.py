"""Generate text from the command line.

python -m elm_mlx.generate --model DIR_OR_REPO --prompt "Once upon a time"
"""

import argparse
import sys
from typing import List, Optional

from .cli import SAMPLING_SEED, ArgumentParser, positive_int, run_cli
from .demo import DEMO_DIR, demo_notice
from .errors import ElmError
from .generation import answer_budget, check_context, check_request, context_length, print_stream, stream_generate
from .load import DTYPES, load
from .quantize import BITS, GROUP_SIZES, RECIPES
from .sample import SamplingParams
from .tokenizer import Tokenizer


DEFAULT_MAX_TOKENS = 256


def read_prompt(arg: str) -> str:
    """The prompt text: the argument itself, or stdin for '-' (which must be UTF-8)."""
    if arg != "-":
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes the shell passed that are not UTF-8 arrive as lone surrogates
            raise ElmError(f"--prompt is not valid UTF-8 text (character {e.start})") from None
        return arg
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ElmError(f"the prompt on stdin is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None


def _unescape(text: str) -> str:
    """Shells pass "\\n" literally; in a stop string it almost always means a newline."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _looks_instruct(model_arg: str, tokenizer: Tokenizer) -> bool:
    return "instruct" in model_arg.lower() or tokenizer.template_from_model


def build_parser():
    defaults = SamplingParams()
    p = ArgumentParser(prog="python -m elm_mlx.generate", description="Generate text with an OpenELM model.")
    p.add_argument(
        "--model",
        default=None,
        help="model directory or Hugging Face repo id, e.g. apple/OpenELM-270M-Instruct (default: the bundled Shakespeare demo model)",
    )
    p.add_argument("--adapter-path", help="apply fine-tuned adapters from this directory (python -m elm_mlx.lora)")
    p.add_argument("--dtype", choices=list(DTYPES), help="convert the weights to this dtype first (cached; default: as stored)")
    p.add_argument("--q-bits", type=int, choices=BITS, help="quantize to this many bits first (cached)")
    p.add_argument("--q-group-size", type=int, choices=GROUP_SIZES, default=64, help="quantization group size (default: %(default)s)")
    p.add_argument("--q-recipe", choices=sorted(RECIPES), help="layer-wise mixed quantization recipe (with --q-bits)")
    p.add_argument("--prompt", required=True, help="prompt text, or '-' to read it from stdin")
    p.add_argument(
        "--max-tokens",
        "-m",
        type=positive_int,
        default=None,
        help=f"most tokens to generate; prompt + this must fit the model's context (default: {DEFAULT_MAX_TOKENS}, or what room the context leaves)",
    )
    p.add_argument("--temp", type=float, default=defaults.temp, help="sampling temperature, 0 for greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling mass, 1 disables (default: %(default)s)")
    p.add_argument(
        "--top-k", type=int, default=defaults.top_k, help="sample among the k most likely tokens, 0 disables (default: %(default)s)"
    )
    p.add_argument(
        "--min-p",
        type=float,
        default=defaults.min_p,
        help="drop tokens below min-p times the top probability, 0 disables (default: %(default)s)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=defaults.repetition_penalty,
        help="penalty for recently seen tokens, 1 disables; Apple's samples use 1.2 (default: %(default)s)",
    )
    p.add_argument(
        "--repetition-context-size",
        type=int,
        default=defaults.repetition_context_size,
        help="how many recent tokens the penalty looks at (default: %(default)s)",
    )
    p.add_argument("--seed", type=SAMPLING_SEED, default=None, help="random seed for reproducible sampling")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when this text is generated (repeatable; \\n and \\t are understood)",
    )
    chat = p.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat",
        action="store_true",
        default=None,
        help="format the prompt as a user turn with the chat template (default for -Instruct models)",
    )
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="use the prompt as raw text even for -Instruct models")
    p.add_argument("--system", default=None, help="system message for chat formatting (implies --chat)")
    p.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens processed per step (default: %(default)s)")
    p.add_argument(
        "--verbose", action=argparse.BooleanOptionalAction, default=True, help="print speed and memory stats to stderr (default: on)"
    )
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    prompt = read_prompt(args.prompt)
    check_request(prompt, args.max_tokens or 1, args.prefill_step_size, args.seed)  # max_tokens None: the default, later  # before the (slow) model load
    if args.chat is False and args.system is not None:
        raise ElmError("--system needs chat formatting; drop --no-chat")
    sampling = SamplingParams(
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size,
    )

    if args.q_recipe and args.q_bits is None:
        raise ElmError("--q-recipe needs --q-bits")
    if args.model is None:
        args.model = str(DEMO_DIR)
        print(demo_notice(), file=sys.stderr)
    model, tokenizer = load(
        args.model,
        dtype=args.dtype,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        q_recipe=args.q_recipe,
        adapter_path=args.adapter_path,
    )
    use_chat = args.chat if args.chat is not None else (args.system is not None or _looks_instruct(args.model, tokenizer))
    if use_chat:  # the template's structure, the texts as plain text (a "</s>" in them is not an end)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    else:
        prompt_ids = tokenizer.encode(prompt)
    limit = context_length(model)
    max_tokens = args.max_tokens if args.max_tokens is not None else answer_budget(len(prompt_ids), DEFAULT_MAX_TOKENS, limit)
    check_context(len(prompt_ids), max_tokens, limit)  # one line, before any work

    responses = stream_generate(
        model,
        tokenizer,
        prompt_ids,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=[_unescape(s) for s in args.stop],
        seed=args.seed,
        prefill_step_size=args.prefill_step_size,
    )
    print_stream(responses, stats=args.verbose)


if __name__ == "__main__":
    run_cli(main)
