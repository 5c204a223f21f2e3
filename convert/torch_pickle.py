"""Read PyTorch `.pt` / `.bin` state dicts without torch and without running their code.

A torch.save file is a zip archive: `<name>/data.pkl` is a pickle describing
the tensors, `<name>/data/<key>` holds each storage's raw bytes. A pickle can
name any Python callable, so a plain `pickle.load` of an untrusted checkpoint
can run arbitrary code. This unpickler resolves only the handful of globals a
tensor state dict needs and rebuilds tensors itself from the raw bytes (bit
for bit, strides and shared storages included). Anything else is refused,
naming the global.
"""

import io
import pickle
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import mlx.core as mx
import numpy as np

from elm_mlx.errors import ElmError


class ForbiddenGlobal(ElmError):
    """The checkpoint's pickle references something a state dict never needs."""


@dataclass(frozen=True)
class _StorageType:
    name: str
    numpy_dtype: str  # how the bytes are read; bfloat16 is read as its raw uint16 bits
    mlx_dtype: mx.Dtype


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


@dataclass(frozen=True)
class _Storage:
    values: np.ndarray
    type: _StorageType


@dataclass(frozen=True)
class _Tensor:
    values: np.ndarray  # contiguous
    type: _StorageType

    def to_mlx(self) -> mx.array:
        if self.type.mlx_dtype == mx.bfloat16:  # raw bits: reinterpret, never convert
            return mx.array(self.values).view(mx.bfloat16)
        return mx.array(self.values).astype(self.type.mlx_dtype)


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *_ignored) -> _Tensor:
    """torch._utils._rebuild_tensor_v2: a strided view into a storage, copied out contiguous."""
    values, size, stride = storage.values, tuple(size), tuple(stride)
    if any(n == 0 for n in size):
        return _Tensor(np.zeros(size, values.dtype), storage.type)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or min(stride, default=0) < 0 or last >= values.size:
        raise ElmError("corrupt checkpoint: a tensor reaches outside its storage")
    view = np.lib.stride_tricks.as_strided(values[offset:], shape=size, strides=[s * values.itemsize for s in stride])
    return _Tensor(np.ascontiguousarray(view), storage.type)


def _rebuild_parameter(data: _Tensor, *_ignored) -> _Tensor:
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): t for name, t in _STORAGE_TYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix = archive, prefix
        self._storages: Dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(
                f"refusing to load: the checkpoint references {module}.{name}, which a tensor state dict never needs"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise ElmError(f"corrupt checkpoint: unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages:  # tensors sharing a storage share one read
            try:
                raw = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError:
                raise ElmError(f"corrupt checkpoint: storage {key} is missing") from None
            array = np.frombuffer(raw, dtype=storage_type.numpy_dtype)
            if array.size < numel:
                raise ElmError(f"corrupt checkpoint: storage {key} is truncated")
            self._storages[key] = _Storage(array, storage_type)
        return self._storages[key]


def load_torch_state_dict(path: Path) -> Dict[str, mx.array]:
    """Tensors of a torch.save'd state dict (zip format, PyTorch >= 1.6) as MLX arrays."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ElmError(f"{path.name} is not a PyTorch zip checkpoint (truncated, or saved in the legacy pre-1.6 format)")
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ElmError(f"{path.name} is not a PyTorch checkpoint (no single data.pkl)")
            prefix = pickles[0][: -len("/data.pkl")]
            byteorder = f"{prefix}/byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
                raise ElmError(f"{path.name} was saved on a big-endian machine, which is not supported")
            unpickler = _StateDictUnpickler(archive.read(pickles[0]), archive, prefix)
            state = unpickler.load()
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, zlib.error) as e:
        raise ElmError(f"{path.name} is corrupt or truncated ({e})") from None
    if not isinstance(state, dict):
        raise ElmError(f"{path.name} holds a {type(state).__name__}, not a state dict of tensors")
    for key in ("model_state_dict", "state_dict"):  # training checkpoints nest the model's weights
        if isinstance(state.get(key), dict):
            state = state[key]
    bad = next((name for name, value in state.items() if not isinstance(value, _Tensor)), None)
    if bad is not None:
        raise ElmError(f"{path.name}: entry {bad!r} is a {type(state[bad]).__name__}, not a tensor")
    return {name: tensor.to_mlx() for name, tensor in state.items()}
