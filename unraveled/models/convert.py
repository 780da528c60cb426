"""Turn a transformers model held in memory into a HookedTransformer, fully offline.

TransformerLens's ``from_pretrained`` refuses local paths and asks the hub for the config even
when given ``hf_model=`` (its issues #664 and #846). Its config and weight converters work on a
local ``config.json`` though, so we call them directly and then process the weights exactly as
``from_pretrained`` does.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import loading_from_pretrained as tl_loading
from transformer_lens.components import LayerNormPre, RMSNormPre
from transformer_lens.utilities.activation_functions import softcap_enabled
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
from transformer_lens.weight_processing import ProcessWeights
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from unraveled.compat import transformer_lens as tl_compat
from unraveled.experiment import WeightsKind
from unraveled.models.layout import fills_its_storage
from unraveled.phases import phase_done


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


def _applicable_flags(flags: dict[str, bool], cfg: HookedTransformerConfig) -> dict[str, bool]:
    """The processing ``from_pretrained`` actually applies to a model of ``cfg``.

    It skips folding and centring where they would change the model's function (shortformer
    positions, post-norm blocks, soft-capped logits).
    """
    shortformer = cfg.positional_embedding_type == "shortformer"
    post_norm = cfg.original_architecture in POST_NORM_ARCHITECTURES
    return {
        **flags,
        "fold_ln": flags["fold_ln"] and not (shortformer or post_norm),
        "center_writing_weights": flags["center_writing_weights"]
        and not (shortformer or post_norm),
        "center_unembed": flags["center_unembed"]
        and not shortformer
        and not softcap_enabled(cfg.output_logits_soft_cap),
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


def hooked_from_hf(
    load_hf: Callable[[], PreTrainedModel],
    tokenizer: PreTrainedTokenizerBase,
    weights: WeightsKind,
    model_name: str,
    default_prepend_bos: bool | None = None,
    official_name: str | None = None,
) -> tuple[HookedTransformer, int]:
    """Convert a transformers model with TransformerLens's own converters and processing.

    The transformers model is loaded here (``load_hf``) and dropped as soon as its weights are in
    TransformerLens's layout, so that each of its tensors is freed once processing has replaced
    it: a conversion holds little more than one copy of the weights.

    Args:
        load_hf: Loads a GPT-2, Llama or other TransformerLens-supported causal LM, in float32.
        tokenizer: Its tokenizer.
        weights: ``processed`` or ``raw`` (see ``processing_flags``).
        model_name: Name recorded in the HookedTransformer's config.
        default_prepend_bos: Whether string inputs get a BOS token; None keeps TransformerLens's
            default (True).
        official_name: The model's TransformerLens name (``gpt2``), whose config TransformerLens
            builds by name, read from the local Hugging Face cache; None for a checkpoint known
            only by its ``config.json``.

    Returns:
        The model, and the checkpoint's own parameter count as transformers counts it (tied
        embeddings once).
    """
    # Frozen, so that processing builds no autograd graph: each result would keep the tensors it
    # was computed from alive, the whole checkpoint over.
    hf_model = load_hf().requires_grad_(False)
    requested = processing_flags(weights)
    n_parameters = sum(parameter.numel() for parameter in hf_model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        if official_name is None:
            # TransformerLens guesses the architecture from the path when it contains "llama" or
            # "gemma" (and then has no config to read); a neutral folder name makes it read
            # config.json.
            config_dir = Path(tmp) / "checkpoint"
            config_dir.mkdir()
            (config_dir / "config.json").write_text(json.dumps(_hf_config_dict(hf_model)))
        name = official_name or str(config_dir)
        cfg = tl_loading.get_pretrained_model_config(
            name,
            fold_ln=requested["fold_ln"],
            dtype=torch.float32,
            default_prepend_bos=default_prepend_bos,
            local_files_only=True,
        )
        flags = _applicable_flags(requested, cfg)
        # Processing copies nothing (see unraveled.compat.transformer_lens).
        converted = [
            tl_compat.without_copies(tl_loading.get_pretrained_state_dict(name, cfg, hf_model))
        ]
    del hf_model
    cfg.model_name = model_name
    cfg.tokenizer_name = None
    # Every weight is replaced from the state dict: skip the random initialisation, whose pages
    # would otherwise all be touched (memory and time) only to be dropped.
    cfg.init_weights = False
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    _load_and_process(model, converted, flags)
    return model.eval(), n_parameters


def _load_and_process(
    model: HookedTransformer, converted: list[dict[str, torch.Tensor]], flags: dict[str, bool]
) -> None:
    """TransformerLens's ``load_and_process_state_dict``, step for step, without holding copies.

    The state dict is handed over in a one-element list and taken out of it straight into the
    processing, so nothing keeps an unprocessed tensor alive once processing has replaced it; the
    processed tensors then become the model's parameters (``assign``) instead of being copied into
    parameters allocated beside them.
    """
    converted[0] = model.fill_missing_keys(converted[0])
    fold_ln = (
        flags["fold_ln"]
        and model.cfg.normalization_type in ("LN", "LNPre", "RMS", "RMSPre")
        and any(key.endswith((".ln1.w", ".ln2.w", "ln_final.w")) for key in converted[0])
    )
    if fold_ln:
        _use_prenorm(model)
    processed = _process_weights(converted, model.cfg, {**flags, "fold_ln": fold_ln})
    plain = {key: tl_compat.plain(processed.pop(key)) for key in list(processed)}
    missing = model.load_state_dict(plain, strict=False, assign=True).missing_keys
    if missing:
        raise ValueError(f"the converted checkpoint has no weights for {missing[:5]}")
    del plain
    _own_dense_storage(model)
    if fold_ln:
        model.setup()


def _process_weights(
    holder: list[dict[str, torch.Tensor]], cfg: HookedTransformerConfig, flags: dict[str, bool]
) -> dict[str, torch.Tensor]:
    """``ProcessWeights.process_weights``, step for step, each step given the only reference.

    The state dict is taken from ``holder`` for each step.

    ``process_weights`` keeps its argument while each step builds the next dict, so every tensor a
    step replaces stayed alive until the step returned: half a model more at the peak. Float32
    weights only (the loaders ask transformers for float32), where its upcasting does nothing.
    """
    if any(
        tensor.is_floating_point() and tensor.dtype != torch.float32
        for tensor in holder[0].values()
    ):
        raise ValueError("weight processing expects float32 weights")
    layer_norm = cfg.normalization_type in ("LN", "LNPre")
    if flags["fold_ln"]:
        # Between the blocks and the unembedding, the blocks' replaced checkpoint tensors are
        # holes in the heap that the unembedding, mapped afresh, can't reuse: a run hands them back.
        holder.append(
            tl_compat.fold_layer_norm(holder.pop(), cfg, layer_norm, layer_norm, phase_done)
        )
    center_writing_weights = (
        flags["center_writing_weights"] and layer_norm and not getattr(cfg, "final_rms", False)
    )
    if center_writing_weights:
        holder.append(ProcessWeights.center_writing_weights(holder.pop(), cfg))
    if flags["center_unembed"]:
        holder.append(ProcessWeights.center_unembed(holder.pop(), cfg=cfg))
    if flags["fold_value_biases"]:
        holder.append(ProcessWeights.fold_value_biases(holder.pop(), cfg))
        if flags["center_writing_weights"] and layer_norm:
            for layer in range(cfg.n_layers):
                key = f"blocks.{layer}.attn.b_O"
                if key in holder[0]:
                    holder[0][key] = holder[0][key] - holder[0][key].mean()
    return holder.pop()


def _use_prenorm(model: HookedTransformer) -> None:
    """Norms without weights, once their weights are folded into the next layer.

    As ``load_and_process_state_dict`` does.
    """
    prenorm = {"LN": (LayerNormPre, "LNPre"), "RMS": (RMSNormPre, "RMSPre")}.get(
        model.cfg.normalization_type
    )
    if prenorm is None:
        return
    module, model.cfg.normalization_type = prenorm
    model.ln_final = module(model.cfg)
    for block in model.blocks:
        block.ln1 = module(model.cfg)
        block.ln2 = module(model.cfg)
        if model.cfg.is_layer_norm_activation():
            block.mlp.ln = module(model.cfg)


def _own_dense_storage(model: HookedTransformer) -> None:
    """Give each parameter and buffer that is a view into a larger tensor its own storage.

    Such a tensor is part of a checkpoint tensor that held several, as GPT-2's fused
    query/key/value matrix; its own storage is contiguous.

    A tensor that fills its storage keeps it, in whatever memory order it has: the folded
    unembedding comes out of processing transposed, which is the layout ``store_rearranged``
    wants (a contiguous copy here was undone by another copy there, 0.15 GB each for GPT-2
    small); and a raw unembedding tied to the embedding stays the view of it that the checkpoint's
    tie makes it.
    """
    with torch.no_grad():
        for module in model.modules():
            for name, tensor in [
                *module.named_parameters(recurse=False, remove_duplicate=False),
                *module.named_buffers(recurse=False, remove_duplicate=False),
            ]:
                if fills_its_storage(tensor):
                    continue
                own = tensor.detach().clone(memory_format=torch.contiguous_format)
                if isinstance(tensor, nn.Parameter):
                    tensor.data = own
                else:
                    setattr(module, name, own)
