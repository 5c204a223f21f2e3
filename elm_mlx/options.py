"""Command-line options every command shares, defined once.

generate, chat, serve, lora and fuse take a model the same way (the bundled
demo model when --model is absent, or the base model an adapter directory
names), sample with the same flags, and print the same notices. The names
follow mlx-lm's where mlx-lm has the option (--model, --adapter-path,
--max-tokens/-m, --temp, --top-p, --top-k, --min-p, --seed,
--system-prompt, --prefill-step-size, --verbose).
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from .cli import SAMPLING_SEED, float_in, int_at_least, non_negative_int, positive_int
from .errors import ElmError
from .sample import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, SamplingParams

DEFAULT_PREFILL_STEP = 512


def notice(text: str) -> None:
    """One informational line on stderr, faint on a terminal."""
    print(f"\x1b[2m{text}\x1b[0m" if sys.stderr.isatty() else text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Definitions
# --------------------------------------------------------------------------


def add_model_options(p: argparse.ArgumentParser, quantize: bool = True, adapters: bool = True, model_help: str = "") -> None:
    """--model and how to load it: adapters, dtype, quantize-on-load."""
    from .dtypes import DTYPES
    from .quantize import BITS, GROUP_SIZES, RECIPES

    p.add_argument(
        "--model",
        default=None,
        help=model_help
        or "model directory or Hugging Face repo id, e.g. apple/OpenELM-270M-Instruct "
        "(default: the base model named by --adapter-path, else the bundled Shakespeare demo model)",
    )
    if adapters:
        p.add_argument("--adapter-path", help="apply fine-tuned adapters from this directory (made by elm-mlx lora)")
    p.add_argument("--dtype", choices=list(DTYPES), help="convert the weights to this dtype first, cached (default: as stored)")
    if quantize:
        p.add_argument("--q-bits", type=int, choices=BITS, help="quantize the weights to this many bits first, cached (default: off)")
        p.add_argument(
            "--q-group-size", type=int, choices=GROUP_SIZES, default=None, help="weights sharing one quantization scale (default: 64)"
        )
        p.add_argument("--q-recipe", choices=sorted(RECIPES), help="layer-wise mixed quantization recipe (default: uniform)")


def add_sampling_options(
    p: argparse.ArgumentParser, repetition_penalty: Optional[float] = None, seed: bool = True, title: str = "sampling"
) -> None:
    """How the next token is picked; the same ranges the server accepts."""
    d = SamplingParams()
    g = p.add_argument_group(title)
    g.add_argument("--temp", type=float_in(0, 2), default=d.temp, help="sampling temperature, 0 for greedy (default: %(default)s)")
    g.add_argument(
        "--top-p",
        type=float_in(0, 1, low_open=True),
        default=d.top_p,
        help="nucleus sampling: keep the most likely tokens up to this mass, 1 disables (default: %(default)s)",
    )
    g.add_argument(
        "--top-k", type=non_negative_int, default=d.top_k, help="keep only the k most likely tokens, 0 disables (default: %(default)s)"
    )
    g.add_argument(
        "--min-p",
        type=float_in(0, 1, high_open=True),
        default=d.min_p,
        help="drop tokens below min-p times the top token's probability, 0 disables (default: %(default)s)",
    )
    g.add_argument(
        "--repetition-penalty",
        type=float_in(MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY),
        default=d.repetition_penalty if repetition_penalty is None else repetition_penalty,
        help="penalise recently seen tokens, 1 disables; Apple's samples use 1.2 (default: %(default)s)",
    )
    g.add_argument(
        "--repetition-context-size",
        type=positive_int,
        default=d.repetition_context_size,
        help="how many recent tokens the penalty looks at (default: %(default)s)",
    )
    if seed:
        g.add_argument("--seed", type=SAMPLING_SEED, default=None, help="random seed, for reproducible sampling (default: none)")


def add_generation_options(p: argparse.ArgumentParser, max_tokens_help: str, max_tokens_default=None, stop: bool = True) -> None:
    """How much to generate and when to stop."""
    p.add_argument("--max-tokens", "-m", type=positive_int, default=max_tokens_default, help=max_tokens_help)
    if stop:
        p.add_argument(
            "--stop",
            action="append",
            default=[],
            metavar="TEXT",
            help="stop when this text is generated; repeatable, \\n and \\t are understood (default: none)",
        )
    p.add_argument(
        "--prefill-step-size",
        type=positive_int,
        default=DEFAULT_PREFILL_STEP,
        help="prompt tokens per forward pass; Ctrl-C is heeded between them (default: %(default)s)",
    )


def add_kv_options(p: argparse.ArgumentParser) -> None:
    """How keys and values are kept: all of them in the model's dtype (the default), a rotating window, or quantized."""
    from .cache import KEEP_TOKENS, KV_BITS, KV_GROUP_SIZES

    g = p.add_argument_group("KV cache")
    g.add_argument(
        "--max-kv-size",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"keep the keys and values of at most N tokens, the first {KEEP_TOKENS} and the most recent ones, to bound memory; "
        "the model's context length still bounds the text (default: all)",
    )
    g.add_argument(
        "--kv-bits", type=int, choices=KV_BITS, default=None, help="store keys and values quantized to this many bits (default: off)"
    )
    g.add_argument(
        "--kv-group-size",
        type=int,
        choices=KV_GROUP_SIZES,
        default=None,
        help="numbers sharing one scale in the quantized keys and values (default: 64, or 32 for head sizes under 64)",
    )


