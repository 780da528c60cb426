"""What the SAE tests share: planted sparse features made with plain torch, and small settings."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from unraveled.sae.training import TrainSettings

# The known answer (issue 22.5): 64 sparse directions in 16 dimensions.
N_PLANTED = 64
D_PLANTED = 16
FIRING = 0.03
PLANTED_SETTINGS = TrainSettings(
    architecture="topk",
    d_sae=128,
    k=2,
    l1_coefficient=1.0,
    training_tokens=150_000,
    batch_tokens=512,
    buffer_tokens=8192,
    lr=1e-2,
)


def planted_directions(seed: int) -> torch.Tensor:
    """64 unit directions in 16 dimensions, pushed apart by gradient descent on their overlaps.

    Made here with plain torch (not SAELens's synthetic module the experiment uses), so the test
    does not share the code it checks.
    """
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(N_PLANTED, D_PLANTED, generator=generator).requires_grad_(True)
    optimiser = torch.optim.Adam([vectors], lr=0.01)
    for _ in range(300):
        unit = torch.nn.functional.normalize(vectors, dim=1)
        overlap = (unit @ unit.T - torch.eye(N_PLANTED)).pow(2).sum()
        optimiser.zero_grad()
        overlap.backward()
        optimiser.step()
    return torch.nn.functional.normalize(vectors.detach(), dim=1)


def planted_stream(directions: torch.Tensor, seed: int) -> Iterator[torch.Tensor]:
    """Endless samples: each feature fires with probability FIRING, magnitude 1 +- 0.1."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        fires = torch.rand(4096, N_PLANTED, generator=generator) < FIRING
        magnitude = 1 + 0.1 * torch.randn(4096, N_PLANTED, generator=generator)
        yield (fires * magnitude) @ directions
