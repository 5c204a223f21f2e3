"""Constrained decoding: JSON schema, JSON object, regex and Lark grammars, on llguidance.

llguidance (Rust, used by llama.cpp and others) compiles a constraint into a
matcher that, at each step, says which tokens may come next (a bitmask, one
bit per token) and follows the tokens chosen. This module gives it elm-mlx's
own tokenizers (the bytes of every token, as streaming detokenization uses
them), turns its bitmask into a mask on the logits with portable MLX ops (its
bundled MLX helper is a Metal kernel, which the CPU and CUDA backends lack),
and runs the single-stream token loop with the mask computed on the CPU while
the model computes the step (MLX is lazy: the forward pass is queued with
mx.async_eval before the mask is computed, and the mask is applied after).

End of sequence is allowed only where the matcher accepts the text, so a
complete constraint ends the answer with "stop"; max_tokens may cut it first
("length", and the partial text is not claimed to be valid).
"""

import json
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import ElmError
from .tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "grammar")

# JSON as json.dumps writes it: one line, ", " and ": ". Free whitespace would let a small model at a high
# temperature pad the answer with spaces and newlines until max_tokens cuts it. A schema's "x-guidance"
# object may override these (llguidance's own extension).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SOURCE_CHARS = 1 << 20  # a constraint's text; the server's body limit is also 1 MiB
# llguidance's fuel for building a constraint's lexer (the regexes of its lexemes) before the first mask; its default
# (1_000_000) lets a counted repetition like a{1000}{1000}{1000} take 2-5 s and +250 MB in its first mask; 400_000
# bounds that to ~0.3 s and +90 MB (2 shared cores). It also caps a constraint's size: what needs more is refused
# ("grammar too big", "too many expressions") instead of computed.
INITIAL_LEXER_FUEL = 400_000


def parser_limits():
    """llguidance's resource limits for every matcher (its defaults, but the lexer's initial fuel; see INITIAL_LEXER_FUEL)."""
    import llguidance as llg

    return llg.LLParserLimits(initial_lexer_fuel=INITIAL_LEXER_FUEL, verbose_errors=False)


class ConstraintError(ElmError):
    """A constraint that does not compile, can match nothing, or that the matcher could not follow."""


@dataclass(frozen=True)
class Constraint:
    """What the output must be: `kind` is one of KINDS, `source` the schema (dict or JSON text), regex or Lark text."""

    kind: str
    source: Any = None

    @classmethod
    def json_schema(cls, schema: Union[dict, str]) -> "Constraint":
        return cls("json_schema", schema)

    @classmethod
    def json_object(cls) -> "Constraint":
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "Constraint":
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, lark: str) -> "Constraint":
        return cls("grammar", lark)

    def llguidance_grammar(self) -> str:
        """The constraint as llguidance's grammar text (not yet checked: compiling does that)."""
        import llguidance as llg

        if self.kind not in KINDS:
            raise ConstraintError(f"unknown constraint kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
        source = self.source
        if self.kind == "json_schema":
            if isinstance(source, str):
                source = _json_text(source, "the JSON schema")
            if not isinstance(source, (dict, bool)):
                raise ConstraintError("a JSON schema must be a JSON object")
            if source is False:  # JSON Schema's schema that nothing validates against
                raise ConstraintError("the JSON schema false cannot match any text")
            if source is True:  # anything
                source = {}
            try:
                return llg.LLMatcher.grammar_from_json_schema(source, defaults=JSON_LAYOUT)
            except (ValueError, TypeError) as e:  # its message may quote the whole schema: one line, cut short
                raise ConstraintError(f"invalid JSON schema: {_compiler_message([str(e)])}") from None
        if not isinstance(source, str) or not source:
            raise ConstraintError(f"a {self.kind} constraint must be a non-empty string")
        if len(source) > MAX_SOURCE_CHARS:
            raise ConstraintError(f"the {self.kind} is over {MAX_SOURCE_CHARS} characters")
        try:  # a lone surrogate (JSON "\ud800", or undecodable bytes on a command line) is no text llguidance can take
            source.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConstraintError(f"the {self.kind} is not valid Unicode text (a lone surrogate at character {e.start})") from None
        if self.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(source)
        return llg.LLMatcher.grammar_from_lark(source)


def _json_text(text: str, what: str) -> Any:
    if len(text) > MAX_SOURCE_CHARS:
        raise ConstraintError(f"{what} is over {MAX_SOURCE_CHARS} characters")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ConstraintError(f"{what} is not valid JSON ({str(e)[:200]})") from None


# --------------------------------------------------------------------------
# The tokenizer as llguidance sees it
# --------------------------------------------------------------------------

_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Tokenizer, Dict[int, Any]]" = weakref.WeakKeyDictionary()
# Compiled constraints, untouched, per tokenizer: (n_vocab, grammar text) -> llguidance matcher, the most recent
# COMPILED_KEPT, for matcher_for (the API and the commands; never the server, whose clients must not share). A
# sequence gets a copy (deep_copy takes ~10 ms where compiling a large schema takes seconds), so a constraint used for
# several prompts, chat turns, or checked and then used, is compiled once. The copies share llguidance's lexer: its
# states are built once for all of them, and so are its limits, so a constraint at the edge of them (a{1000}{1000})
# that one sequence exhausted is refused on a later use too.
_COMPILED: "weakref.WeakKeyDictionary[Tokenizer, OrderedDict]" = weakref.WeakKeyDictionary()
_COMPILED_LOCK = threading.Lock()
COMPILED_KEPT = 4


