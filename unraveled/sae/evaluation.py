"""How good an SAE is on held-out windows: sparsity, reconstruction, and CE loss recovered.

The definitions are SAELens's (``sae_lens.evals``), so the numbers compare with SAELens's own
evaluations and Neuronpedia's:

- **L0**: active features (activation ``!= 0``, as SAELens counts), mean per token.
- **MSE**: the squared reconstruction error summed over the hook's dimensions, mean per token.
- **Fraction of variance explained**: ``1 - MSE / Var(x)`` with ``Var(x) = E[||x||^2] -
  ||E[x]||^2``, the total variance over the evaluated tokens (SAELens's
  ``ExplainedVarianceCalculator``, not its per-batch legacy formula).
- **Feature density**: per feature, the fraction of evaluated tokens it is active on. **Dead**:
  never active over the evaluated tokens; **dense**: active on more than 10% of them.
- **CE loss recovered**: ``(zero - spliced) / (zero - clean)``, from the next-token loss of the
  clean model, of the model with the SAE's reconstruction spliced in at the hook, and of the model
  with the hook's activation zeroed. These three losses come from SAELens's own
  ``get_recons_loss``, called on each batch of windows.

Which positions count and what "active" means are ``unraveled.sae.positions``'s definitions, the
ones training and the feature browser use too: the prepended BOS and the special tokens are left
out as SAELens's ``run_evals`` leaves them out by default (``exclude_special_tokens=True``): the
tokenizer's BOS, EOS, PAD, SEP and decoder-start ids (``sae_lens.util.get_special_token_ids``; for
GPT-2 the one ``<|endoftext|>`` that also separates documents in the corpus windows). A position
left out counts in no metric: not in L0, MSE, variance or density, and its next-token loss is not
averaged. The spliced pass keeps the model's
own activation there (``get_recons_loss`` splices only the other positions); the zero-ablation
pass zeroes every position, as in SAELens. Special-token activations are outliers (GPT-2's first
position has many times the norm of the others), so they would dominate MSE and variance.

Windows go through in batches of ``batch_windows``: only running sums are kept (per feature a
firing count, per number of active features a token count, per window a few sums), so memory is
set by the batch, not by how many windows are evaluated. SAELens's
``get_sparsity_and_variance_metrics`` is not used because it takes an ``ActivationsStore`` (our
windows are already tokenised, chosen and held out) and keeps every token's metrics until the end;
the same definitions are computed here from running sums instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from numpy.typing import NDArray
from sae_lens import SAE
from sae_lens.evals import get_recons_loss
from sae_lens.training.activation_scaler import ActivationScaler
from torch import Tensor
from transformer_lens import HookedTransformer

from unraveled.corpus import with_bos
from unraveled.experiment import Table
from unraveled.sae.activations import run_to_hook
from unraveled.sae.positions import counted_positions, excluded_token_ids, is_active

# Active on more than this fraction of the evaluated tokens: a dense feature.
DENSE_THRESHOLD = 0.1
# Below this total variance the fraction explained is taken as 1 (exact) or 0, as SAELens does.
_NO_VARIANCE = 1e-10


MIN_CE_LOSS_GAP = 1e-3
"""Nats: zero-ablation closer than this to the clean loss leaves CE loss recovered undefined."""


def recovered_loss(clean: float, spliced: float, zero_ablation: float) -> tuple[float, str | None]:
    """``(zero - spliced) / (zero - clean)``, or NaN and why where that divides by about 0.

    Args:
        clean: Mean next-token loss of the model as it is.
        spliced: With the SAE's reconstruction spliced in at its hook.
        zero_ablation: With the hook's activations zeroed.

    Returns:
        The fraction recovered, and None; or NaN and the reason when zero-ablating the hook
        changes the loss by less than ``MIN_CE_LOSS_GAP``: nothing there for the SAE to recover.
    """
    gap = zero_ablation - clean
    if abs(gap) < MIN_CE_LOSS_GAP:
        return float("nan"), (
            f"zero-ablating the hook changes the loss by {gap:.2g} nats (less than "
            f"{MIN_CE_LOSS_GAP:g}): the loss doesn't depend on it, nothing to recover"
        )
    return (zero_ablation - spliced) / gap, None


@dataclass(frozen=True)
class SAEEvaluation:
    """An SAE's evaluation on held-out windows (definitions in the module docstring).

    Attributes:
        hook_name: The hook the SAE reads and is spliced into.
        n_windows: Windows evaluated.
        window_tokens: Positions per window (a prepended BOS included).
        excluded_token_ids: Token ids whose positions count in no metric (special tokens).
        n_tokens: Positions evaluated for L0, MSE, variance and density (excluded ones left out).
        l0: Mean number of active features per evaluated token.
        l0_counts: Evaluated tokens with exactly ``i`` active features, for ``i`` in 0..d_sae.
        mse: Mean over evaluated tokens of the squared error summed over the hook's dimensions.
        explained_variance: Fraction of the activations' total variance the reconstruction
            explains.
        mse_per_window: The MSE over each window's evaluated tokens (NaN for a window with none).
        explained_variance_per_window: ``1 - mse_per_window / Var(x)``, Var over all evaluated
            tokens: its token-weighted mean over windows is ``explained_variance``.
        feature_counts: Per feature, the evaluated tokens it is active on.
        ce_loss_clean: Mean next-token loss of the model as it is.
        ce_loss_spliced: Mean next-token loss with the SAE's reconstruction spliced in.
        ce_loss_zero_ablation: Mean next-token loss with the hook's activation zeroed.
        ce_loss_tokens: Next-token predictions averaged (positions before the last whose input
            token is not excluded).
        ce_loss_clean_per_window: The clean loss per window (NaN for a window with none).
        ce_loss_spliced_per_window: The spliced loss per window.
        ce_loss_zero_ablation_per_window: The zero-ablation loss per window.
    """

    hook_name: str
    n_windows: int
    window_tokens: int
    excluded_token_ids: tuple[int, ...]
    n_tokens: int
    l0: float
    l0_counts: Int[NDArray, " n_active"]
    mse: float
    explained_variance: float
    mse_per_window: Float[NDArray, " window"]
    explained_variance_per_window: Float[NDArray, " window"]
    feature_counts: Int[NDArray, " feature"]
    ce_loss_clean: float
    ce_loss_spliced: float
    ce_loss_zero_ablation: float
    ce_loss_tokens: int
    ce_loss_clean_per_window: Float[NDArray, " window"]
    ce_loss_spliced_per_window: Float[NDArray, " window"]
    ce_loss_zero_ablation_per_window: Float[NDArray, " window"]

    @property
    def ce_loss_recovered(self) -> float:
        """``(zero - spliced) / (zero - clean)``; NaN where undefined (see ``recovered_loss``).

        1 when splicing the reconstruction in costs no loss, 0 when it costs as much as zeroing.
        """
        return recovered_loss(self.ce_loss_clean, self.ce_loss_spliced, self.ce_loss_zero_ablation)[
            0
        ]

    @property
    def ce_loss_recovered_undefined_because(self) -> str | None:
        """Why ``ce_loss_recovered`` is NaN, or None where it is defined."""
        return recovered_loss(self.ce_loss_clean, self.ce_loss_spliced, self.ce_loss_zero_ablation)[
            1
        ]

    @property
    def feature_density(self) -> Float[NDArray, " feature"]:
        """Per feature, the fraction of evaluated tokens it is active on."""
        return self.feature_counts / self.n_tokens

    @property
    def dead_features(self) -> Int[NDArray, " dead"]:
        """Indices of the features never active over the evaluated tokens."""
        return np.flatnonzero(self.feature_counts == 0)

    @property
    def dense_features(self) -> Int[NDArray, " dense"]:
        """Indices of the features active on more than ``DENSE_THRESHOLD`` of the tokens."""
        return np.flatnonzero(self.feature_density > DENSE_THRESHOLD)

    def metrics(self) -> dict[str, Any]:
        """The scalar results for metrics.json (per-feature and per-window ones: ``tables``)."""
        d_sae = len(self.feature_counts)
        return {
            "hook_name": self.hook_name,
            "windows_evaluated": self.n_windows,
            "tokens_per_window": self.window_tokens,
            "excluded_token_ids": list(self.excluded_token_ids),
            "tokens_evaluated": self.n_tokens,
            "l0": self.l0,
            "mse": self.mse,
            "explained_variance": self.explained_variance,
            "d_sae": d_sae,
            "dead_features": len(self.dead_features),
            "dead_fraction": len(self.dead_features) / d_sae,
            "dense_threshold": DENSE_THRESHOLD,
            "dense_features": len(self.dense_features),
            "dense_fraction": len(self.dense_features) / d_sae,
            "ce_loss_clean": self.ce_loss_clean,
            "ce_loss_spliced": self.ce_loss_spliced,
            "ce_loss_zero_ablation": self.ce_loss_zero_ablation,
            "ce_loss_recovered": self.ce_loss_recovered,
            **(
                {"ce_loss_recovered_undefined_because": self.ce_loss_recovered_undefined_because}
                if self.ce_loss_recovered_undefined_because is not None
                else {}
            ),
            "ce_loss_tokens": self.ce_loss_tokens,
        }

    def tables(self) -> list[Table]:
        """Per feature (its firing count and density) and per window (its losses and errors)."""
        return [
            Table(
                "sae_evaluation_features",
                {
                    "feature": np.arange(len(self.feature_counts)),
                    "active_tokens": self.feature_counts,
                    "density": self.feature_density,
                },
                f"Per SAE feature: the held-out tokens it is active on, of {self.n_tokens}.",
            ),
            Table(
                "sae_evaluation_windows",
                {
                    "window": np.arange(self.n_windows),
                    "mse": self.mse_per_window,
                    "explained_variance": self.explained_variance_per_window,
                    "ce_loss_clean": self.ce_loss_clean_per_window,
                    "ce_loss_spliced": self.ce_loss_spliced_per_window,
                    "ce_loss_zero_ablation": self.ce_loss_zero_ablation_per_window,
                },
                "Per held-out window: reconstruction error and the three next-token losses.",
            ),
        ]


def _per_window_mean(
    sums: Float[NDArray, " window"], counts: Int[NDArray, " window"]
) -> Float[NDArray, " window"]:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


@torch.no_grad()
def evaluate_sae(
    model: HookedTransformer,
    sae: SAE[Any],
    hook_name: str,
    windows: Int[Tensor, "window pos"],
    batch_windows: int,
    exclude_special_tokens: bool | Iterable[int] = True,
    prepend_bos: bool = False,
) -> SAEEvaluation:
    """Evaluate ``sae`` at ``hook_name`` of ``model`` on ``windows``, ``batch_windows`` at a time.

    Args:
        model: The model the SAE reads.
        sae: A SAELens SAE whose input is the activation at ``hook_name``.
        hook_name: The hook to read and splice into (a ``[window, pos, d_in]`` activation).
        windows: Held-out token windows, each evaluated as one sequence (without BOS).
        batch_windows: Windows per forward pass; memory grows with it (the spliced-loss pass
            holds three ``[batch_windows, pos, d_vocab]`` logits at once).
        exclude_special_tokens: Which tokens' positions count in no metric (see
            ``unraveled.sae.positions.excluded_token_ids``); True, SAELens's default, leaves
            out the special tokens.
        prepend_bos: Put the model's BOS before each window, as in training; its position counts
            in no metric (SAELens's splice, ``get_recons_loss``, still replaces it when nothing
            is excluded).

    Returns:
        The metrics (see ``SAEEvaluation`` and the module docstring).

    Raises:
        ValueError: No windows, ``batch_windows`` below 1, an activation at ``hook_name`` that
            is not ``[window, pos, sae.cfg.d_in]``, or every position excluded.
    """
    windows = with_bos(model, windows, prepend_bos)
    n_windows, window_tokens = windows.shape
    if n_windows == 0 or window_tokens < 2:
        raise ValueError(
            f"windows: expected at least one window of at least 2 tokens (BOS included), got "
            f"shape {tuple(windows.shape)}"
        )
    if batch_windows < 1:
        raise ValueError(f"batch_windows: expected at least 1, got {batch_windows}")
    excluded = excluded_token_ids(model, exclude_special_tokens)
    d_sae = sae.cfg.d_sae
    feature_counts = torch.zeros(d_sae, dtype=torch.int64)
    l0_counts = torch.zeros(d_sae + 1, dtype=torch.int64)
    # float64: the total variance is a difference of two large, nearly equal numbers when the
    # activations have a large mean (SAELens's ExplainedVarianceCalculator does the same).
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_squared_norm = 0.0
    # Per window: evaluated tokens, summed squared error; next-token losses and their count.
    window_tokens_kept = torch.zeros(n_windows, dtype=torch.int64)
    window_squared_error = torch.zeros(n_windows, dtype=torch.float64)
    window_losses = {
        name: torch.zeros(n_windows, dtype=torch.float64)
        for name in ("ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation")
    }
    window_loss_counts = torch.zeros(n_windows, dtype=torch.int64)
    for start in range(0, n_windows, batch_windows):
        rows = slice(start, min(start + batch_windows, n_windows))
        tokens = windows[rows].to(model.cfg.device)
        # [batch, pos]: True at the positions evaluated.
        kept = counted_positions(tokens.cpu(), excluded, prepend_bos)
        x = run_to_hook(model, hook_name, tokens)
        if x.ndim != 3 or x.shape[-1] != sae.cfg.d_in:
            raise ValueError(
                f"hook {hook_name!r}: expected an activation [window, pos, {sae.cfg.d_in}] "
                f"(the SAE's d_in), got {list(x.shape)}"
            )
        features = sae.encode(x.to(sae.device))
        reconstruction = sae.decode(features)
        if features.is_sparse:
            features = features.to_dense()
        # [batch, pos]: active features per position.
        active = is_active(features)
        n_active = active.sum(dim=-1).cpu()
        l0_counts += torch.bincount(n_active[kept], minlength=d_sae + 1)
        feature_counts += (active & kept.to(features.device)[..., None]).sum((0, 1)).cpu()
        x64 = x.to("cpu", torch.float64)
        squared_error = (x64 - reconstruction.to("cpu", torch.float64)).pow(2).sum(-1)
        window_squared_error[rows] = (squared_error * kept).sum(-1)
        window_tokens_kept[rows] = kept.sum(-1)
        sum_x += (x64 * kept[..., None]).sum((0, 1))
        sum_squared_norm += float((x64.pow(2).sum(-1) * kept).sum())
        del features, active, reconstruction, x, x64

        losses = get_recons_loss(
            sae,
            model,
            ActivationScaler(),
            tokens,
            compute_kl=False,
            compute_ce_loss=True,
            ignore_tokens=list(excluded) or None,
            hook_name=hook_name,
        )
        # The loss at position t predicts token t + 1 from token t: left out when token t is, as
        # SAELens's get_downstream_reconstruction_metrics masks it.
        loss_kept = kept[:, :-1]
        for name, sums in window_losses.items():
            sums[rows] = (losses[name].to("cpu", torch.float64) * loss_kept).sum(-1)
        window_loss_counts[rows] = loss_kept.sum(-1)
        del losses

    n_tokens = int(window_tokens_kept.sum())
    if n_tokens == 0:
        raise ValueError(
            f"windows: every position holds an excluded token {list(excluded)}: nothing to evaluate"
        )
    squared_error_total = float(window_squared_error.sum())
    mse = squared_error_total / n_tokens
    mean_x = sum_x / n_tokens
    total_variance = sum_squared_norm / n_tokens - float(mean_x.pow(2).sum())
    mse_per_window = _per_window_mean(window_squared_error.numpy(), window_tokens_kept.numpy())
    if total_variance < _NO_VARIANCE:
        exact = mse < _NO_VARIANCE
        explained_variance = 1.0 if exact else 0.0
        explained_per_window = np.where(mse_per_window < _NO_VARIANCE, 1.0, 0.0)
    else:
        explained_variance = 1.0 - mse / total_variance
        explained_per_window = 1.0 - mse_per_window / total_variance
    n_loss = int(window_loss_counts.sum())
    if n_loss == 0:
        raise ValueError(
            "windows: no position before a window's last holds a token that is not excluded: "
            "no next-token loss to evaluate"
        )
    loss_means = {name: float(sums.sum()) / n_loss for name, sums in window_losses.items()}
    loss_per_window = {
        name: _per_window_mean(sums.numpy(), window_loss_counts.numpy())
        for name, sums in window_losses.items()
    }
    active = torch.arange(d_sae + 1, dtype=torch.float64)
    return SAEEvaluation(
        hook_name=hook_name,
        n_windows=n_windows,
        window_tokens=window_tokens,
        excluded_token_ids=excluded,
        n_tokens=n_tokens,
        l0=float((l0_counts * active).sum()) / n_tokens,
        l0_counts=l0_counts.numpy(),
        mse=mse,
        explained_variance=explained_variance,
        mse_per_window=mse_per_window,
        explained_variance_per_window=explained_per_window,
        feature_counts=feature_counts.numpy(),
        ce_loss_clean=loss_means["ce_loss_without_sae"],
        ce_loss_spliced=loss_means["ce_loss_with_sae"],
        ce_loss_zero_ablation=loss_means["ce_loss_with_ablation"],
        ce_loss_tokens=n_loss,
        ce_loss_clean_per_window=loss_per_window["ce_loss_without_sae"],
        ce_loss_spliced_per_window=loss_per_window["ce_loss_with_sae"],
        ce_loss_zero_ablation_per_window=loss_per_window["ce_loss_with_ablation"],
    )
