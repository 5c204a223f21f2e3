"""Save a prompt's keys and values to a file, to start later generations from it.

elm-mlx cache-prompt --prompt-cache-file doc.safetensors --prompt - < long_document.txt
elm-mlx generate --prompt-cache-file doc.safetensors --prompt "Summarise it."

A long document is computed once; each generation then computes only the
text given to it, which is appended after the cached prompt (as mlx-lm's
cache_prompt does). The prompt is used as raw text (no chat template).

The file is safetensors: `tokens` (the prompt's ids) and, per layer i,
`layers.i.keys` and `layers.i.values` of shape (1, kv heads, tokens, head
size), with metadata naming the format and the model's identity. The
identity is a hash of the model as loaded: its configuration, every
parameter's name, shape and dtype, and a sample of every parameter's values,
so a file is refused by another model, another dtype or quantization, or the
same model with other adapters, wherever the model directory lives. A file is
checked from its header (size, names, shapes, dtypes, identity) before any
tensor is read, so a foreign, truncated or absurd file costs no memory.
"""

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .cache import KVCache, make_cache
from .cli import ArgumentParser, describe_os_error, positive_int, run_cli
from .errors import ElmError
from .generation import check_context, context_length, prefill_chunk
from .options import DEFAULT_PREFILL_STEP, add_model_options, add_verbose_option, load_from_args, notice

FORMAT = "elm-mlx prompt cache"
VERSION = "1"
MAX_HEADER_BYTES = 1 << 20  # far above any real header (a few entries per layer)
SAMPLE = 64  # values per parameter that enter the model identity

_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16"}
_ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4}


# --------------------------------------------------------------------------
# Identity
# --------------------------------------------------------------------------


