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
from typing import List, Optional

from .cache import PromptCache
from .cli import ArgumentParser, run_cli
from .errors import ElmError
from .generation import GenerationResponse, format_stats, stream_generate
from .load import load
from .sample import SamplingParams
from .tokenizer import Tokenizer

HELP = "commands: /reset (forget the conversation), /system TEXT (new system prompt, resets), /exit (or Ctrl-D)"


class ChatSession:
    """A conversation and the tokens the model has already seen of it."""

    def __init__(self, model, tokenizer: Tokenizer, system: Optional[str] = None):
        self.model, self.tokenizer = model, tokenizer
        self.prompt_cache = PromptCache(model)
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.tokens: List[int] = []  # everything fed to the model in this conversation

    def prompt_for(self, user_text: str) -> List[int]:
        """History tokens as the model saw them (its own answers as generated), then the new turn's tokens.

        Re-encoding the rendered history could tokenize the model's answers
        differently from how it generated them, and so miss the cache.
        """
        messages = self.messages + [{"role": "user", "content": user_text}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if not self.tokens:
            return self.tokenizer.encode(text)
        eos_token = self.tokenizer.eos_token
        history = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=False)
        cut = history.rfind(eos_token) + len(eos_token) if eos_token and eos_token in history else -1
        if cut < 0 or not text.startswith(history[:cut]):  # a template this shortcut does not fit
            return self.tokenizer.encode(text)
        tokens = list(self.tokens)
        if tokens[-1] not in self.tokenizer.eos_ids:  # the answer was cut short: close the turn
            tokens.append(min(self.tokenizer.eos_ids))
        return tokens + self.tokenizer.encode(text[cut:], add_bos=False)

    def ask(self, user_text: str, max_tokens: int, sampling: SamplingParams):
        """Stream the answer; the turn is recorded even when the caller stops early."""
        prompt = self.prompt_for(user_text)
        responses = stream_generate(self.model, self.tokenizer, prompt, max_tokens, sampling, prompt_cache=self.prompt_cache)
        answer = []
        try:
            for r in responses:
                answer.append(r.text)
                yield r
        finally:
            responses.close()
            self.tokens = list(self.prompt_cache.tokens)
            self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": "".join(answer)}]


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
    p.add_argument("--max-tokens", "-m", type=int, default=512, help="most tokens per answer (default: %(default)s)")
    p.add_argument("--temp", type=float, default=defaults.temp, help="(default: %(default)s)")
    p.add_argument("--top-p", type=float, default=defaults.top_p, help="(default: %(default)s)")
    p.add_argument("--min-p", type=float, default=defaults.min_p, help="(default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.2, help="Apple's samples use 1.2 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=True, help="stats after each answer (default: on)")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        raise ElmError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    sampling = SamplingParams(temp=args.temp, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    if args.seed is not None:
        import mlx.core as mx

        mx.random.seed(args.seed)
    repl(ChatSession(model, tokenizer, args.system), args.max_tokens, sampling, args.verbose)


if __name__ == "__main__":
    run_cli(main)