def _special_ids(tokenizer: Tokenizer, n_vocab: int) -> Dict[int, str]:
    """Tokens that are not text (control, unknown, special, padding past the tokenizer): id -> a name."""
    names = {i: name for name, i in tokenizer.special_tokens.items()}
    sp = getattr(tokenizer, "sp", None)
    specials = {}
    for i in range(n_vocab):
        if i >= tokenizer.vocab_size:
            specials[i] = f"<pad_{i}>"
        elif sp is not None and (sp.is_control(i) or sp.is_unknown(i)):
            specials[i] = sp.id_to_piece(i)
        elif i in names or not tokenizer.token_bytes[i]:
            specials[i] = names.get(i, f"<special_{i}>")
    return specials


class _Greedy:
    """Longest-match tokenization over the token table: always gives exactly the bytes asked for (when they can be spelled)."""

    def __init__(self, table: Sequence[bytes], specials: Dict[int, str]):
        self.ids: Dict[bytes, int] = {}
        for i, piece in enumerate(table):
            if piece and i not in specials:
                self.ids.setdefault(piece, i)
        self.longest = max((len(p) for p in self.ids), default=1)

    def __call__(self, data: bytes) -> List[int]:
        out, i = [], 0
        while i < len(data):
            for n in range(min(self.longest, len(data) - i), 0, -1):
                token = self.ids.get(data[i : i + n])
                if token is not None:
                    out.append(token)
                    i += n
                    break
            else:
                i += 1  # a byte no token spells (a tokenizer without byte fallback): left out
        return out


class _Description:
    """What llguidance.TokenizerWrapper reads: every token's bytes (special ones marked with 0xFF), EOS, and a tokenize function.

    The tokenize function must give tokens whose bytes are exactly its input,
    as the model would see that text in the middle of an answer. SentencePiece
    prepends a space to a whole text, so the text is encoded after a newline
    and the tokens of that newline are dropped; where that does not give the
    same bytes (a normalizer that changes text), longest-match is used.
    """

    def __init__(self, tokenizer: Tokenizer, n_vocab: int):
        table = list(tokenizer.token_bytes) + [b""] * (n_vocab - tokenizer.vocab_size)
        specials = _special_ids(tokenizer, n_vocab)
        self.tokens = [b"\xff" + specials[i].encode() if i in specials else piece for i, piece in enumerate(table)]
        self.special_token_ids = sorted(specials)
        eos = sorted(tokenizer.eos_ids)
        self.eos_token_id = eos[0] if eos else None
        self.bos_token_id = tokenizer.bos_id
        # A weak reference: the cache (_LL_TOKENIZERS) keys on the tokenizer weakly and holds this description, so a
        # strong one would keep every tokenizer that ever compiled a constraint alive for good.
        self._tokenizer, self._table, self._greedy = weakref.ref(tokenizer), table, _Greedy(table, specials)

    def _spells(self, ids: List[int], data: bytes) -> bool:
        return b"".join(self._table[i] for i in ids) == data

    def __call__(self, data: Union[bytes, str]) -> List[int]:
        data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return self._greedy(data)
        tokenizer = self._tokenizer()
        if tokenizer is None:  # gone (its cache entry goes with it); longest-match needs only the table
            return self._greedy(data)
        ids = tokenizer._encode_text(text)
        if self._spells(ids, data):
            return ids
        ids = tokenizer._encode_text("\n" + text)
        spelled = b""
        for k, token in enumerate(ids):
            spelled += self._table[token]
            if spelled.endswith(b"\n") and self._spells(ids[k + 1 :], data):
                return ids[k + 1 :]
        return self._greedy(data)