def model_identity(model) -> str:
    """A hex digest of what makes two loaded models compute the same keys and values (see the module docstring)."""
    h = hashlib.sha256()
    args = getattr(model, "args", None)
    config = args.to_dict() if hasattr(args, "to_dict") else {}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in sorted(tree_flatten(model.parameters()), key=lambda item: item[0]):
        h.update(f"{name}:{p.shape}:{p.dtype}".encode())
        flat = p.reshape(-1)
        sample = flat[:: max(1, flat.size // SAMPLE)][:SAMPLE]
        as_bits = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32}.get(p.dtype.size)
        h.update(np.array(sample.view(as_bits) if as_bits else sample.astype(mx.float32)).tobytes())
    return h.hexdigest()


def kv_layout(model) -> List[Tuple[int, int, mx.Dtype]]:
    """(kv heads, head size, dtype) of each layer's keys, found by running one token: true of any architecture."""
    probe = make_cache(model)
    model(mx.array([[0]], dtype=mx.uint32), cache=probe)
    return [(c.keys.shape[1], c.keys.shape[3], c.keys.dtype) for c in probe]


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def check_output(path: Path, force: bool) -> None:
    """Refuse an existing path, or with force one that is not an earlier cache file of ours; before any work."""
    if not os.path.lexists(path):
        if not path.parent.is_dir():
            raise ElmError(f"cannot write {path}: the directory {path.parent} does not exist")
        return
    if not force:
        raise ElmError(f"{path} already exists; pass --force to replace it")
    if path.is_symlink() or not path.is_file():
        raise ElmError(f"--force will not replace {path}: it is not a plain file")
    try:
        read_cache_header(path)
    except ElmError:
        raise ElmError(f"--force will not replace {path}: it is not a prompt cache file of ours") from None


def save_prompt_cache(path: Path, model, tokens: Sequence[int], cache: Sequence[KVCache]) -> int:
    """Write the file whole or not at all (a temporary sibling renamed over `path`); return its size in bytes."""
    path = Path(path)
    arrays: Dict[str, mx.array] = {"tokens": mx.array(list(tokens), dtype=mx.int32)}
    for i, layer in enumerate(cache):
        if layer.offset != len(tokens):
            raise ElmError(f"layer {i} holds {layer.offset} positions, not the prompt's {len(tokens)}")
        arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"] = layer.contents()
    metadata = {"format": FORMAT, "version": VERSION, "model": model_identity(model), "tokens": str(len(tokens))}
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            mx.save_safetensors(temporary, arrays, metadata=metadata)
            os.replace(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)
    except OSError as e:
        raise ElmError(describe_os_error(e)) from None
    except RuntimeError as e:  # mlx's own write errors carry no errno
        raise ElmError(f"writing {path} failed: {e}") from None
    return path.stat().st_size


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def read_cache_header(path: Path) -> Tuple[dict, int]:
    """The safetensors header of a prompt cache file of ours, and the bytes its tensors' data must fill.

    ElmError for anything else."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise ElmError(f"{path} is not a prompt cache file (no safetensors header)")
            header = json.loads(f.read(length))
    except OSError as e:
        raise ElmError(describe_os_error(e)) from None
    except (ValueError, RecursionError):
        raise ElmError(f"{path} is not a prompt cache file (its header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ElmError(f"{path} is a safetensors file but not an elm-mlx prompt cache (make one with elm-mlx cache-prompt)")
    if meta.get("version") != VERSION:
        raise ElmError(f"{path} is a prompt cache of another version ({str(meta.get('version'))[:20]}); make it again")
    return header, size - 8 - length


def load_prompt_cache(path: Path, model) -> Tuple[List[int], List[KVCache]]:
    """The prompt's token ids and a cache for every layer holding its keys and values, for this model only."""
    path = Path(path)
    header, data_bytes = read_cache_header(path)
    if header["__metadata__"].get("model") != model_identity(model):
        raise ElmError(f"{path} was made for another model (or another dtype, quantization or adapters); make it again for this one")
    n = _count(header, path, context_length(model))
    expected = {"tokens": ("I32", (n,))}
    for i, (heads, dim, dtype) in enumerate(kv_layout(model)):
        for part in ("keys", "values"):
            expected[f"layers.{i}.{part}"] = (_DTYPES.get(dtype, "?"), (1, heads, n, dim))
    _check_tensors(header, expected, data_bytes, path)

    try:
        arrays = mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        raise ElmError(f"cannot read {path}: {e}") from None
    tokens = arrays["tokens"].tolist()
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if vocab is not None and not all(0 <= t < vocab for t in tokens):
        raise ElmError(f"{path} holds token ids outside this model's vocabulary")
    cache = make_cache(model)
    for i, layer in enumerate(cache):
        layer.update_and_fetch(arrays[f"layers.{i}.keys"], arrays[f"layers.{i}.values"])
    mx.eval([c.state for c in cache])
    return tokens, cache


def _count(header: dict, path: Path, limit: Optional[int]) -> int:
    """The number of cached tokens the header states, within the model's context."""
    text = header["__metadata__"].get("tokens")
    if not isinstance(text, str) or not text.isdigit() or len(text) > 15 or int(text) < 1:
        raise ElmError(f"{path} does not state how many tokens it holds")
    n = int(text)
    if limit is not None and n >= limit:
        raise ElmError(f"{path} holds {n} tokens, leaving no room in this model's {limit}-token context")
    return n


def _check_tensors(header: dict, expected: Dict[str, Tuple[str, tuple]], data_bytes: int, path: Path) -> None:
    """Exactly the expected tensors, with their dtypes and shapes, laid end to end and filling the file."""
    names = set(header) - {"__metadata__"}
    if names != set(expected):
        extra, missing = sorted(names - set(expected))[:3], sorted(set(expected) - names)[:3]
        raise ElmError(f"{path} does not hold this model's layers (unexpected: {extra or 'none'}, missing: {missing or 'none'})")
    spans = []
    for name, (dtype, shape) in expected.items():
        info = header[name]
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not isinstance(info, dict) or info.get("dtype") != dtype or info.get("shape") != list(shape):
            got = (info.get("dtype"), info.get("shape")) if isinstance(info, dict) else info
            raise ElmError(f"{path}: {name} is {str(got)[:80]}, expected {dtype} {list(shape)}")
        nbytes = int(np.prod(shape)) * _ITEM_BYTES[dtype]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ElmError(f"{path}: {name} has no valid data offsets")
        if offsets[1] - offsets[0] != nbytes:
            raise ElmError(f"{path}: {name} has {offsets[1] - offsets[0]} bytes of data, expected {nbytes}")
        spans.append(tuple(offsets))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise ElmError(f"{path}: its tensors overlap or leave gaps")
        end = stop
    if end != data_bytes:
        raise ElmError(f"{path} holds {data_bytes} bytes of tensor data, expected {end}: truncated or padded")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m elm_mlx.cache_prompt",
        description="Compute a prompt's keys and values once and save them; generate --prompt-cache-file continues from them.",
    )
    add_model_options(p)
    p.add_argument("--prompt", "-p", required=True, help="prompt text (raw, no chat template), or '-' to read it from stdin")
    p.add_argument("--prompt-cache-file", required=True, metavar="FILE", help="the .safetensors file to write")
    p.add_argument("--force", action="store_true", help="replace FILE if it is an earlier prompt cache file (default: refuse)")
    p.add_argument(
        "--prefill-step-size",
        type=positive_int,
        default=DEFAULT_PREFILL_STEP,
        help="prompt tokens per forward pass; Ctrl-C is heeded between them (default: %(default)s)",
    )
    add_verbose_option(p, "print which model is used, conversion notes and what was saved to stderr")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    from .generate import read_prompt  # generate imports this module

    args = build_parser().parse_args(argv)
    path = Path(args.prompt_cache_file).expanduser()
    check_output(path, args.force)  # before the (slow) model load
    prompt = read_prompt(args.prompt)
    if not prompt.strip():
        raise ElmError("the prompt is empty")
    _, model, tokenizer = load_from_args(args, verbose=args.verbose)
    tokens = tokenizer.encode(prompt)
    check_context(len(tokens), 1, context_length(model))  # room for at least one token after it
    cache = make_cache(model)
    ids, done = mx.array(tokens, dtype=mx.uint32), 0
    while done < len(tokens):
        done = prefill_chunk(model, ids, cache, done, len(tokens), args.prefill_step_size)
    check_output(path, args.force)  # something may have appeared meanwhile
    size = save_prompt_cache(path, model, tokens, cache)
    if args.verbose:
        notice(f"saved the keys and values of {len(tokens)} prompt tokens to {path} ({size / (1 << 20):.1f} MiB)")


if __name__ == "__main__":
    run_cli(main)
