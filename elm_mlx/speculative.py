"""Speculative decoding: several tokens per pass over the target's weights, with the target's own output.

A proposer guesses the next k tokens: prompt lookup (the continuation of the
latest earlier occurrence of the text's last n tokens) or a small draft
model with the same vocabulary. The target scores all of them in one forward
pass; the KV caches are then trimmed back to the last accepted token.

Greedy (temp 0): a proposal is kept while it is the target's argmax, so the
text is the one plain greedy decoding writes. Sampling: the rejection scheme
of Leviathan et al. and Chen et al. (2023): accept proposal d with probability
min(1, p(d) / q(d)), else draw from max(0, p - q) normalised; after k
acceptances draw one more from p. Then every token is distributed exactly as
p, the target's distribution after repetition penalty, top-k/top-p/min-p and
temperature (sample.sampling_logits, shared with plain decoding). Prompt
lookup is the case of a deterministic q (one-hot): accept with probability
p(d). Randomness comes from one key per output position (sample.key_stream),
split three ways: the draft's draw for that position, and, for a pass that
starts there, its acceptance tests and its replacement draw. Passes start at
ever later positions, so no test reuses randomness, and a seeded run is
reproducible.
"""

import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import KVCache, PromptCache, QuantizedKVCache, make_cache
from .errors import ElmError
from .generation import Cancelled, GenerationResponse, Piece, TextStream, Timing, prefill_chunk
from .sample import SamplingParams, key_stream, make_logits_processors, sampling_logits
from .tokenizer import Tokenizer

MAX_DRAFT_TOKENS = 64  # beyond this a verify pass costs more than it can win, and acceptance of 64 in a row is rare
DEFAULT_DRAFT_TOKENS = 4  # draft model
DEFAULT_LOOKUP_TOKENS = 10  # prompt lookup (the value Apple's model card suggests)
DEFAULT_MIN_NGRAM, DEFAULT_MAX_NGRAM = 1, 3
MAX_NGRAM = 64


