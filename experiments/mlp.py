"""MLPs: their width, the superposition toy that shows how many nearly orthogonal directions fit
in few dimensions, and how the MLP neurons actually fire on prompts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray
from pydantic import Field

from unraveled.experiment import RESOLVE_ANNOTATIONS, Artifact, Experiment, Figure, Params, Prompt

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from transformer_lens import HookedTransformer

DEFAULT_PROMPTS = [
    "Alice gave Bob a goose, and he gave her a duck.",
    "The Eiffel Tower is in Paris, the capital of France.",
    "def add(a, b):\n    return a + b",
]


class MlpParams(Params):
    prompts: list[Prompt] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1)
    # Bounded: the toy holds every pair's cosine (toy_vectors**2 / 2 numbers).
    toy_vectors: int = Field(1000, ge=2, le=5000, description="Vectors in the superposition toy.")
    toy_dims: int = Field(100, ge=2, le=4096, description="Dimensions they live in.")
    toy_steps: int = Field(300, ge=1, le=100_000, description="Adam steps.")
    toy_lr: float = Field(0.01, gt=0)
    toy_cutoff: float = Field(0.01, ge=0, description="Cosines below this are not penalised.")


@dataclass(frozen=True)
class SuperpositionToy:
    loss: Float[NDArray, " steps"]
    pair_angles_deg: Float[NDArray, " pairs"]


@dataclass(frozen=True)
class MlpResult:
    toy: SuperpositionToy
    post_samples: list[Float[NDArray, " samples"]]
    active_fraction: Float[NDArray, " layer"]
    summary: dict[str, Any]

    def metrics(self) -> dict[str, Any]:
        return self.summary


def superposition_toy(n_vectors: int, n_dims: int, steps: int, lr: float, cutoff: float, seed: int) -> SuperpositionToy:
    """Push ``n_vectors`` unit vectors towards orthogonality with Adam.

    The loss sums, over distinct pairs, how far |cos| exceeds ``cutoff``; far more vectors than
    dimensions still end up within about a degree of orthogonal to one another.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n_vectors, n_dims, generator=generator).requires_grad_(True)
    optimiser = torch.optim.Adam([vectors], lr=lr)
    off_diagonal = ~torch.eye(n_vectors, dtype=torch.bool)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            unit = vectors / vectors.norm(dim=1, keepdim=True)
            cosines = unit @ unit.T
            loss = (cosines[off_diagonal].abs() - cutoff).relu().sum() / 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    with torch.no_grad():
        unit = vectors / vectors.norm(dim=1, keepdim=True)
        upper = torch.triu(torch.ones(n_vectors, n_vectors, dtype=torch.bool), diagonal=1)
        angles = torch.rad2deg(torch.arccos((unit @ unit.T)[upper].clamp(-1, 1)))
    return SuperpositionToy(loss=np.array(losses), pair_angles_deg=angles.numpy())


def compute(model: HookedTransformer, params: MlpParams, seed: int) -> MlpResult:
    from unraveled.activations import collect_activations

    toy = superposition_toy(params.toy_vectors, params.toy_dims, params.toy_steps, params.toy_lr, params.toy_cutoff, seed)
    n_layers = model.cfg.n_layers
    hooks = [f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)]
    acts = collect_activations(model, params.prompts, hooks)
    rng = np.random.default_rng(seed)
    post_samples, active = [], []
    for layer in range(n_layers):
        real = acts.cache[hooks[layer]][acts.mask]  # [real tokens, d_mlp]: padding left out
        values = real.flatten().numpy()
        post_samples.append(rng.choice(values, size=min(20000, len(values)), replace=False))
        active.append(float((real > 0).float().mean()))
    within_one_degree = float((np.abs(toy.pair_angles_deg - 90) <= 1).mean())
    summary = {
        "d_mlp": model.cfg.d_mlp,
        "act_fn": model.cfg.act_fn,
        "gated_mlp": bool(model.cfg.gated_mlp),
        "superposition_toy": {
            "vectors": params.toy_vectors,
            "dims": params.toy_dims,
            "final_loss": float(toy.loss[-1]),
            "fraction_of_pairs_within_1_degree_of_orthogonal": within_one_degree,
            "max_deviation_from_90_degrees": float(np.abs(toy.pair_angles_deg - 90).max()),
        },
        "fraction_of_neurons_active_per_layer": active,
        "active_means": "post-activation > 0, over every real token of the prompts",
        "post_activation_mean_per_layer": [float(s.mean()) for s in post_samples],
        "prompts": params.prompts,
    }
    return MlpResult(toy=toy, post_samples=post_samples, active_fraction=np.array(active), summary=summary)


def render(result: MlpResult) -> Iterator[Artifact]:
    from unraveled.render.figures import panels

    figure, (left, right) = panels(2)
    left.plot(result.toy.loss)
    left.set(title="Superposition toy: loss", xlabel="Adam step", ylabel="sum over pairs of relu(|cos| - cutoff)")
    left.grid(True, alpha=0.4)
    right.hist(result.toy.pair_angles_deg, bins=np.linspace(89, 91, 9), edgecolor="white")
    right.set(title="Angles between pairs of vectors", xlabel="angle (degrees)", ylabel="pairs", xlim=(89, 91))
    right.grid(True, alpha=0.4)
    yield Figure("06_angle_distribution", figure, "Many more nearly orthogonal directions than dimensions")

    figure, (left, right) = panels(2, width_ratios=[2.0, 1.0])
    left.violinplot(result.post_samples, showextrema=False)
    left.set(title="MLP post-activations per layer (mlp.hook_post)", xlabel="Layer", ylabel="activation", yscale="symlog")
    left.set_xticks(range(1, len(result.post_samples) + 1), [str(i) for i in range(len(result.post_samples))], fontsize=7)
    right.bar(range(len(result.active_fraction)), result.active_fraction, color="teal")
    right.set(title="Fraction of neurons active (> 0)", xlabel="Layer", ylabel="fraction", ylim=(0, 1))
    yield Figure("07_mlp_activations", figure, "Distribution of MLP activations and fraction of neurons active, per layer")


EXPERIMENT = Experiment(title="MLPs and superposition", params=MlpParams, compute=compute, render=render)
