"""Type and range checks for config.json fields, shared by the architectures.

A config is user input: JSON gives bools where ints belong, NaN, 1e999 and
strings, and a config with a million layers would build a million modules
before anything failed. Each check names the field and says what it takes.
The caps are far above any published model yet low enough that building
the (lazy, unallocated) model stays quick.
"""

import math
from typing import Any, Sequence

from ..errors import ConfigError

MAX_LAYERS = 1024
MAX_WIDTH = 1 << 16  # model_dim / hidden_size; the largest published models use 16k-25k
MAX_FFN_WIDTH = 1 << 20
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_VOCAB = 1 << 24  # published vocabularies stop near 256k
MAX_POSITIONS = 1 << 24
MAX_ROPE_BASE = 1e12  # published bases reach 5e5 - 1e8
MAX_TOKEN_ID = (1 << 31) - 1


def shown(value: Any) -> str:
    """A value for an error message, cut short so a huge list stays one readable line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(name: str, value: Any, high: int, low: int = 1) -> None:
    if not is_int(value) or not low <= value <= high:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer of at least {low}")
        raise ConfigError(f"{name} must be {kind} (at most {high}), got {shown(value)}")


def number(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    """A finite number in [low, high] (or (low, high] when low_open)."""
    ok = is_number(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"above {low:g}" if low_open else f"at least {low:g}"
        raise ConfigError(f"{name} must be a finite number {bound} and at most {high:g}, got {shown(value)}")


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {shown(value)}")


def choice(name: str, value: Any, allowed: Sequence[str], note: str = "") -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{name} {shown(value)} is not supported{note}")


def token_ids(name: str, value: Any) -> None:
    """None, one id, or a list of ids (Hugging Face allows several eos ids)."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    if len(values) > 64 or not all(is_int(v) and 0 <= v <= MAX_TOKEN_ID for v in values):
        raise ConfigError(f"{name} must be a token id (a non-negative integer), a short list of them, or null; got {shown(value)}")


def per_layer(name: str, values: Any, layers_field: str, count: int) -> None:
    """A list with one entry per layer (checked for length only; the caller checks the entries)."""
    if not isinstance(values, (list, tuple)) or len(values) != count:
        entries = f"{len(values)} entries" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}, not a list,"
        raise ConfigError(f"{name} has {entries} but {layers_field} is {count}")


def require_object(config: Any) -> None:
    if not isinstance(config, dict):
        raise ConfigError(f"the config must be a JSON object, got a {type(config).__name__}")
