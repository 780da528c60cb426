"""How far an SAE evaluation's headlines spread over the held-out windows.

The evaluation's headlines (``unraveled.sae.evaluation``) pool every evaluated token, but the
samples are the windows: whole, seeded choices over the corpus, with neighbouring tokens far from
independent. So each headline's uncertainty is taken over windows: the same quantity computed
per window (``SAEEvaluation.*_per_window``; CE loss recovered from each window's three losses),
its standard deviation over the windows where it is defined (``ddof=1``), and the standard error
``sd / sqrt(n)`` (``unraveled.spread``, the convention every experiment shares). It says how much
another choice of held-out windows would move the headline, not how much another training seed
would.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray

from unraveled.sae.evaluation import SAEEvaluation, recovered_loss
from unraveled.spread import Spread, spread


def ce_loss_recovered_per_window(evaluation: SAEEvaluation) -> Float[NDArray, " window"]:
    """Each window's CE loss recovered from its own three losses (NaN where undefined)."""
    return np.array(
        [
            recovered_loss(clean, spliced, zero)[0]
            for clean, spliced, zero in zip(
                evaluation.ce_loss_clean_per_window,
                evaluation.ce_loss_spliced_per_window,
                evaluation.ce_loss_zero_ablation_per_window,
                strict=True,
            )
        ],
        dtype=np.float64,
    )


def l0_spread(evaluation: SAEEvaluation) -> Spread:
    """The spread of L0 over evaluated tokens (the evaluation keeps only its histogram)."""
    counts = evaluation.l0_counts.astype(np.float64)
    n = int(counts.sum())
    if n < 2:
        return Spread(n, float("nan"), float("nan"))
    active = np.arange(len(counts))
    mean = float((counts * active).sum()) / n
    sd = float(np.sqrt((counts * (active - mean) ** 2).sum() / (n - 1)))
    return Spread(n, sd, sd / float(np.sqrt(n)))


def window_spreads(evaluation: SAEEvaluation) -> dict[str, Spread]:
    """Per headline of the evaluation, its spread over the held-out windows."""
    return {
        "mse": spread(evaluation.mse_per_window),
        "explained_variance": spread(evaluation.explained_variance_per_window),
        "ce_loss_clean": spread(evaluation.ce_loss_clean_per_window),
        "ce_loss_spliced": spread(evaluation.ce_loss_spliced_per_window),
        "ce_loss_zero_ablation": spread(evaluation.ce_loss_zero_ablation_per_window),
        "ce_loss_recovered": spread(ce_loss_recovered_per_window(evaluation)),
    }
