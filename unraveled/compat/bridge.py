"""Experiments on TransformerLens's ``TransformerBridge`` (its successor to HookedTransformer).

TransformerLens 3.9 deprecates ``HookedTransformer`` in favour of ``TransformerBridge``, which
wraps the Hugging Face model itself and, in compatibility mode
(``bridge.enable_compatibility_mode()``), answers to HookedTransformer's hook names and weight
attributes. Not to all of it: it can't start a forward pass at a layer nor stop one after the
last block, several of its hook points are aliases whose hooks see another name, and it has no
positional-embedding matrix.
Each experiment declares what it uses beyond ``run_with_cache`` and ``run_with_hooks``
(``Experiment.needs``) and which weights it reads (``Experiment.weights``); ``check_bridge``
asks the bridge for each, before anything is computed, and refuses with a ``ParamError`` naming
what the bridge lacks. A test runs every experiment on a tiny bridge, so a need an experiment
forgets to declare fails there, and an experiment that runs gives the HookedTransformer's
numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from unraveled.errors import ParamError

if TYPE_CHECKING:
    from unraveled.experiment import Experiment, ModelNeed

FIELD = "model"
_HOOKED_NAME = re.compile(r"(blocks\.\d+\.)?((attn|mlp)\.)?hook_\w+$")


def is_bridge(model: Any) -> bool:
    """Whether ``model`` is a TransformerLens ``TransformerBridge``."""
    if "transformer_lens" not in type(model).__module__:
        return False
    from transformer_lens.model_bridge import TransformerBridge

    return isinstance(model, TransformerBridge)


def _zeros_residual(model: Any) -> Any:
    import torch

    parameter = next(model.parameters())
    return torch.zeros(1, 1, model.cfg.d_model, dtype=parameter.dtype, device=parameter.device)


def _lacks_start_at_layer(model: Any) -> str | None:
    # Started at the last layer's end, a forward pass is the final norm and the unembedding of
    # one zero vector: nothing to speak of, where it is supported at all.
    try:
        model(_zeros_residual(model), start_at_layer=model.cfg.n_layers)
    except NotImplementedError:
        return "a forward pass started at a layer (start_at_layer), which patching runs from"
    return None


def _lacks_hook_names(model: Any) -> str | None:
    aliases = [(name, point.name) for name, point in model.hook_dict.items() if point.name != name]
    if aliases:
        # Named by one of HookedTransformer's names where there is one: the name a user knows.
        name, actual = min(aliases, key=lambda alias: not _HOOKED_NAME.match(alias[0]))
        return (
            f"hook points named as asked: its {name} is an alias of {actual}, and a hook "
            f"on it sees the name {actual} ({len(aliases)} such aliases)"
        )
    return None


def _lacks_stop_at_layer(model: Any) -> str | None:
    import torch

    # One token: a whole forward pass where stopping is not supported, still nothing to speak of.
    with torch.inference_mode():
        output = model(torch.zeros((1, 1), dtype=torch.long), stop_at_layer=model.cfg.n_layers)
    if output.shape[-1] != model.cfg.d_model:
        return (
            "a forward pass stopped after the last block (stop_at_layer=n_layers): it returns "
            "the logits instead of the residual stream"
        )
    return None


def _lacks_w_pos(model: Any) -> str | None:
    if not hasattr(model, "W_pos"):
        return "a positional embedding matrix (W_pos)"
    return None


def _lacks_block_internals(model: Any) -> str | None:
    block = model.blocks[0]
    missing = [name for name in ("ln1", "ln2", "apply_mlp") if not hasattr(block, name)]
    if missing:
        return (
            "a block's parts to recompute outside a forward pass (HookedTransformer's "
            + ", ".join(f"block.{name}" for name in missing)
            + ")"
        )
    return None


LACKS: dict[ModelNeed, Callable[[Any], str | None]] = {
    "start_at_layer": _lacks_start_at_layer,
    "hook_names": _lacks_hook_names,
    "stop_at_layer": _lacks_stop_at_layer,
    "W_pos": _lacks_w_pos,
    "block_internals": _lacks_block_internals,
}


def check_bridge(model: Any, experiment_name: str, experiment: Experiment[Any, Any]) -> None:
    """Refuse an experiment a ``TransformerBridge`` can't run, saying what it lacks.

    A no-op for any other model (a ``HookedTransformer``). Nothing is computed: the bridge is
    asked for each of the experiment's ``needs`` and for the weights it reads.

    Args:
        model: The model the experiment is to run on.
        experiment_name: The experiment's name, for the message.
        experiment: The experiment (its ``needs`` and ``weights``).

    Raises:
        ParamError: At ``model``, naming what the bridge lacks and, where there is one, the way
            to get it.
    """
    if not is_bridge(model):
        return
    if not getattr(model, "compatibility_mode", False):
        raise ParamError(
            FIELD,
            "a TransformerBridge runs unraveled's experiments in compatibility mode only "
            "(HookedTransformer's hook names and weights): call model.enable_compatibility_mode()",
        )
    # Set by enable_compatibility_mode's weight processing (fold LayerNorm, centre weights);
    # TransformerLens keeps it on the bridge, with no public accessor.
    processed = bool(getattr(model, "_weights_processed", False))
    if experiment.weights == "raw" and processed:
        raise ParamError(
            FIELD,
            f"{experiment_name} reads the checkpoint's raw weights, and this TransformerBridge's "
            "are processed (LayerNorm folded, weights centred): boot another and call "
            "enable_compatibility_mode(no_processing=True) on it",
        )
    if experiment.weights == "processed" and not processed:
        raise ParamError(
            FIELD,
            f"{experiment_name} reads TransformerLens's processed weights, and this "
            "TransformerBridge's are not processed: boot another and call "
            "enable_compatibility_mode() on it (its default processing)",
        )
    lacking = [what for need in sorted(experiment.needs) if (what := LACKS[need](model))]
    if lacking:
        raise ParamError(
            FIELD,
            f"{experiment_name} can't run on a TransformerBridge, which lacks "
            + "; and ".join(lacking)
            + ". Load the model as a HookedTransformer (ur.load_model) to run it",
        )
