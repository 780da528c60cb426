"""Attribution patching on SAE features: which features at a hook carry the IOI logit difference.

The SAE is spliced in at its hook: the activation becomes ``decode(encode(x)) + error``, with the
error ``x - decode(encode(x))`` held at the value computed on the run's own input. The forward
pass is unchanged by the splice (it returns ``x``), so the gradient of the metric at the hook is
the plain model's, and the gradient with respect to the feature activations is that gradient
through the decoder (a vector-Jacobian product through ``sae.decode``; for a linear decoder,
``grad @ W_dec.T``). Per feature, the estimate of patching it from the clean into the corrupted
run is (clean - corrupted activation) x gradient at the corrupted run, summed over positions and
averaged over pairs; the error term's estimate is the same for the error, reported separately,
so that the features' estimates and the error's add up to the estimate of patching the whole
activation (the total clean - corrupted difference where the metric is linear in it).

Exact patching of the top features: in the corrupted run, one feature's activation replaced by
its clean activation at every position, everything else spliced as computed (the other features
and the corrupted run's error), the metric read again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from numpy.typing import NDArray
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from unraveled.patching import (
    GRADIENT_TOKENS,
    MAX_ROWS,
    Metric,
    PromptPairs,
    last_token_logits,
    logit_difference,
    run_cache,
)
from unraveled.patching.attribution import forward_and_gradients, gradient_passes


@dataclass(frozen=True)
class FeatureAttribution:
    """Attribution of a metric's clean - corrupted difference to an SAE's features at one hook.

    Attributes:
        hook_name: The hook the SAE is spliced in at.
        clean_metric: Mean metric over pairs of the clean run.
        corrupted_metric: Mean metric of the corrupted run.
        estimate: ``[feature]`` attribution estimate of restoring each feature (clean into
            corrupted): (clean - corrupted activation) x gradient, summed over positions, mean
            over pairs.
        error_estimate_per_pair: ``[pair]`` the same for the SAE's error term, per pair.
        top_features: The features patched exactly, largest ``|estimate|`` first.
        exact: ``[top]`` each one's exact patching effect: mean patched metric - corrupted mean.
        correlation: Pearson correlation of ``estimate[top_features]`` and ``exact`` (NaN for
            fewer than two features or a constant side).
    """

    hook_name: str
    clean_metric: float
    corrupted_metric: float
    estimate: Float[NDArray, " feature"]
    error_estimate_per_pair: Float[NDArray, " pair"]
    top_features: Int[NDArray, " top"]
    exact: Float[NDArray, " top"]
    correlation: float

    @property
    def n_pairs(self) -> int:
        """Prompt pairs the means are over."""
        return len(self.error_estimate_per_pair)

    @property
    def error_estimate(self) -> float:
        """The SAE error term's estimate, mean over pairs."""
        return float(self.error_estimate_per_pair.mean())

    @property
    def total(self) -> float:
        """Clean minus corrupted mean metric: what patching the whole activation restores."""
        return self.clean_metric - self.corrupted_metric


def encode_with_error(
    sae: SAE, activation: Float[Tensor, "*batch d_in"]
) -> tuple[Float[Tensor, "*batch d_sae"], Float[Tensor, "*batch d_in"]]:
    """The feature activations and the error term ``x - decode(encode(x))`` (no gradient)."""
    with torch.no_grad():
        features = sae.encode(activation.to(sae.dtype))
        return features, activation - sae.decode(features).to(activation.dtype)


def _decode(
    sae: SAE, activation: Float[Tensor, "*batch d_in"], features: Float[Tensor, "*batch d_sae"]
) -> Float[Tensor, "*batch d_in"]:
    """``sae.decode(features)`` for inputs ``activation``.

    Encoding ``activation`` first sets what a decoder with a per-input normalisation reads.
    """
    sae.encode(activation.to(sae.dtype))
    return sae.decode(features)


def feature_gradients(
    sae: SAE,
    activation: Float[Tensor, "batch pos d_in"],
    features: Float[Tensor, "batch pos d_sae"],
    gradient: Float[Tensor, "batch pos d_in"],
) -> Float[Tensor, "batch pos d_sae"]:
    """The gradient with respect to the spliced feature activations, from the activation's."""
    with torch.enable_grad():
        leaf = features.detach().requires_grad_(True)
        (result,) = torch.autograd.grad(
            _decode(sae, activation, leaf), leaf, grad_outputs=gradient.to(sae.dtype)
        )
    return result


