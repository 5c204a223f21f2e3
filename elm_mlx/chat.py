"""Chat with a model in the terminal.

elm-mlx chat --model apple/OpenELM-270M-Instruct

Multi-turn with the model's chat template, answers streamed as they are
generated. The KV cache is kept across turns: each turn computes only its new
tokens, never the history again. With --json-schema, --regex or --grammar
every answer follows that constraint. Commands: /help, /stats, /reset,
/system TEXT, /save FILE, /exit (or Ctrl-D). Ctrl-C stops the answer being
written, not the program.
"""

import json
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx

from .cache import KVOptions, PromptCache
from .cli import ArgumentParser, describe_os_error, one_line, run_cli
from .errors import ElmError
from .files import write_text_atomically
from .generation import GenerationResponse, context_length, format_stats, stream_generate
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
    notice,
    sampling_from_args,
    speculative_from_args,
    unescape,
)
from .sample import SamplingParams
from .tokenizer import Tokenizer

HELP = (
    "commands: /help, /stats (model, context used, last answer's speed), /reset (forget the conversation), "
    "/system TEXT (new system prompt, resets; /system alone clears it), /save FILE (the conversation as JSON), /exit (or Ctrl-D)"
)
TRANSCRIPT_FORMAT = "elm-mlx chat transcript"