def _check_count(value, name: str, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ElmError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class PromptLookup:
    """Prompt lookup: `num_tokens` proposals per pass, from the longest n-gram (max_ngram down to min_ngram) match."""

    num_tokens: int = DEFAULT_LOOKUP_TOKENS
    min_ngram: int = DEFAULT_MIN_NGRAM
    max_ngram: int = DEFAULT_MAX_NGRAM

    def __post_init__(self):
        _check_count(self.num_tokens, "the number of prompt lookup tokens", 1, MAX_DRAFT_TOKENS)
        _check_count(self.min_ngram, "the prompt lookup min n-gram", 1, MAX_NGRAM)
        _check_count(self.max_ngram, "the prompt lookup max n-gram", 1, MAX_NGRAM)
        if self.min_ngram > self.max_ngram:
            raise ElmError(f"the prompt lookup min n-gram ({self.min_ngram}) is above its max n-gram ({self.max_ngram})")


@dataclass(frozen=True)
class Speculation:
    """What stream_generate was asked for, checked: one proposer and its k (the most per pass)."""

    lookup: Optional[PromptLookup]
    draft: Optional[nn.Module]
    k: int
    adaptive: bool = False


def resolve(
    model: nn.Module,
    prompt_lookup: Union[None, int, PromptLookup] = None,
    draft_model: Optional[nn.Module] = None,
    num_draft_tokens: Optional[int] = None,
    adaptive_draft: bool = False,
) -> Optional[Speculation]:
    """The Speculation stream_generate's keywords ask for (None: plain decoding); one-line ElmError for bad ones."""
    if prompt_lookup is not None and not isinstance(prompt_lookup, PromptLookup):
        if prompt_lookup == 0 and not isinstance(prompt_lookup, bool):
            prompt_lookup = None
        else:
            _check_count(prompt_lookup, "prompt_lookup (tokens proposed per pass)", 1, MAX_DRAFT_TOKENS)
            prompt_lookup = PromptLookup(num_tokens=prompt_lookup)
    if num_draft_tokens is not None:
        _check_count(num_draft_tokens, "num_draft_tokens", 1, MAX_DRAFT_TOKENS)
        if draft_model is None:
            raise ElmError("num_draft_tokens needs a draft model")
    if not isinstance(adaptive_draft, bool):
        raise ElmError(f"adaptive_draft must be true or false, got {adaptive_draft!r}")
    if prompt_lookup is not None and draft_model is not None:
        raise ElmError("prompt lookup and a draft model do not combine; choose one")
    if draft_model is not None:
        check_vocab(model, draft_model)
        return Speculation(None, draft_model, num_draft_tokens or DEFAULT_DRAFT_TOKENS, adaptive_draft)
    if prompt_lookup is not None:
        return Speculation(prompt_lookup, None, prompt_lookup.num_tokens, adaptive_draft)
    if adaptive_draft:
        raise ElmError("adaptive_draft needs prompt lookup or a draft model")
    return None


def _vocab(model: nn.Module) -> Optional[int]:
    value = getattr(getattr(model, "args", None), "vocab_size", None)
    return value if isinstance(value, int) else None


def check_vocab(model: nn.Module, draft: nn.Module) -> None:
    """Refuse a draft whose logits do not index the target's vocabulary."""
    if not hasattr(draft, "layers") or not callable(draft):
        raise ElmError(f"the draft model must be a loaded model, got {type(draft).__name__}")
    if _vocab(model) != _vocab(draft):
        raise ElmError(f"the draft model's vocabulary has {_vocab(draft)} tokens, the model's {_vocab(model)}: it cannot draft for it")


def check_draft(model: nn.Module, tokenizer: Tokenizer, draft: nn.Module, draft_tokenizer: Tokenizer) -> None:
    """Refuse a draft model that does not share the target's vocabulary and tokenizer (same ids, same text, same ends)."""
    check_vocab(model, draft)
    same = (
        tokenizer.vocab_size == draft_tokenizer.vocab_size
        and tokenizer.token_bytes == draft_tokenizer.token_bytes
        and tokenizer.bos_id == draft_tokenizer.bos_id
        and set(tokenizer.eos_ids) == set(draft_tokenizer.eos_ids)
    )
    if not same:
        raise ElmError("the draft model's tokenizer differs from the model's (token ids, texts or special tokens); it cannot draft for it")


def load_draft(path_or_repo: str, tokenizer: Tokenizer, model: Optional[nn.Module] = None, **load_options) -> nn.Module:
    """Load a draft model (load()'s options: dtype, q_bits, ...) and check it can draft for `model`/`tokenizer`."""
    from .load import load

    try:
        draft, draft_tokenizer = load(path_or_repo, **load_options)
    except ElmError as e:
        raise ElmError(f"the draft model: {e}") from None
    if model is not None:
        check_draft(model, tokenizer, draft, draft_tokenizer)
    else:  # no target to compare logits widths with: the tokenizers alone
        check_draft(draft, tokenizer, draft, draft_tokenizer)
    return draft


def check_cache(cache: Sequence) -> None:
    """Speculation trims rejected tokens off the cache: refuse caches that cannot take them back exactly."""
    for layer_cache in cache:
        if not isinstance(layer_cache, (KVCache, QuantizedKVCache)):
            raise ElmError("speculative decoding needs a KV cache it can take tokens back from; a rotating window (--max-kv-size) cannot")


# --------------------------------------------------------------------------
# Proposers
# --------------------------------------------------------------------------


BACKOFF_AFTER = 3  # prompt lookup: passes in a row with nothing accepted before it pauses
MAX_PAUSE = 16  # tokens decoded plainly, at most, before it tries again


class LookupProposer:
    """Proposals from the text itself: after the latest earlier occurrence of its last n tokens, what followed.

    Text with nothing to copy still has short n-grams that recur by chance,
    and every wrong proposal costs the model a wider pass. So after
    BACKOFF_AFTER passes in a row with nothing accepted, it pauses for 1, 2,
    4... passes (at most MAX_PAUSE), proposing nothing (plain single-token
    passes), until a proposal is accepted again.
    """

    def __init__(self, options: PromptLookup, tokens: Sequence[int]):
        self.options = options
        self.buffer = np.zeros(max(64, 2 * len(tokens)), dtype=np.int64)
        self.size = 0
        self.misses = 0  # passes in a row whose proposals were all rejected
        self.pause = 0  # passes left without proposals
        self.extend(tokens)

    def feedback(self, proposed: int, accepted: int) -> None:
        """How the last proposal went."""
        if not proposed:
            return
        if accepted:
            self.misses = 0
            return
        self.misses += 1
        if self.misses >= BACKOFF_AFTER:
            self.pause = min(MAX_PAUSE, 2 ** (self.misses - BACKOFF_AFTER))

    def extend(self, tokens: Sequence[int]) -> None:
        n = self.size + len(tokens)
        if n > len(self.buffer):
            grown = np.zeros(max(n, 2 * len(self.buffer)), dtype=np.int64)
            grown[: self.size] = self.buffer[: self.size]
            self.buffer = grown
        self.buffer[self.size : n] = tokens
        self.size = n

    def propose(self, k: int) -> List[int]:
        """At most k tokens (none when no n-gram of the allowed sizes recurs, or while pausing)."""
        if self.pause:
            self.pause -= 1
            return []
        text = self.buffer[: self.size]
        for n in range(min(self.options.max_ngram, self.size - 1), self.options.min_ngram - 1, -1):
            suffix = text[-n:]
            # Starts of earlier occurrences, each with at least one token after it.
            starts = np.flatnonzero(text[: self.size - n] == suffix[0])
            for i in range(1, n):
                starts = starts[text[starts + i] == suffix[i]]
            if starts.size:
                start = int(starts[-1]) + n
                return text[start : start + k].tolist()
        return []


_draft_caches: "weakref.WeakKeyDictionary[PromptCache, tuple]" = weakref.WeakKeyDictionary()


def draft_prompt_cache(prompt_cache: PromptCache, draft: nn.Module) -> PromptCache:
    """The draft's own PromptCache, kept beside the model's: a conversation's next turn (chat, the serial server)
    then recomputes its history in neither model."""
    held = _draft_caches.get(prompt_cache)
    if held is None or held[0] is not draft:
        held = (draft, PromptCache(draft))
        _draft_caches[prompt_cache] = held
    return held[1]


class DraftProposer:
    """A small model with its own KV cache, kept in step with the text (trimmed after rejections).

    With a PromptCache (see draft_prompt_cache) it starts from the prefix
    that cache holds and leaves it holding the text for the next call.
    """

    def __init__(self, draft: nn.Module, sampling: SamplingParams, prompt_cache: Optional[PromptCache] = None):
        self.model = draft
        self.store = prompt_cache
        self.cache = make_cache(draft)
        self.sampling = sampling
        self.processors = make_logits_processors(sampling)
        self.fed = 0  # tokens of the text the draft cache holds

    def prefill(self, tokens: Sequence[int], step_size: int, cancel: Optional[Callable[[], bool]]) -> None:
        """Compute all but the last of `tokens` (the last goes with the first proposal)."""
        if self.store is not None:
            self.fed = self.store.reuse(tokens)
            self.cache = self.store.cache
        ids = mx.array(tokens, dtype=mx.uint32)
        while self.fed < len(tokens) - 1:
            if cancel is not None and cancel():
                raise Cancelled(self.fed, len(tokens))
            self.fed = prefill_chunk(self.model, ids, self.cache, self.fed, len(tokens) - 1, step_size)

    def propose(self, text: Sequence[int], k: int, keys: Sequence[mx.array]):
        """k tokens (a lazy (k,) array) and, when sampling, the (k, vocab) probabilities they were drawn from."""
        inputs = mx.array(text[self.fed :], dtype=mx.uint32)
        history = mx.array(text, dtype=mx.uint32) if self.processors else None
        drafts, probs = [], []
        for i in range(k):
            logits = self.model(inputs[None], cache=self.cache)[:, -1, :]
            logprobs = _processed(logits, history, self.processors)
            if self.sampling.temp == 0:
                token = mx.argmax(logprobs, axis=-1)
            else:
                weights = sampling_logits(logprobs, self.sampling)
                token = mx.random.categorical(weights, axis=-1, key=keys[i])
                probs.append(mx.softmax(weights, axis=-1))
            token = token.astype(mx.uint32)
            drafts.append(token)
            if history is not None:
                history = mx.concatenate([history, token])
            inputs = token
        self.fed = len(text) + k - 1  # the last draft is not fed
        return mx.concatenate(drafts), (mx.concatenate(probs) if probs else None)

    def finish(self, text: Sequence[int]) -> None:
        """Leave the PromptCache holding what the draft has computed of `text` (only verified tokens: `fed` counts
        proposals until rollback, and `text` grows only after it)."""
        if self.store is not None:
            self.store.record(list(text[: self.fed]))

    def rollback(self, valid: int) -> None:
        """Keep only the first `valid` tokens of the text in the cache."""
        if self.fed > valid:
            for c in self.cache:
                c.trim(self.fed - valid)
            self.fed = valid


def _processed(logits: mx.array, history: Optional[mx.array], processors) -> mx.array:
    """Logits processors, then log-softmax: the log-probabilities plain decoding hands its sampler."""
    for processor in processors:
        logits = processor(history, logits)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


# --------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------


def verify(
    logprobs: mx.array,
    drafts: Sequence[int],
    draft_probs: Optional[mx.array],
    sampling: SamplingParams,
    keys: Optional[Sequence[mx.array]] = None,
) -> tuple:
    """How many proposals the target accepts, and the token it puts after them.

    logprobs: (k+1, vocab), row j the target's log-probabilities after the
    j-th proposal. draft_probs: (k, vocab), the distributions the proposals
    were drawn from; None for a deterministic proposal (prompt lookup, or
    greedy drafting). keys: (acceptance tests, replacement draw), when sampling.
    Returns (accepted, next token) as ints.
    """
    k = len(drafts)
    if sampling.temp == 0:
        best = mx.argmax(logprobs, axis=-1).tolist()
        accepted = next((j for j in range(k) if drafts[j] != best[j]), k)
        return accepted, best[accepted]
    p = mx.softmax(sampling_logits(logprobs, sampling), axis=-1)  # (k+1, vocab) float32
    accepted = k
    if k:
        rows, ids = mx.arange(k), mx.array(list(drafts), dtype=mx.int32)
        p_d = p[rows, ids]
        q_d = draft_probs[rows, ids].astype(p.dtype) if draft_probs is not None else 1.0  # a deterministic proposal: q is one-hot
        flags = (mx.random.uniform(shape=(k,), key=keys[0]) * q_d < p_d).tolist()  # accept with probability min(1, p/q)
        accepted = next((j for j in range(k) if not flags[j]), k)
    row = p[accepted]
    if accepted < k:  # rejected: draw from max(0, p - q), normalised
        if draft_probs is not None:
            residual = mx.maximum(row - draft_probs[accepted].astype(p.dtype), 0.0)
        else:
            residual = mx.where(mx.arange(row.size) == drafts[accepted], 0.0, row)
        row = mx.where(residual.sum() > 0, residual, row)  # p == q up to rounding: a rejection there is rounding too
    return accepted, mx.random.categorical(mx.log(row), key=keys[1]).item()


class _Keys:
    """One key per output position, split into (draft draw, acceptance tests, replacement draw), made on demand.

    A pass that starts at position n tests its proposals and draws its
    replacement with n's keys; later passes start further on, so every test
    uses fresh randomness, and a seed gives the same text every time.
    """

    def __init__(self, seed: Optional[int]):
        self.stream: Iterator[mx.array] = key_stream(seed)
        self.made: List[mx.array] = []

    def at(self, position: int) -> mx.array:
        while len(self.made) <= position:
            self.made.append(mx.random.split(next(self.stream), 3))
        return self.made[position]


# --------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------


def speculative_stream(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt_ids: List[int],
    reused: int,
    fed: List[int],
    max_tokens: int,
    sampling: SamplingParams,
    stop: Sequence[str],
    seed: Optional[int],
    prefill_step_size: int,
    cache: list,
    cancel: Optional[Callable[[], bool]],
    spec: Speculation,
    prompt_cache: Optional[PromptCache] = None,
) -> Iterator[GenerationResponse]:
    """What stream_generate yields, computed speculatively (its arguments, and `fed` to extend as tokens come).

    With the model's `prompt_cache`, the draft model keeps a cache beside it (draft_prompt_cache)."""
    check_cache(cache)
    timing = Timing(len(prompt_ids), reused)

    tokens = mx.array(prompt_ids, dtype=mx.uint32)
    done, end = reused, len(prompt_ids) - 1
    while done < end:
        if cancel is not None and cancel():
            raise Cancelled(done, len(prompt_ids))
        done = prefill_chunk(model, tokens, cache, done, end, prefill_step_size)
    seq = list(prompt_ids)  # every token of the text; the last one is not in the cache yet
    processors = make_logits_processors(sampling)
    keys = _Keys(seed) if sampling.temp > 0 else None
    lookup = LookupProposer(spec.lookup, prompt_ids) if spec.lookup is not None else None
    drafter = None
    if spec.draft is not None:
        drafter = DraftProposer(spec.draft, sampling, draft_prompt_cache(prompt_cache, spec.draft) if prompt_cache is not None else None)
    try:  # the draft's PromptCache is left holding what it verifiably computed, however this ends
        if drafter is not None:
            drafter.prefill(prompt_ids, prefill_step_size, cancel)
        text = TextStream(tokenizer, stop, max_tokens)
        emitted = drafted = accepted_total = passes = first_pass_tokens = 0
        k_now = spec.k

        def response(piece: Piece, logprobs=None) -> GenerationResponse:
            # The first pass's tokens come with the prefill; decode speed counts the rest.
            decoded = emitted - first_pass_tokens
            counts = dict(draft_tokens=drafted, accepted_tokens=accepted_total, target_passes=passes)
            return timing.response(piece, logprobs, text.generated, decoded, **counts)

        while True:
            k = max(0, min(k_now, max_tokens - emitted - 1))
            pass_keys = keys.at(emitted)[1:] if keys is not None else None
            draft_probs = None
            if lookup is not None:
                proposals = lookup.propose(k)
                draft_ids = mx.array(proposals, dtype=mx.uint32)
            elif k:
                draft_keys = [keys.at(emitted + j)[0] for j in range(k)] if keys is not None else []
                draft_ids, draft_probs = drafter.propose(seq, k, draft_keys)
            else:
                draft_ids = mx.zeros((0,), mx.uint32)
            inputs = mx.concatenate([mx.array(seq[-1:], dtype=mx.uint32), draft_ids])
            k = inputs.size - 1
            logits = model(inputs[None], cache=cache)[0]
            if processors:
                history = mx.concatenate([mx.array(seq, dtype=mx.uint32), draft_ids])
                rows = [_processed(logits[j : j + 1], history[: len(seq) + j], processors) for j in range(k + 1)]
                logprobs = mx.concatenate(rows)
            else:
                logprobs = _processed(logits, None, ())
            proposals = draft_ids.tolist()
            accepted, last = verify(logprobs, proposals, draft_probs, sampling, pass_keys)
            for c in cache:  # keep the pending token and the accepted proposals; drop the rest
                c.trim(k - accepted)
            if drafter is not None:
                drafter.rollback(len(seq) + min(accepted, max(k - 1, 0)))
            if spec.adaptive and k:  # grow after a full acceptance, shrink after a rejection
                k_now = min(spec.k, k_now + 2) if accepted == k else max(1, k_now - 1)
            new = proposals[:accepted] + [last]
            seq += new
            if lookup is not None:
                lookup.extend(new)
                lookup.feedback(k, accepted)
            passes += 1
            drafted += k
            accepted_total += accepted
            if timing.first_token_time is None:
                timing.first_token()
                first_pass_tokens = len(new)
            for j, token in enumerate(new):
                fed.append(token)
                emitted += 1
                for piece in text.add(token):
                    yield response(piece, logprobs[j])
                if text.finish_reason is not None:
                    if cache[0].offset < len(fed):  # the last token too, as plain decoding leaves it (a PromptCache reuses it)
                        model(mx.array([token], dtype=mx.uint32)[None], cache=cache)
                        mx.eval([c.state for c in cache])
                    return
    finally:
        if drafter is not None:
            drafter.finish(seq)
