"""Key/value caches for incremental decoding.

One sequence: KVCache (everything), RotatingKVCache (the first few tokens and
the last N: bounded memory for long generations) or QuantizedKVCache (keys
and values stored in 4 or 8 bits). A batch of sequences: BatchKVCache, or
QuantizedBatchKVCache storing each row as QuantizedKVCache stores it alone.
Reuse across requests: PromptCache (one conversation, the CLI chat) and
PromptStore (many prefixes, bounded in bytes, for a server).

Storage grows in blocks of `step` positions, so appending one token is a slice
assignment into preallocated memory, not a reallocation per token.
"""

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from .errors import ElmError


class _Stored:
    """What every cache here reports: the arrays it holds (`keys`/`values`, each an array or, quantized, a
    tuple of arrays), for mx.eval, and their bytes."""

    keys = values = None

    @property
    def state(self) -> List[mx.array]:
        """Arrays to pass to mx.eval to materialise the cache."""
        if self.keys is None:
            return []
        return [a for part in (self.keys, self.values) for a in (part if isinstance(part, (tuple, list)) else (part,))]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)


class KVCache(_Stored):
    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append (B, heads, L, head_dim) keys/values; return everything cached so far."""
        start, n = self.offset, keys.shape[2]
        if self.keys is None or start + n > self.keys.shape[2]:
            self._grow(keys, values, n)
        self.keys[..., start : start + n, :] = keys
        self.values[..., start : start + n, :] = values
        self.offset += n
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def extend(self, keys: mx.array, values: mx.array) -> None:
        """Append keys and values in this cache's stored form (here as they are); see QuantizedKVCache.extend."""
        self.update_and_fetch(keys, values)

    def _grow(self, keys: mx.array, values: mx.array, n: int) -> None:
        blocks = (n + self.step - 1) // self.step
        B, n_kv_heads, _, k_dim = keys.shape
        new_k = mx.zeros((B, n_kv_heads, blocks * self.step, k_dim), keys.dtype)
        new_v = mx.zeros((B, n_kv_heads, blocks * self.step, values.shape[3]), values.dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            used = self.offset
            self.keys = mx.concatenate([self.keys[..., :used, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :used, :], new_v], axis=2)

    def trim(self, n: int) -> int:
        """Forget the last n positions (kept storage is overwritten by later updates); return how many went."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def contents(self) -> Tuple[mx.array, mx.array]:
        """The (1, heads, offset, dim) keys and values held, as copies (the storage's spare blocks stay behind)."""
        return mx.contiguous(self.keys[..., : self.offset, :]), mx.contiguous(self.values[..., : self.offset, :])


class RotatingKVCache(_Stored):
    """Keys and values of the first `keep` tokens and of the most recent ones, `max_size` in all.

    Every token attends to the `keep` first tokens (which draw much of the
    attention, "attention sinks") and to the most recent `max_size - keep`
    ones including itself; older ones are dropped, so memory stays bounded
    however long the sequence grows. Positions are never reused: rotary
    positions keep counting (`offset`), so the model's context length still
    bounds the sequence. Until more than `max_size` tokens have been seen,
    attention is exactly that of KVCache.

    Held in temporal order: a step appends by concatenation, dropping the
    tokens no query can see any more (one copy of the window per step; a ring
    buffer would avoid it, at the price of positions out of order).
    """

    def __init__(self, max_size: int, keep: int = 4):
        if max_size <= keep:
            raise ElmError(f"the KV window must hold more than the {keep} first tokens it keeps, got {max_size}")
        self.max_size, self.keep = max_size, keep
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0  # tokens seen, the next token's position

    @property
    def held(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def positions(self) -> np.ndarray:
        """The position of every token held: the first `keep`, then the most recent ones."""
        recent = self.held - min(self.keep, self.held)
        return np.concatenate([np.arange(self.held - recent), np.arange(self.offset - recent, self.offset)])

    def mask(self, n: int) -> Optional[mx.array]:
        """For n new tokens: None when plain causal attention is right, else an (n, held + n) boolean mask
        letting each token see the first `keep` tokens and the last `max_size - keep` up to itself."""
        if self.held - self._dropped() + n <= self.max_size:
            return None
        keys = np.concatenate([self._kept_positions(), np.arange(self.offset, self.offset + n)])
        queries = np.arange(self.offset, self.offset + n)[:, None]
        visible = (keys[None] <= queries) & ((keys[None] < self.keep) | (queries - keys[None] < self.max_size - self.keep))
        return mx.array(visible)

    def _kept_positions(self) -> np.ndarray:
        """Positions of the tokens still held once those no new query can see are dropped (see _dropped)."""
        return np.delete(self.positions(), slice(self.keep, self.keep + self._dropped()))

    def _dropped(self) -> int:
        """Held tokens the next token cannot see: it sees `keep` first ones and max_size - keep - 1 before itself."""
        return max(0, self.held - (self.max_size - 1))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append keys/values; return those the new tokens may attend to (mask(n) says which sees which)."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            drop = self._dropped()
            self.keys = mx.concatenate([self.keys[..., : self.keep, :], self.keys[..., self.keep + drop :, :], keys], axis=2)
            self.values = mx.concatenate([self.values[..., : self.keep, :], self.values[..., self.keep + drop :, :], values], axis=2)
        self.offset += keys.shape[2]
        return self.keys, self.values

    def trim(self, n: int) -> int:
        """Forget the last n tokens; possible only while nothing has been dropped (returns 0 otherwise)."""
        if self.held != self.offset:
            return 0
        n = min(self.offset, n)
        if n:
            self.keys, self.values = self.keys[..., : self.offset - n, :], self.values[..., : self.offset - n, :]
            self.offset -= n
        return n


class _Quantizing:
    """mx.quantize with a cache's `bits` and `group_size`: an array becomes (packed, scales, biases) and back."""

    bits: int
    group_size: int

    def _pack(self, x: mx.array) -> Tuple[mx.array, ...]:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def _unpack(self, parts: Sequence[mx.array]) -> mx.array:
        return mx.dequantize(*parts, group_size=self.group_size, bits=self.bits)


class QuantizedKVCache(_Quantizing, _Stored):
    """Keys and values stored quantized (mx.quantize, `bits` per number, one scale and bias per `group_size`).

    Attention reads them dequantized: every step dequantizes the whole cache,
    one layer at a time (correctness before speed on the CPU), so what stays
    in memory between steps is the quantized form, about bits/16 of float16
    plus a scale and a bias per group, and attention differs from the plain
    cache's by the quantization error only. New
    keys are quantized before they are attended to, so what a token sees does
    not depend on whether it was computed in this step or an earlier one.
    """

    step = 256

    def __init__(self, bits: int = 8, group_size: int = 64):
        self.bits, self.group_size = bits, group_size
        self.keys: Optional[Tuple[mx.array, ...]] = None  # (packed, scales, biases)
        self.values: Optional[Tuple[mx.array, ...]] = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        self.extend(self._pack(keys), self._pack(values))
        return self._read(self.keys), self._read(self.values)

    def extend(self, keys: Sequence[mx.array], values: Sequence[mx.array]) -> None:
        """Append keys and values already quantized with this cache's bits and group size, each (packed, scales,
        biases), as they are: copied from another cache (a batch row, a stored prompt), not quantized twice."""
        start, n = self.offset, keys[0].shape[2]
        if self.keys is None or start + n > self.keys[0].shape[2]:
            room = -(-n // self.step) * self.step
            self.keys = self._grown(self.keys, keys, room)
            self.values = self._grown(self.values, values, room)
        for stored, new in ((self.keys, keys), (self.values, values)):
            for part, new_part in zip(stored, new):
                part[..., start : start + n, :] = new_part
        self.offset += n

    def _grown(self, stored, new, room: int):
        """Storage with `room` more positions after the `offset` in use."""
        blank = [mx.zeros((*p.shape[:2], room, p.shape[3]), p.dtype) for p in new]
        if stored is None:
            return tuple(blank)
        return tuple(mx.concatenate([p[..., : self.offset, :], b], axis=2) for p, b in zip(stored, blank))

    def _read(self, stored) -> mx.array:
        return self._unpack([p[..., : self.offset, :] for p in stored])

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n


def storage_form(layer_cache) -> Optional[Tuple[int, int]]:
    """How a cache stores keys and values: None as they are, (bits, group_size) quantized. Caches of one form
    hold bit-identical keys and values for the same tokens, so they can copy each other's."""
    bits = getattr(layer_cache, "bits", None)
    return None if bits is None else (bits, layer_cache.group_size)


def _parts(stored) -> List[mx.array]:
    """A stored form's arrays: the array itself, or a quantized form's (packed, scales, biases)."""
    return list(stored) if isinstance(stored, (tuple, list)) else [stored]


def _cut(stored, end: int):
    """The first `end` positions of a stored form (axis 2 of each of its arrays)."""
    if isinstance(stored, (tuple, list)):
        return tuple(p[..., :end, :] for p in stored)
    return stored[..., :end, :]


LayerCache = Union[KVCache, RotatingKVCache, QuantizedKVCache]

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
KEEP_TOKENS = 4  # the first tokens a rotating window always keeps (as mlx-lm's RotatingKVCache does)


@dataclass(frozen=True)
class KVOptions:
    """How a single sequence's cache stores keys and values: all of them (the default), a rotating window of
    `max_size`, or quantized to `bits` with `group_size`. Window and quantization do not combine."""

    max_size: Optional[int] = None
    bits: Optional[int] = None
    group_size: Optional[int] = None  # None: 64, or the head size when that is smaller

    def __post_init__(self):
        if self.max_size is not None and (not _is_int(self.max_size) or self.max_size <= KEEP_TOKENS):
            raise ElmError(f"max_kv_size must be an integer above {KEEP_TOKENS}, got {self.max_size!r}")
        if self.bits is not None and self.bits not in KV_BITS:
            raise ElmError(f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, got {self.bits!r}")
        if self.group_size is not None and self.group_size not in KV_GROUP_SIZES:
            raise ElmError(f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, got {self.group_size!r}")
        if self.group_size is not None and self.bits is None:
            raise ElmError("kv_group_size needs kv_bits")
        if self.max_size is not None and self.bits is not None:
            raise ElmError("a rotating KV window (max_kv_size) and KV quantization (kv_bits) do not combine; choose one")

    @property
    def plain(self) -> bool:
        return self.max_size is None and self.bits is None

    def make(self, model) -> List[LayerCache]:
        """One cache per layer of `model`; ElmError when its head size does not split into quantization groups."""
        if self.max_size is not None:
            return [RotatingKVCache(self.max_size, KEEP_TOKENS) for _ in model.layers]
        if self.bits is not None:
            group = self.group_size or _default_group(model)
            head_dim = _head_dim(model)
            if head_dim is not None and head_dim % group:
                raise ElmError(f"kv_group_size {group} does not divide this model's head size {head_dim}; use one that does")
            return [QuantizedKVCache(self.bits, group) for _ in model.layers]
        return make_cache(model)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _head_dim(model) -> Optional[int]:
    value = getattr(getattr(model, "args", None), "head_dim", None)
    return value if _is_int(value) else None


def _default_group(model) -> int:
    head_dim = _head_dim(model)
    return 32 if head_dim is not None and head_dim < 64 else 64


def make_cache(model, kv: Optional[KVOptions] = None) -> List[LayerCache]:
    """A fresh cache for every layer: plain unless `kv` asks for a window or quantization."""
    if kv is not None and not kv.plain:
        return kv.make(model)
    return [KVCache() for _ in model.layers]


def attention_mask(cache: Sequence[LayerCache], n: int) -> Optional[mx.array]:
    """The mask n new tokens need with this cache, or None for the model's own (causal) choice."""
    first = cache[0] if cache else None
    return first.mask(n) if isinstance(first, RotatingKVCache) else None


class BatchKVCache(_Stored):
    """One layer's keys and values for a batch of sequences of different lengths, right-aligned.

    Row b holds its sequence in columns [padding[b], size); every row's next
    token goes to column `size`, so one decode step appends one column for
    all rows. The columns left of padding[b] are masked out (`mask`), and
    `offset` gives each row its own rotary position (its first real token is
    at position 0), so a row computes what its sequence would alone.

    The storage is a list of `parts`, arrays that share their first three
    axes (rows, heads, columns): here the keys and the values; in
    QuantizedBatchKVCache each one's packed numbers, scales and biases. Every
    layout operation treats the parts alike; three hooks (_encode, _pair,
    _read) say what the parts are.
    """

    step = 256

    def __init__(self):
        self.parts: Optional[List[mx.array]] = None  # each (B, kv_heads, capacity, its own last axis)
        self.padding: List[int] = []
        self.size = 0
        self._offset: Optional[mx.array] = None

    # ---- what the parts are (QuantizedBatchKVCache overrides these) ----

    def _encode(self, keys: mx.array, values: mx.array) -> List[mx.array]:
        """New (B, heads, L, head_dim) keys and values as parts."""
        return [keys, values]

    def _pair(self, parts: Sequence[mx.array]) -> tuple:
        """Parts as (keys, values) in the stored form a sequence's own cache of the same form holds."""
        return parts[0], parts[1]

    def _read(self, parts: Sequence[mx.array]) -> Tuple[mx.array, mx.array]:
        """Parts as the keys and values attention reads."""
        return self._pair(parts)

    @property
    def keys(self):
        return None if self.parts is None else self._pair(self.parts)[0]

    @property
    def values(self):
        return None if self.parts is None else self._pair(self.parts)[1]

    @property
    def state(self) -> List[mx.array]:
        return list(self.parts or ())

    # ---- the layout ----

    @property
    def offset(self) -> mx.array:
        """Each row's position for the next token: (B,) int32, what mx.fast.rope takes per sequence."""
        if self._offset is None:
            self._offset = mx.array([self.size - p for p in self.padding], dtype=mx.int32)
        return self._offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append (B, heads, L, head_dim) keys/values to every row; return all columns so far, as attention reads them."""
        new, n = self._encode(keys, values), keys.shape[2]
        if self.parts is None:
            self._allocate(new)
        if self.size + n > self.parts[0].shape[2]:
            self._widen(right=-(-n // self.step) * self.step)
        for part, piece in zip(self.parts, new):
            part[..., self.size : self.size + n, :] = piece
        self.size += n
        self._offset = None
        return self._read([p[..., : self.size, :] for p in self.parts])

    def set_padding(self, padding: Sequence[int]) -> None:
        """Declare each row's first `padding[b]` columns padding, e.g. to left-pad rows inside a pass that is
        about to be appended (their positions then start where their tokens do)."""
        self.padding = list(padding)
        self._offset = None

    def mask(self) -> Optional[mx.array]:
        """(B, 1, 1, size + 1) booleans for a decode step's attention: each row sees its own columns only;
        None (attend to everything, as a sequence alone does) while no row has padding."""
        if not any(self.padding):
            return None
        columns = mx.arange(self.size + 1)
        return (columns[None, :] >= mx.array(self.padding)[:, None])[:, None, None, :]

    def add(self, cache: LayerCache) -> None:
        """Append a sequence prefilled alone (a cache of this one's storage_form holding it, perhaps nothing yet)
        as a new last row; its stored keys and values are copied as they are."""
        if storage_form(cache) != storage_form(self):
            raise ElmError(f"a sequence's cache stores keys and values as {storage_form(cache)}, the batch's as {storage_form(self)}")
        length = cache.offset
        if length:
            parts = [p[..., :length, :] for p in _parts(cache.keys) + _parts(cache.values)]
            if self.parts is None:
                self._allocate(parts)
            if length > self.size:
                self._widen(left=length - self.size)
            self.parts = [mx.concatenate([a, self._row(p)], axis=0) for a, p in zip(self.parts, parts)]
        elif self.parts is not None:
            self.parts = [mx.concatenate([a, self._row(a[:1, :, :0])], axis=0) for a in self.parts]
        self.padding.append(self.size - length)
        self._offset = None

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows (in this order), and drop the columns no kept row uses.

        The kept rows are copied into new arrays, so the memory of the rows
        that left is free once the caller evaluates `state`.
        """
        if not rows:
            self.parts, self.padding, self.size, self._offset = None, [], 0, None
            return
        start = min(self.padding[r] for r in rows)
        index = mx.array(list(rows))
        self.parts = [p[:, :, start:, :][index] for p in self.parts]
        self.padding = [self.padding[r] - start for r in rows]
        self.size -= start
        self._offset = None

    def row(self, b: int) -> tuple:
        """Row b's own keys and values, (1, heads, its length, dim) each, padding left out, in stored form
        (what a sequence's own cache of this form takes with `extend`)."""
        start = self.padding[b]
        return self._pair([p[b : b + 1, :, start : self.size, :] for p in self.parts])

    def _allocate(self, parts: Sequence[mx.array]) -> None:
        """Zero-width storage for the rows so far, once the first parts tell the heads, widths and dtypes."""
        B = len(self.padding)
        self.parts = [mx.zeros((B, p.shape[1], 0, p.shape[3]), p.dtype) for p in parts]

    def _row(self, part: mx.array) -> mx.array:
        """A (1, heads, capacity, its last axis) row holding `part` right-aligned to `size`."""
        _, heads, capacity, _ = self.parts[0].shape
        row = mx.zeros((1, heads, capacity, part.shape[3]), part.dtype)
        row[..., self.size - part.shape[2] : self.size, :] = part
        return row

    def _widen(self, left: int = 0, right: int = 0) -> None:
        """Add zero columns: on the left (more padding for every row), or on the right (room to append)."""

        def widen(a: mx.array) -> mx.array:
            B, heads, _, dim = a.shape
            pieces = [mx.zeros((B, heads, left, dim), a.dtype)] if left else []
            pieces.append(a[..., : self.size, :] if right else a)
            if right:
                pieces.append(mx.zeros((B, heads, right, dim), a.dtype))
            return mx.concatenate(pieces, axis=2)

        self.parts = [widen(p) for p in self.parts]
        self.padding = [p + left for p in self.padding]
        self.size += left
        self._offset = None


class QuantizedBatchKVCache(_Quantizing, BatchKVCache):
    """A BatchKVCache whose rows are stored as QuantizedKVCache stores one sequence: keys and values each as
    (packed, scales, biases), new ones quantized before they are attended to. Quantization works on groups of
    one position's head_dim numbers, so a row's parts are bit-identical to its sequence's own cache; rows join
    and leave with their parts copied, never dequantized and quantized again."""

    def __init__(self, bits: int = 8, group_size: int = 64):
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def _encode(self, keys: mx.array, values: mx.array) -> List[mx.array]:
        return [*self._pack(keys), *self._pack(values)]

    def _pair(self, parts: Sequence[mx.array]) -> tuple:
        return tuple(parts[:3]), tuple(parts[3:])

    def _read(self, parts: Sequence[mx.array]) -> Tuple[mx.array, mx.array]:
        keys, values = self._pair(parts)
        return self._unpack(keys), self._unpack(values)


def make_batch_cache(model, kv: Optional[KVOptions] = None) -> List[BatchKVCache]:
    """One batch cache per layer of `model`, storing keys and values as make_cache(model, kv)'s caches do (and
    refusing what they refuse); a rotating window does not batch (its rows would drop columns at different steps)."""
    if kv is not None and kv.max_size is not None:
        raise ElmError(
            "a rotating KV window (max_kv_size) serves one sequence at a time; batched decoding can quantize keys and values (kv_bits) instead"
        )
    form = storage_form(make_cache(model, kv)[0]) if model.layers else None
    return [BatchKVCache() if form is None else QuantizedBatchKVCache(*form) for _ in model.layers]


class PromptCache:
    """A model's KV cache together with the tokens it holds, reused by the next prompt that shares a prefix.

    Conversations resend their history with every turn; only the tokens after
    the longest common prefix need a forward pass.
    """

    def __init__(self, model, kv: Optional[KVOptions] = None):
        self.model, self.kv = model, kv
        self.cache: List[LayerCache] = make_cache(model, kv)
        self.tokens: List[int] = []

    def reuse(self, prompt: Sequence[int]) -> int:
        """Keep the cached prefix `prompt` starts with (all but its last token at most); return its length.

        A rotating window that has dropped tokens cannot go back: unless the
        prompt extends everything it holds, it starts afresh.
        """
        common = 0
        for cached, new in zip(self.tokens, prompt[:-1]):  # the last prompt token must run to give logits
            if cached != new:
                break
            common += 1
        if common == 0 or not self._trim_to(common):
            self.cache, self.tokens = make_cache(self.model, self.kv), []
            return 0
        self.tokens = self.tokens[:common]
        return common

    def _trim_to(self, length: int) -> bool:
        """Make every layer hold `length` tokens; False when one cannot (see RotatingKVCache.trim)."""
        for layer_cache in self.cache:
            extra = layer_cache.offset - length
            if extra and layer_cache.trim(extra) != extra:
                return False
        return True

    def record(self, tokens: Sequence[int]) -> None:
        """After generation: `tokens` were fed (the prompt, then every generated token).

        An interruption can leave layers holding different lengths, or one
        token more than was handed out; keep what every layer has and
        `tokens` names.
        """
        keep = min([len(tokens)] + [c.offset for c in self.cache])
        if not self._trim_to(keep):
            self.cache, keep = make_cache(self.model, self.kv), 0
        self.tokens = list(tokens[:keep])


# --------------------------------------------------------------------------
# Many prompts: a server's prompt store
# --------------------------------------------------------------------------

DEFAULT_PROMPT_CACHE_FRACTION = 0.25  # of physical memory
DEFAULT_PROMPT_CACHE_CAP = 2 << 30


def physical_memory() -> Optional[int]:
    """Bytes of RAM, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def default_prompt_cache_bytes() -> int:
    """min(25% of RAM, 2 GiB): room for many long prompts of a small model without crowding the weights out."""
    ram = physical_memory()
    return DEFAULT_PROMPT_CACHE_CAP if ram is None else min(int(ram * DEFAULT_PROMPT_CACHE_FRACTION), DEFAULT_PROMPT_CACHE_CAP)


@dataclass
class _Entry:
    tokens: np.ndarray  # int64 token ids, for vectorised prefix comparison
    layers: List[tuple]  # per layer, (1, heads, len(tokens), dim) keys and values, in stored form
    nbytes: int
    form: Optional[Tuple[int, int]] = None  # how they are stored (storage_form): only caches of this form reuse them


class PromptStore:
    """Keys and values of many earlier token sequences, reused by any later prompt that shares a prefix.

    A request finds the stored sequence with the longest common prefix and
    copies that prefix's keys and values into its own fresh cache, so only
    the rest of its prompt is computed: a system prompt that every
    conversation starts with, or a conversation's history resent with each
    turn. Entries are evicted least recently used first, so the total stays
    within `max_bytes` (0 stores nothing). A sequence that is a prefix of a
    stored one is not stored again; storing one that extends a stored one
    replaces it. Safe to share between threads.

    Keys and values are kept in the form the sequence's cache stored them
    (storage_form: as they are, or quantized with some bits and group size)
    and reused only by caches of the same form, copied as they are: a reused
    prefix is bit-identical to what the sequence would have computed.
    """

    def __init__(self, max_bytes: Optional[int] = None):
        if max_bytes is None:
            max_bytes = default_prompt_cache_bytes()
        ram = physical_memory()
        if not _is_int(max_bytes) or max_bytes < 0:
            raise ElmError(f"the prompt cache size must be a whole number of bytes >= 0, got {max_bytes!r}")
        if ram is not None and max_bytes > ram:
            raise ElmError(f"a prompt cache of {max_bytes} bytes is more than this machine's memory ({ram} bytes)")
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[int, _Entry]" = OrderedDict()  # least recently used first
        self._next = 0
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0  # lookups that reused at least one token
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def unused(self, tokens: int, whole: bool = False) -> None:
        """Of a lookup's reuse, `tokens` went unused after all (the caller recomputed them; `whole`: all of it).
        Keeps `hits` and `reused_tokens` to what was reused."""
        with self._lock:
            self.reused_tokens -= tokens
            self.hits -= int(whole)

    def lookup(self, prompt: Sequence[int], limit: Optional[int] = None, form: Optional[Tuple[int, int]] = None) -> Tuple[int, List[tuple]]:
        """The longest stored prefix of `prompt` (at most `limit` tokens) among entries of this storage `form`:
        its length and per-layer keys and values.

        The arrays are the stored ones sliced, never to be written to (MLX
        arrays are values: a cache that copies them in cannot change them).
        """
        limit = len(prompt) if limit is None else min(limit, len(prompt))
        if limit <= 0:
            return 0, []
        wanted = np.asarray(prompt[:limit], dtype=np.int64)
        with self._lock:
            best, best_key = 0, None
            for key, entry in self._entries.items():
                common = _common_prefix(entry.tokens, wanted) if entry.form == form else 0
                if common > best:
                    best, best_key = common, key
            if best_key is None:
                return 0, []
            self._entries.move_to_end(best_key)
            self.hits += 1
            self.reused_tokens += best
            layers = self._entries[best_key].layers
        return best, [(_cut(k, best), _cut(v, best)) for k, v in layers]

    def cache_for(
        self, model, prompt: Sequence[int], limit: Optional[int] = None, kv: Optional[KVOptions] = None
    ) -> Tuple[List[LayerCache], int]:
        """A fresh cache (make_cache(model, kv)) for `prompt` holding its longest stored prefix (at most `limit`
        tokens) of that cache's form, and that length."""
        cache = make_cache(model, kv)
        reused, layers = self.lookup(prompt, limit, storage_form(cache[0]) if cache else None)
        for layer_cache, (keys, values) in zip(cache, layers):
            layer_cache.extend(keys, values)
        if reused:
            mx.eval([c.state for c in cache])
        return cache, reused

    def store(self, tokens: Sequence[int], layers: Sequence[tuple], form: Optional[Tuple[int, int]] = None) -> bool:
        """Keep the keys and values of `tokens` (per layer, (1, heads, len(tokens), dim), stored in `form`, see
        storage_form); False when not kept (nothing to keep, larger than the whole budget, or already covered by a
        stored sequence of that form)."""
        n = len(tokens)
        arrays = [p for k, v in layers for p in _parts(k) + _parts(v)]
        if n == 0 or not layers or any(p.shape[2] != n for p in arrays):
            return False
        nbytes = sum(p.nbytes for p in arrays)
        if nbytes > self.max_bytes:
            return False
        ids = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.form != form:
                    continue
                common = _common_prefix(entry.tokens, ids)
                if common == n:  # already stored, perhaps with more after it
                    self._entries.move_to_end(key)
                    return False
                if common == len(entry.tokens):  # the new one extends it
                    self._remove(key)
            while self._entries and self.nbytes + nbytes > self.max_bytes:
                self._remove(next(iter(self._entries)))
            layers = [(_contiguous(k), _contiguous(v)) for k, v in layers]  # no views into larger buffers
            mx.eval(layers)
            self._next += 1
            self._entries[self._next] = _Entry(ids, layers, nbytes, form)
            self.nbytes += nbytes
        return True

    def store_cache(self, tokens: Sequence[int], cache: Sequence[LayerCache]) -> bool:
        """store() what a sequence's own per-layer cache (KVCache or QuantizedKVCache) holds; it must hold exactly `tokens`."""
        if not cache or any(c.offset != len(tokens) or c.keys is None for c in cache):
            return False
        return self.store(tokens, [(_cut(c.keys, c.offset), _cut(c.values, c.offset)) for c in cache], storage_form(cache[0]))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def _remove(self, key: int) -> None:
        self.nbytes -= self._entries.pop(key).nbytes


def _contiguous(stored):
    return tuple(mx.contiguous(p) for p in stored) if isinstance(stored, (tuple, list)) else mx.contiguous(stored)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-d integer arrays."""
    m = min(len(a), len(b))
    differ = np.flatnonzero(a[:m] != b[:m])
    return int(differ[0]) if differ.size else m
