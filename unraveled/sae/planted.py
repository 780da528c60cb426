"""The known answer: sparse features planted in superposition, and how many an SAE recovers.

``planted_features`` makes SAELens's synthetic data (its ``FeatureDictionary`` of unit
directions, more than the dimensions, and its ``ActivationGenerator`` of sparse firings), the
superposition toy's setting with a ground truth; ``max_cosine_per_planted`` says, for each
planted direction, how close the SAE's nearest decoder direction comes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float
from sae_lens import SAE
from sae_lens.synthetic import ActivationGenerator, FeatureDictionary
from torch import Tensor

RECOVERED_COSINE = 0.9


@dataclass(frozen=True)
class PlantedFeatures:
    """Sparse features in superposition: their directions and a stream of their activations.

    Attributes:
        directions: The planted unit directions, one per row.
        firing_probability: The chance each feature fires on a sample (independently).
        seed: Seeds the directions and the stream.
    """

    directions: Float[Tensor, "feature d_in"]
    firing_probability: float
    seed: int

    def stream(self, chunk: int = 4096) -> Iterator[Float[Tensor, "sample d_in"]]:
        """Samples without end, ``chunk`` at a time: each a sum of the features that fire.

        A feature that fires has magnitude 1 plus Gaussian noise of 0.1 (SAELens's generator).
        """
        n_features, d_in = self.directions.shape
        dictionary = FeatureDictionary(n_features, d_in, initializer=None)
        dictionary.feature_vectors.data = self.directions.clone()
        generator = ActivationGenerator(
            n_features, self.firing_probability, std_firing_magnitudes=0.1
        )
        torch.manual_seed(self.seed)
        while True:
            # Not around the yield: grad mode is the thread's, and the caller trains.
            with torch.no_grad():
                samples = dictionary(generator(chunk))
            yield samples


def planted_features(
    n_features: int, d_in: int, firing_probability: float, seed: int
) -> PlantedFeatures:
    """``n_features`` unit directions in ``d_in`` dimensions, as nearly orthogonal as they go.

    SAELens's ``FeatureDictionary`` with its default initializer: random directions pushed apart,
    as the superposition toy of the ``mlp`` experiment pushes its vectors.
    """
    dictionary = FeatureDictionary(n_features, d_in, seed=seed)
    return PlantedFeatures(dictionary.feature_vectors.detach().clone(), firing_probability, seed)


def max_cosine_per_planted(
    directions: Float[Tensor, "feature d_in"], sae: SAE
) -> Float[Tensor, " feature"]:
    """For each planted direction, the largest cosine with any of the SAE's decoder directions."""
    decoder = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
    planted = torch.nn.functional.normalize(directions.float(), dim=1)
    return (planted @ decoder.T).max(dim=1).values
