"""Hugging Face Hub access shared by loading and conversion: one place that maps Hub failures to one-line errors."""

import re
from pathlib import Path
from typing import List, Sequence

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
    """Download `repo_id` (or find it in the local cache) with tqdm progress; returns its directory."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        if patterns is None:
            try:
                patterns = METADATA_PATTERNS + weight_patterns(HfApi().list_repo_files(repo_id))
            except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
                patterns = METADATA_PATTERNS + ["*.safetensors"]  # offline: whatever the cache holds
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns)))
    except GatedRepoError:
        raise ElmError(f"{repo_id} is gated on the Hugging Face Hub; accept its licence there and run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ElmError(f"{repo_id!r} is neither a local path nor a model on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        raise ElmError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached; "
            "connect to the internet once to download it, or pass a local path"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ElmError(f"downloading {repo_id} failed: {e}") from None
