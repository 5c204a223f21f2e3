"""Chat with a model in the terminal.

python -m elm_mlx.chat --model apple/OpenELM-270M-Instruct

Multi-turn with the model's chat template, answers streamed as they are
generated. The KV cache is kept across turns: each turn computes only its new
tokens, never the history again. Commands: /reset, /system TEXT, /exit
(or Ctrl-D). Ctrl-C stops the answer being written, not the program.
"""

import argparse
import signal
import sys
from typing import List, Optional, Tuple

from .cache import PromptCache
from .cli import SAMPLING_SEED, ArgumentParser, positive_int, run_cli
from .errors import ElmError
from .generation import GenerationResponse, context_length, format_stats, stream_generate
from .load import load
from .sample import SamplingParams
from .tokenizer import Tokenizer

HELP = "commands: /reset (forget the conversation), /system TEXT (new system prompt, resets), /exit (or Ctrl-D)"


class ChatSession:
    """A conversation and the tokens the model has already seen of it.

    The conversation must fit the model's context with room for an answer:
    when it no longer does, the oldest whole turns go (the system prompt
    stays); a message that cannot fit even alone is refused.
    """

    def __init__(self, model, tokenizer: Tokenizer, system: Optional[str] = None, notice=None):
        self.model, self.tokenizer = model, tokenizer
        self.prompt_cache = PromptCache(model)
        self.context_length = context_length(model)
        self.system = system
        self.notice = notice or (lambda text: None)  # told when turns are dropped
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

    def ask(self, user_text: str, max_tokens: int, sampling: SamplingParams):
        """Stream the answer; the turn is recorded even when the caller stops early."""
        prompt, budget = self.fitted_prompt(user_text, max_tokens)
        responses = stream_generate(self.model, self.tokenizer, prompt, budget, sampling, prompt_cache=self.prompt_cache)
        answer = []
        try:
            for r in responses:
                answer.append(r.text)
                yield r
        finally:
            responses.close()
            self.tokens = list(self.prompt_cache.tokens)
            self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": "".join(answer)}]


def dim(text: str) -> str:
    """Faint on a terminal, plain otherwise."""
    return f"\x1b[2m{text}\x1b[0m" if sys.stderr.isatty() else text


def _stats(r: GenerationResponse) -> str:
    new = r.prompt_tokens - r.prompt_cached_tokens
    return f"[{new} new prompt tokens, {r.prompt_cached_tokens} from cache] " + format_stats(r)


def repl(session: ChatSession, max_tokens: int, sampling: SamplingParams, stats: bool) -> None:
    # Ctrl-C is part of this program's interface. A shell starts background jobs with SIGINT
    # ignored, and Python then leaves it ignored; take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print(f"chatting; {HELP}", file=sys.stderr)
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
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            session.system = text[len("/system") :].strip() or None
            session.reset()
            print(f"(system prompt {'set' if session.system else 'cleared'}; conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; {HELP})", file=sys.stderr)
            continue
        last = None
        answer = session.ask(line, max_tokens, sampling)
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


def main(argv: Optional[List[str]] = None) -> None:
    defaults = SamplingParams()
    p = ArgumentParser(prog="python -m elm_mlx.chat", description="Chat with an -Instruct model in the terminal.")
    p.add_argument("--model", required=True, help="model directory or Hugging Face repo id")
    p.add_argument("--adapter-path", help="apply fine-tuned adapters from this directory")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", "-m", type=positive_int, default=512, help="most tokens per answer, within the context (default: %(default)s)")
    p.add_argument("--temp", type=float, default=defaults.temp, help="(default: %(default)s)")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="(default: %(default)s)")
    p.add_argument("--min-p", type=float, default=defaults.min_p, help="(default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.2, help="Apple's samples use 1.2 (default: %(default)s)")
    p.add_argument("--seed", type=SAMPLING_SEED, default=None)
    p.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=True, help="stats after each answer (default: on)")
    args = p.parse_args(argv)
    sampling = SamplingParams(temp=args.temp, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    if args.seed is not None:
        import mlx.core as mx

        mx.random.seed(args.seed)
    session = ChatSession(model, tokenizer, args.system, notice=lambda text: print(dim(text), file=sys.stderr))
    repl(session, args.max_tokens, sampling, args.verbose)


if __name__ == "__main__":
    run_cli(main)
