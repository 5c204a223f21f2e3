"""Text generation: the token loop, and streaming text with running stats."""

import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Generator, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from .cache import KVOptions, PromptCache, attention_mask, make_cache
from .errors import ElmError
from .sample import LogitsProcessor, Sampler, SamplingParams, key_stream, make_logits_processors, make_sampler
from .tokenizer import Tokenizer


class ContextLengthError(ElmError):
    """The prompt and the tokens asked for do not fit in the model's context window."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int):
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit
        super().__init__(
            f"this model's context length is {limit} tokens, but {prompt_tokens + max_tokens} were asked for "
            f"({prompt_tokens} in the prompt, {max_tokens} to generate); shorten the prompt or ask for fewer tokens"
        )


class Cancelled(Exception):
    """A generation stopped by its `cancel` callback; `done` of `total` prompt tokens had been computed."""

    def __init__(self, done: int, total: int):
        super().__init__(f"cancelled after {done} of {total} prompt tokens")
        self.done, self.total = done, total


def context_length(model: nn.Module) -> Optional[int]:
    """Positions the model was trained for (OpenELM `max_context_length`, OLMo `max_position_embeddings`).

    Past it, rotary positions the model never saw make its output garbage.
    """
    args = getattr(model, "args", None)
    for name in ("max_context_length", "max_position_embeddings"):
        limit = getattr(args, name, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit
    return None


def check_context(prompt_tokens: int, max_tokens: int, limit: Optional[int]) -> None:
    """Refuse, before any work, a request whose prompt plus answer would overrun the context."""
    if limit is not None and prompt_tokens + max_tokens > limit:
        raise ContextLengthError(prompt_tokens, max_tokens, limit)


def answer_budget(prompt_tokens: int, wanted: int, limit: Optional[int]) -> int:
    """A default max_tokens shrunk to the room the context leaves (at least 1, so an over-long
    prompt still meets check_context's error); for callers whose user did not name a number."""
    if limit is None:
        return wanted
    return max(1, min(wanted, limit - prompt_tokens))


def prefill_chunk(model: nn.Module, tokens: mx.array, cache: list, start: int, end: int, step_size: int) -> int:
    """Run tokens[start:] (at most step_size of them, none past `end`) into `cache`; return where the next chunk starts.

    The single-stream and the batched paths both prefill with this, chunk by
    chunk from the prompt's start, so a prompt's cache is computed the same way
    in both. A rotating window's cache supplies its own mask (see cache.attention_mask).
    """
    n = min(step_size, end - start)
    model(tokens[start : start + n][None], cache=cache, mask=attention_mask(cache, n))
    mx.eval([c.state for c in cache])
    return start + n


def prefill_prompt(model: nn.Module, tokens: mx.array, cache: list, step_size: int, cancel: Optional[Callable[[], bool]] = None) -> int:
    """Run all but the last of `tokens` into `cache`, chunk by chunk; return the last token's index.

    The last token is left to the caller's first decoding step, which needs its
    logits. `cancel` is asked between chunks: raises Cancelled when it returns true.
    """
    done, end = 0, tokens.size - 1
    while done < end:
        if cancel is not None and cancel():
            raise Cancelled(done, tokens.size)
        done = prefill_chunk(model, tokens, cache, done, end, step_size)
    return end


def generate_step(
    prompt: Sequence[int],
    model: nn.Module,
    sampler: Sampler,
    logits_processors: Sequence[LogitsProcessor] = (),
    prefill_step_size: int = 512,
    cache: Optional[list] = None,
    context: Sequence[int] = (),
    cancel: Optional[Callable[[], bool]] = None,
    keys: Optional[Iterator[mx.array]] = None,
) -> Iterator[Tuple[int, mx.array]]:
    """Yield (token id, log-probabilities) forever; the caller decides when to stop.

    The prompt is prefilled in chunks of `prefill_step_size` tokens, so a long
    prompt never builds one huge attention graph, and so that `cancel` (and
    Ctrl-C) is heeded between chunks: raises Cancelled when it returns true.
    While the caller handles token n, token n+1 is already being computed
    (mx.async_eval). `context` names tokens already in `cache` before
    `prompt`, for logits processors. `keys` (see sample.key_stream) gives
    each token's random key; without it the global generator is used.
    """
    cache = cache if cache is not None else make_cache(model)
    tokens = mx.array(prompt, dtype=mx.uint32)
    history = mx.array([*context, *prompt], dtype=mx.uint32)  # only consulted by logits processors

    def step(inputs: mx.array) -> Tuple[mx.array, mx.array]:
        nonlocal history
        logits = model(inputs[None], cache=cache)[:, -1, :]
        for processor in logits_processors:
            logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs, key=next(keys)) if keys is not None else sampler(logprobs)
        if logits_processors:
            history = mx.concatenate([history, token.astype(mx.uint32)])
        return token, logprobs.squeeze(0)

    end = prefill_prompt(model, tokens, cache, prefill_step_size, cancel)

    token, logprobs = step(tokens[end:])
    mx.async_eval(token, logprobs)
    while True:
        next_token, next_logprobs = step(token)
        mx.async_eval(next_token, next_logprobs)
        yield token.item(), logprobs
        token, logprobs = next_token, next_logprobs


