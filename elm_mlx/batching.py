"""Continuous batching: many sequences decoded together, one forward pass per step for all of them.

Decoding one stream reads every weight once per token and is bound by memory
bandwidth; decoding B streams in one pass reads the weights once for B tokens.
`BatchEngine` keeps a batch of sequences that join after their prefill and
leave when they finish, without stalling each other; `batch_generate` runs a
list of prompts through it.

Layout. All decoding sequences share one `BatchKVCache` per layer, rows
right-aligned with left padding (elm_mlx.cache): a decode step appends one
column for every row, a single slice assignment, and a row's keys never move
while it decodes. Each row attends only to its own columns (a boolean mask)
and gets its own rotary positions (mx.fast.rope takes one offset per row), so
a left-padded sequence's first token is at position 0, as it is alone. The
price is padding: a short row next to a long one computes attention over the
long one's width; rows leaving trim the columns nobody uses. Per-sequence
caches with one attention call per row would have no padding but B small
calls per layer; a paged layout would need attention over gathered blocks,
which mx.fast (0.32) does not offer.

Prefill. A new sequence is prefilled alone into its own KVCache, in chunks of
`prefill_step_size` tokens from its start (the chunks stream_generate uses),
at most that many tokens per step and between decode steps, so a long prompt
never freezes the streams already running. All but its last prompt token are
prefilled; the last one is its first decode input, after which the row joins
the batch.

Alone or batched. Each sequence owns its sampler, logits processors
(repetition penalty over its own history), stop strings (the TextStream
stream_generate uses) and random keys (sample.key_stream): a seeded request
gives the same tokens alone, via stream_generate, or among others. The
tests hold greedy and seeded outputs to the single-stream path token for
token; in principle a batched matrix product may round differently from a
single-row one and split a near-tie the other way.

Prompt cache. With a `PromptStore`, a sequence about to be prefilled starts
from a copy of the keys and values of the longest prefix of its prompt the
store holds (never its last token, which must run to give logits) and
prefills only the rest; `Event.cached_tokens` says how many it reused. Its
prompt is stored once prefilled (so requests arriving together with one
system prompt compute it once, in turn), and everything it fed the model
(prompt and answer) when it leaves, cancelled ones included.

Quantized keys and values. With `kv` (KVOptions) asking for `bits`, each
sequence prefills into its own QuantizedKVCaches and the batch keeps
QuantizedBatchKVCaches: a row joins with its packed numbers, scales and
biases copied (never dequantized and quantized again), the store keeps and
hands out that form, and quantization works on one position's head_dim
numbers at a time, so batching adds no difference of its own: the same
keys give a row the bits its sequence's own cache holds alone (the tests
hold the tokens to stream_generate with the same options). A rotating
window (`max_size`) does not batch: ElmError.
"""

import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from .cache import KVOptions, LayerCache, PromptStore, make_batch_cache, make_cache, storage_form
from .errors import ElmError
from .generation import Piece, TextStream, check_context, check_request, context_length, prefill_chunk
from .sample import SamplingParams, key_stream, make_logits_processors, make_sampler
from .tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]


@dataclass(frozen=True)
class Request:
    """What one sequence asks for; checked by BatchEngine.submit."""

    prompt: Prompt
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    seed: Optional[int] = None
    constraint: Any = None  # elm_mlx.constrain.Constraint (or a compiled Matcher, for this request only): JSON schema, regex, grammar


@dataclass
class Event:
    """Something that happened to one request during a step.

    A generated token: `token`, its `logprobs` (vocab,) and its `text` (may be
    empty while a character or a possible stop string is pending). The end:
    token None and `finish_reason` "stop", "length" or "cancelled", with any
    remaining text ("error", with `error` saying why, when the request's
    constraint could not be followed). Prefill progress: `prefilled` prompt tokens computed.
    Every event says how many prompt tokens came from the prompt cache
    (`cached_tokens`, what usage.prompt_tokens_details.cached_tokens reports).
    """

    id: int
    text: str = ""
    token: Optional[int] = None
    logprobs: Optional[mx.array] = None
    finish_reason: Optional[str] = None
    prefilled: Optional[int] = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_tokens: int = 0
    error: Optional[str] = None  # with finish_reason "error": why the constraint could not be followed


