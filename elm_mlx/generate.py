"""Generate text from the command line.

python -m elm_mlx.generate --model DIR_OR_REPO --prompt "Once upon a time"

With --prompt-cache-file (made by elm-mlx cache-prompt) the prompt is raw
text appended after the cached one, and only it is computed. That file holds
every key and value in the model's dtype, so --max-kv-size and --kv-bits,
which would keep them otherwise, are refused with it, and so is chat
formatting, which would wrap only the appended text.
"""

import sys
from pathlib import Path
from typing import List, Optional

from .cache import PromptCache
from .cache_prompt import load_prompt_cache, read_cache_header
from .cli import ArgumentParser, run_cli
from .errors import ElmError
from .generation import answer_budget, check_context, check_request, context_length, print_stream, stream_generate
from .options import (
    add_constraint_options,
    add_generation_options,
    add_kv_options,
    add_model_options,
    add_sampling_options,
    add_speculative_options,
    add_verbose_option,
    check_speculative_args,
    constraint_from_args,
    kv_from_args,
    load_from_args,
    sampling_from_args,
    speculative_from_args,
    unescape,
)
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
        raise ElmError(f"the prompt on stdin is not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 1]!r})") from None


def _looks_instruct(model_arg: str, tokenizer: Tokenizer) -> bool:
    return "instruct" in model_arg.lower() or tokenizer.template_from_model


def build_parser():
    p = ArgumentParser(prog="python -m elm_mlx.generate", description="Generate text with an OpenELM model.")
    add_model_options(p)
    p.add_argument("--prompt", "-p", required=True, help="prompt text, or '-' to read it from stdin")
    add_generation_options(
        p,
        f"most tokens to generate; prompt + this must fit the model's context (default: {DEFAULT_MAX_TOKENS}, or what room the context leaves)",
    )
    add_sampling_options(p)
    chat = p.add_mutually_exclusive_group()
    chat.add_argument(
        "--chat",
        action="store_true",
        default=None,
        help="format the prompt as a user turn with the chat template (default: on for -Instruct models and models with a template)",
    )
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="use the prompt as raw text even for -Instruct models")
    p.add_argument("--system", "--system-prompt", default=None, help="system message for chat formatting, implies --chat (default: none)")
    p.add_argument(
        "--prompt-cache-file",
        metavar="FILE",
        default=None,
        help="start from a prompt saved by elm-mlx cache-prompt; --prompt is raw text appended after it (default: none)",
    )
    add_kv_options(p)
    add_speculative_options(p)
    add_constraint_options(p)
    add_verbose_option(p, "print which model is used, conversion notes and a speed and memory line to stderr")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    prompt = read_prompt(args.prompt)
    kv = kv_from_args(args)  # every refusal before the (slow) model load
    check_speculative_args(args)
    if args.prompt_cache_file is not None:
        _check_cache_file_options(args, kv)
    else:
        check_request(prompt, args.max_tokens or 1, args.prefill_step_size, args.seed)
    if args.chat is False and args.system is not None:
        raise ElmError("--system needs chat formatting; drop --no-chat")
    sampling = sampling_from_args(args)
    constraint = constraint_from_args(args)  # refuses speculative options beside it
    model_name, model, tokenizer = load_from_args(args, verbose=args.verbose)
    speculative = speculative_from_args(args, model, tokenizer, verbose=args.verbose)
    prompt_cache = None
    use_chat = args.chat if args.chat is not None else (args.system is not None or _looks_instruct(model_name, tokenizer))
    if args.prompt_cache_file is not None:
        prompt_cache = PromptCache(model)
        cached, prompt_cache.cache = load_prompt_cache(Path(args.prompt_cache_file).expanduser(), model)
        prompt_cache.tokens = list(cached)
        prompt_ids = cached + tokenizer.encode(prompt, add_bos=False)
    elif use_chat:  # the template's structure, the texts as plain text (a "</s>" in them is not an end)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    else:
        prompt_ids = tokenizer.encode(prompt)
    limit = context_length(model)
    max_tokens = args.max_tokens if args.max_tokens is not None else answer_budget(len(prompt_ids), DEFAULT_MAX_TOKENS, limit)
    check_context(len(prompt_ids), max_tokens, limit)  # one line, before any work
    if constraint is not None:  # compiled (and refused in one line) before any model work
        from .constrain import compile_constraint, model_vocab

        constraint = compile_constraint(constraint, tokenizer, model_vocab(model))  # once, unclaimed: stream_generate takes it

    responses = stream_generate(
        model,
        tokenizer,
        prompt_ids,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=[unescape(s) for s in args.stop],
        seed=args.seed,
        prefill_step_size=args.prefill_step_size,
        prompt_cache=prompt_cache,
        kv=kv,
        **speculative,
        constraint=constraint,
    )
    print_stream(responses, stats=args.verbose)


def _check_cache_file_options(args, kv) -> None:
    """What does not go with a prompt cache file (see the module docstring)."""
    if kv is not None:
        raise ElmError("--prompt-cache-file holds every key and value: --max-kv-size and --kv-bits do not apply to it")
    if args.chat or args.system is not None:
        raise ElmError("--prompt-cache-file continues raw text: drop --chat and --system")
    check_request("(the cached prompt)", args.max_tokens or 1, args.prefill_step_size, args.seed)  # an empty --prompt is fine
    read_cache_header(Path(args.prompt_cache_file).expanduser())  # a file that is no cache of ours: refused before loading


if __name__ == "__main__":
    run_cli(main)
