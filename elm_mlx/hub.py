"""Hugging Face Hub access shared by loading and conversion: one place that maps Hub failures to one-line errors."""

import importlib.util
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .errors import ElmError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Everything a model directory may need besides its weights.
METADATA_PATTERNS = ["*.json", "tokenizer.model", "*.jinja"]


def looks_like_repo_id(text: str) -> bool:
    """'org/name', as opposed to a local path."""
    return bool(_REPO_ID.match(text))


def weight_patterns(files: Sequence[str]) -> List[str]:
    """Download only one copy of the weights: safetensors when a repo has them, else PyTorch .bin."""
    if any(f.endswith(".safetensors") for f in files):
        return ["*.safetensors"]
    return ["*.bin"]


def snapshot(repo_id: str, patterns: Sequence[str] = None) -> Path:
    """Download `repo_id` (or find it in the local cache) with tqdm progress; returns its directory.

    One request (the repo's file list, with the Hub's metadata timeout and no
    retries) decides whether the Hub answers; if it does not, the cache is
    used at once, so an unreachable Hub costs seconds and no warnings, not
    huggingface_hub's minute of retries.
    """
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    network_errors = (HfHubHTTPError, *_network_errors())
    try:
        try:
            info = HfApi().model_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except network_errors as e:  # offline mode, no network, the Hub down: the cache may have it
            if isinstance(e, RepositoryNotFoundError):
                raise
            return _cached(repo_id, patterns, e)
        if patterns is None:
            patterns = METADATA_PATTERNS + weight_patterns([s.rfilename for s in info.siblings or []])
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except GatedRepoError:  # also raised by the download itself when the listing was public
        raise ElmError(f"{repo_id} is gated on the Hugging Face Hub; accept its licence there and run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ElmError(f"{repo_id!r} is neither a local path nor a model on the Hugging Face Hub") from None
    except network_errors as e:
        raise ElmError(f"downloading {repo_id} failed: {_one_line(e)}; run the command again to resume") from None


def _cached(repo_id: str, patterns: Optional[Sequence[str]], error: Exception) -> Path:
    """The cached copy of `repo_id` when the Hub did not answer (`error` says why)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = list(patterns) if patterns is not None else METADATA_PATTERNS + ["*.safetensors", "*.bin"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if type(error).__name__ == "OfflineModeIsEnabled":
        raise ElmError(f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; unset it to download") from None
    raise ElmError(
        f"cannot reach the Hugging Face Hub and no cached copy of {repo_id}: {_one_line(error)} "
        "(HF_HUB_OFFLINE=1 uses only the cache)"
    ) from None


def _network_errors() -> tuple:
    """What huggingface_hub's HTTP client raises when the Hub cannot be reached.

    requests (huggingface_hub < 1.0) raises OSErrors; httpx (1.x) and httpx2
    (later) raise their TransportError. Only the installed clients are named.
    """
    errors = [OSError]
    for module in ("httpx", "httpx2"):
        if module in sys.modules or importlib.util.find_spec(module) is not None:
            errors.append(importlib.import_module(module).TransportError)
    return tuple(errors)


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