def feature_attribution(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    pairs: PromptPairs,
    metric: Metric = logit_difference,
    top: int = 20,
    tokens_per_pass: int = GRADIENT_TOKENS,
    max_rows: int = MAX_ROWS,
) -> FeatureAttribution:
    """Attribution patching on the SAE's features at ``hook_name``, the top ones patched exactly.

    Args:
        model: The model.
        sae: The SAE (SAELens's ``SAE``) reading ``hook_name``.
        hook_name: Where it is spliced in.
        pairs: The prompt pairs (e.g. ``unraveled.datasets.ioi.ioi_batch(...).tokens``).
        metric: Score of each prompt from its last token's logits (default: the logit
            difference of the correct over the incorrect answer).
        top: How many features, largest ``|estimate|`` first, to patch exactly.
        tokens_per_pass: Tokens per forward-and-backward pass (bounds memory).
        max_rows: Prompts run at once in the exact patching (bounds memory).

    Returns:
        The estimates, the error term's, and the exact effects of the top features.
    """
    clean_logits, clean_cache = run_cache(model, pairs, "clean", [hook_name])
    clean_activation = clean_cache[hook_name]
    clean_features, clean_error = encode_with_error(sae, clean_activation)
    d_sae = clean_features.shape[-1]
    corrupted_scores = torch.empty(pairs.size)
    estimates = torch.empty(pairs.size, d_sae)
    error_estimates = torch.empty(pairs.size)
    for rows in gradient_passes(pairs, tokens_per_pass):
        part = pairs.rows(rows)
        scores, activations, gradients = forward_and_gradients(
            model, part.corrupted, part, [hook_name], metric
        )
        activation, gradient = activations[hook_name], gradients[hook_name]
        features, error = encode_with_error(sae, activation)
        feature_gradient = feature_gradients(sae, activation, features, gradient)
        corrupted_scores[rows] = scores
        estimates[rows] = ((clean_features[rows] - features) * feature_gradient).sum(dim=1)
        error_estimates[rows] = ((clean_error[rows] - error) * gradient).sum(dim=(1, 2))
    estimate = estimates.mean(0).double().numpy()
    order = np.argsort(-np.abs(estimate), kind="stable")[: min(top, d_sae)]
    exact = (
        patched_feature_metric(
            model, sae, hook_name, pairs, torch.as_tensor(order), clean_features, metric, max_rows
        ).mean(-1)
        - corrupted_scores.mean()
    )
    exact_np = exact.double().numpy()
    return FeatureAttribution(
        hook_name=hook_name,
        clean_metric=float(metric(clean_logits, pairs).mean()),
        corrupted_metric=float(corrupted_scores.mean()),
        estimate=estimate,
        error_estimate_per_pair=error_estimates.double().numpy(),
        top_features=order.astype(np.int64),
        exact=exact_np,
        correlation=_pearson(estimate[order], exact_np),
    )


def patched_feature_metric(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    pairs: PromptPairs,
    features: Int[Tensor, " patched"],
    clean_features: Float[Tensor, "batch pos d_sae"],
    metric: Metric = logit_difference,
    max_rows: int = MAX_ROWS,
) -> Float[Tensor, "patched batch"]:
    """The metric of the corrupted run with one feature at a time restored to its clean value.

    For each of ``features``: at ``hook_name`` of the corrupted run, the SAE spliced in with
    that feature's activation replaced by the clean run's at every position (the other
    features and the error term as the corrupted run computes them). Runs copies of the batch,
    at most ``max_rows`` prompts (and at least one copy) at a time.
    """
    copies_per_pass = max(1, max_rows // pairs.size)
    results = []
    for start in range(0, len(features), copies_per_pass):
        chosen = features[start : start + copies_per_pass]
        copies = len(chosen)

        def splice(activation: Tensor, hook: HookPoint, chosen: Tensor = chosen) -> Tensor:
            own, _ = encode_with_error(sae, activation)
            patched = own.clone().view(len(chosen), pairs.size, *own.shape[1:])
            restored = clean_features[:, :, chosen].permute(2, 0, 1)  # [copy, batch, pos]
            patched[torch.arange(len(chosen)), :, :, chosen] = restored
            with torch.no_grad():
                change = _decode(sae, activation, patched.view_as(own)) - _decode(
                    sae, activation, own
                )
            return activation + change.to(activation.dtype)

        repeated = pairs.repeat(copies)
        with torch.inference_mode():
            logits = model.run_with_hooks(repeated.corrupted, fwd_hooks=[(hook_name, splice)])
            scores = metric(last_token_logits(logits, repeated), repeated)
        results.append(scores.view(copies, pairs.size))
    return torch.cat(results) if results else torch.empty(0, pairs.size)


def _pearson(x: Float[NDArray, " n"], y: Float[NDArray, " n"]) -> float:
    """Pearson's correlation; NaN for fewer than two values or a constant side."""
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])
