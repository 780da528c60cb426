"""Small SAELens SAEs with random weights, for the feature browser and attribution tests."""

from __future__ import annotations

import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata


def tiny_sae(d_in: int, d_sae: int, hook_name: str, seed: int, bias: float = -0.5) -> StandardSAE:
    """A ReLU SAE with Gaussian weights; encoder biases spread around ``bias`` so that features
    range from dead to dense on a tiny model's activations."""
    generator = torch.Generator().manual_seed(seed)
    sae = StandardSAE(
        StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook_name))
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=generator) / d_in**0.5)
        sae.b_enc.copy_(bias + torch.randn(d_sae, generator=generator) * 1.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=generator) / d_in**0.5)
        sae.b_dec.copy_(torch.randn(d_in, generator=generator) * 0.1)
    return sae.eval().requires_grad_(False)
