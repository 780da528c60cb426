"""A model's tokenizer and context length, read without its weights.

For the checks that must come before any model is loaded: a prompt's token count against the
model's context and the experiment's cap. Loading converts the weights (seconds to minutes, and a
new entry in the converted-weights cache); the tokenizer and the config are small files. They are
read from the places loading reads the model from, in the same order: the converted-weights cache
entry, then the source's own files (``ModelSource.read_shape``: the checkpoint folder, the Hugging
Face cache's snapshot or the bundled GGUF file). The tokenizer is the one loading would build, so
the counts are the loaded model's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from unraveled.models import weight_cache
from unraveled.models.plan import PlannedModel
from unraveled.models.sources import ModelSource

# Where checkpoint configs give the context length (TransformerLens reads one of them per
# architecture, and caps some lower; the loaded model's own n_ctx is checked again after it loads).
_CONTEXT_KEYS = ("n_ctx", "n_positions", "max_position_embeddings", "seq_length")


@dataclass(frozen=True)
class ModelShape:
    """What a prompt check needs of a model, without its weights.

    Attributes:
        label: The model as messages name it (a fallback says what it stands in for).
        tokenizer: The tokenizer loading gives the model.
        n_ctx: Its context length: the converted model's own (from a cache entry), else the
            largest the checkpoint's config declares (TransformerLens caps some architectures
            lower, which the check after loading catches); None where reading it would parse the
            file a second time (a bundled GGUF not yet converted: its context, 8192 for SmolLM2,
            far above every experiment's cap, is checked once the model loads).
    """

    label: str
    tokenizer: PreTrainedTokenizerBase
    n_ctx: int | None


def _from_cache_entry(source: ModelSource) -> tuple[PreTrainedTokenizerBase, int] | None:
    identity = source.fingerprint()
    if identity is None:
        return None
    for weights in ("processed", "raw"):  # both kinds hold the same tokenizer and config
        found = weight_cache.read_tokenizer_and_context(
            weight_cache.cache_key(source.slug, weights, identity)
        )
        if found is not None:
            return found
    return None


def checkpoint_folder_shape(folder: Path) -> tuple[PreTrainedTokenizerBase, int | None] | None:
    """A checkpoint folder's tokenizer and the largest context its config declares.

    None when they can't be read (loading then reports the folder as bad input).
    """
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:  # transformers raises OSError, ValueError, KeyError...: loading says which
        return None
    declared = [config[key] for key in _CONTEXT_KEYS if isinstance(config.get(key), int)]
    return tokenizer, max(declared) if declared else None


def model_shape(planned: PlannedModel) -> ModelShape | None:
    """The tokenizer and context of the model ``planned`` will load, without loading it.

    Returns:
        Its shape (the fallback's, labelled as such, when the plan fell back); None when it can't
        be known without the network or a load (a hub model not cached; a folder whose files
        can't be read).
    """
    found = _from_cache_entry(planned.source) or planned.source.read_shape()
    return ModelShape(planned.label(), *found) if found is not None else None