class _Sequence:
    """One request's state: its prompt, its cache while prefilling, and its own sampling and text."""

    def __init__(self, id: int, request: Request, prompt_ids: List[int], tokenizer: Tokenizer):
        self.id = id
        self.prompt_ids = prompt_ids
        self.cache: Optional[List[LayerCache]] = None  # its own while prefilling; then a row of the batch
        self.prompt: Optional[mx.array] = None  # the prompt's ids as an array, while prefilling
        self.prefilled = 0
        self.cached = 0  # prompt tokens whose keys and values came from the prompt store
        self.generated: List[int] = []  # every token sampled, so the store knows what the cache holds
        self.next_input = prompt_ids[-1]
        self.history = list(prompt_ids)  # for repetition penalties: the prompt and every token since
        self.sampler = make_sampler(request.sampling)
        self.processors = make_logits_processors(request.sampling)
        self.window = request.sampling.repetition_context_size
        self.keys = key_stream(request.seed) if request.sampling.temp > 0 else None  # greedy draws nothing
        self.text = TextStream(tokenizer, request.stop, request.max_tokens)
        self.matcher = None  # its constraint's matcher (elm_mlx.constrain), set by submit
        self.deferred = False  # it has waited a step for another prompt's stored keys (it waits once at most)

    @property
    def prefill_end(self) -> int:
        return len(self.prompt_ids) - 1

    def event(self, **fields) -> Event:
        return Event(
            self.id, prompt_tokens=len(self.prompt_ids), generation_tokens=self.text.generated, cached_tokens=self.cached, **fields
        )

    def fed(self, length: int) -> List[int]:
        """The first `length` tokens the model was fed: the prompt, then each sampled token as the next input."""
        return (self.prompt_ids + self.generated)[:length]


