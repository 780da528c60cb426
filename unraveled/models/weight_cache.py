"""A cache of converted, processed weights, so a model is converted only once per machine.

Each entry holds the HookedTransformer's state dict (safetensors), its config, its tokenizer and
what is known of the checkpoint it came from (``source.json``: its own parameter count). Entries
are keyed by the source's identity, so a different revision or a changed folder is a miss.
For the bundled SmolLM2 this skips the GGUF dequantization and the conversion, by far the slowest
part of a load. Entries are written to a temporary folder and renamed into place, so a killed
run never leaves a half-written entry behind.
"""

from __future__ import annotations

import errno
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

from unraveled.models.layout import inverse, memory_order

logger = logging.getLogger(__name__)

_WEIGHTS_FILE = "model.safetensors"
_CONFIG_FILE = "hooked_config.json"
_TOKENIZER_DIR = "tokenizer"
_SOURCE_FILE = "source.json"
# 2: keyed by the hub snapshot's commit; source.json added.
# 3: a tensor shared under several names is stored once, under the first (older readers expect
#    another of its names).
# 4: tensors stored in their memory order, with the layout in the file's metadata: a tied
#    unembedding is stored as the embedding it is a view of, and rearranged weights as laid out.
_FORMAT_VERSION = 4
# The safetensors metadata key: for each tensor not stored as itself, [the stored tensor whose
# storage it is, the permutation of the stored tensor's dimensions that gives it].
_LAYOUT_KEY = "unraveled_layout"


def cache_root() -> Path:
    """``$UNRAVELED_CACHE``, by default ``~/.cache/unraveled``."""
    return Path(os.environ.get("UNRAVELED_CACHE", "~/.cache/unraveled")).expanduser()


def cache_key(slug: str, weights: str, fingerprint: dict[str, Any]) -> str:
    """A folder name that changes whenever the source, the processing or TransformerLens does."""
    identity = {
        "format": _FORMAT_VERSION,
        "transformer_lens": transformer_lens.__version__
        if hasattr(transformer_lens, "__version__")
        else "",
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
        field: getattr(torch, value["torch_dtype"])
        if isinstance(value, dict) and "torch_dtype" in value
        else value
        for field, value in encoded.items()
    }
    return HookedTransformerConfig.from_dict({**decoded, "device": "cpu"})


def read_tokenizer_and_context(key: str) -> tuple[PreTrainedTokenizerBase, int] | None:
    """The tokenizer and context length of the entry for ``key``, without its weights.

    None when there is no entry or it can't be read (``load_entry`` then removes it).
    """
    if not has_entry(key):
        return None
    try:
        n_ctx = int(json.loads((_entry(key) / _CONFIG_FILE).read_text())["n_ctx"])
        return AutoTokenizer.from_pretrained(
            _entry(key) / _TOKENIZER_DIR, local_files_only=True
        ), n_ctx
    except Exception:  # a damaged entry: json, tokenizers and the file system each raise their own
        return None


def _read_weights(model: HookedTransformer, path: Path) -> None:
    """Make the stored tensors ``model``'s parameters and buffers, one tensor at a time.

    Each is in the layout and has the ties it was stored with (``_tensors_to_store``).

    Each tensor read becomes the parameter itself rather than being copied into the one the model
    was built with, whose memory was never written (``init_weights`` is off) and so never held:
    a cached load holds one copy of the weights, and no layout needs copying afterwards.
    """
    own = model.state_dict()
    with safetensors.safe_open(str(path), framework="pt", device="cpu", backend="pread") as stored:
        layout = json.loads((stored.metadata() or {}).get(_LAYOUT_KEY, "{}"))
        names = set(stored.keys()) | layout.keys()
        missing, unexpected = sorted(own.keys() - names), sorted(names - own.keys())
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        read: dict[str, torch.Tensor] = {}
        for name in own:
            source, order = layout.get(name, (name, list(range(own[name].dim()))))
            if source not in read:
                read[source] = stored.get_tensor(source)
            tensor = read[source].permute(inverse(tuple(order)))
            if tensor.shape != own[name].shape or tensor.dtype != own[name].dtype:
                raise ValueError(
                    f"{path}: {name} is stored as {tuple(tensor.shape)} {tensor.dtype}, "
                    f"the model has {tuple(own[name].shape)} {own[name].dtype}"
                )
            module_name, _, attribute = name.rpartition(".")
            module = model.get_submodule(module_name)
            parameters = dict(module.named_parameters(recurse=False, remove_duplicate=False))
            if attribute in parameters:
                parameters[attribute].data = tensor
            else:
                setattr(module, attribute, tensor)  # a buffer


