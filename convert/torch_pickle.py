"""Read PyTorch `.pt` / `.bin` state dicts without torch and without running their code.

A torch.save file is a zip archive: `<name>/data.pkl` is a pickle describing
the tensors, `<name>/data/<key>` holds each storage's raw bytes. A pickle can
name any Python callable, so a plain `pickle.load` of an untrusted checkpoint
can run arbitrary code. This unpickler resolves only the handful of globals a
tensor state dict needs and rebuilds tensors itself from the raw bytes (bit
for bit, strides and shared storages included). Anything else is refused,
naming the global.

A file that runs no code can still exhaust the machine, so every size is
checked before it is spent: the pickle's nesting depth and memo indices
(pre-scanned, since CPython's unpickler builds and hashes 300k-deep tuples
without a recursion check and crashes), each storage's inflated size against
what the pickle declares and against its compressed size (zip bombs), and
each tensor's element count against its storage (a zero stride lets a
515-byte file describe gigabytes).
"""

import io
import math
import pickle
import pickletools
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import mlx.core as mx
import numpy as np

from elm_mlx.errors import ElmError

# A state dict nests a handful of levels (dict -> tensor args -> size tuple);
# training checkpoints add one or two. Far below where C recursion is a risk.
MAX_NESTING = 64
# data.pkl of a real checkpoint is kilobytes (a 3B model's is about 100 KB).
MAX_PICKLE_BYTES = 64 << 20
# Weights are close to incompressible; a member that inflates this much is a bomb.
MAX_INFLATION = 32
# Tied weights reuse one storage twice; copies beyond this are refused.
MAX_STORAGE_REUSE = 4
MAX_DIMS = 16


class ForbiddenGlobal(ElmError):
    """The checkpoint's pickle references something a state dict never needs."""


class CheckpointError(ElmError):
    """The checkpoint is malformed or asks for more than its bytes hold."""


@dataclass(frozen=True)
class _StorageType:
    name: str
    numpy_dtype: str  # how the bytes are read; bfloat16 is read as its raw uint16 bits
    mlx_dtype: mx.Dtype

    def __setstate__(self, state):  # BUILD on a shared global would change it for everyone
        raise CheckpointError("the pickle tries to modify a storage type")


_STORAGE_TYPES = {
    t.name: t
    for t in (
        _StorageType("FloatStorage", "<f4", mx.float32),
        _StorageType("HalfStorage", "<f2", mx.float16),
        _StorageType("BFloat16Storage", "<u2", mx.bfloat16),
        _StorageType("DoubleStorage", "<f8", mx.float32),  # MLX GPUs have no float64
        _StorageType("LongStorage", "<i8", mx.int64),
        _StorageType("IntStorage", "<i4", mx.int32),
        _StorageType("ShortStorage", "<i2", mx.int16),
        _StorageType("CharStorage", "<i1", mx.int8),
        _StorageType("ByteStorage", "<u1", mx.uint8),
        _StorageType("BoolStorage", "?", mx.bool_),
    )
}


class _Storage:
    """A storage's bytes, and how many elements tensors have copied out of it so far."""

    def __init__(self, key: str, values: np.ndarray, type: _StorageType):
        self.key, self.values, self.type, self.copied = key, values, type, 0

    def __setstate__(self, state):
        raise CheckpointError(f"the pickle tries to modify storage {self.key}")


@dataclass(frozen=True)
class _Tensor:
    values: np.ndarray  # contiguous
    type: _StorageType

    def __setstate__(self, state):
        raise CheckpointError("the pickle tries to modify a tensor after building it")

    def to_mlx(self) -> mx.array:
        if self.type.mlx_dtype == mx.bfloat16:  # raw bits: reinterpret, never convert
            return mx.array(self.values).view(mx.bfloat16)
        return mx.array(self.values).astype(self.type.mlx_dtype)


# --------------------------------------------------------------------------
# The globals a state dict may call, each checking its arguments
# --------------------------------------------------------------------------


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _shape(value, what: str) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS or not all(_is_index(n) for n in value):
        raise CheckpointError(f"a tensor's {what} is not a tuple of at most {MAX_DIMS} non-negative integers")
    return tuple(value)