def add_speculative_options(p: argparse.ArgumentParser, prompt_lookup: bool = True) -> None:
    """Speculative decoding (elm_mlx.speculative): a draft model or prompt lookup proposes, the model verifies.
    Without prompt_lookup (the server, where it is a request field) only the draft model's options."""
    from .speculative import DEFAULT_DRAFT_TOKENS, DEFAULT_MAX_NGRAM, DEFAULT_MIN_NGRAM, MAX_DRAFT_TOKENS, MAX_NGRAM

    g = p.add_argument_group("speculative decoding", "several tokens per pass of the model; greedy text unchanged, sampling exact")
    g.add_argument(
        "--draft-model",
        metavar="PATH_OR_REPO",
        default=None,
        help="a small model with the same tokenizer proposes tokens, e.g. OpenELM-270M for 1.1B or 3B"
        + ("" if prompt_lookup else "; the server then needs --max-batch 1")
        + " (default: none)",
    )
    g.add_argument(
        "--num-draft-tokens",
        type=int_at_least(1, MAX_DRAFT_TOKENS),
        default=None,
        metavar="K",
        help=f"tokens the draft model proposes per pass (default: {DEFAULT_DRAFT_TOKENS})",
    )
    if prompt_lookup:
        g.add_argument(
            "--prompt-lookup",
            type=int_at_least(1, MAX_DRAFT_TOKENS),
            default=None,
            metavar="K",
            help="propose K tokens per pass from the text itself, after the latest earlier occurrence of its last words; "
            "for answers that copy their input (summaries, edits); Apple suggests 10 (default: off)",
        )
        g.add_argument(
            "--prompt-lookup-min-ngram",
            type=int_at_least(1, MAX_NGRAM),
            default=DEFAULT_MIN_NGRAM,
            metavar="N",
            help="shortest run of last tokens to look up (default: %(default)s)",
        )
        g.add_argument(
            "--prompt-lookup-max-ngram",
            type=int_at_least(1, MAX_NGRAM),
            default=DEFAULT_MAX_NGRAM,
            metavar="N",
            help="longest run of last tokens to look up; the longest that recurs wins (default: %(default)s)",
        )
    g.add_argument(
        "--adaptive-draft",
        action="store_true",
        help="propose fewer tokens after a rejection, more (up to K) after a full acceptance (default: off)",
    )


def add_verbose_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--verbose",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"{what}; --no-verbose prints only the model's text and errors (default: on)",
    )


