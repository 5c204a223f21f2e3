"""Writing model directories safely: all or nothing, never over an existing one unless asked."""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

import mlx.core as mx

from .errors import ElmError


def refuse_existing(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise ElmError(f"{path} already exists; pass --force to replace it")


@contextmanager
def atomic_directory(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; it becomes `path` only if the block succeeds.

    On any error the temporary directory is removed and `path` is untouched.
    With force, an existing `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like any mkdir
    try:
        yield staging
        refuse_existing(path, force)  # something may have appeared meanwhile
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