class BatchEngine:
    """Sequences decoded together: submit requests, call step() until idle, cancel any time.

    At most `max_batch` sequences hold a cache (prefilling or decoding); the
    others wait in submission order. Not thread-safe, except that cancel()
    may be called from another thread: it takes effect at the next step.
    `prompt_cache` (a PromptStore, perhaps shared with other engines of the
    same model) reuses the keys and values of earlier prompts. `kv`
    (KVOptions with `bits`) stores keys and values quantized.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        max_batch: int = 8,
        prefill_step_size: int = 512,
        prompt_cache: Optional[PromptStore] = None,
        kv: Optional[KVOptions] = None,
    ):
        for name, value in (("max_batch", max_batch), ("prefill_step_size", prefill_step_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ElmError(f"{name} must be an integer >= 1, got {value!r}")
        if prompt_cache is not None and not isinstance(prompt_cache, PromptStore):
            raise ElmError(f"prompt_cache must be a PromptStore, got {type(prompt_cache).__name__}")
        if kv is not None and not isinstance(kv, KVOptions):
            raise ElmError(f"kv must be a KVOptions, got {type(kv).__name__}")
        self.kv = kv
        self.model, self.tokenizer, self.store = model, tokenizer, prompt_cache
        self.max_batch, self.prefill_step_size = max_batch, prefill_step_size
        self.context_length = context_length(model)
        self.vocab_size = getattr(getattr(model, "args", None), "vocab_size", None)
        self.cache = self._new_batch_cache()  # refuses kv options a batch cannot follow
        self.waiting: List[_Sequence] = []
        self.prefilling: List[_Sequence] = []
        self.decoding: List[_Sequence] = []  # in the order of the batch cache's rows
        self._cancelled: Set[int] = set()
        self._cancel_lock = threading.Lock()  # cancel() may come from another thread
        self._pending: Optional[_Step] = None  # the decode step computing now, its tokens not handed out yet
        self._next_id = 0

    # ---- the requests ---------------------------------------------------

    def submit(self, request: Request) -> int:
        """Check a request (ElmError naming what is wrong, before any work) and queue it; return its id."""
        prompt_ids = self._checked_prompt(request)
        seq = _Sequence(self._next_id + 1, request, prompt_ids, self.tokenizer)
        if request.constraint is not None:
            from .constrain import matcher_for

            seq.matcher = matcher_for(request.constraint, self.tokenizer, self.model)
        self._next_id += 1
        self.waiting.append(seq)
        return self._next_id

    def cancel(self, id: int) -> None:
        """Stop a request at the next step, which frees its cache and reports finish_reason "cancelled"."""
        with self._cancel_lock:
            self._cancelled.add(id)

    @property
    def active(self) -> int:
        """Requests holding a cache: prefilling or decoding."""
        return len(self.prefilling) + len(self.decoding)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self.waiting)

    def kv_bytes(self) -> int:
        """Bytes of keys and values held: the batch's and those of prompts being prefilled."""
        held = sum(c.nbytes for c in self.cache)
        return held + sum(c.nbytes for s in self.prefilling for c in s.cache or ())

    def padding_fraction(self) -> float:
        """Share of the batch's used cache columns that are padding (computed over, never used)."""
        layout = self.cache[0]
        total = layout.size * len(layout.padding)
        return sum(layout.padding) / total if total else 0.0

    # ---- one step -------------------------------------------------------

    def step(self) -> List[Event]:
        """Cancel, admit, prefill at most prefill_step_size prompt tokens, then decode one token for every joined sequence.

        Decode steps are pipelined (see _decode): a step returns the tokens of the one before. When prompts wait to
        be prefilled, a step only hands out the tokens already computing, and the prefill comes at the next step."""
        events = self._apply_cancellations()
        while self.waiting and self.active < self.max_batch:
            self.prefilling.append(self.waiting.pop(0))
        if self._pending is not None and self.prefilling:  # tokens already computing go out before a prefill delays them
            previous, self._pending = self._pending, None
            return events + self._hand_out(previous)
        events += self._prefill()
        if self.decoding:
            events += self._decode()
        return events

    def _apply_cancellations(self) -> List[Event]:
        with self._cancel_lock:
            cancelled, self._cancelled = self._cancelled, set()
        events = []
        for group in (self.waiting, self.prefilling):
            for seq in [s for s in group if s.id in cancelled]:
                group.remove(seq)  # a prefilling sequence's own cache goes with it, what it computed to the store
                if self.store is not None and seq.cache is not None:
                    self.store.store_cache(seq.prompt_ids[: seq.prefilled], seq.cache)
                events.append(seq.event(finish_reason="cancelled"))
        leaving = [s for s in self.decoding if s.id in cancelled]
        if leaving:
            events += [s.event(**_closing(s.text.close("cancelled", flush=False))) for s in leaving]
            self._leave(leaving)
        return events

    def _prefill(self) -> List[Event]:
        """Prefill in submission order, whole chunks only, until prefill_step_size tokens are spent this step."""
        events, spent, deferred = self._prefill_together()
        for seq in list(self.prefilling):
            if seq.id in deferred:
                continue  # next step, with what the one it waits for has stored, and perhaps with others like it
            if seq.cache is None:
                self._look_up(seq)
            while seq.prefilled < seq.prefill_end:
                chunk = min(self.prefill_step_size, seq.prefill_end - seq.prefilled)
                if spent and spent + chunk > self.prefill_step_size:
                    return events
                seq.prefilled = prefill_chunk(self.model, seq.prompt, seq.cache, seq.prefilled, seq.prefill_end, self.prefill_step_size)
                spent += chunk
                events.append(seq.event(prefilled=seq.prefilled))
            self._join(seq)
        return events

    def _look_up(self, seq: _Sequence) -> None:
        """Give a sequence about to prefill its own cache, holding the longest prefix the store has of its prompt
        (looked up now, not at submission: earlier requests may have stored it since)."""
        if self.store is not None:
            seq.cache, seq.cached = self.store.cache_for(self.model, seq.prompt_ids, limit=seq.prefill_end, kv=self.kv)
            seq.prefilled = seq.cached
        else:
            seq.cache = self._new_row_cache()
        seq.prompt = mx.array(seq.prompt_ids, dtype=mx.uint32)

    def _prefill_together(self) -> Tuple[List[Event], int, Set[int]]:
        """Prefill several new short prompts in one padded forward pass, instead of one pass each.

        Those whose whole prompt (less its last token) is one chunk and which
        share with none taken before it SHARED_PREFIX or more tokens beyond
        what the prompt store holds of it (those wait for the other's stored keys), in
        submission order while the pass computes at most prefill_step_size
        tokens. The pass is `width` tokens wide: the most any of them has left
        to compute after the prefix the prompt store holds of it. A row with
        more than that left starts from its stored prefix cut where its last
        `width` tokens begin (recomputing what the store held beyond that); a
        prompt shorter than `width` is left-padded. Each row is right-aligned,
        with its own rotary positions, and attends to its own columns only (a
        padding query attends to itself, so nothing is NaN), as in decoding;
        then each row becomes a cache of its own and joins as usual. So
        requests sharing a system prompt that is already stored prefill their
        different endings together, not one pass each.
        Returns the events, the (padded) tokens spent, and the ids of prompts
        deferred to the next step for another's stored keys (see _may_wait).
        """
        group: List[_Sequence] = []
        width, deferred = 0, set()
        for seq in self.prefilling:
            if seq.cache is not None:
                continue
            if not 0 < seq.prefill_end <= self.prefill_step_size:
                continue  # a chunked prompt looks the store up just before its own prefill (earlier ones may store first)
            self._look_up(seq)
            if self._may_wait(seq) and any(_common(seq, s) - seq.cached >= SHARED_PREFIX for s in group):
                self.store.unused(seq.cached, whole=seq.cached > 0)
                seq.cache, seq.cached, seq.prefilled = None, 0, 0  # it waits for that member's stored prompt (looked up
                seq.deferred = True  # again at the next step): a shared system prompt is computed once
                deferred.add(seq.id)
                continue
            if seq.cached == seq.prefill_end:
                continue  # all of it is stored: nothing to compute, it joins as it is
            wider = max(width, seq.prefill_end - seq.cached)
            if wider * (len(group) + 1) > self.prefill_step_size:
                break
            group.append(seq)
            width = wider
        if len(group) < 2:
            return [], 0, deferred
        cache = self._new_batch_cache()
        inputs, pad = [], []
        for seq in group:
            kept = max(0, seq.prefill_end - width)  # of its stored prefix, what the pass starts from
            for own_layer, layer in zip(seq.cache, cache):
                own_layer.trim(own_layer.offset - kept)
                layer.add(own_layer)
            if self.store is not None and seq.cached > kept:
                self.store.unused(seq.cached - kept, whole=kept == 0)
            seq.cached = kept
            inputs.append([0] * (width - seq.prefill_end + kept) + seq.prompt_ids[kept : seq.prefill_end])
            pad.append(width - (seq.prefill_end - kept))  # left padding inside the pass (prompts shorter than it)
        start = cache[0].size
        padding = [p + extra for p, extra in zip(cache[0].padding, pad)]
        for layer in cache:
            layer.set_padding(padding)
        rows, columns = start + mx.arange(width)[:, None], mx.arange(start + width)[None, :]
        own = (columns[None] >= mx.array(padding)[:, None, None]) | (columns == rows)[None]
        self.model(mx.array(inputs, dtype=mx.uint32), cache=cache, mask=((columns <= rows)[None] & own)[:, None])
        mx.eval([c.state for c in cache])
        events = []
        for b, seq in enumerate(group):
            seq.cache = self._new_row_cache()
            for own_layer, layer in zip(seq.cache, cache):
                own_layer.extend(*layer.row(b))  # as stored: quantized parts are copied, not quantized twice
            seq.prefilled = seq.prefill_end
            events.append(seq.event(prefilled=seq.prefilled))
            self._join(seq)
        return events, width * len(group), deferred

    def _may_wait(self, seq: _Sequence) -> bool:
        """Whether a prompt may wait a step for another's keys to be stored: only once, and only with a store that
        can keep something (a store of 0 bytes never would: the wait would repeat every step)."""
        return self.store is not None and self.store.max_bytes > 0 and not seq.deferred

    def _new_row_cache(self) -> List[LayerCache]:
        """A sequence's own cache for its prefill: the one stream_generate would use with these kv options."""
        return make_cache(self.model, self.kv)

    def _new_batch_cache(self) -> list:
        """A batch cache per layer storing keys and values as _new_row_cache's do."""
        return make_batch_cache(self.model, self.kv)

    def _join(self, seq: _Sequence) -> None:
        """A prefilled sequence becomes the last row of the batch; its own cache is freed (or stored)."""
        if self.store is not None and seq.prefilled > seq.cached:
            self.store.store_cache(seq.prompt_ids[: seq.prefilled], seq.cache)
        for batch_layer, own_layer in zip(self.cache, seq.cache):
            batch_layer.add(own_layer)
        mx.eval([c.state for c in self.cache])
        seq.cache, seq.prompt = None, None
        self.prefilling.remove(seq)
        self.decoding.append(seq)

    def _decode(self) -> List[Event]:
        """Queue this step's forward pass for every row, then hand out the previous step's tokens.

        Pipelined: step n+1 is computing (mx.async_eval) while step n's tokens
        become text and the caller delivers them, so Python's work per token
        overlaps the model's. A row's input is the previous step's token,
        still an array then. A row that finished at step n has computed step
        n+1 in vain; that token is dropped, so every row's tokens are those it
        would get alone. A row with logits processors needs its whole history,
        and a constrained row its matcher moved past its last token, before
        its next step: then the previous step is handed out first.
        """
        events: List[Event] = []
        previous, self._pending = self._pending, None
        if previous is not None and any(s.processors or s.matcher is not None for s in self.decoding):
            events += self._hand_out(previous)
            previous = None
        if self.decoding:
            self._pending = self._launch(previous)
        if previous is not None:
            events += self._hand_out(previous)
        return events

    def _launch(self, previous: Optional["_Step"]) -> "_Step":
        """Build one forward pass for every row and start computing it; rows carried over from `previous`
        take its (not yet computed) tokens as input, rows that joined since take their last prompt token."""
        rows = list(self.decoding)
        if previous is None:
            inputs = mx.array([s.next_input for s in rows], dtype=mx.uint32)
        else:
            position = {s.id: i for i, s in enumerate(previous.rows)}
            joined = [s for s in rows if s.id not in position]
            index = [position.get(s.id) for s in rows]
            carried = mx.concatenate([previous.tokens.astype(mx.uint32), mx.array([s.next_input for s in joined], dtype=mx.uint32)])
            fresh = iter(range(len(previous.rows), len(previous.rows) + len(joined)))
            index = [i if i is not None else next(fresh) for i in index]
            inputs = carried if index == list(range(carried.size)) else carried[mx.array(index)]
        logits = self.model(inputs[:, None], cache=self.cache, mask=self.cache[0].mask())[:, -1, :]
        ended = {}
        if any(s.matcher is not None for s in rows):
            from .constrain import mask_batch

            mx.async_eval(logits)  # the model runs while the CPU computes the constrained rows' masks
            logits, ended = mask_batch([s.matcher for s in rows], logits)
        tokens, logprobs = self._next_tokens(rows, logits)
        mx.async_eval(tokens, logprobs)
        return _Step(rows, tokens, logprobs, ended)

    def _hand_out(self, step: "_Step") -> List[Event]:
        """A computed step's tokens to the rows still decoding: text, stops and finishes; finished rows leave."""
        live = {s.id for s in self.decoding}
        events, leaving = [], []
        ended = dict(step.ended)
        for i, (seq, token) in enumerate(zip(step.rows, step.tokens.tolist())):
            if seq.id not in live:  # cancelled, or finished a step earlier: this token was computed in vain
                continue
            if seq.matcher is not None and i not in ended:
                ended.update(_follow(seq, token, i))
            if i in ended:  # the constraint is complete (no end-of-sequence token to say so) or failed
                error = ended[i]
                piece = seq.text.close("stop" if error is None else "error")
                events.append(seq.event(error=None if error is None else str(error), **_closing(piece)))
                leaving.append(seq)
                continue
            seq.next_input = token
            seq.generated.append(token)
            if seq.processors:
                seq.history.append(token)
            for piece in seq.text.add(token):
                events.append(seq.event(logprobs=step.logprobs[i] if piece.token is not None else None, **_closing(piece)))
            if seq.text.finish_reason is not None:
                leaving.append(seq)
        if leaving:
            self._leave(leaving)
        return events

    @staticmethod
    def _next_tokens(rows: List[_Sequence], logits: mx.array) -> Tuple[mx.array, Union[mx.array, List[mx.array]]]:
        """Tokens (B,) and the rows' log-probabilities (B, vocab), or a list of (vocab,) when rows differ in dtype: each row's processors over its own history,
        its sampler with its own key. Vectorized where that changes nothing: one argmax when all rows are greedy."""
        if any(s.processors for s in rows):  # row by row: a penalised row turns float32, the others keep their dtype
            per_row = [_log_softmax(_processed(s, logits[i : i + 1])) for i, s in enumerate(rows)]
            logprobs = [row[0] for row in per_row]
        else:
            logprobs = _log_softmax(logits)
            if all(s.keys is None for s in rows):
                return mx.argmax(logprobs, axis=-1), logprobs
            per_row = [logprobs[i : i + 1] for i in range(len(rows))]
        tokens = [s.sampler(row, key=next(s.keys) if s.keys is not None else None) for s, row in zip(rows, per_row)]
        return mx.concatenate(tokens), logprobs

    def _leave(self, leaving: List[_Sequence]) -> None:
        """Drop rows from the batch now; their memory is free (or reused) once the smaller arrays are evaluated."""
        gone = {s.id for s in leaving}
        if self.store is not None:
            layout = self.cache[0]
            for i, seq in enumerate(self.decoding):
                if seq.id in gone:
                    row = [layer.row(i) for layer in self.cache]
                    self.store.store(seq.fed(layout.size - layout.padding[i]), row, storage_form(layout))
        rows = [i for i, s in enumerate(self.decoding) if s.id not in gone]
        self.decoding = [self.decoding[i] for i in rows]
        if not self.decoding:
            self._pending = None  # a step queued for rows that have all left: nothing in it is wanted
        for layer in self.cache:
            layer.keep(rows)
        mx.eval([c.state for c in self.cache])

    # ---- checks ---------------------------------------------------------

    def _checked_prompt(self, request: Request) -> List[int]:
        if not isinstance(request, Request):
            raise ElmError(f"expected a Request, got {type(request).__name__}")
        prompt, max_tokens = request.prompt, request.max_tokens
        if not isinstance(prompt, str) and not _is_token_list(prompt):
            raise ElmError("a prompt must be a string or a list of token ids")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise ElmError(f"max_tokens must be an integer, got {max_tokens!r}")
        if not isinstance(request.sampling, SamplingParams):
            raise ElmError(f"sampling must be a SamplingParams, got {type(request.sampling).__name__}")
        if isinstance(request.stop, str) or not all(isinstance(s, str) for s in request.stop):
            raise ElmError("stop must be a list of strings")
        if request.seed is not None and (not isinstance(request.seed, int) or isinstance(request.seed, bool)):
            raise ElmError(f"seed must be an integer, got {request.seed!r}")
        check_request(prompt, max_tokens, self.prefill_step_size, request.seed)
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if self.vocab_size is not None and not all(0 <= t < self.vocab_size for t in prompt_ids):
            raise ElmError(f"token ids must be in [0, {self.vocab_size - 1}] for this model")
        check_context(len(prompt_ids), max_tokens, self.context_length)
        return prompt_ids