class ChatSession:
    """A conversation and the tokens the model has already seen of it.

    The conversation must fit the model's context with room for an answer:
    when it no longer does, the oldest whole turns go (the system prompt
    stays); a message that cannot fit even alone is refused.
    """

    def __init__(
        self,
        model,
        tokenizer: Tokenizer,
        system: Optional[str] = None,
        notice=None,
        kv: Optional[KVOptions] = None,
        speculative: Optional[dict] = None,
        constraint=None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.speculative = speculative or {}  # stream_generate's speculative keywords (options.speculative_from_args)
        if constraint is not None:
            from .constrain import Matcher

            if isinstance(constraint, Matcher):  # a compiled Matcher follows one answer; every turn compiles its own
                raise ElmError("a compiled Matcher serves one sequence; pass the Constraint")
        self.constraint = constraint  # an elm_mlx.constrain.Constraint every answer follows (a fresh matcher each turn), or None
        self.prompt_cache = PromptCache(model, kv)  # a rotating window that dropped tokens recomputes an edited history
        self.context_length = context_length(model)
        self.system = system
        self.notice = notice or (lambda text: None)  # told when turns are dropped
        self.last: Optional[GenerationResponse] = None  # the last answer's final stats
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.tokens: List[int] = []  # everything fed to the model in this conversation

    def prompt_for(self, user_text: str) -> List[int]:
        """History tokens as the model saw them (its own answers as generated), then the new turn's tokens.

        Re-encoding the rendered history could tokenize the model's answers
        differently from how it generated them, and so miss the cache. Message
        contents are encoded as plain text: a "</s>" typed by the user is text.
        """
        full = self.tokenizer.encode_chat(self.messages + [{"role": "user", "content": user_text}], add_generation_prompt=True)
        if not self.tokens:
            return full
        history = self.tokenizer.encode_chat(self.messages, add_generation_prompt=False)
        eos = [i for i, t in enumerate(history) if t in self.tokenizer.eos_ids]
        cut = eos[-1] + 1 if eos else -1
        if cut < 0 or full[:cut] != history[:cut]:  # a template this shortcut does not fit
            return full
        tokens = list(self.tokens)
        if tokens[-1] not in self.tokenizer.eos_ids:  # the answer was cut short: close the turn
            tokens.append(min(self.tokenizer.eos_ids))
        return tokens + full[cut:]

    def fitted_prompt(self, user_text: str, max_tokens: int) -> Tuple[List[int], int]:
        """The prompt and its answer budget, dropping the oldest turns until an answer has room.

        Room means min(max_tokens, a quarter of the context); the answer may
        then run on to max_tokens or the end of the context, whichever is first.
        A message that does not fit even alone is refused, the history kept.
        """
        limit = self.context_length
        prompt = self.prompt_for(user_text)
        if limit is None:
            return prompt, max_tokens
        room = min(max_tokens, max(1, limit // 4))
        kept, dropped = list(self.messages), 0
        while len(prompt) + room > limit:
            turns = [i for i, m in enumerate(kept) if m["role"] == "user"]
            if not turns:
                raise ElmError(
                    f"this message needs {len(prompt)} tokens with the template and its answer {room} more, "
                    f"over the model's {limit}-token context: shorten it"
                )
            end = turns[1] if len(turns) > 1 else len(kept)
            del kept[turns[0] : end]
            dropped += 1
            prompt = self.tokenizer.encode_chat(kept + [{"role": "user", "content": user_text}], add_generation_prompt=True)
        if dropped:
            self.messages, self.tokens = kept, []  # the history changed: the cache keeps what still matches
            self.notice(f"(the conversation outgrew the {limit}-token context: dropped the oldest {dropped} turn{'s' * (dropped > 1)})")
        return prompt, min(max_tokens, limit - len(prompt))

    def ask(self, user_text: str, max_tokens: int, sampling: SamplingParams, stop: Sequence[str] = ()):
        """Stream the answer; the turn is recorded even when the caller stops early."""
        prompt, budget = self.fitted_prompt(user_text, max_tokens)
        responses = stream_generate(
            self.model,
            self.tokenizer,
            prompt,
            budget,
            sampling,
            stop=stop,
            prompt_cache=self.prompt_cache,
            **self.speculative,
            constraint=self.constraint,
        )
        answer, r = [], None
        try:
            for r in responses:
                answer.append(r.text)
                yield r
        finally:
            responses.close()
            self.last = r if answer else None
            self.tokens = list(self.prompt_cache.tokens)
            self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": "".join(answer)}]


def _stats(r: GenerationResponse) -> str:
    new = r.prompt_tokens - r.prompt_cached_tokens
    return f"[{new} new prompt tokens, {r.prompt_cached_tokens} from cache] " + format_stats(r)


def session_stats(session: ChatSession, model_name: str) -> str:
    """What /stats shows: the model, how full the context is, and the last answer's speed."""
    limit = session.context_length
    used = len(session.tokens)
    lines = [
        f"model: {model_name}",
        f"context: {used} of {limit} tokens used ({100 * used / limit:.0f}%)" if limit else f"context: {used} tokens used",
        f"turns: {sum(m['role'] == 'user' for m in session.messages)}" + (f"; system prompt: {session.system!r}" if session.system else ""),
    ]
    if session.constraint is not None:
        lines.append(f"every answer follows {_constraint_text(session.constraint)}")
    lines.append(f"last answer: {_stats(session.last)}" if session.last else "last answer: none yet")
    return "\n".join(lines)


def _constraint_text(constraint) -> str:
    kind, source = constraint.kind, constraint.source
    if kind == "regex":
        return f"the regex {one_line(source, 80)}"
    return {"json_schema": "a JSON schema", "json_object": "JSON (any object)", "grammar": "a Lark grammar"}.get(kind, kind)


def save_transcript(session: ChatSession, model_name: str, sampling: SamplingParams, file: str) -> str:
    """Write the conversation as JSON, whole or not at all. An existing file is replaced only if it is a transcript of ours."""
    if "\x00" in file:
        raise ElmError("a file name cannot contain a NUL character")
    path = Path(file).expanduser()
    record = {
        "format": TRANSCRIPT_FORMAT,
        "model": model_name,
        "system": session.system,
        "sampling": asdict(sampling),
        "messages": session.messages,
    }
    try:  # even looking at the path can fail (a name too long, a permission on the way)
        if path.is_dir():
            raise ElmError(f"{path} is a directory; /save needs a file name")
        if path.is_symlink() or (path.exists() and not _is_transcript(path)):
            raise ElmError(f"{path} already exists and is not a chat transcript; choose another name")
        write_text_atomically(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        e.filename, e.filename2 = str(path), None  # the user's file, not the temporary beside it
        raise ElmError(describe_os_error(e)) from None
    return str(path)


def _is_transcript(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except OSError:
        return False
    return TRANSCRIPT_FORMAT.encode() in head


def command(session: ChatSession, text: str, model_name: str, sampling: SamplingParams) -> Optional[str]:
    """Carry out a /command; return what to tell the user ("exit" to leave)."""
    name, _, rest = text.partition(" ")
    rest = rest.strip()
    if name in ("/exit", "/quit"):
        return "exit"
    if name == "/help":
        return HELP
    if name == "/stats":
        return session_stats(session, model_name)
    if name == "/reset":
        session.reset()
        return "(conversation cleared)"
    if name == "/system":
        session.system = rest or None
        session.reset()
        return f"(system prompt {'set' if session.system else 'cleared'}; conversation cleared)"
    if name == "/save":
        if not rest:
            return "(/save needs a file name, e.g. /save chat.json)"
        try:
            return f"(saved {len(session.messages)} messages to {save_transcript(session, model_name, sampling, rest)})"
        except ElmError as e:
            return f"error: {e}"
    return f"(unknown command {one_line(name, 40)}; {HELP})"


def repl(
    session: ChatSession, max_tokens: int, sampling: SamplingParams, stats: bool, model_name: str = "model", stop: Sequence[str] = ()
) -> None:
    # Ctrl-C is part of this program's interface. A shell starts background jobs with SIGINT
    # ignored, and Python then leaves it ignored; take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"chatting with {model_name}; {HELP}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-C stops an answer; /exit or Ctrl-D quits)", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            reply = command(session, text, model_name, sampling)
            if reply == "exit":
                return
            print(reply, file=sys.stderr)
            continue
        last = None
        answer = session.ask(line, max_tokens, sampling, stop)
        try:
            for last in answer:
                sys.stdout.write(last.text)
                sys.stdout.flush()
        except ElmError as e:  # this message is refused; the conversation goes on
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            answer.close()
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        if stats and last is not None:
            print(_stats(last), file=sys.stderr)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m elm_mlx.chat", description="Chat with a model in the terminal (best with -Instruct models).")
    add_model_options(p)
    p.add_argument("--system", "--system-prompt", help="system prompt (default: none)")
    add_generation_options(p, "most tokens per answer, within the context (default: %(default)s)", max_tokens_default=512)
    add_sampling_options(p, repetition_penalty=1.2)
    add_kv_options(p)
    add_speculative_options(p)
    add_constraint_options(p)
    p.add_argument(
        "--stats", action="store_true", help="print prompt/cache/speed figures after every answer (/stats shows them on request)"
    )
    add_verbose_option(p, "print which model is used and conversion notes to stderr")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    sampling = sampling_from_args(args)
    kv = kv_from_args(args)
    check_speculative_args(args)
    constraint = constraint_from_args(args)  # every refusal before the (slow) model load
    model_name, model, tokenizer = load_from_args(args, verbose=args.verbose)
    speculative = speculative_from_args(args, model, tokenizer, verbose=args.verbose)
    if constraint is not None:  # what needs the tokenizer refused before the first turn; the turns copy this compile
        from .constrain import matcher_for

        matcher_for(constraint, tokenizer, model)
    if args.seed is not None:
        mx.random.seed(args.seed)
    session = ChatSession(
        model, tokenizer, args.system, notice=notice, kv=kv, speculative=speculative, constraint=constraint
    )  # refuses a group size the heads do not split into
    if constraint is not None:
        notice(f"(every answer follows {_constraint_text(constraint)})")
    repl(session, args.max_tokens, sampling, args.stats, model_name=_display_name(model_name), stop=[unescape(t) for t in args.stop])


def _display_name(model_name: str) -> str:
    local = Path(model_name).expanduser()
    return local.resolve().name if local.exists() else model_name


if __name__ == "__main__":
    run_cli(main)