def load_entry(key: str) -> tuple[HookedTransformer, int] | None:
    """The cached model for ``key``, on the CPU, and its checkpoint's parameter count.

    None when there is no entry, or when the entry can't be read (it is then removed, saying so,
    and the caller converts the weights again).
    """
    entry = _entry(key)
    if not has_entry(key):
        return None
    try:
        cfg = _config_from_json(json.loads((entry / _CONFIG_FILE).read_text()))
        tokenizer = AutoTokenizer.from_pretrained(entry / _TOKENIZER_DIR, local_files_only=True)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
        _read_weights(model, entry / _WEIGHTS_FILE)
        checkpoint_parameters = int(
            json.loads((entry / _SOURCE_FILE).read_text())["checkpoint_parameters"]
        )
    except (
        Exception
    ) as error:  # a damaged file: safetensors, json, tokenizers and torch each raise their own
        logger.warning(
            "the converted-weights cache entry %s can't be read (%s: %s); "
            "removing it and converting again",
            entry,
            type(error).__name__,
            error,
        )
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return model.eval(), checkpoint_parameters


def _tensors_to_store(
    model: HookedTransformer,
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, tuple[int, ...]]]]:
    """The state dict as safetensors takes it, and the layout that rebuilds the rest.

    The state dict holds contiguous tensors, each storage once; the layout gives, for each tensor
    not stored as itself, the stored tensor that holds its storage and the permutation of that
    tensor's dimensions that gives it.

    Each tensor is stored in its memory order, so a rearranged weight is written as laid out and
    nothing is copied; a tensor shared under several names (the tied unembedding, the layers'
    common rotary tables) is written once.
    """
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    first_name: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for name, tensor in model.state_dict().items():
        order = memory_order(tensor) or tuple(range(tensor.dim()))
        as_stored = tensor.permute(
            order
        ).contiguous()  # a copy only for a tensor no order makes contiguous
        identity = (
            as_stored.untyped_storage().data_ptr(),
            as_stored.storage_offset(),
            tuple(as_stored.shape),
            as_stored.dtype,
        )
        source = first_name.setdefault(identity, name)
        if source == name:
            tensors[name] = as_stored
        if source != name or order != tuple(range(tensor.dim())):
            layout[name] = (source, order)
    return tensors, layout


def store_entry(key: str, model: HookedTransformer, checkpoint_parameters: int) -> Path:
    """Write ``model`` under ``key``, atomically, with its checkpoint's parameter count.

    Returns the entry's folder. When another process stores the same entry at the same time, the
    first one renamed into place is kept and the other's copy dropped.
    """
    entry = _entry(key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
    try:
        tensors, layout = _tensors_to_store(model)
        safetensors.torch.save_file(
            tensors, str(staging / _WEIGHTS_FILE), metadata={_LAYOUT_KEY: json.dumps(layout)}
        )
        (staging / _CONFIG_FILE).write_text(
            json.dumps(_config_to_json(model.cfg), indent=1, default=str)
        )
        model.tokenizer.save_pretrained(staging / _TOKENIZER_DIR)
        (staging / _SOURCE_FILE).write_text(
            json.dumps({"checkpoint_parameters": checkpoint_parameters})
        )
        if entry.exists() and not has_entry(
            key
        ):  # an incomplete entry from before entries were renamed into place
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(staging, entry)
        except OSError as error:
            # Another process converting the same model stored the same entry first: keep its copy
            # (a complete entry is never replaced, as another run may be reading it).
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not has_entry(key):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            logger.info("converted weights already cached in %s by another run", entry)
            return entry
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("cached converted weights in %s", entry)
    return entry
