"""How far a quantity spreads over its samples: standard deviation and standard error.

One convention for every experiment that reports an uncertainty over samples (pairs, noise
samples, held-out windows): the standard deviation with ``ddof=1`` and the standard error
``sd / sqrt(n)``. It says how much another draw of the samples would move the mean, so it is
undefined (NaN) with fewer than two samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray


@dataclass(frozen=True)
class Spread:
    """One quantity over samples: how many, their standard deviation and the standard error.

    Attributes:
        n: Samples where the quantity is defined (NaN ones left out).
        sd: Standard deviation over them (``ddof=1``; NaN for fewer than two).
        standard_error: ``sd / sqrt(n)``.
    """

    n: int
    sd: float
    standard_error: float

    def as_dict(self) -> dict[str, float | int]:
        """For metrics.json."""
        return {"n": self.n, "sd": self.sd, "standard_error": self.standard_error}


def standard_error(
    values: Float[NDArray, "*dims"], axis: int = -1, scale: float = 1.0
) -> Float[NDArray, "*reduced"]:
    """The standard error of the mean over ``axis``: ``scale * std(ddof=1) / sqrt(n)``.

    Args:
        values: Samples along ``axis``; NaN ones are not left out (``spread`` does that).
        axis: The samples' axis.
        scale: Multiplies the standard deviation before the division, so a standard error in
            percent (``scale=100``) rounds exactly as the experiments always computed it.

    Returns:
        The standard error in ``values``'s dtype, NaN everywhere when the axis holds fewer than
        two samples.
    """
    n = values.shape[axis]
    if n < 2:
        return np.full(np.delete(values.shape, axis), np.nan)
    return np.asarray(scale * values.std(axis=axis, ddof=1) / np.sqrt(n))


def spread(values: Float[NDArray, " sample"]) -> Spread:
    """The spread of ``values`` over the samples where they are defined (not NaN)."""
    defined = np.asarray(values, dtype=np.float64)
    defined = defined[~np.isnan(defined)]
    n = len(defined)
    if n < 2:
        return Spread(n, float("nan"), float("nan"))
    sd = float(defined.std(ddof=1))
    return Spread(n, sd, sd / float(np.sqrt(n)))