# --------------------------------------------------------------------------
# Reading them back
# --------------------------------------------------------------------------


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        repetition_context_size=args.repetition_context_size,
    )


def kv_from_args(args):
    """The KVOptions the flags ask for, or None for the plain cache; refuses combinations that do not go together."""
    from .cache import KEEP_TOKENS, KVOptions

    if args.max_kv_size is not None and args.max_kv_size <= KEEP_TOKENS:
        raise ElmError(f"--max-kv-size must be above {KEEP_TOKENS}, the first tokens the window always keeps")
    if args.max_kv_size is None and args.kv_bits is None and args.kv_group_size is None:
        return None
    if args.kv_group_size is not None and args.kv_bits is None:
        raise ElmError("--kv-group-size needs --kv-bits")
    if args.max_kv_size is not None and args.kv_bits is not None:
        raise ElmError("--max-kv-size and --kv-bits do not combine; choose one")
    return KVOptions(max_size=args.max_kv_size, bits=args.kv_bits, group_size=args.kv_group_size)


def check_speculative_args(args) -> None:
    """Refuse speculative options that do not go together, before the (slow) model load."""
    from .speculative import PromptLookup

    lookup = getattr(args, "prompt_lookup", None)
    if args.draft_model is not None and lookup is not None:
        raise ElmError("--draft-model and --prompt-lookup do not combine; choose one")
    if args.num_draft_tokens is not None and args.draft_model is None:
        raise ElmError("--num-draft-tokens needs --draft-model (prompt lookup takes its K as --prompt-lookup K)")
    if args.adaptive_draft and args.draft_model is None and lookup is None:
        raise ElmError("--adaptive-draft needs --draft-model or --prompt-lookup")
    if lookup is not None:
        PromptLookup(lookup, args.prompt_lookup_min_ngram, args.prompt_lookup_max_ngram)
    if (args.draft_model is not None or lookup is not None) and getattr(args, "max_kv_size", None) is not None:
        raise ElmError("--max-kv-size does not combine with speculative decoding: a rotating window cannot take rejected tokens back")


def speculative_from_args(args, model, tokenizer, verbose: bool = True) -> dict:
    """stream_generate's speculative keywords: loads the draft model (in --dtype, unquantized) and checks its tokenizer."""
    from .speculative import DEFAULT_DRAFT_TOKENS, PromptLookup, load_draft

    check_speculative_args(args)
    lookup = getattr(args, "prompt_lookup", None)
    if lookup is not None:
        options = PromptLookup(lookup, args.prompt_lookup_min_ngram, args.prompt_lookup_max_ngram)
        return {"prompt_lookup": options, "adaptive_draft": args.adaptive_draft}
    if args.draft_model is None:
        return {}
    draft = load_draft(args.draft_model, tokenizer, model, dtype=args.dtype, verbose=verbose)
    return {"draft_model": draft, "num_draft_tokens": args.num_draft_tokens or DEFAULT_DRAFT_TOKENS, "adaptive_draft": args.adaptive_draft}


def unescape(text: str) -> str:
    """Shells pass "\\n" literally; in a stop string it almost always means a newline."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def quantize_from_args(args) -> dict:
    """load()'s quantization keywords. Any quantization option implies quantizing (4 bits unless --q-bits says)."""
    bits, group, recipe = getattr(args, "q_bits", None), getattr(args, "q_group_size", None), getattr(args, "q_recipe", None)
    if bits is None and (group is not None or recipe is not None):
        bits = 4
    return {"q_bits": bits, "q_group_size": group or 64, "q_recipe": recipe}


def resolve_model(model: Optional[str], adapter_path: Optional[str] = None, verbose: bool = True) -> str:
    """The model to use: `model`, else the base model of `adapter_path`, else the bundled demo. Says which once."""
    if model is not None:
        return model
    if adapter_path is not None:
        base = base_model_of(Path(adapter_path).expanduser())
        if verbose:
            notice(f"using {base}, the base model {adapter_path} was trained on (--model overrides)")
        return base
    from .demo import DEMO_DIR, demo_notice

    if verbose:
        notice(demo_notice())
    return str(DEMO_DIR)


