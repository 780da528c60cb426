"""Turn a transformers model held in memory into a HookedTransformer, fully offline.

TransformerLens's ``from_pretrained`` refuses local paths and asks the hub for the config even
when given ``hf_model=`` (its issues #664 and #846). Its config and weight converters work on a
local ``config.json`` though, so we call them directly and then process the weights exactly as
``from_pretrained`` does.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from unraveled.experiment import WeightsKind


def processing_flags(weights: WeightsKind) -> dict[str, bool]:
    """TransformerLens weight processing for each kind of weights.

    ``processed`` is ``from_pretrained``'s default (LayerNorm folded, writing weights and
    unembedding centred); ``raw`` keeps the checkpoint's weights, gammas included.
    """
    enabled = weights == "processed"
    return {
        "fold_ln": enabled,
        "center_writing_weights": enabled,
        "center_unembed": enabled,
        "fold_value_biases": enabled,
    }


def _hf_config_dict(hf_model: PreTrainedModel) -> dict[str, Any]:
    config = hf_model.config.to_dict()
    # GGUF checkpoints are dequantized on load; the marker would make TransformerLens refuse them.
    config.pop("quantization_config", None)
    config["architectures"] = [type(hf_model).__name__]
    # TransformerLens reads GPT-2's context length from n_ctx, which checkpoints saved by recent
    # transformers no longer write; n_positions holds the same number.
    if "n_positions" in config:
        config.setdefault("n_ctx", config["n_positions"])
    return config


class _CloneFreeTensor(torch.Tensor):
    """A tensor whose ``clone()`` is itself, and whose results are clone-free tensors too.

    TransformerLens's weight processing copies the whole state dict at each of its steps (fold
    LayerNorm, centre the unembedding, fold value biases), although every step is functional: it
    builds new tensors for what it changes and modifies nothing in place. Those defensive copies
    were the peak of a conversion (about 2 GB above the model itself for SmolLM2-135M).
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.Tensor.clone:
            return args[0]
        return super().__torch_function__(func, types, args, kwargs)


def hooked_from_hf(
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    weights: WeightsKind,
    model_name: str,
    default_prepend_bos: bool | None = None,
) -> HookedTransformer:
    """Convert ``hf_model`` with TransformerLens's own converters and processing.

    Args:
        hf_model: A GPT-2, Llama or other TransformerLens-supported causal LM, in float32.
        tokenizer: Its tokenizer.
        weights: ``processed`` or ``raw`` (see ``processing_flags``).
        model_name: Name recorded in the HookedTransformer's config.
        default_prepend_bos: Whether string inputs get a BOS token; None keeps TransformerLens's
            default (True).
    """
    flags = processing_flags(weights)
    with tempfile.TemporaryDirectory() as tmp:
        # TransformerLens guesses the architecture from the path when it contains "llama" or
        # "gemma" (and then has no config to read); a neutral folder name makes it read config.json.
        config_dir = Path(tmp) / "checkpoint"
        config_dir.mkdir()
        (config_dir / "config.json").write_text(json.dumps(_hf_config_dict(hf_model)))
        cfg = tl_loading.get_pretrained_model_config(
            str(config_dir),
            fold_ln=flags["fold_ln"],
            dtype=torch.float32,
            default_prepend_bos=default_prepend_bos,
        )
        state_dict = tl_loading.get_pretrained_state_dict(str(config_dir), cfg, hf_model)
    cfg.model_name = model_name
    cfg.tokenizer_name = None
    # Every weight is overwritten from the state dict: skip the random initialisation, whose
    # pages would otherwise all be touched (memory and time) only to be replaced.
    cfg.init_weights = False
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    state_dict = {key: value.as_subclass(_CloneFreeTensor) for key, value in state_dict.items()}
    model.load_and_process_state_dict(state_dict, refactor_factored_attn_matrices=False, **flags)
    return model.eval()