def _follow(seq: _Sequence, token: int, row: int) -> dict:
    """Move a sequence's matcher past its token; {row: error} if it cannot."""
    from .constrain import ConstraintError

    try:
        seq.matcher.consume(token)
    except ConstraintError as e:
        return {row: e}
    return {}


@dataclass
class _Step:
    """A decode step queued for computing: its rows (in the batch's order then), tokens (B,), and
    log-probabilities, row i's at logprobs[i]."""

    rows: List[_Sequence]
    tokens: mx.array
    logprobs: Union[mx.array, List[mx.array]]
    ended: Dict[int, Any]  # rows whose constraint ended before this token (None) or failed (the error)


SHARED_PREFIX = 16  # prompt tokens two new prompts must share for the second to wait for the first's stored keys


def _common(a: _Sequence, b: _Sequence) -> int:
    """How many prompt tokens (of those to prefill) two sequences share from the start."""
    n = 0
    for x, y in zip(a.prompt_ids[: a.prefill_end], b.prompt_ids[: b.prefill_end]):
        if x != y:
            break
        n += 1
    return n


def _log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _processed(seq: _Sequence, logits: mx.array) -> mx.array:
    """One row's logits after its own processors, which see its own history only."""
    history = mx.array(seq.history[-seq.window :], dtype=mx.uint32)
    for processor in seq.processors:
        logits = processor(history, logits)
    return logits