def ll_tokenizer(tokenizer: Tokenizer, n_vocab: Optional[int] = None):
    """llguidance's LLTokenizer for this tokenizer and a model with `n_vocab` logits (built once, then cached)."""
    import llguidance as llg

    n_vocab = max(n_vocab or 0, tokenizer.vocab_size)
    cached = _LL_TOKENIZERS.setdefault(tokenizer, {})
    if n_vocab not in cached:
        description = _Description(tokenizer, n_vocab)
        eos = sorted(tokenizer.eos_ids)
        cached[n_vocab] = llg.LLTokenizer(llg.TokenizerWrapper(description), n_vocab=n_vocab, eos_token=eos or None)
    return cached[n_vocab]


# --------------------------------------------------------------------------
# One sequence's matcher
# --------------------------------------------------------------------------


class Matcher:
    """One sequence's position in its constraint: the tokens allowed next, and following the tokens chosen."""

    def __init__(self, matcher, n_vocab: int, eos_ids: Sequence[int], stand_in_eos: Optional[int] = None):
        self._m, self.n_vocab, self.eos_ids = matcher, n_vocab, set(eos_ids)
        self.claimed = False  # set when a sequence takes it (matcher_for): its state is that sequence's alone
        self.words = (n_vocab + 31) // 32
        # llguidance always has an end token; for a tokenizer without one it picks a token of its own, never to be drawn
        self._stand_in = stand_in_eos if stand_in_eos is not None and stand_in_eos not in self.eos_ids else None

    def fill_mask(self, row: np.ndarray) -> None:
        """Write the allowed-token bitmask (int32 words, bit i of word w is token 32 w + i) into `row`.

        Raises ConstraintError when the matcher failed or no token may follow a text it does not accept.
        """
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._m, row.reshape(1, -1))
        if self._stand_in is not None:
            word, bit = divmod(self._stand_in, 32)
            row[word] &= np.int32(~(1 << bit) if bit < 31 else 0x7FFFFFFF)
        if self._m.is_error():
            raise ConstraintError(f"the constraint could not be followed: {_first_line(self._m.get_error())}")
        if not row.any() and not self._m.is_accepting():
            raise ConstraintError("the constraint allows no token here (the tokenizer cannot spell what it asks for)")

    def mask(self) -> np.ndarray:
        row = np.zeros(self.words, dtype=np.int32)
        self.fill_mask(row)
        return row

    @property
    def accepting(self) -> bool:
        """The text so far is complete (end of sequence would be allowed)."""
        return self._m.is_accepting()

    @property
    def done(self) -> bool:
        """Complete and nothing may follow but end of sequence."""
        return self._m.is_stopped()

    def consume(self, token: int) -> None:
        if token in self.eos_ids:
            return
        if not self._m.consume_token(token):
            raise ConstraintError(f"the constraint could not be followed: {_first_line(self._m.get_error())}")


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else "unknown error"


def check_constraint(constraint: Constraint, tokenizer_description=None) -> str:
    """The constraint's llguidance grammar once the compiler accepts it (with or without a tokenizer), else ConstraintError.

    Without a tokenizer this is quick and needs no model: commands check their options with it before loading one.
    """
    import llguidance as llg

    if not isinstance(constraint, Constraint):
        raise ConstraintError(f"expected a Constraint, got {type(constraint).__name__}")
    grammar = constraint.llguidance_grammar()
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer_description, limits=parser_limits())
    if is_error:
        raise ConstraintError(f"invalid {_what(constraint)}: {_compiler_message(messages)}")
    return grammar


