"""A cache of converted, processed weights, so a model is converted only once per machine.

Each entry holds the HookedTransformer's state dict (safetensors), its config, its tokenizer and
what is known of the checkpoint it came from (``source.json``: its own parameter count). Entries
are keyed by the source's identity, so a different revision or a changed folder is a miss.
For the bundled SmolLM2 this skips the GGUF dequantization and the conversion, by far the slowest
part of a load. Entries are written to a temporary folder and renamed into place, so a killed
run never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import transformer_lens
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_WEIGHTS_FILE = "model.safetensors"
_CONFIG_FILE = "hooked_config.json"
_TOKENIZER_DIR = "tokenizer"
_SOURCE_FILE = "source.json"
# 2: keyed by the hub snapshot's commit; source.json added.
# 3: a tensor shared under several names is stored once, under the first (older readers expect
#    another of its names).
_FORMAT_VERSION = 3


def cache_root() -> Path:
    """``$UNRAVELED_CACHE``, by default ``~/.cache/unraveled``."""
    return Path(os.environ.get("UNRAVELED_CACHE", "~/.cache/unraveled")).expanduser()


def cache_key(slug: str, weights: str, fingerprint: dict[str, Any]) -> str:
    """A folder name that changes whenever the source, the processing or TransformerLens does."""
    identity = {
        "format": _FORMAT_VERSION,
        "transformer_lens": transformer_lens.__version__ if hasattr(transformer_lens, "__version__") else "",
        "weights": weights,
        **fingerprint,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return f"{slug}-{weights}-{digest}"


def _entry(key: str) -> Path:
    return cache_root() / "weights" / key


def has_entry(key: str) -> bool:
    """Whether a complete entry exists for ``key``."""
    return (_entry(key) / _WEIGHTS_FILE).is_file() and (_entry(key) / _SOURCE_FILE).is_file()


def _config_to_json(cfg: HookedTransformerConfig) -> dict[str, Any]:
    encoded = {}
    for field, value in cfg.to_dict().items():
        if isinstance(value, torch.dtype):
            encoded[field] = {"torch_dtype": str(value).removeprefix("torch.")}
        elif field != "device":
            encoded[field] = value
    return encoded


def _config_from_json(encoded: dict[str, Any]) -> HookedTransformerConfig:
    decoded = {
        field: getattr(torch, value["torch_dtype"]) if isinstance(value, dict) and "torch_dtype" in value else value
        for field, value in encoded.items()
    }
    return HookedTransformerConfig.from_dict({**decoded, "device": "cpu"})


def read_tokenizer_and_context(key: str) -> tuple[PreTrainedTokenizerBase, int] | None:
    """The tokenizer and context length of the entry for ``key``, without its weights; None when
    there is no entry or it can't be read (``load_entry`` then removes it)."""
    if not has_entry(key):
        return None
    try:
        n_ctx = int(json.loads((_entry(key) / _CONFIG_FILE).read_text())["n_ctx"])
        return AutoTokenizer.from_pretrained(_entry(key) / _TOKENIZER_DIR, local_files_only=True), n_ctx
    except Exception:  # a damaged entry: json, tokenizers and the file system each raise their own
        return None


def _read_weights(model: HookedTransformer, path: Path) -> None:
    """Copy the stored tensors into ``model``'s parameters and buffers one at a time.

    ``safetensors.torch.load_model`` reads the whole file into memory before copying it into the
    model, so a load briefly held the weights twice. Names missing from the file are allowed only
    where ``save_model`` dropped them: tensors sharing storage with a stored one.
    """
    own = model.state_dict()
    with safetensors.safe_open(str(path), framework="pt", device="cpu", backend="pread") as stored:
        names = set(stored.keys())
        unexpected = sorted(names - own.keys())
        stored_storages = {own[name].untyped_storage().data_ptr() for name in names & own.keys()}
        missing = sorted(
            name for name in own.keys() - names if own[name].untyped_storage().data_ptr() not in stored_storages
        )
        if missing or unexpected:
            raise ValueError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name in names:
                own[name].copy_(stored.get_tensor(name))


def load_entry(key: str) -> tuple[HookedTransformer, int] | None:
    """The cached model for ``key``, on the CPU, and its checkpoint's parameter count; None when
    there is no entry, or when the entry can't be read (it is then removed, saying so, and the
    caller converts the weights again)."""
    entry = _entry(key)
    if not has_entry(key):
        return None
    try:
        cfg = _config_from_json(json.loads((entry / _CONFIG_FILE).read_text()))
        tokenizer = AutoTokenizer.from_pretrained(entry / _TOKENIZER_DIR, local_files_only=True)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
        _read_weights(model, entry / _WEIGHTS_FILE)
        checkpoint_parameters = int(json.loads((entry / _SOURCE_FILE).read_text())["checkpoint_parameters"])
    except Exception as error:  # a damaged file: safetensors, json, tokenizers and torch each raise their own
        logger.warning("the converted-weights cache entry %s can't be read (%s: %s); removing it and converting again", entry, type(error).__name__, error)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return model.eval(), checkpoint_parameters


def _tensors_to_store(model: HookedTransformer) -> dict[str, torch.Tensor]:
    """The state dict as safetensors takes it: each tensor shared under several names (the
    layers' common rotary tables) once, and contiguous (``store_rearranged`` gives some weights
    another layout; those are copied)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if identity not in seen:
            seen.add(identity)
            tensors[name] = tensor.contiguous()
    return tensors


def store_entry(key: str, model: HookedTransformer, checkpoint_parameters: int) -> Path:
    """Write ``model`` under ``key``, atomically, with its checkpoint's parameter count; returns
    the entry's folder."""
    entry = _entry(key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
    try:
        safetensors.torch.save_file(_tensors_to_store(model), str(staging / _WEIGHTS_FILE))
        (staging / _CONFIG_FILE).write_text(json.dumps(_config_to_json(model.cfg), indent=1, default=str))
        model.tokenizer.save_pretrained(staging / _TOKENIZER_DIR)
        (staging / _SOURCE_FILE).write_text(json.dumps({"checkpoint_parameters": checkpoint_parameters}))
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("cached converted weights in %s", entry)
    return entry