def _rebuild_tensor(storage=None, offset=None, size=None, stride=None, *_ignored) -> _Tensor:
    """torch._utils._rebuild_tensor_v2: a strided view into a storage, copied out contiguous."""
    if not isinstance(storage, _Storage) or not _is_index(offset):
        raise CheckpointError("a tensor is rebuilt from something other than a storage and an offset")
    size, stride = _shape(size, "size"), _shape(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointError(f"a tensor has {len(size)} sizes but {len(stride)} strides")
    values, count = storage.values, math.prod(size)
    if count == 0:
        return _Tensor(np.zeros(size, values.dtype), storage.type)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= values.size:
        raise CheckpointError(f"a tensor reaches outside storage {storage.key}")
    if count > values.size:  # only overlapping (e.g. zero) strides get here
        raise CheckpointError(f"a tensor of {count} elements views storage {storage.key}, which holds only {values.size}")
    storage.copied += count
    if storage.copied > MAX_STORAGE_REUSE * values.size:
        raise CheckpointError(f"tensors copy storage {storage.key} more than {MAX_STORAGE_REUSE} times over")
    view = np.lib.stride_tricks.as_strided(values[offset:], shape=size, strides=[s * values.itemsize for s in stride])
    return _Tensor(np.ascontiguousarray(view), storage.type)


def _rebuild_parameter(data=None, *_ignored) -> _Tensor:
    if not isinstance(data, _Tensor):  # returning anything else would hand back a shared object
        raise CheckpointError("a parameter is rebuilt from something other than a tensor")
    return data


def _ordered_dict(*args) -> OrderedDict:
    """collections.OrderedDict as torch pickles it: called with no arguments (or a list of pairs)."""
    if args == ():
        return OrderedDict()
    pairs = args[0] if len(args) == 1 else None
    if not isinstance(pairs, list) or not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
        raise CheckpointError("OrderedDict is called with something other than a list of pairs")
    try:
        return OrderedDict(pairs)
    except TypeError:  # an unhashable key
        raise CheckpointError("OrderedDict is given a key that is not a string or number") from None


_ALLOWED = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): t for name, t in _STORAGE_TYPES.items()},
}


# --------------------------------------------------------------------------
# Pre-scan: bound nesting and the memo before the real unpickler runs
# --------------------------------------------------------------------------


class _Cell:
    """One object on the simulated stack: how deep it nests, and whether something already holds it."""

    __slots__ = ("depth", "held", "is_global")

    def __init__(self, depth: int = 0, is_global: bool = False):
        self.depth, self.held, self.is_global = depth, False, is_global


_MUTATORS = {"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"}
_GLOBALS = {"GLOBAL", "STACK_GLOBAL", "EXT1", "EXT2", "EXT4"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}


def check_pickle_structure(data: bytes) -> None:
    """Walk the opcodes tracking each object's nesting depth; refuse deep or self-modifying pickles.

    Depths stay exact upper bounds because an object may be modified only while
    nothing holds it yet (the pickler never does otherwise): modifying an object
    already inside another would change that one's depth behind its back.
    """
    stack, marks, memo = [], [], {}
    try:
        for ops, (opcode, arg, _pos) in enumerate(pickletools.genops(data), start=1):
            name = opcode.name
            if name == "MARK":
                marks.append(len(stack))
            elif name in _MEMO_PUTS or name == "MEMOIZE":
                index = len(memo) if name == "MEMOIZE" else arg
                if index > ops:  # the C unpickler sizes its memo by the largest index
                    raise CheckpointError(f"the pickle's memo index {index} is out of range")
                memo[index] = stack[-1]
            elif name in _MEMO_GETS:
                stack.append(memo[arg])
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "POP_MARK":
                del stack[marks.pop() :]
            elif name not in ("STOP", "PROTO", "FRAME"):
                _simulate(name, opcode, stack, marks)
    except (ValueError, KeyError, IndexError) as e:  # genops' own complaints, a bad memo key, an empty stack
        raise CheckpointError(f"the pickle is malformed ({type(e).__name__}: {str(e)[:80]})") from None


