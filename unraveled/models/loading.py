"""Load a model by name into a HookedTransformer, through the converted-weights cache.

The order of places tried, per kind of name:

- hub names (``gpt2``): converted-weights cache, Hugging Face cache, then the hub;
- local checkpoint directories: converted-weights cache, then the directory;
- the bundled ``smollm2-135m``: converted-weights cache, then the GGUF file in its package.

When a model can't be had, ``load_model`` falls back to the bundled model if allowed, loudly.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import safetensors
import torch
from transformer_lens import HookedTransformer
from transformer_lens.loading_from_pretrained import get_official_model_name
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from unraveled.errors import BadCheckpointError, ModelUnavailableError
from unraveled.experiment import WeightsKind
from unraveled.models import hub, weight_cache
from unraveled.models.convert import hooked_from_hf
from unraveled.models.layout import share_tied_unembedding, store_rearranged
from unraveled.models.sources import (
    FALLBACK_MODEL,
    BundledModel,
    HubModel,
    LocalCheckpoint,
    ModelSource,
    checkpoint_problem,
    resolve_model,
)

logger = logging.getLogger(__name__)

# The HookedTransformer attribute holding the checkpoint's own parameter count.
_CHECKPOINT_PARAMETERS = "unraveled_checkpoint_parameters"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for experiments, and where it came from.

    Attributes:
        model: The HookedTransformer, in eval mode.
        requested: The name the config or ``--model`` asked for.
        name: The name of the model actually loaded (differs from ``requested`` on fallback).
        slug: Folder name for its outputs.
        loaded_from: Where the weights were read, in words.
        weights: ``processed`` or ``raw``.
        load_seconds: Wall time of the load.
        from_weight_cache: Whether the converted-weights cache served it.
        fallback_reason: Why ``requested`` could not be loaded, when this is a fallback.
        revision: Which version of the weights: the hub commit (the Hugging Face cache's
            snapshot), the bundled package's version, or None for a local directory (its path
            is in ``loaded_from``).
    """

    model: HookedTransformer
    requested: str
    name: str
    slug: str
    loaded_from: str
    weights: WeightsKind
    load_seconds: float
    from_weight_cache: bool
    fallback_reason: str | None = None
    revision: str | None = None

    @property
    def is_fallback(self) -> bool:
        return self.fallback_reason is not None

    def label(self) -> str:
        """How figures and pages name the model: the one used, and what it stands in for."""
        if self.is_fallback:
            return f"{self.name} (fallback: {self.requested} unavailable)"
        return self.name


def checkpoint_parameters(model: HookedTransformer) -> int | None:
    """How many parameters the checkpoint itself has, as transformers counts them (tied
    embeddings once), or None for a model that did not come through ``load_model``.

    TransformerLens's own parameters differ: it unties tied embeddings and adds zero biases the
    checkpoint doesn't have (GPT-2's unembedding bias; Llama's attention and MLP biases).
    """
    return getattr(model, _CHECKPOINT_PARAMETERS, None)


def fingerprint(source: ModelSource) -> dict[str, Any] | None:
    """What identifies the source's weights; None when it can't be known without loading them
    (a hub model not in the local Hugging Face cache).
    """
    if isinstance(source, HubModel):
        snapshot = hub.cached_snapshot(source.repo_id)
        if snapshot is None:
            return None
        return {"repo_id": source.repo_id, "revision": hub.snapshot_revision(snapshot)}
    if isinstance(source, LocalCheckpoint):
        files = sorted(p for p in source.path.iterdir() if p.is_file())
        return {
            "path": str(source.path),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        }
    gguf = source.gguf_path()
    stat = gguf.stat() if gguf else None
    return {
        "gguf": str(gguf),
        "size": stat.st_size if stat else None,
        "mtime": stat.st_mtime_ns if stat else None,
    }


def _safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors weight files (one, or the shards its index names); empty for
    a checkpoint stored as ``.bin``.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [
            folder / name
            for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))
        ]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _hf_from_folder(folder: Path) -> PreTrainedModel:
    """The transformers model of a checkpoint folder, in float32, its weights in memory of its own.

    transformers maps safetensors files into memory, and the pages it reads count as the process's
    memory until every tensor of the file is gone: converting GPT-2 small peaked 0.3 GB higher
    that way. Read one tensor at a time instead, so each is freed as soon as conversion has
    replaced it. ``.bin`` checkpoints load as transformers loads them.
    """
    files = _safetensors_files(folder)
    if not files:
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, local_files_only=True
        )
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        raise ValueError(
            f"transformers has no causal language model for model_type {config.model_type!r}"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        with safetensors.safe_open(str(file), framework="pt", backend="pread") as stored:
            for name in stored.keys():
                state_dict[name] = stored.get_tensor(name)
    return model_class.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=torch.float32
    )