def _is_token_list(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def _closing(piece: Piece) -> dict:
    return dict(text=piece.text, token=piece.token, finish_reason=piece.finish_reason)


@dataclass
class BatchResult:
    """One prompt's whole answer; `tokens` are the generated ids (an end-of-sequence token is not among them)."""

    text: str
    tokens: List[int]
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from the prompt cache


def batch_generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    max_tokens: int = 256,
    sampling: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
    stop: Sequence[str] = (),
    seeds: Optional[Sequence[Optional[int]]] = None,
    prefill_step_size: int = 512,
    max_batch: int = 8,
    prompt_cache: Optional[PromptStore] = None,
    constraint=None,
    kv: Optional[KVOptions] = None,
) -> List[BatchResult]:
    """Generate for every prompt, at most `max_batch` decoded together; one result per prompt, in order.

    `sampling` is one SamplingParams for all or one per prompt; `seeds` one
    seed (or None) per prompt; `prompt_cache` a PromptStore to reuse and fill;
    `constraint` one elm_mlx.constrain.Constraint for all or one (or None) per
    prompt (a compiled Matcher serves one prompt only); `kv` KVOptions quantizing keys and values
    (bits, group_size). Every request is checked before any work.
    """
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ElmError("prompts must be a list of prompts (strings or lists of token ids)")
    if not prompts:
        raise ElmError("prompts is empty")
    samplings = _per_prompt("sampling", sampling if sampling is not None else SamplingParams(), len(prompts), SamplingParams)
    seeds = _per_prompt("seeds", seeds, len(prompts), None) if seeds is not None else [None] * len(prompts)
    constraints = constraint if isinstance(constraint, (list, tuple)) else [constraint] * len(prompts)
    constraints = _per_prompt("constraint", constraints, len(prompts), None)
    engine = BatchEngine(model, tokenizer, max_batch=max_batch, prefill_step_size=prefill_step_size, prompt_cache=prompt_cache, kv=kv)
    requests = [Request(p, max_tokens, s, stop, seed, c) for p, s, seed, c in zip(prompts, samplings, seeds, constraints)]
    ids = [engine.submit(r) for r in requests]

    texts: Dict[int, List[str]] = {i: [] for i in ids}
    tokens: Dict[int, List[int]] = {i: [] for i in ids}
    results: Dict[int, BatchResult] = {}
    while engine.active or engine.queued:
        for e in engine.step():
            texts[e.id].append(e.text)
            if e.token is not None:
                tokens[e.id].append(e.token)
            if e.finish_reason is not None:
                results[e.id] = BatchResult(
                    "".join(texts[e.id]), tokens[e.id], e.finish_reason, e.prompt_tokens, e.generation_tokens, e.cached_tokens
                )
    return [results[i] for i in ids]


def _per_prompt(name: str, value, n: int, single_type) -> list:
    """`value` for each of n prompts: one value repeated (when it is a `single_type`) or a list of exactly n."""
    if single_type is not None and isinstance(value, single_type):
        return [value] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ElmError(f"{name} must be {'one value or ' if single_type else ''}a list of one per prompt ({n})")
    return list(value)
