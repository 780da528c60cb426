"""Steering vectors from contrastive prompts, ``steer``, and what steering does and costs.

The vector (Rimsky et al. 2024, "Steering Llama 2 via Contrastive Activation Addition", CAA): the
mean over pairs of the difference between the residual stream of the positive prompt and of the
negative prompt, read at ``blocks.{layer}.hook_resid_pre``. CAA reads it at the last token (where
the contrast is summed up), and that is the default ``position="last"``; ``position="mean"``
averages each prompt's positions first, which, unlike ActAdd's position-aligned single pair
(Turner et al. 2023, "Steering Language Models With Activation Engineering"), lets prompts of
different lengths be paired. Either way the vector is added at the same hook point, at every
position (or from a position on), as both papers do for the generated tokens.

The effect is measured as the change in the log-probability of target tokens at the end of
prompts, and the price as the KL divergence of the steered next-token distributions from the
unsteered ones on neutral text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

from jaxtyping import Float

from unraveled.errors import ParamError
from unraveled.experiment import RESOLVE_ANNOTATIONS
from unraveled.interventions.base import Intervention, Positions, intervening
from unraveled.interventions.edits import AddVector

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:
    from torch import Tensor
    from transformer_lens import HookedTransformer

VectorPosition = Literal["last", "mean"]


def check_contrastive_sets(positive: Sequence[str], negative: Sequence[str]) -> None:
    """Raise ``ParamError`` unless both sets are non-empty and pair up one to one."""
    if not positive:
        raise ParamError("positive", "is empty; give at least one prompt")
    if not negative:
        raise ParamError("negative", "is empty; give at least one prompt")
    if len(positive) != len(negative):
        raise ParamError(
            "negative",
            f"has {len(negative)} prompts, positive has {len(positive)}: "
            "each positive prompt needs its negative",
        )


def contrastive_vector(
    model: HookedTransformer,
    positive: Sequence[str],
    negative: Sequence[str],
    layer: int,
    position: VectorPosition = "last",
    prepend_bos: bool | None = None,
) -> Float[Tensor, " d_model"]:
    """The mean over pairs of resid_pre(positive) - resid_pre(negative) at ``layer``.

    Args:
        model: The model.
        positive: The positive prompts.
        negative: The negative prompts, paired with ``positive`` in order.
        layer: The block whose ``hook_resid_pre`` is read (and later steered).
        position: ``last``: each prompt's last token (CAA); ``mean``: the mean over its tokens,
            BOS left out when one is prepended.
        prepend_bos: Overrides the model's default.

    Raises:
        ParamError: Empty or unequal sets, a layer out of range, or (``mean``) a prompt with
            no token but BOS.
    """
    import torch

    from unraveled.activations import collect_activations

    check_contrastive_sets(positive, negative)
    n_layers = model.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise ParamError(
            "layer",
            f"{layer} is out of range: the model has {n_layers} layers (use 0..{n_layers - 1})",
        )
    hook = f"blocks.{layer}.hook_resid_pre"
    acts = collect_activations(
        model, [*positive, *negative], [hook], prepend_bos=prepend_bos, logits=False
    )
    resid = acts.cache[hook].double()  # [prompt, pos, d_model]
    mask = acts.mask.to(resid.device)
    if position == "last":
        last = mask.sum(dim=1) - 1
        per_prompt = resid[torch.arange(len(resid)), last]
    else:
        # BOS is the same token in every prompt, with a residual far larger than the others' in
        # GPT-2: averaged in, it would enter as (1/len(pos) - 1/len(neg)) * resid_BOS.
        if model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos:
            mask = mask.clone()
            mask[:, 0] = False
        counts = mask.sum(dim=1, keepdim=True)
        if bool((counts == 0).any()):
            raise ParamError("positive", "a prompt has no token besides BOS to average over")
        per_prompt = (resid * mask[..., None]).sum(dim=1) / counts
    n = len(positive)
    return (per_prompt[:n] - per_prompt[n:]).mean(dim=0).to(model.cfg.dtype).cpu()


@contextmanager
def steer(
    model: HookedTransformer,
    vector: Float[Tensor, " d_model"],
    layer: int,
    coefficient: float,
    *,
    from_position: int = 0,
) -> Iterator[Positions]:
    """Add ``coefficient * vector`` at ``blocks.{layer}.hook_resid_pre`` inside the block.

    The hook is removed on the way out, also when the body raises. Position-independent (the
    default ``from_position=0``) it is right under ``model.generate`` with its key-value cache
    too; from a later position on, generate with ``unraveled.interventions.generate``, which
    tells the hook where each cached step starts (or ``model.generate(...,
    use_past_kv_cache=False)``). Under ``model.generate`` with its cache the hook raises
    ``ParamError`` at the first cached step rather than leave it unsteered.

    Example:
        >>> with steer(model, vector, layer=6, coefficient=4.0):
        ...     model.generate("I think that you are", max_new_tokens=20)
    """
    with intervening(
        model, AddVector(vector, layer, coefficient, from_position=from_position)
    ) as positions:
        yield positions


def target_log_prob(
    model: HookedTransformer,
    prompts: Sequence[str],
    target_ids: Sequence[int],
    interventions: Sequence[Intervention] = (),
    prepend_bos: bool | None = None,
) -> Float[Tensor, " prompt"]:
    """Per prompt, log P(next token is one of ``target_ids``) after its last token.

    Args:
        model: The model.
        prompts: The prompts (right-padded into one batch; padding never reaches the result).
        target_ids: The target tokens' ids; their probabilities are summed.
        interventions: Active during the forward pass.
        prepend_bos: Overrides the model's default.
    """
    import torch

    from unraveled.activations import tokenize_batch

    tokens, mask = tokenize_batch(model, list(prompts), prepend_bos)
    with torch.inference_mode(), intervening(model, *interventions):
        logits = model(tokens)
    last = mask.sum(dim=1) - 1
    log_probs = logits[torch.arange(len(tokens)), last].double().log_softmax(dim=-1)
    return log_probs[:, list(target_ids)].logsumexp(dim=-1).cpu()


def next_token_log_probs(
    model: HookedTransformer,
    text: str,
    interventions: Sequence[Intervention] = (),
    prepend_bos: bool | None = None,
) -> Float[Tensor, "pos d_vocab"]:
    """The next-token log-probabilities at every position of ``text``, under ``interventions``."""
    import torch

    tokens = model.to_tokens(text, prepend_bos=prepend_bos)
    with torch.inference_mode(), intervening(model, *interventions):
        logits = model(tokens)
    return logits[0].double().log_softmax(dim=-1).cpu()


def kl_per_position(
    reference: Float[Tensor, "pos d_vocab"], other: Float[Tensor, "pos d_vocab"]
) -> Float[Tensor, " pos"]:
    """KL(reference || other) per position, in nats, from log-probabilities."""
    return (reference.exp() * (reference - other)).sum(dim=-1)