def _simulate(name: str, opcode, stack: list, marks: list) -> None:
    """Pop what `opcode` consumes and push what it makes, with the made object's depth."""
    before = opcode.stack_before
    if pickletools.markobject in before:
        popped = stack[marks.pop() :]
        del stack[len(stack) - len(popped) :]
        below = before.index(pickletools.markobject)
        popped = stack[len(stack) - below :] + popped if below else popped
        del stack[len(stack) - below :]
    else:
        popped = stack[len(stack) - len(before) :] if before else []
        if len(popped) < len(before):
            raise IndexError("stack underflow")
        del stack[len(stack) - len(before) :]
    if name in _MUTATORS:
        target, items = popped[0], popped[1:]
        if target.is_global:
            raise CheckpointError("the pickle tries to modify one of the globals it uses")
        if target.held or any(item is target for item in items):
            raise CheckpointError("the pickle modifies an object after nesting it (or nests it in itself)")
        target.depth = max([target.depth] + [item.depth + 1 for item in items])
        made = target
    else:
        made = _Cell(max((item.depth + 1 for item in popped), default=0), is_global=name in _GLOBALS)
    for item in popped:
        item.held = item.held or item is not made
    if made.depth > MAX_NESTING:
        raise CheckpointError(f"the pickle nests more than {MAX_NESTING} levels deep")
    if opcode.stack_after:
        stack.append(made)


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix = archive, prefix
        self._storages: Dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise ForbiddenGlobal(
                f"refusing to load: the checkpoint references {module}.{name}, which a tensor state dict never needs"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise CheckpointError(f"unexpected persistent id (a {type(pid).__name__}, not a storage reference)")
        _, storage_type, key, _location, numel = pid
        if not isinstance(key, str) or not _is_index(numel):
            raise CheckpointError("a storage reference has a bad key or element count")
        if key not in self._storages:  # tensors sharing a storage share one read
            self._storages[key] = _Storage(key, self._read_storage(key, storage_type, numel), storage_type)
        return self._storages[key]

    def _read_storage(self, key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
        """Exactly the bytes the pickle declares, refused before reading if the member cannot hold them honestly."""
        itemsize = np.dtype(storage_type.numpy_dtype).itemsize
        info = _member(self._archive, f"{self._prefix}/data/{key}", f"storage {key}")
        if info.file_size < numel * itemsize:
            raise CheckpointError(f"storage {key} is truncated ({info.file_size} bytes, {numel * itemsize} declared)")
        with self._archive.open(info) as member:
            raw = member.read(numel * itemsize)
        return np.frombuffer(raw, dtype=storage_type.numpy_dtype, count=numel)


def _member(archive: zipfile.ZipFile, name: str, what: str, limit: int = None) -> zipfile.ZipInfo:
    """A member's entry, refused if it is missing, inflates implausibly, or exceeds `limit` bytes."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CheckpointError(f"{what} is missing") from None
    if limit is not None and info.file_size > limit:
        raise CheckpointError(f"{what} is {info.file_size} bytes, more than the {limit} a checkpoint needs")
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(1 << 20, MAX_INFLATION * info.compress_size):
        raise CheckpointError(
            f"{what} inflates from {info.compress_size} to {info.file_size} bytes (a zip bomb; torch.save never compresses)"
        )
    return info


def _read_member(archive: zipfile.ZipFile, name: str, what: str, limit: int) -> bytes:
    with archive.open(_member(archive, name, what, limit)) as member:
        return member.read(limit + 1)


def load_torch_state_dict(path: Path) -> Dict[str, mx.array]:
    """Tensors of a torch.save'd state dict (zip format, PyTorch >= 1.6) as MLX arrays."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ElmError(f"{path.name} is not a PyTorch zip checkpoint (truncated, or saved in the legacy pre-1.6 format)")
    try:
        state = _unpickle(path)
    except (CheckpointError, ForbiddenGlobal) as e:
        raise type(e)(f"{path.name}: {e}") from None
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, zlib.error, NotImplementedError) as e:
        raise ElmError(f"{path.name} is corrupt or truncated ({str(e)[:200]})") from None
    except (TypeError, AttributeError, ValueError, KeyError, IndexError, OverflowError) as e:
        # The pickle VM applying an opcode to the wrong kind of object (APPEND to a number, ...).
        raise CheckpointError(f"{path.name} is not a valid state dict pickle ({type(e).__name__}: {str(e)[:120]})") from None
    return {name: tensor.to_mlx() for name, tensor in _tensors(path, state).items()}


def _unpickle(path: Path):
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ElmError(f"{path.name} is not a PyTorch checkpoint (no single data.pkl)")
        prefix = pickles[0][: -len("/data.pkl")]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and _read_member(archive, byteorder, "byteorder", 16).strip() != b"little":
            raise ElmError(f"{path.name} was saved on a big-endian machine, which is not supported")
        data = _read_member(archive, pickles[0], "data.pkl", MAX_PICKLE_BYTES)
        check_pickle_structure(data)
        return _StateDictUnpickler(data, archive, prefix).load()


def _tensors(path: Path, state) -> Dict[str, _Tensor]:
    if not isinstance(state, dict):
        raise ElmError(f"{path.name} holds a {type(state).__name__}, not a state dict of tensors")
    for key in ("model_state_dict", "state_dict"):  # training checkpoints nest the model's weights
        if isinstance(state.get(key), dict):
            state = state[key]
    bad = next((name for name, value in state.items() if not (isinstance(name, str) and isinstance(value, _Tensor))), None)
    if bad is not None:
        raise ElmError(f"{path.name}: entry {str(bad)[:80]!r} is a {type(state[bad]).__name__}, not a tensor")
    return state