def compile_constraint(constraint: Constraint, tokenizer: Tokenizer, n_vocab: Optional[int] = None, reuse: bool = False) -> Matcher:
    """A fresh matcher for `constraint`, or ConstraintError with the compiler's message in one line.

    A constraint that cannot match any text (a regex no string satisfies) is refused here, not mid-answer.
    With `reuse`, one compiled before for this tokenizer (see _COMPILED) is copied, not compiled again.
    """
    if not isinstance(constraint, Constraint):
        raise ConstraintError(f"expected a Constraint, got {type(constraint).__name__}")
    lt = ll_tokenizer(tokenizer, n_vocab)
    grammar = constraint.llguidance_grammar()  # checked by the matcher's own compile (validating first would compile it twice)
    key = (lt.vocab_size, grammar)
    with _COMPILED_LOCK:
        kept = _COMPILED.setdefault(tokenizer, OrderedDict()) if reuse else OrderedDict()
        template = kept.get(key)
        if template is not None:
            kept.move_to_end(key)
    if template is not None:
        return Matcher(template.deep_copy(), lt.vocab_size, sorted(tokenizer.eos_ids), lt.eos_token)
    template = _ll_matcher(lt, grammar)
    if template.is_error():
        raise ConstraintError(f"invalid {_what(constraint)}: {_compiler_message([template.get_error()])}")
    matcher = Matcher(template.deep_copy() if reuse else template, lt.vocab_size, sorted(tokenizer.eos_ids), lt.eos_token)
    try:
        empty = not matcher.mask().any()
    except ConstraintError:
        empty = True
    if empty:
        raise ConstraintError(f"the {_what(constraint)} cannot match any text")
    if reuse:
        with _COMPILED_LOCK:
            kept[key] = template
            while len(kept) > COMPILED_KEPT:
                kept.popitem(last=False)
    return matcher


def _ll_matcher(lt, grammar: str):
    """llguidance's compile (the slow part: seconds for a schema with thousands of properties)."""
    import llguidance as llg

    return llg.LLMatcher(lt, grammar, log_level=0, limits=parser_limits())


def _what(constraint: Constraint) -> str:
    return constraint.kind.replace("_", " ").replace("json", "JSON")


