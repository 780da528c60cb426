"""Which token positions an SAE is trained, evaluated and browsed on, and when a feature is active.

One definition, used by training (``unraveled.sae.activations``), evaluation
(``unraveled.sae.evaluation``) and the feature browser (``unraveled.sae.browser``), so that a
feature's density in the browser and in the evaluation's table are the same number, and the SAE
is evaluated on the kind of positions it was trained on:

- **Counted positions**: every position of a window except the BOS put in front of it
  (``prepend_bos``) and any position holding a special token: the tokenizer's BOS, EOS, PAD, SEP
  and decoder-start ids (SAELens's ``get_special_token_ids``; for GPT-2 the one
  ``<|endoftext|>``, which also separates documents inside corpus windows). These are SAELens's
  ``exclude_special_tokens=True``: the default of its ``run_evals`` (``sae_lens.evals``), and the
  training option its ``ActivationsStore`` applies to the activations before they reach the
  buffer (``_filter_buffer_acts``), so an SAELens user who evaluates with the defaults expects
  these positions left out, and one who trains on what is evaluated sets it for training too.
  Special-token activations are outliers (GPT-2's first position has many times the norm of the
  others): kept, they would dominate the reconstruction loss in training and the MSE and
  variance in evaluation, and be the top contexts of many features in the browser. The
  prepended BOS is left out by position as well, so it stays out even where the special tokens
  are not excluded (``exclude_special_tokens=False``) or the tokenizer names no BOS id.
- **Active**: a feature's activation is not zero (``!= 0``), as SAELens counts L0 and feature
  density (``sae_lens.evals``). The ReLU-based architectures (standard, TopK, BatchTopK, JumpReLU,
  gated) never output a negative activation, so there ``!= 0`` and ``> 0`` agree; SAELens's
  AbsTopK keeps signed values, and a strongly negative activation is a feature firing, not an
  inactive one: ``> 0`` would call such a feature dead on tokens where it reconstructs the most.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from jaxtyping import Bool, Float, Int
from numpy.typing import NDArray
from sae_lens.util import get_special_token_ids
from torch import Tensor
from transformer_lens import HookedTransformer


def excluded_token_ids(
    model: HookedTransformer, exclude_special_tokens: bool | Iterable[int] = True
) -> tuple[int, ...]:
    """The token ids whose positions are not counted, resolved as SAELens's ``run_evals`` does.

    Args:
        model: The model whose tokenizer names the special tokens.
        exclude_special_tokens: ``True``: the tokenizer's structural special tokens (none
            without a tokenizer); ``False``: none; an iterable: exactly those ids.
    """
    if exclude_special_tokens is True:
        tokenizer = model.tokenizer
        return tuple(sorted(get_special_token_ids(tokenizer))) if tokenizer is not None else ()
    if exclude_special_tokens is False:
        return ()
    return tuple(sorted({int(i) for i in exclude_special_tokens}))


def counted_positions(
    tokens: Int[Tensor, "window pos"], excluded: tuple[int, ...], prepended_bos: bool
) -> Bool[Tensor, "window pos"]:
    """True at the positions that count (see the module docstring), on ``tokens``' device.

    Args:
        tokens: The token ids the model ran on, BOS included where one was prepended.
        excluded: Token ids whose positions don't count (``excluded_token_ids``).
        prepended_bos: Position 0 holds a prepended BOS: it doesn't count whatever its id.
    """
    ids = torch.tensor(excluded, dtype=tokens.dtype, device=tokens.device)
    counted = ~torch.isin(tokens, ids)
    if prepended_bos:
        counted[:, 0] = False
    return counted


def is_active(
    features: Float[Tensor, "*token feature"] | Float[NDArray, "*token feature"],
) -> Bool[Tensor, "*token feature"] | Bool[NDArray, "*token feature"]:
    """True where a feature is active: its activation is not zero (see the module docstring).

    A tensor gives a tensor and an array an array, of ``features``' shape.
    """
    return features != 0
