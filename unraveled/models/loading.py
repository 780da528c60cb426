"""Load a planned model into a HookedTransformer, through the converted-weights cache.

The converted-weights cache is tried first, for every kind of source; on a miss the source
converts itself from its own files (``ModelSource.convert``: the Hugging Face cache or hub, a
checkpoint folder, the bundled GGUF file) and the result is cached. What loads was decided by the
plan (``unraveled.models.plan``): loading never falls back to another model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from transformer_lens import HookedTransformer
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from unraveled.experiment import WeightsKind
from unraveled.models import weight_cache
from unraveled.models.layout import share_tied_unembedding, store_rearranged
from unraveled.models.plan import PlannedModel, plan_model

# The HookedTransformer attribute holding the checkpoint's own parameter count.
_CHECKPOINT_PARAMETERS = "unraveled_checkpoint_parameters"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for experiments, and where it came from.

    Attributes:
        model: The HookedTransformer, in eval mode.
        planned: What was asked for and what loaded instead, if anything (``PlannedModel``).
        loaded_from: Where the weights were read, in words.
        weights: ``processed`` or ``raw``.
        load_seconds: Wall time of the load.
        from_weight_cache: Whether the converted-weights cache served it.
        revision: Which version of the weights: the hub commit (the Hugging Face cache's
            snapshot), the bundled package's version, or None for a local directory (its path
            is in ``loaded_from``).
    """

    model: HookedTransformer
    planned: PlannedModel
    loaded_from: str
    weights: WeightsKind
    load_seconds: float
    from_weight_cache: bool
    revision: str | None = None

    @property
    def requested(self) -> str:
        """The name the config or ``--model`` asked for."""
        return self.planned.requested

    @property
    def name(self) -> str:
        """The name of the model actually loaded (differs from ``requested`` on fallback)."""
        return self.planned.source.name

    @property
    def slug(self) -> str:
        """Folder name for its outputs."""
        return self.planned.source.slug

    @property
    def fallback_reason(self) -> str | None:
        """Why ``requested`` could not be loaded, when this is a fallback."""
        return self.planned.fallback_reason

    @property
    def is_fallback(self) -> bool:
        """Whether the bundled model stands in for the one requested."""
        return self.planned.is_fallback

    def label(self) -> str:
        """How figures and pages name the model: the one used, and what it stands in for."""
        return self.planned.label()


def checkpoint_parameters(model: HookedTransformer) -> int | None:
    """How many parameters the checkpoint itself has, as transformers counts them.

    Tied embeddings count once; None for a model that did not come through ``load_planned``.
    TransformerLens's own parameters differ: it unties tied embeddings and adds zero biases the
    checkpoint doesn't have (GPT-2's unembedding bias; Llama's attention and MLP biases).
    """
    return getattr(model, _CHECKPOINT_PARAMETERS, None)


def _safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors weight files: one, or the shards its index names.

    Empty for a checkpoint stored as ``.bin``.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [
            folder / name
            for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))
        ]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def hf_model_from_folder(folder: Path) -> PreTrainedModel:
    """The transformers model of a checkpoint folder, in float32, its weights in memory of its own.

    transformers maps safetensors files into memory, and the pages it reads count as the process's
    memory until every tensor of the file is gone, which raises a conversion's peak. Read one
    tensor at a time instead, so each is freed as soon as conversion has replaced it. ``.bin``
    checkpoints load as transformers loads them.
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


def arrange_weights(model: HookedTransformer) -> HookedTransformer:
    """Tie the unembedding where the checkpoint does, then lay the weights out for the forward pass.

    The layout is ``unraveled.models.layout``'s; returns ``model``. Tied first: the tied
    unembedding is the embedding transposed, already in the layout the forward pass wants, so no
    copy of it is made only to be dropped. A model read from the converted-weights cache is
    arranged already (the cache stores this layout and the tie), and nothing is copied.
    """
    share_tied_unembedding(model)
    return store_rearranged(model)


def prepare_for_experiments(model: HookedTransformer, device: str) -> HookedTransformer:
    """Put a loaded model on ``device``, arranged (``arrange_weights``), without weight gradients.

    Moving keeps each weight's layout but copies tied weights apart: they are tied again there.
    """
    model = arrange_weights(model).to(device)
    share_tied_unembedding(model)
    return model.requires_grad_(False)


def load_planned(planned: PlannedModel, weights: WeightsKind, device: str) -> LoadedModel:
    """Load what ``planned`` says: from the converted-weights cache when it holds these weights.

    Entries are keyed by the source's fingerprint (the hub snapshot's commit, a directory's file
    sizes and times, the GGUF file's), so a different source is a miss, never a stale hit.

    Raises:
        BadCheckpointError: The planned folder is not a checkpoint (exit 2).
        ModelUnavailableError: The model can't be had (exit 3).
    """
    planned.require_loadable()
    source = planned.source
    started = time.perf_counter()
    identity = source.fingerprint()
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
        model, loaded_from, n_parameters = source.convert(weights)
        if identity is None:  # a download has just put the hub snapshot in the cache
            identity = source.fingerprint()
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
        planned=planned,
        loaded_from=loaded_from,
        weights=weights,
        load_seconds=time.perf_counter() - started,
        from_weight_cache=from_cache,
        revision=source.revision(identity),
    )


def load_model(name: str, weights: WeightsKind = "processed", device: str = "cpu") -> LoadedModel:
    """Load ``name`` as a HookedTransformer: the model named, never another in its place.

    Args:
        name: A hub name (``gpt2``), a checkpoint directory, or ``smollm2-135m``.
        weights: ``processed`` (TransformerLens defaults) or ``raw`` (checkpoint weights).
        device: Torch device.

    Raises:
        ConfigError: The name is not a model name (exit status 2).
        BadCheckpointError: The folder named is not a checkpoint (exit status 2).
        ModelUnavailableError: The model can't be had: not cached and the hub unreachable, or
            the bundled model's package missing (exit status 3).
    """
    return load_planned(plan_model(name, "load_model", chosen=True), weights, device)