def model_vocab(model: nn.Module) -> Optional[int]:
    """How many logits the model gives (its vocab_size; may exceed the tokenizer's)."""
    size = getattr(getattr(model, "args", None), "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def matcher_for(constraint: Union[Constraint, Matcher], tokenizer: Tokenizer, model: nn.Module) -> Matcher:
    """The matcher one sequence follows: a Constraint compiled for this model, or a Matcher compiled earlier (the server's).

    A Matcher is that one sequence's position in its constraint, so it serves
    once: a second claim (the same Matcher for two prompts, or two calls)
    raises ElmError rather than letting two sequences advance one state.
    """
    if isinstance(constraint, Matcher):
        if constraint.claimed:
            raise ElmError("a compiled Matcher serves one sequence; pass the Constraint")
        matcher = constraint
    else:
        matcher = compile_constraint(constraint, tokenizer, model_vocab(model), reuse=True)
    matcher.claimed = True
    return matcher


def _compiler_message(messages: List[str]) -> str:
    """llguidance's error on one line, without the source excerpt and caret it draws under it."""
    lines = [line.strip() for line in " ".join(messages).splitlines() if line.strip()]
    kept = [line for line in lines if not re.match(r"^(\^+|\d+\s*\|)", line)]
    return " ".join(kept)[:500] or "rejected by the compiler"


# --------------------------------------------------------------------------
# Masks on logits (portable MLX ops: CPU, CUDA and Metal alike)
# --------------------------------------------------------------------------


def apply_token_masks(logits: mx.array, words: np.ndarray) -> mx.array:
    """`logits` (B, V) with every token whose bit is 0 in `words` (B, W) int32 set to -inf."""
    batch, vocab = logits.shape
    packed = mx.array(np.ascontiguousarray(words).view(np.uint32))
    # Made here, not at import: an unevaluated array belongs to the stream of the thread that made it (the server decodes in its own).
    bits = mx.arange(32, dtype=mx.uint32)
    allowed = ((packed[:, :, None] >> bits) & 1).reshape(batch, -1)
    if allowed.shape[1] < vocab:
        allowed = mx.concatenate([allowed, mx.zeros((batch, vocab - allowed.shape[1]), dtype=allowed.dtype)], axis=1)
    return mx.where(allowed[:, :vocab].astype(mx.bool_), logits, mx.array(-mx.inf, dtype=logits.dtype))


def batch_masks(matchers: Sequence[Optional[Matcher]], words: int) -> Tuple[np.ndarray, List[Optional[ConstraintError]]]:
    """One bitmask row per sequence (all ones where it has no matcher) and the error of each row whose matcher failed."""
    out = np.full((len(matchers), words), -1, dtype=np.int32)
    errors: List[Optional[ConstraintError]] = [None] * len(matchers)
    for i, matcher in enumerate(matchers):
        if matcher is not None:
            try:
                matcher.fill_mask(out[i, : matcher.words])
            except ConstraintError as e:
                errors[i] = e
    return out, errors


# --------------------------------------------------------------------------
# The single-stream token loop under a constraint
# --------------------------------------------------------------------------


def constrained_step(
    prompt: Sequence[int],
    model: nn.Module,
    matcher: Matcher,
    sampler: Callable,
    logits_processors: Sequence[Callable] = (),
    prefill_step_size: int = 512,
    cache: Optional[list] = None,
    context: Sequence[int] = (),
    cancel: Optional[Callable[[], bool]] = None,
    keys: Optional[Iterator[mx.array]] = None,
    overlap: bool = True,
) -> Iterator[Tuple[int, mx.array]]:
    """generation.generate_step under a constraint: (token, log-probabilities) until the constraint is complete.

    Token n+1's forward pass is queued (mx.async_eval) before token n is read;
    the matcher then follows token n and computes n+1's mask on the CPU while
    the model computes, and the mask joins the graph just before sampling. The
    log-probabilities are those of the masked distribution the token was
    drawn from. Returns (ends) when the text is complete and no
    end-of-sequence token exists to say so; raises ConstraintError if the
    matcher fails. `overlap=False` waits for the logits before computing the
    mask (the benchmark's baseline for what the overlap buys).
    """
    from .cache import make_cache
    from .generation import prefill_prompt

    cache = cache if cache is not None else make_cache(model)
    tokens = mx.array(prompt, dtype=mx.uint32)
    history = mx.array([*context, *prompt], dtype=mx.uint32)
    mask_row = np.zeros((1, matcher.words), dtype=np.int32)

    def forward(inputs: mx.array) -> mx.array:
        logits = model(inputs[None], cache=cache)[:, -1, :]
        for processor in logits_processors:
            logits = processor(history, logits)
        return logits

    def choose(logits: mx.array) -> Tuple[mx.array, mx.array]:
        nonlocal history
        if not overlap:
            mx.eval(logits)
        matcher.fill_mask(mask_row[0])  # the CPU work that overlaps the forward pass already queued
        logits = apply_token_masks(logits, mask_row)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs, key=next(keys)) if keys is not None else sampler(logprobs)
        if logits_processors:
            history = mx.concatenate([history, token.astype(mx.uint32)])
        return token, logprobs.squeeze(0)

    end = prefill_prompt(model, tokens, cache, prefill_step_size, cancel)

    logits = forward(tokens[end:])
    mx.async_eval(logits)
    token, logprobs = choose(logits)
    mx.async_eval(token, logprobs)
    while True:
        if not mask_row.any():  # complete, and this tokenizer has no end-of-sequence token to say so
            return
        logits = forward(token)
        mx.async_eval(logits)
        t = token.item()
        yield t, logprobs
        matcher.consume(t)
        token, logprobs = choose(logits)
        mx.async_eval(token, logprobs)


def mask_batch(matchers: Sequence[Optional[Matcher]], logits: mx.array) -> Tuple[mx.array, Dict[int, Optional[ConstraintError]]]:
    """The batch's logits with each constrained row masked; rows that end here: index -> None (complete) or the error.

    Call it after queueing the forward pass (mx.async_eval), so the masks are
    computed while the model runs. A row that ends has no mask applied (its
    sampled token is not used).
    """
    words = max(m.words for m in matchers if m is not None)
    rows, errors = batch_masks(matchers, words)
    ended: Dict[int, Optional[ConstraintError]] = {}
    for i, matcher in enumerate(matchers):
        if errors[i] is not None:
            ended[i] = errors[i]
        elif matcher is not None and not rows[i].any():  # complete, and no end-of-sequence token to say so
            ended[i] = None
        if i in ended:
            rows[i] = -1
    return apply_token_masks(logits, rows), ended