def _from_hub(source: HubModel, weights: WeightsKind) -> tuple[HookedTransformer, str, int]:
    snapshot = hub.cached_snapshot(source.repo_id)
    if snapshot is not None:
        loaded_from = f"Hugging Face cache ({snapshot})"
    else:
        reason = hub.hub_unreachable_reason()
        if reason is not None:
            raise ModelUnavailableError(
                f"model {source.name!r} ({source.repo_id}) is not in the Hugging Face cache "
                f"({hub.hf_cache_dir()}) and {reason}"
            )
        snapshot = hub.download_snapshot(source.repo_id)
        loaded_from = f"Hugging Face hub ({source.repo_id})"
    model, n_parameters = hooked_from_hf(
        lambda: _hf_from_folder(snapshot),
        AutoTokenizer.from_pretrained(snapshot, local_files_only=True),
        weights,
        model_name=source.name,
        official_name=get_official_model_name(source.name),
    )
    return model, loaded_from, n_parameters


def _from_directory(
    source: LocalCheckpoint, weights: WeightsKind
) -> tuple[HookedTransformer, str, int]:
    # A folder the user named is their input: if it is not a checkpoint, say so (exit 2) rather
    # than fall back to another model.
    problem = checkpoint_problem(source.path)
    if problem is not None:
        raise BadCheckpointError(f"{source.path} is not a usable checkpoint folder: {problem}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, local_files_only=True)
        model, n_parameters = hooked_from_hf(
            lambda: _hf_from_folder(source.path), tokenizer, weights, model_name=source.slug
        )
    except (
        Exception
    ) as error:  # transformers and TransformerLens raise OSError, ValueError, KeyError, ...
        raise BadCheckpointError(
            f"{source.path} is not a usable checkpoint folder: {type(error).__name__}: {error}"
        ) from None
    return model, f"local checkpoint ({source.path})", n_parameters


def _from_bundled(source: BundledModel, weights: WeightsKind) -> tuple[HookedTransformer, str, int]:
    gguf = source.gguf_path()
    if gguf is None:
        raise ModelUnavailableError(
            f"the bundled model {source.name!r} needs the {source.package} package: {source.install_hint}"
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # SmolLM2's tokenizer adds no BOS and the model was trained without one.
    model, n_parameters = hooked_from_hf(
        lambda: AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        ),
        tokenizer,
        weights,
        model_name=source.name,
        default_prepend_bos=False,
    )
    return model, f"bundled GGUF, dequantized ({gguf})", n_parameters


def _revision(source: ModelSource, identity: dict[str, Any] | None) -> str | None:
    if isinstance(source, HubModel):
        return identity["revision"] if identity else None
    if isinstance(source, BundledModel):
        try:
            return f"{source.package} {importlib.metadata.version(source.package)}"
        except importlib.metadata.PackageNotFoundError:
            return None
    return None


def arrange_weights(model: HookedTransformer) -> HookedTransformer:
    """Tie the unembedding to the embedding where the checkpoint ties them, then lay the weights
    out as the forward pass reads them (``unraveled.models.layout``); returns ``model``.

    Tied first: the tied unembedding is the embedding transposed, already in the layout the
    forward pass wants, so no copy of it is made only to be dropped. A model read from the
    converted-weights cache is arranged already (the cache stores this layout and the tie), and
    nothing is copied.
    """
    share_tied_unembedding(model)
    return store_rearranged(model)


def prepare_for_experiments(model: HookedTransformer, device: str) -> HookedTransformer:
    """Put a loaded model on ``device``, arranged (``arrange_weights``), with no gradients for
    weights.

    Moving keeps each weight's layout but copies tied weights apart: they are tied again there.
    """
    model = arrange_weights(model).to(device)
    share_tied_unembedding(model)
    return model.requires_grad_(False)


def _load_source(
    source: ModelSource, requested: str, weights: WeightsKind, device: str
) -> LoadedModel:
    """Load ``source``, from the converted-weights cache when it holds these very weights.

    Entries are keyed by the source's identity (the hub snapshot's commit, a directory's file
    sizes and times, the GGUF file's), so a different source is a miss, never a stale hit.
    """
    started = time.perf_counter()
    identity = fingerprint(source)
    cached = (
        weight_cache.load_entry(weight_cache.cache_key(source.slug, weights, identity))
        if identity
        else None
    )
    from_cache = cached is not None
    if cached is not None:
        model, n_parameters = cached
        loaded_from = f"converted-weights cache ({weight_cache.cache_root()})"
    else:
        if isinstance(source, HubModel):
            model, loaded_from, n_parameters = _from_hub(source, weights)
            identity = fingerprint(source)  # a download has just put the snapshot in the cache
        elif isinstance(source, LocalCheckpoint):
            model, loaded_from, n_parameters = _from_directory(source, weights)
        else:
            model, loaded_from, n_parameters = _from_bundled(source, weights)
        if identity is not None:
            weight_cache.store_entry(
                weight_cache.cache_key(source.slug, weights, identity),
                arrange_weights(model),
                n_parameters,
            )
    model = prepare_for_experiments(model, device)
    setattr(model, _CHECKPOINT_PARAMETERS, n_parameters)
    return LoadedModel(
        model=model,
        requested=requested,
        name=source.name if not isinstance(source, LocalCheckpoint) else source.slug,
        slug=source.slug,
        loaded_from=loaded_from,
        weights=weights,
        load_seconds=time.perf_counter() - started,
        from_weight_cache=from_cache,
        revision=_revision(source, identity),
    )


def load_model(
    name: str,
    weights: WeightsKind = "processed",
    device: str = "cpu",
    fallback: str | None = FALLBACK_MODEL,
    source_label: str = "--model",
) -> LoadedModel:
    """Load ``name`` as a HookedTransformer, falling back to ``fallback`` when it can't be had.

    Args:
        name: A hub name (``gpt2``), a checkpoint directory, or ``smollm2-135m``.
        weights: ``processed`` (TransformerLens defaults) or ``raw`` (checkpoint weights).
        device: Torch device.
        fallback: Model to load instead when ``name`` is unavailable; None makes that an error.
        source_label: Where the name came from, for error messages.

    Raises:
        ConfigError: The name is not a model name (exit status 2).
        ModelUnavailableError: Neither the model nor the fallback could be loaded (exit status 3).
    """
    source = resolve_model(name, source_label)
    try:
        return _load_source(source, name, weights, device)
    except ModelUnavailableError as error:
        if fallback is None or fallback == name:
            raise
        logger.warning(
            "%s. Falling back to the bundled %s: figures will show %s, not %s.",
            error,
            fallback,
            fallback,
            name,
        )
        loaded = _load_source(resolve_model(fallback), fallback, weights, device)
        return replace(loaded, requested=name, fallback_reason=str(error))


def availability(name: str) -> tuple[str, str]:
    """What ``name`` resolves to, and whether and from where it can be loaded now (no weights read)."""
    source = resolve_model(name)
    identity = fingerprint(source)
    cached = identity is not None and any(
        weight_cache.has_entry(weight_cache.cache_key(source.slug, kind, identity))
        for kind in ("processed", "raw")
    )
    if isinstance(source, HubModel):
        resolves_to = f"TransformerLens / Hugging Face {source.repo_id}"
        if cached:
            return resolves_to, "yes: converted-weights cache"
        if hub.cached_snapshot(source.repo_id):
            return resolves_to, "yes: Hugging Face cache"
        reason = hub.hub_unreachable_reason()
        return resolves_to, f"no: not cached and {reason}" if reason else "yes: Hugging Face hub"
    if isinstance(source, LocalCheckpoint):
        problem = checkpoint_problem(source.path)
        return (
            f"local checkpoint {source.path}",
            f"no: {problem}" if problem else "yes (weights checked when loaded)",
        )
    gguf = source.gguf_path()
    resolves_to = f"bundled GGUF {gguf or source.gguf_file}"
    if cached:
        return resolves_to, "yes: converted-weights cache"
    return resolves_to, "yes" if gguf else f"no: {source.install_hint}"
