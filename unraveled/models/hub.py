"""The Hugging Face side: the local cache first, then the hub, and a fast answer when neither works.

TransformerLens retries an unreachable hub for a long while before failing; a short probe here
(``HUB_PROBE_TIMEOUT_S``) answers sooner and says what was tried.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download, try_to_load_from_cache

logger = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot of ``repo_id`` that the local Hugging Face cache's ``main`` points at.

    None unless it has a config. The folder's name is the commit hash (``snapshot_revision``).
    """
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def snapshot_revision(snapshot: Path) -> str:
    """The commit hash a snapshot folder holds: the hub cache names each snapshot after it."""
    return snapshot.name


# What a conversion reads: the configs, the tokenizer and the safetensors weights, not the same
# weights again in other frameworks' formats.
_CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]
_BIN_WEIGHTS = ["pytorch_model*.bin"]


def download_snapshot(repo_id: str) -> Path:
    """Download ``repo_id``'s checkpoint into the Hugging Face cache; its snapshot folder.

    PyTorch ``.bin`` weights are fetched only for a repository that has no safetensors weights.
    """
    snapshot = Path(snapshot_download(repo_id, allow_patterns=_CHECKPOINT_FILES))
    if not any(snapshot.glob("*.safetensors")):
        snapshot = Path(
            snapshot_download(repo_id, allow_patterns=[*_CHECKPOINT_FILES, *_BIN_WEIGHTS])
        )
    return snapshot


def hub_unreachable_reason(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hugging Face hub can't be used right now, or None when it answers."""
    if hf_constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = hf_constants.ENDPOINT
    try:
        httpx.head(endpoint, timeout=timeout_s, follow_redirects=False)
    except httpx.HTTPError as error:
        return f"the hub at {endpoint} did not answer within {timeout_s:.0f} s ({error})"
    return None


def hf_cache_dir() -> str:
    """Where the Hugging Face cache lives on this machine (follows HF_HOME and HF_HUB_CACHE)."""
    return str(hf_constants.HF_HUB_CACHE)