@dataclass
class GenerationResponse:
    """One streamed piece of output with the running statistics.

    Every generated token yields one response (its `text` may be empty while a
    multi-byte character or a possible stop string is pending). A last
    response with token None carries any remaining text and `finish_reason`:
    "stop" (end-of-sequence token or stop string) or "length" (max_tokens).
    """

    text: str
    token: Optional[int]
    logprobs: Optional[mx.array]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: Optional[str] = None
    prompt_cached_tokens: int = 0  # prompt tokens whose keys/values came from a PromptCache
    # Speculative decoding (elm_mlx.speculative); all 0 in plain decoding.
    draft_tokens: int = 0  # tokens proposed and scored by the model
    accepted_tokens: int = 0  # of those, accepted
    target_passes: int = 0  # the model's forward passes that produced generated tokens

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.generation_tokens / self.target_passes if self.target_passes else 0.0


SEED_LIMIT = 1 << 64  # mx.random.seed takes an unsigned 64-bit integer


def check_request(prompt: Union[str, Sequence[int]], max_tokens: int, prefill_step_size: int = 512, seed: Optional[int] = None) -> None:
    """Refuse what would fail (or never end) later, before any model work."""
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise ElmError(f"seed must be an integer in [0, 2^64 - 1], got {seed}")
    if not (prompt.strip() if isinstance(prompt, str) else len(prompt)):
        raise ElmError("the prompt is empty")
    if max_tokens < 1:
        raise ElmError(f"max_tokens must be >= 1, got {max_tokens}")
    if prefill_step_size < 1:  # 0 would never advance through the prompt
        raise ElmError(f"prefill_step_size must be >= 1, got {prefill_step_size}")


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-n:]):
                longest = n
                break
    return longest


@dataclass
class Piece:
    """Text for one generated token (`token` set), or the closing text of a sequence (`finish_reason` set)."""

    text: str
    token: Optional[int] = None
    finish_reason: Optional[str] = None


