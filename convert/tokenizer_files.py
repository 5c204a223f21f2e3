"""Finding the tokenizer a converted model ships with.

Apple's OpenELM repos have none: OpenELM uses Meta's Llama-2 SentencePiece
model. In order: an explicit --tokenizer (file, directory or hub id), the
source's own tokenizer files, then an ungated Hub copy of the Llama-2
tokenizer (ELM_MLX_TOKENIZER_REPO overrides which), checked by hash.

Whatever is copied into the output is checked first: each file found in a
directory must lie inside it (no symlink out), and each is what its name
says (SentencePiece loads tokenizer.model; tokenizer.json is a JSON object
with a "model"; the configs are JSON objects), within a size bound.
"""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional

from elm_mlx.errors import ElmError
from elm_mlx.files import file_in_source, read_json_object, read_small_file
from elm_mlx.hub import looks_like_repo_id
from elm_mlx.tokenizer import DEFAULT_CHAT_TEMPLATE, TOKENIZER_FILES

DEFAULT_TOKENIZER_REPO = "hf-internal-testing/llama-tokenizer"
LLAMA2_TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
MAX_TOKENIZER_BYTES = 64 << 20  # Llama-2's tokenizer.model is 0.5 MB, large tokenizer.json files ~30 MB


def default_tokenizer_repo() -> str:
    return os.environ.get("ELM_MLX_TOKENIZER_REPO", DEFAULT_TOKENIZER_REPO)


def find_tokenizer(option: Optional[str], source_dir: Optional[Path], model_type: str = "openelm") -> Dict[str, Path]:
    """File name in the output directory -> file to copy there, each one checked (see the module docstring)."""
    if option:
        path = Path(option).expanduser()
        if path.is_file():
            return {_tokenizer_kind(path, option): path}
        if path.is_dir():
            found = _tokenizer_files_in(path)
            if not found:
                raise ElmError(f"--tokenizer {option}: no tokenizer.model or tokenizer.json there")
            return found
        if looks_like_repo_id(option):
            return _checked({"tokenizer.model": _download_tokenizer(option)})
        raise ElmError(f"--tokenizer {option!r} is neither a file, a directory nor a Hugging Face repo id")
    if source_dir is not None:
        found = _tokenizer_files_in(source_dir)
        if found:
            return found
    if model_type != "openelm":  # the Llama-2 fallback is OpenELM's tokenizer, nobody else's
        raise ElmError("no tokenizer: the source has no tokenizer.model or tokenizer.json; pass --tokenizer")
    return _checked({"tokenizer.model": _download_tokenizer(default_tokenizer_repo())})


def _tokenizer_kind(path: Path, option: str) -> str:
    """The output name of a tokenizer file named by --tokenizer, decided by its content."""
    for name in ("tokenizer.model", "tokenizer.json"):
        try:
            check_tokenizer_file(name, path)
            return name
        except ElmError:
            pass
    raise ElmError(f'--tokenizer {option}: not a SentencePiece model nor a tokenizer.json (a JSON object with a "model")')


def _tokenizer_files_in(directory: Path) -> Dict[str, Path]:
    """The tokenizer files a directory holds, each inside it and checked; {} when it has no tokenizer."""
    files = {name: file_in_source(directory, name, "tokenizer file") for name in TOKENIZER_FILES}
    found = {name: file for name, file in files.items() if file.is_file()}
    if "tokenizer.model" not in found and "tokenizer.json" not in found:
        return {}
    return _checked(found)


def _checked(files: Dict[str, Path]) -> Dict[str, Path]:
    for name, file in files.items():
        check_tokenizer_file(name, file)
    return files


def check_tokenizer_file(name: str, file: Path) -> None:
    """Refuse (ElmError) a file that is not what its output name says, or is larger than any real one."""
    if name == "tokenizer.model":
        import sentencepiece as spm

        try:
            loaded = spm.SentencePieceProcessor().LoadFromSerializedProto(read_small_file(file, MAX_TOKENIZER_BYTES, "tokenizer"))
        except RuntimeError:
            loaded = False
        if not loaded:
            raise ElmError(f"tokenizer {file} is not a SentencePiece model")
    elif name.endswith(".json"):
        value = read_json_object(file, MAX_TOKENIZER_BYTES, "tokenizer file")
        if name == "tokenizer.json" and not isinstance(value.get("model"), dict):
            raise ElmError(f'tokenizer {file} is not a tokenizer.json: it has no "model" object')
    else:
        try:
            read_small_file(file, MAX_TOKENIZER_BYTES, "tokenizer file").decode("utf-8")
        except UnicodeDecodeError:
            raise ElmError(f"tokenizer file {file} is not UTF-8 text") from None


def _download_tokenizer(repo_id: str) -> Path:
    """tokenizer.model from a Hub repo, through elm_mlx.hub (one quick request decides whether the Hub answers)."""
    from elm_mlx.hub import snapshot

    try:
        path = snapshot(repo_id, ["tokenizer.model"]) / "tokenizer.model"
    except ElmError as e:
        raise ElmError(
            f"no tokenizer: the source has none and {repo_id}/tokenizer.model could not be fetched ({e}); "
            "pass --tokenizer /path/to/tokenizer.model (Meta's Llama-2 tokenizer)"
        ) from None
    if not path.is_file():
        raise ElmError(
            f"no tokenizer: {repo_id} has no tokenizer.model; pass --tokenizer /path/to/tokenizer.model (Meta's Llama-2 tokenizer)"
        )
    if repo_id == default_tokenizer_repo() and _sha256(path) != LLAMA2_TOKENIZER_SHA256:
        print(f"warning: {repo_id}/tokenizer.model is not the Llama-2 tokenizer OpenELM was trained with", file=sys.stderr)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install_tokenizer(files: Dict[str, Path], out_dir: Path, model_name: str) -> None:
    """Copy the tokenizer files and make sure a tokenizer_config.json describes them.

    The written config lets transformers (and so mlx-lm) load a bare
    tokenizer.model too; -Instruct models get the Zephyr chat template.
    """
    for name, source in files.items():
        shutil.copyfile(source.resolve(), out_dir / name)  # checked to lie inside its directory
    if "tokenizer_config.json" in files:
        return
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
    }
    if "instruct" in model_name.lower():
        config["chat_template"] = DEFAULT_CHAT_TEMPLATE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
