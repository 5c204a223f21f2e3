"""Writing model directories safely, and reading the files of a source without leaving it.

Outputs are all or nothing and never replace an existing directory unless
asked; even then (--force) only one that is itself an earlier elm-mlx output.
Files read or copied from a source directory must lie inside it.
"""

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional

import mlx.core as mx

from .errors import ElmError

# Every name elm-mlx writes into a directory it makes: model directories (convert, fuse, the demo
# build), LoRA training checkpoints and bench results. --force replaces a directory only if it holds
# nothing but these (plain files, no links, no folders) and one of OUTPUT_MARKERS.
OUTPUT_FILES = frozenset(
    {
        "config.json", "README.md", "model.safetensors", "model.safetensors.index.json",
        "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
        "training.json", "loss.png",
        "adapters.safetensors", "adapter_config.json", "optimizer.safetensors", "state.json",
        "results.json", "results.md", "tps_by_size.png", "ablation.png", "aggregate_tps.png", "speedup.png",
    }
)  # fmt: skip
OUTPUT_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
OUTPUT_MARKERS = ("config.json", "adapter_config.json", "results.json")
MAX_OUTPUT_ENTRIES = 10_000  # far more than any output of ours; bounds the look at a foreign directory


def refuse_existing(path: Path, force: bool, keep: Iterable[Path] = ()) -> None:
    """Refuse an existing `path`, or with force one that is not an earlier output of ours.

    `keep` names what the new output is made from (its sources): never replaced, nor any folder holding them.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return
    if not force:
        raise ElmError(f"{path} already exists; pass --force to replace it")
    reason = _not_replaceable(path, keep)
    if reason:
        raise ElmError(f"--force will not replace {path}: {reason}")


def _not_replaceable(path: Path, keep: Iterable[Path]) -> Optional[str]:
    """Why `path` is no earlier output of ours to replace, or None when it is one."""
    if path.is_symlink():
        return "it is a symbolic link"
    if not path.is_dir():
        return "it is not a directory"
    real = path.resolve()
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor) or real == Path.home().resolve():
        return "it is the root or home directory"
    if real == cwd or real in cwd.parents:
        return "it is (or holds) the current directory"
    for source in keep:
        source = Path(source).expanduser().resolve()
        if real == source or real in source.parents:
            return f"it is (or holds) the source {source}"
    try:
        names = _output_names(path)
    except OSError as e:
        return f"cannot look inside it ({e.strerror or e})"
    if isinstance(names, str):
        return names
    if names and not any(marker in names for marker in OUTPUT_MARKERS):
        return f"it holds none of {', '.join(OUTPUT_MARKERS)}, so it is no elm-mlx output"
    return None


def _output_names(path: Path):
    """The names in `path` when all are plain files elm-mlx writes, else why not (a str)."""
    names = []
    with os.scandir(path) as entries:
        for entry in entries:
            if len(names) >= MAX_OUTPUT_ENTRIES:
                return "it holds more files than any elm-mlx output"
            known = entry.name in OUTPUT_FILES or OUTPUT_SHARD.fullmatch(entry.name)
            if not (known and entry.is_file(follow_symlinks=False)):
                return f"it holds {entry.name!r}, which is not an elm-mlx output file (remove it yourself if that is intended)"
            names.append(entry.name)
    return names


def write_text_atomically(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary sibling, renamed over `path` once complete."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: Path, force: bool = False, keep: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; it becomes `path` only if the block succeeds.

    On any error the temporary directory is removed and `path` is untouched.
    With force, an existing earlier output (see refuse_existing) is swapped
    out only once the new one is complete: old renamed aside, new renamed in,
    then old removed. OSErrors become one-line ElmErrors naming `path`.
    """
    shown, path, keep = Path(path), Path(os.path.abspath(path)), list(keep)
    refuse_existing(shown, force, keep)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    except OSError as e:
        raise ElmError(f"cannot write {shown}: {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any mkdir
        yield staging
        refuse_existing(shown, force, keep)  # something may have appeared, or changed, meanwhile
        _swap_in(staging, path)
    except OSError as e:
        raise ElmError(f"writing {shown} failed: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the swap succeeded


def _swap_in(staging: Path, path: Path) -> None:
    """Rename `staging` to `path`; an existing `path` is set aside first, restored if the rename fails."""
    if not os.path.lexists(path):
        os.replace(staging, path)
        return
    holder = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    old = holder / path.name
    os.replace(path, old)
    try:
        os.replace(staging, path)
    except OSError:
        os.replace(old, path)
        raise
    finally:
        shutil.rmtree(holder, ignore_errors=True)  # the old output, or nothing once it is restored


def source_root(directory: Path) -> Path:
    """The folder a source directory's files may resolve into: the directory itself, or for a
    Hugging Face cache snapshot (<repo>/snapshots/<revision>) its repo folder, whose blobs/ they link to."""
    directory = Path(directory).resolve()
    repo = directory.parent.parent
    if directory.parent.name == "snapshots" and (repo / "blobs").is_dir():
        return repo
    return directory


def file_in_source(directory: Path, name: str, what: str = "file") -> Path:
    """directory/name, refused unless `name` is a plain file name and the file, links resolved, lies in the source."""
    directory = Path(directory)
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name or "\\" in name:
        raise ElmError(f"{what} {name!r} in {directory} is not a plain file name inside that directory")
    file = directory / name
    if os.path.lexists(file) and not file.resolve().is_relative_to(source_root(directory)):
        raise ElmError(f"{what} {file} links to {file.resolve()}, outside {directory}; refusing to read it")
    return file


def read_small_file(file: Path, limit: int, what: str = "file") -> bytes:
    """The bytes of `file`, refused (without reading it all) when it is larger than `limit`."""
    try:
        with open(file, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ElmError(f"cannot read {what} {file}: {e.strerror or e}") from None
    if len(data) > limit:
        raise ElmError(f"{what} {file} is larger than {limit / (1 << 20):g} MiB; refusing to read it")
    return data


def read_json_object(file: Path, limit: int, what: str = "file") -> dict:
    """A small JSON file holding an object, or a one-line ElmError saying what is wrong with it."""
    data = read_small_file(file, limit, what)
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and invalid UTF-8 are ValueErrors
        raise ElmError(f"{what} {file} is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(value, dict):
        raise ElmError(f"{what} {file} must hold a JSON object, not {type(value).__name__}")
    return value


def read_safetensors(file: Path) -> Dict[str, mx.array]:
    """All tensors of one .safetensors file, dtypes as stored (bfloat16 included)."""
    try:
        return mx.load(str(file))
    except (RuntimeError, ValueError, OSError) as e:
        raise ElmError(f"cannot read {Path(file).name} (truncated or not safetensors): {e}") from None


def save_weights(directory: Path, weights: Dict[str, mx.array], max_shard_bytes: int = 5 << 30) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors shards plus model.safetensors.index.json."""
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = weights[name]
        size += nbytes
    shards.append(current)

    if len(shards) == 1:
        mx.save_safetensors(str(directory / "model.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(directory / file_name), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, file_name))
    index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