def base_model_of(adapter_dir: Path) -> str:
    """The base model an adapter directory records (elm-mlx lora writes it into adapter_config.json)."""
    from .lora.adapters import read_adapter_config

    base = read_adapter_config(adapter_dir).get("base_model")
    if not isinstance(base, str) or not base.strip() or len(base) > 4096:
        raise ElmError(f"{adapter_dir} does not name its base model; pass --model")
    return base


def load_from_args(args, verbose: bool = True):
    """(model, tokenizer) as the model options say, with the slow-BLAS notice once on a CPU."""
    from .load import load

    model_name = resolve_model(args.model, getattr(args, "adapter_path", None), verbose)
    if verbose:
        blas_notice()
    model, tokenizer = load(
        model_name, dtype=args.dtype, adapter_path=getattr(args, "adapter_path", None), verbose=verbose, **quantize_from_args(args)
    )
    return model_name, model, tokenizer


def blas_notice() -> None:
    """Say once, when MLX runs on the CPU with its slow reference BLAS, what to install (ELM_MLX_BLAS_NOTICE=0 silences it)."""
    from . import _blas

    if os.environ.get("ELM_MLX_BLAS_NOTICE", "1") == "0":
        return
    text = getattr(_blas, "slow_blas_notice", lambda: None)()
    if text:
        notice(text)


# --------------------------------------------------------------------------
# Structured output
# --------------------------------------------------------------------------


def add_constraint_options(p: argparse.ArgumentParser) -> None:
    """--json-schema, --regex, --grammar: what the generated text must be (one of them)."""
    g = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    g.add_argument(
        "--json-schema",
        metavar="FILE|JSON",
        default=None,
        help="the text is JSON valid under this JSON schema: a file, or the schema itself when it starts with '{' (default: free text)",
    )
    g.add_argument("--regex", metavar="PATTERN", default=None, help="the text matches this regular expression in full (default: free text)")
    g.add_argument(
        "--grammar", metavar="FILE", default=None, help="the text follows this Lark grammar (llguidance's dialect) (default: free text)"
    )


def constraint_from_args(args):
    """The Constraint the flags ask for (elm_mlx.constrain), or None; its files read, not yet compiled.

    Refused beside speculative options (--draft-model, --prompt-lookup), which it does not combine with yet.
    """
    from .constrain import MAX_SOURCE_CHARS, Constraint, check_constraint

    def read(path: str, flag: str) -> str:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ElmError(f"{flag}: {path} is not a file")
        if file.stat().st_size > MAX_SOURCE_CHARS:
            raise ElmError(f"{flag}: {path} is over {MAX_SOURCE_CHARS} bytes")
        try:
            return file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ElmError(f"{flag}: {path} is not UTF-8 text (byte {e.start})") from None

    schema, regex, grammar = getattr(args, "json_schema", None), getattr(args, "regex", None), getattr(args, "grammar", None)
    if schema is not None:
        constraint = Constraint.json_schema(schema if schema.lstrip().startswith("{") else read(schema, "--json-schema"))
    elif regex is not None:
        constraint = Constraint.regex(regex)
    elif grammar is not None:
        constraint = Constraint.grammar(read(grammar, "--grammar"))
    else:
        return None
    # Validated without a tokenizer so a bad constraint is refused before the (slow) model load: llguidance's check
    # builds the grammar's parser, about a quarter of a compile (a 10,000-property schema: 2.3 s, then 10.8 s to
    # compile). The compile with the tokenizer, after the load, happens once: compile_constraint keeps it for the
    # prompts and turns that follow.
    check_constraint(constraint)
    if getattr(args, "draft_model", None) is not None or getattr(args, "prompt_lookup", None) is not None:
        raise ElmError("--json-schema, --regex and --grammar do not combine with speculative decoding (--draft-model, --prompt-lookup) yet")
    return constraint
