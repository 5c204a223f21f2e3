"""Hostile PyTorch checkpoints: each is made here from raw pickle opcodes or by patching torch.save output.

Bombs (deep nesting, zero strides, zip bombs, storages copied over and over)
run through the converter's CLI in a child under a memory cap; the rest call
the loader directly. Every one must end in a single line naming the file.
"""

import json
import pickle
import pickletools
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from convert.torch_pickle import load_torch_state_dict
from elm_mlx.errors import ElmError
from hostile import run_limited

MEMORY = 1500 << 20

# --------------------------------------------------------------------------
# A tiny pickle assembler, enough for torch's state dict format
# --------------------------------------------------------------------------

MARK, TUPLE, EMPTY_DICT, SETITEMS, REDUCE, BINPERSID, STOP = b"(", b"t", b"}", b"u", b"R", b"Q", b"."


def value(v) -> bytes:
    """The opcodes that push a plain value (int, str, tuple of them), with no memo entries."""
    return pickletools.optimize(pickle.dumps(v, protocol=2))[2:-1]


def glob(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
    return MARK + value("storage") + glob("torch", kind) + value(key) + value("cpu") + value(numel) + TUPLE + BINPERSID


def tensor(storage_ops: bytes, offset: int, size: tuple, stride: tuple) -> bytes:
    hooks = glob("collections", "OrderedDict") + value(()) + REDUCE
    args = MARK + storage_ops + value(offset) + value(size) + value(stride) + value(False) + hooks + TUPLE
    return glob("torch._utils", "_rebuild_tensor_v2") + args + REDUCE


def state_dict(entries: dict) -> bytes:
    """entries: name -> opcodes of the value."""
    body = b"".join(value(k) + v for k, v in entries.items())
    return b"\x80\x02" + EMPTY_DICT + MARK + body + SETITEMS + STOP


def write_checkpoint(path: Path, pickle_bytes: bytes, storages: dict = None) -> Path:
    """A torch.save zip: archive/data.pkl, archive/byteorder, archive/data/<key> (stored, as torch writes them)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", raw)
    return path


def deflate_bomb(size: int) -> bytes:
    """A raw deflate stream of `size` zero bytes, a few KB per 16 MiB, made without compressing it all.

    Full-flushed blocks carry no back-references across the flush, so one
    compressed chunk repeated is a valid stream of that chunk repeated.
    """
    chunk = 16 << 20
    assert size % chunk == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15)
    return block * (size // chunk) + final.compress(b"") + final.flush()


def write_zip_raw(path: Path, members: list) -> Path:
    """A zip written byte by byte: members are (name, method, compressed bytes, declared size).

    Stored members get their true CRC; deflated ones zero: a reader that inflated
    a bomb would exhaust memory long before it checked one.
    """
    out, central = bytearray(), bytearray()
    for name, method, data, size in members:
        raw_name, offset = name.encode(), len(out)
        crc = zlib.crc32(data) if method == zipfile.ZIP_STORED else 0
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0, crc, len(data), size, len(raw_name), 0)
        out += b"PK\x03\x04" + fields + raw_name + data
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHII", 0, 0, 0, 0, offset) + raw_name
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


def one_float_tensor() -> bytes:
    return tensor(storage("0", 1), 0, (1,), (1,))


# --------------------------------------------------------------------------
# Bombs, end to end through `python -m convert` under a memory cap
# --------------------------------------------------------------------------

DEPTH = 300_000


def deep_tuple_key(directory: Path) -> None:
    key = value(1) + b"\x85" * DEPTH  # TUPLE1 300k times: a key CPython hashes recursively
    write_checkpoint(directory / "pytorch_model.bin", b"\x80\x02" + EMPTY_DICT + key + one_float_tensor() + b"s.", {"0": bytes(4)})


def deep_marked_lists(directory: Path) -> None:
    nested = MARK * DEPTH + b"l" * DEPTH  # LIST after MARK, 300k deep
    write_checkpoint(directory / "pytorch_model.bin", state_dict({"w": nested}))


def zero_stride_tensor(directory: Path) -> None:
    # One float of storage viewed as 40000 x 40000 (6.4 GB if copied out).
    entries = {"transformer.norm.weight": tensor(storage("0", 1), 0, (40_000, 40_000), (0, 0))}
    write_checkpoint(directory / "pytorch_model.bin", state_dict(entries), {"0": bytes(4)})


def storage_copied_over_and_over(directory: Path) -> None:
    # 400 full views of one 4 MiB storage: 1.6 GB of copies from a 4 MiB file.
    numel = 1 << 20
    shared = storage("0", numel)
    entries = {f"w{i}": tensor(shared, 0, (numel,), (1,)) for i in range(400)}
    write_checkpoint(directory / "pytorch_model.bin", state_dict(entries), {"0": bytes(4 * numel)})


def deflated_storage(directory: Path) -> None:
    size = 2 << 30  # 2 GiB of zeros in ~40 KB
    pkl = state_dict({"w": tensor(storage("0", size // 4), 0, (size // 4,), (1,))})
    members = [("archive/data.pkl", 0, pkl, len(pkl)), ("archive/data/0", zipfile.ZIP_DEFLATED, deflate_bomb(size), size)]
    write_zip_raw(directory / "pytorch_model.bin", members)


def deflated_pickle(directory: Path) -> None:
    size = 2 << 30
    write_zip_raw(directory / "pytorch_model.bin", [("archive/data.pkl", zipfile.ZIP_DEFLATED, deflate_bomb(size), size)])


def huge_memo_index(directory: Path) -> None:
    # LONG_BINPUT 4e9: CPython's unpickler grows its memo array to the index (tens of GB).
    write_checkpoint(directory / "pytorch_model.bin", b"\x80\x02" + EMPTY_DICT + b"r\xff\xff\xff\xf0" + STOP)


BOMBS = [
    (deep_tuple_key, "nests more than"),
    (deep_marked_lists, "nests more than"),
    (zero_stride_tensor, "views storage 0, which holds only 1"),
    (storage_copied_over_and_over, "copy storage 0 more than"),
    (deflated_storage, "zip bomb"),
    (deflated_pickle, "data.pkl is 2147483648 bytes"),
    (huge_memo_index, "memo index 4043309055 is out of range"),
]


@pytest.mark.parametrize("make, message", BOMBS, ids=[make.__name__ for make, _ in BOMBS])
def test_checkpoint_bombs_are_refused_in_one_line_within_memory(tmp_path, make, message):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(tiny_config()))
    make(source)
    out = tmp_path / "out"
    result = run_limited(
        [sys.executable, "-m", "convert", "--hf-path", str(source), "--mlx-path", str(out)], memory_bytes=MEMORY, timeout=120
    )
    line = result.one_line_error()
    assert result.returncode == 1, result.stderr
    assert line.startswith("error: pytorch_model.bin") and message in line, line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --------------------------------------------------------------------------
# Malformed but small: the loader itself, in process
# --------------------------------------------------------------------------

REBUILD = glob("torch._utils", "_rebuild_tensor_v2")
SMALL = {
    "rebuild with no arguments": (state_dict({"w": REBUILD + value(()) + REDUCE}), "other than a storage"),
    "rebuild from an int": (state_dict({"w": REBUILD + value((5, 0, (1,), (1,))) + REDUCE}), "other than a storage"),
    "size is a string": (state_dict({"w": tensor(storage("0", 1), 0, "ab", (1,))}), "size is not a tuple"),
    "negative size": (state_dict({"w": tensor(storage("0", 1), 0, (-1,), (1,))}), "size is not a tuple"),
    "size and stride differ": (state_dict({"w": tensor(storage("0", 4), 0, (2, 2), (1,))}), "2 sizes but 1 strides"),
    "negative offset": (state_dict({"w": tensor(storage("0", 4), -1, (1,), (1,))}), "other than a storage and an offset"),
    "offset past the end": (state_dict({"w": tensor(storage("0", 1), 3, (1,), (1,))}), "reaches outside storage 0"),
    "huge dimensions": (state_dict({"w": tensor(storage("0", 1), 0, (1 << 62, 1 << 62), (1, 1))}), "reaches outside"),
    "too many dimensions": (state_dict({"w": tensor(storage("0", 1), 0, (1,) * 40, (1,) * 40)}), "at most 16"),
    "absurd storage size": (state_dict({"w": tensor(storage("0", 10**15), 0, (1,), (1,))}), "storage 0 is truncated"),
    "missing storage": (state_dict({"w": tensor(storage("9", 1), 0, (1,), (1,))}), "storage 9 is missing"),
    "storage key not a string": (state_dict({"w": tensor(storage(7, 1), 0, (1,), (1,))}), "bad key or element count"),
    "persistent id a string": (state_dict({"w": b"Pfoo\n"}), "unexpected persistent id (a str"),
    "OrderedDict of an int": (state_dict({"w": glob("collections", "OrderedDict") + value((5,)) + REDUCE}), "list of pairs"),
    "parameter of a string": (
        state_dict({"w": glob("torch._utils", "_rebuild_parameter") + value(("x",)) + REDUCE}),
        "parameter is rebuilt from something other than a tensor",
    ),
    "calling a storage type": (state_dict({"w": glob("torch", "FloatStorage") + value(()) + REDUCE}), "not a valid state dict"),
    "BUILD on a global": (state_dict({"w": REBUILD + value({"a": 1}) + b"b"}), "modify one of the globals"),
    "BUILD on a tensor": (state_dict({"w": one_float_tensor() + value({"values": 1}) + b"b"}), "modify a tensor"),
    "APPEND to an int": (state_dict({"w": value(3) + value(4) + b"a"}), "not a valid state dict"),
    "list as a key": (b"\x80\x02" + EMPTY_DICT + b"]" + value(1) + b"s.", "not a valid state dict"),
    "list in itself": (b"\x80\x02]q\x00h\x00a.", "nests it in itself"),
    "changing a nested list": (b"\x80\x02]q\x00\x85q\x01h\x00K\x01a.", "after nesting it"),
    "memo get of nothing": (b"\x80\x02h\x05.", "malformed"),
    "stack underflow": (b"\x80\x02a.", "malformed"),
    "truncated opcode": (b"\x80\x02X\xff\xff\x00\x00ab", "malformed"),
    "forbidden global": (state_dict({"w": glob("os", "system") + value(("true",)) + REDUCE}), "references os.system"),
    "not a dict": (b"\x80\x02K\x05.", "holds a int, not a state dict"),
    "entry not a tensor": (state_dict({"w": value(5)}), "entry 'w' is a int"),
}


@pytest.mark.parametrize("case", list(SMALL))
def test_malformed_pickles_get_one_line_naming_the_file(tmp_path, case):
    pkl, message = SMALL[case]
    path = write_checkpoint(tmp_path / "pytorch_model.bin", pkl, {"0": bytes(16)})
    with pytest.raises(ElmError) as caught:
        load_torch_state_dict(path)
    text = str(caught.value)
    assert text.startswith("pytorch_model.bin") and message in text and "\n" not in text, text


def test_hand_built_checkpoint_loads_exactly(tmp_path):
    """The assembler above writes what torch would: a strided view of a shared storage comes out right."""
    raw = np.arange(6, dtype="<f4").tobytes()
    shared = storage("0", 6)
    entries = {"a": tensor(shared, 0, (2, 3), (3, 1)), "t": tensor(shared, 1, (2, 2), (1, 3))}
    weights = load_torch_state_dict(write_checkpoint(tmp_path / "x.bin", state_dict(entries), {"0": raw}))
    assert weights["a"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert weights["t"].tolist() == [[1, 4], [2, 5]]


def test_real_torch_state_dicts_still_load(tmp_path):
    """A module's state_dict (OrderedDict with _metadata), parameters, a nested training checkpoint."""
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    state = module.state_dict()
    torch.save(state, tmp_path / "a.bin")
    torch.save({"model_state_dict": state, "epoch": 3}, tmp_path / "b.pt")
    torch.save({"p": torch.nn.Parameter(torch.ones(2)), "tied": state["0.weight"], "same": state["0.weight"]}, tmp_path / "c.bin")
    for name in ("a.bin", "b.pt"):
        loaded = load_torch_state_dict(tmp_path / name)
        assert sorted(loaded) == sorted(state)
        assert np.array_equal(np.array(loaded["0.weight"]), state["0.weight"].numpy())
    assert load_torch_state_dict(tmp_path / "c.bin")["p"].tolist() == [1.0, 1.0]


def test_zero_stride_tensor_saved_by_torch_is_refused(tmp_path):
    """torch.save keeps expand()'s zero strides: a tiny file describing a 10 GB tensor, read under the memory cap."""
    torch = pytest.importorskip("torch")
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(tiny_config()))
    torch.save({"w": torch.zeros(1).expand(50_000, 50_000)}, source / "pytorch_model.bin")
    assert (source / "pytorch_model.bin").stat().st_size < 2000
    out = tmp_path / "out"
    result = run_limited(
        [sys.executable, "-m", "convert", "--hf-path", str(source), "--mlx-path", str(out)], memory_bytes=MEMORY, timeout=120
    )
    line = result.one_line_error()
    assert result.returncode == 1, result.stderr
    assert line.startswith("error: pytorch_model.bin") and "a tensor of 2500000000 elements views storage 0, which holds only 1" in line
    assert not out.exists()
