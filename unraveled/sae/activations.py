"""A hook's activations over corpus windows, streamed: forward passes stopped at the hook's layer.

``run_to_hook`` runs a batch only as far as a hook (``stop_at_layer``); it is the one way the
SAE code reads a hook (training, evaluation, the feature browser, the SAE-fits check).
``hook_activations`` runs one batch of windows that way and returns the hook's activations, one
row per counted position (``unraveled.sae.positions``: neither the prepended BOS nor a special
token, as evaluation and the feature browser count).
``activation_chunks`` streams a set of windows batch by batch, on the local engine or on Ray
workers (``unraveled.sae.ray``), in the same batches either way, so the same windows give the
same activations wherever they run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from numpy.typing import NDArray
from torch import Tensor
from transformer_lens import HookedTransformer

from unraveled.corpus import with_bos
from unraveled.engines.local import batches
from unraveled.sae.positions import counted_positions, excluded_token_ids

EngineName = Literal["local", "ray"]
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def default_hook(model: HookedTransformer) -> str:
    """The residual stream entering the middle block: ``blocks.{n_layers // 2}.hook_resid_pre``."""
    return f"blocks.{model.cfg.n_layers // 2}.hook_resid_pre"


def hook_block(hook_name: str) -> int | None:
    """The block a hook is in (``blocks.L....`` -> L), or None for hooks outside the blocks."""
    found = _BLOCK.match(hook_name)
    return int(found.group(1)) if found else None


def run_to_hook(
    model: HookedTransformer, hook_name: str, tokens: Int[Tensor, "window pos"]
) -> Float[Tensor, "window pos ..."]:
    """``hook_name``'s activation on ``tokens``, from a forward pass stopped at the hook.

    The residual stream entering block L is the output of ``stop_at_layer=L``; any other hook in
    block L runs blocks 0..L; a hook outside the blocks runs the whole model. Generating SAE
    activations is almost all forward passes, so not running the blocks past the hook is most
    of their cost saved (``make bench``, group ``sae``, compares it with a plain forward pass).

    Args:
        model: The model.
        hook_name: A hook point of ``model`` (``model.hook_dict``).
        tokens: Token ids, one sequence per row, as the model runs them (BOS included).
    """
    block = hook_block(hook_name)
    with torch.inference_mode():
        if block is not None and hook_name == f"blocks.{block}.hook_resid_pre":
            return model(tokens, stop_at_layer=block)
        captured: list[Tensor] = []

        def keep(activation: Tensor, hook: object) -> None:
            captured.append(activation)

        stop = None if block is None else block + 1
        model.run_with_hooks(tokens, stop_at_layer=stop, fwd_hooks=[(hook_name, keep)])
        return captured[0]


def hook_activations(
    model: HookedTransformer,
    hook_name: str,
    windows: Int[Tensor, "window pos"],
    prepend_bos: bool,
) -> Float[Tensor, "token d_in"]:
    """``hook_name``'s activations on ``windows``, one row per counted position, in window order.

    The forward pass stops where the hook is reached (``run_to_hook``). With ``prepend_bos`` a
    BOS token goes before each window (as the model was trained). Only the counted positions
    (``unraveled.sae.positions``) give a row: the prepended BOS and special tokens such as
    GPT-2's ``<|endoftext|>`` between documents are left out, as SAELens's
    ``exclude_special_tokens=True`` leaves them out, so the SAE trains on the positions it is
    evaluated and browsed on.

    Args:
        model: The model.
        hook_name: A hook point of ``model`` (``model.hook_dict``).
        windows: Token ids, one window per row, without BOS.
        prepend_bos: Put the model's BOS before each window.
    """
    tokens = with_bos(model, windows.to(model.cfg.device), prepend_bos)
    acts = run_to_hook(model, hook_name, tokens)
    counted = counted_positions(tokens, excluded_token_ids(model), prepend_bos)
    return acts[counted].float().cpu()


def window_batches(n_windows: int, batch_windows: int) -> list[range]:
    """The batches every engine cuts ``n_windows`` into (``unraveled.engines.local.batches``)."""
    return list(batches(0, n_windows, batch_windows))


def activation_chunks(
    model: HookedTransformer,
    hook_name: str,
    windows: Int[NDArray, "window pos"],
    batch_windows: int,
    prepend_bos: bool,
    engine: EngineName = "local",
    workers: int | None = None,
    epochs: int | None = 1,
) -> Iterator[Float[Tensor, "token d_in"]]:
    """``hook_name``'s activations on ``windows``, one batch of windows at a time, in order.

    Args:
        model: The model.
        hook_name: The hook.
        windows: Token ids, one window per row, without BOS.
        batch_windows: Windows per forward pass.
        prepend_bos: Put the model's BOS before each window (its position is not counted).
        engine: ``local`` (this process) or ``ray`` (Ray workers; the driver receives the chunks
            in window order, a few batches ahead of the consumer).
        workers: Ray workers at most (default: every CPU Ray can place).
        epochs: Passes over the windows; None repeats them without end (a training stream read
            as far as needed).
    """
    if engine == "ray":
        from unraveled.sae.ray import ray_activation_chunks  # Ray is imported only when asked for

        yield from ray_activation_chunks(
            model, hook_name, windows, batch_windows, prepend_bos, workers, epochs
        )
        return
    passes = 0
    while epochs is None or passes < epochs:
        for batch in window_batches(len(windows), batch_windows):
            chosen = torch.from_numpy(windows[batch.start : batch.stop].astype(np.int64))
            yield hook_activations(model, hook_name, chosen, prepend_bos)
        passes += 1