class TextStream:
    """One sequence's tokens turned into text, and the decision when it ends.

    Shared by stream_generate and the batch engine, so both stop alike: an
    end-of-sequence token ends with "stop" and is not shown; text that may be
    the start of a stop string is held back until it cannot be; a stop string
    ends with "stop" and neither it nor anything after it is shown; the
    max_tokens-th token ends with "length".
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str], max_tokens: int):
        self.detokenizer = tokenizer.detokenizer(trim_leading_space=False)
        self.eos_ids = tokenizer.eos_ids
        self.stop = [s for s in stop if s]
        self.max_tokens = max_tokens
        self.pending = ""  # decoded text not yet handed out (it may start a stop string)
        self.generated = 0
        self.finish_reason: Optional[str] = None

    def add(self, token: int) -> List[Piece]:
        """The pieces `token` gives: its text (unless it ends the sequence unseen), then the closing piece if it ends it."""
        if token in self.eos_ids:
            return [self.close("stop")]
        self.generated += 1
        self.pending += self.detokenizer.add(token)
        hit = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if hit >= 0:
            text, self.pending = self.pending[:hit], ""
            return [Piece(text, token), self.close("stop", flush=False)]  # bytes buffered past the stop go too
        keep = _held_back(self.pending, self.stop) if self.stop else 0
        text, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        if self.generated >= self.max_tokens:
            return [Piece(text, token), self.close("length")]
        return [Piece(text, token)]

    def close(self, reason: str, flush: bool = True) -> Piece:
        """End the sequence; with flush, hand out what was held back."""
        text = self.pending + self.detokenizer.finalize() if flush else ""
        self.pending, self.finish_reason = "", reason
        return Piece(text, finish_reason=reason)


def stream_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: Union[str, Sequence[int]],
    max_tokens: int = 256,
    sampling: Optional[SamplingParams] = None,
    stop: Sequence[str] = (),
    seed: Optional[int] = None,
    prefill_step_size: int = 512,
    prompt_cache: Optional[PromptCache] = None,
    cancel: Optional[Callable[[], bool]] = None,
    kv: Optional[KVOptions] = None,
    prompt_lookup=None,
    draft_model: Optional[nn.Module] = None,
    num_draft_tokens: Optional[int] = None,
    adaptive_draft: bool = False,
    constraint=None,
) -> Generator[GenerationResponse, None, None]:
    """Generate from a prompt (text, or token ids), yielding text as it is produced.

    Raises ContextLengthError when prompt + max_tokens exceed the model's
    context length, before any work. With a `prompt_cache`, the prefix this
    prompt shares with what the cache holds is not computed again, and the
    cache is left holding this conversation for the next call. `cancel` is
    asked between prefill chunks (see generate_step). `kv` bounds or
    quantizes the keys and values kept (a PromptCache has its own).
    `prompt_lookup` (K or a speculative.PromptLookup) or `draft_model` (with
    `num_draft_tokens`, `adaptive_draft`) decode speculatively: the same text
    greedy, the same distribution sampling (see elm_mlx.speculative).
    `constraint` (elm_mlx.constrain.Constraint, or a compiled Matcher, which serves one call) makes
    the text follow a JSON schema, regex or grammar; a bad one raises
    ConstraintError before any work. The two do not combine (yet).
    """
    from .speculative import resolve, speculative_stream

    sampling = sampling or SamplingParams()
    spec = resolve(model, prompt_lookup, draft_model, num_draft_tokens, adaptive_draft)
    if kv is not None and prompt_cache is not None:
        raise ElmError("pass kv options to the PromptCache, not to stream_generate, when using one")
    check_request(prompt, max_tokens, prefill_step_size, seed)
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    check_context(len(prompt_ids), max_tokens, context_length(model))
    matcher = None
    if constraint is not None:
        if spec is not None:
            raise ElmError("constrained output (JSON schema, regex, grammar) does not combine with speculative decoding yet")
        from .constrain import matcher_for

        matcher = matcher_for(constraint, tokenizer, model)

    reused = prompt_cache.reuse(prompt_ids) if prompt_cache is not None else 0
    fed = list(prompt_ids)  # every token the model has seen, for the prompt cache
    cache = prompt_cache.cache if prompt_cache is not None else make_cache(model, kv)
    run = partial(_stream, matcher=matcher) if spec is None else partial(speculative_stream, spec=spec, prompt_cache=prompt_cache)
    try:
        yield from run(model, tokenizer, prompt_ids, reused, fed, max_tokens, sampling, stop, seed, prefill_step_size, cache, cancel)
    finally:
        if prompt_cache is not None:
            prompt_cache.record(fed)


def _stream(model, tokenizer, prompt_ids, reused, fed, max_tokens, sampling, stop, seed, prefill_step_size, cache, cancel, matcher=None):
    step_args = dict(
        prefill_step_size=prefill_step_size,
        cache=cache,
        context=prompt_ids[:reused],
        cancel=cancel,
        keys=key_stream(seed) if seed is not None and sampling.temp > 0 else None,
    )
    sampler, processors = make_sampler(sampling), make_logits_processors(sampling)
    if matcher is not None:
        from .constrain import constrained_step

        steps = constrained_step(prompt_ids[reused:], model, matcher, sampler, processors, **step_args)
    else:
        steps = generate_step(prompt_ids[reused:], model, sampler, processors, **step_args)
    timing = Timing(len(prompt_ids), reused)
    text = TextStream(tokenizer, stop, max_tokens)

    def response(piece: Piece, logprobs=None) -> GenerationResponse:
        # The first token comes out of the prefill; decode speed counts the rest.
        return timing.response(piece, logprobs, text.generated, text.generated - 1)

    try:
        for token, logprobs in steps:
            fed.append(token)
            timing.first_token()
            for piece in text.add(token):
                yield response(piece, logprobs)
            if text.finish_reason is not None:
                return
        yield response(text.close("stop"))  # a constraint complete with no end-of-sequence token to say so
    finally:
        steps.close()


class Timing:
    """One generation's clock (from here, with the peak memory reset) and the GenerationResponses it reports.

    Shared by plain and speculative decoding, so both count prompt and decode speeds alike: the prefill runs until
    the first token; decode speed counts the tokens after it (`decoded`: those after the first model pass's).
    """

    def __init__(self, prompt_tokens: int, reused: int):
        self.prompt_tokens, self.reused = prompt_tokens, reused
        mx.reset_peak_memory()
        self.start = time.perf_counter()
        self.first_token_time: Optional[float] = None

    def first_token(self) -> None:
        """Note the time the first token came out (later calls change nothing)."""
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()

    def response(self, piece: Piece, logprobs, generated: int, decoded: int, **speculation) -> GenerationResponse:
        """The response for `piece`, `generated` tokens so far; `speculation`: GenerationResponse's draft counts."""
        now = time.perf_counter()
        prefill = (self.first_token_time or now) - self.start
        decode = now - self.first_token_time if self.first_token_time else 0.0
        return GenerationResponse(
            text=piece.text,
            token=piece.token,
            logprobs=logprobs if piece.token is not None else None,
            prompt_tokens=self.prompt_tokens,
            prompt_tps=(self.prompt_tokens - self.reused) / prefill if prefill > 0 else 0.0,
            generation_tokens=generated,
            generation_tps=decoded / decode if decoded > 0 and decode > 0 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            finish_reason=piece.finish_reason,
            prompt_cached_tokens=self.reused,
            **speculation,
        )


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: Union[str, Sequence[int]],
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate and return the whole text; with verbose, stream it to stdout and print stats."""
    responses = stream_generate(model, tokenizer, prompt, **kwargs)
    if verbose:
        return print_stream(responses, stats=True)
    return "".join(r.text for r in responses)


def print_stream(responses: Iterable[GenerationResponse], stats: bool) -> str:
    """Write text to stdout as it arrives, then a newline and, with stats, the stats line to stderr."""
    pieces: List[str] = []
    last = None
    for last in responses:
        pieces.append(last.text)
        sys.stdout.write(last.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if stats:
        print(format_stats(last), file=sys.stderr)
    return "".join(pieces)


def format_stats(r: GenerationResponse) -> str:
    """One line of counts and speeds; a speed that was not measurable (one token, no time) reads "-"."""
    return (
        f"prompt: {_count(r.prompt_tokens)}, {_rate(r.prompt_tps)} | "
        f"generation: {_count(r.generation_tokens)}, {_rate(r.generation_tps)} | "
        f"peak memory: {r.peak_memory_gb:.3f} GB"
    ) + (f" | {format_speculation(r)}" if r.target_passes else "")


def format_speculation(r: GenerationResponse) -> str:
    """How speculation went: the share of proposals accepted and the tokens each pass of the model gave."""
    return (
        f"speculative: acceptance {100 * r.acceptance_rate:.1f}% ({r.accepted_tokens}/{r.draft_tokens}), "
        f"{r.tokens_per_pass:.2f} tokens per model pass"
    )


def _count(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def _rate(tokens_per_second: float) -> str:
    return f"{tokens_per_second:.1f} tok/s" if tokens_per_second > 0 else "- tok/s"
