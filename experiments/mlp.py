"""MLPs: their width, the superposition toy, and how the MLP neurons actually fire on prompts.

The toy packs far more vectors than dimensions and pushes them apart, as the original analysis
does: most pairs end up nearly orthogonal, but not all (the Welch bound forbids it), so the whole
angle distribution is reported, not only the 89-91 degree window.

It reads raw weights, as the original analysis does: folding the LayerNorm into the MLP's input
weights and centring the weights that write to the residual change neither ``mlp.hook_pre`` nor
``mlp.hook_post``, so the processed copy would only cost a second conversion.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float, Int
from numpy.typing import NDArray
from pydantic import Field

from unraveled.experiment import RESOLVE_ANNOTATIONS, Artifact, Experiment, Figure, Params, Prompt

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from matplotlib.axes import Axes
    from torch import Tensor
    from transformer_lens import HookedTransformer

# How "active" is measured, shortly (figures) and in full (metrics).
ACTIVE_RULE = (
    "post-activation > 0 (mlp.hook_post)",
    "post-activation > 0 (mlp.hook_post), over every real token of the prompts",
)
GATED_ACTIVE_RULE = (
    "gate pre-activation > 0 (mlp.hook_pre)",
    "gate pre-activation > 0 (mlp.hook_pre), i.e. SiLU(gate) > 0; "
    "the gated MLP's hook_post = SiLU(gate) x up "
    "has no sign that means firing. Over every real token of the prompts",
)
DEFAULT_PROMPTS = [
    "Alice gave Bob a goose, and he gave her a duck.",
    "The Eiffel Tower is in Paris, the capital of France.",
    "def add(a, b):\n    return a + b",
]


class MlpParams(Params):
    """The MLP experiment's params: the prompts run, and the superposition toy's settings."""

    prompts: list[Prompt] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1)
    # Bounded: the toy holds every pair's cosine (toy_vectors**2 / 2 numbers).
    toy_vectors: int = Field(1000, ge=2, le=5000, description="Vectors in the superposition toy.")
    toy_dims: int = Field(100, ge=2, le=4096, description="Dimensions they live in.")
    toy_steps: int = Field(300, ge=1, le=100_000, description="Adam steps.")
    toy_lr: float = Field(0.01, gt=0)
    toy_cutoff: float = Field(0.01, ge=0, description="Dot products below this are not penalised.")
    toy_norm_weight: float = Field(
        1000.0, ge=0, description="Weight of the penalty keeping the vectors unit length."
    )


@dataclass(frozen=True)
class PairAngles:
    """How close to orthogonal the pairs of a set of vectors are, with every pair counted."""

    n_pairs: int
    histogram_edges: Float[NDArray, " edges"]
    histogram_counts: Int[NDArray, " bins"]
    zoom_edges: Float[NDArray, " zoom_edges"]
    zoom_counts: Int[NDArray, " zoom_bins"]
    fraction_within_1_degree: float
    rms_cosine: float
    welch_bound_rms_cosine: float
    max_abs_cosine: float
    pairs_more_than_45_degrees_off: int

    def summary(self) -> dict[str, Any]:
        """The numbers for the metrics: every field but the histograms."""
        return {
            "pairs": self.n_pairs,
            "fraction_of_pairs_within_1_degree_of_orthogonal": self.fraction_within_1_degree,
            "rms_cosine": self.rms_cosine,
            "welch_bound_rms_cosine": self.welch_bound_rms_cosine,
            "max_abs_cosine": self.max_abs_cosine,
            "pairs_more_than_45_degrees_off_orthogonal": self.pairs_more_than_45_degrees_off,
        }


@dataclass(frozen=True)
class SuperpositionToy:
    """The superposition toy's outcome.

    Attributes:
        loss: The loss after each Adam step.
        vectors: The vectors at the end.
        angles: How close to orthogonal their pairs are.
    """

    loss: Float[NDArray, " steps"]
    vectors: Float[NDArray, "vectors dims"]
    angles: PairAngles


@dataclass(frozen=True)
class MlpResult:
    """The superposition toy, and how the MLP neurons fire on the prompts.

    Attributes:
        toy: The superposition toy.
        post_samples: Per layer, a random sample of the post-activations on real tokens.
        active_fraction: Per layer, the fraction of neurons active over the real tokens.
        active_rule: What counts as active, shortly (for the figures).
        summary: The metrics.
    """

    toy: SuperpositionToy
    post_samples: list[Float[NDArray, " samples"]]
    active_fraction: Float[NDArray, " layer"]
    active_rule: str
    summary: dict[str, Any]

    def metrics(self) -> dict[str, Any]:
        """The toy's loss and angles, and the neurons' activity per layer."""
        return self.summary


def pair_angles(vectors: Float[NDArray, "n d"]) -> PairAngles:
    """Angles between every pair of distinct rows, and how far the set is from orthogonal.

    They come as a 0-180 degree histogram that counts all of them and a zoom on 89-91 degrees.

    The RMS cosine can't go below the Welch bound, whatever the optimiser does: with more vectors
    than dimensions, some pairs must stay far from orthogonal.
    """
    from unraveled.geometry import pair_cosines, welch_bound

    cosines = pair_cosines(vectors.astype(np.float64))
    angles = np.rad2deg(np.arccos(np.clip(cosines, -1.0, 1.0)))
    edges = np.linspace(0.0, 180.0, 181)
    zoom_edges = np.linspace(89.0, 91.0, 21)
    off = np.abs(angles - 90.0)
    return PairAngles(
        n_pairs=len(angles),
        histogram_edges=edges,
        histogram_counts=np.histogram(angles, bins=edges)[0],
        zoom_edges=zoom_edges,
        zoom_counts=np.histogram(angles, bins=zoom_edges)[0],
        fraction_within_1_degree=float((off <= 1.0).mean()),
        rms_cosine=float(np.sqrt(np.mean(cosines**2))),
        welch_bound_rms_cosine=float(np.sqrt(welch_bound(*vectors.shape))),
        max_abs_cosine=float(np.abs(cosines).max()),
        pairs_more_than_45_degrees_off=int((off > 45.0).sum()),
    )


def _off_diagonal(square: Float[Tensor, "n n"]) -> Float[Tensor, "n_minus_1 n"]:
    """The off-diagonal entries of a contiguous square matrix, in row-major order, as a view.

    Dropping the first entry of the flattened matrix puts every diagonal entry at the end of a
    row of n + 1; without that last column, the rows hold exactly the off-diagonal entries.
    """
    n = square.shape[0]
    return square.view(-1)[1:].view(n - 1, n + 1)[:, :-1]


def superposition_toy(
    n_vectors: int,
    n_dims: int,
    steps: int,
    lr: float,
    cutoff: float,
    seed: int,
    norm_weight: float = 1000.0,
) -> SuperpositionToy:
    """Push ``n_vectors`` unit vectors in ``n_dims`` dimensions towards orthogonality.

    This is the original analysis's toy. The rows start at unit length; Adam then minimises, over
    the off-diagonal of the Gram matrix (each pair in both orders), relu(|dot| - ``cutoff``), plus
    ``norm_weight`` times the summed squared deviation of the diagonal from 1, which keeps the
    rows unit length. Most pairs end up within a degree of orthogonal, not all of them (see
    ``pair_angles``).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n_vectors, n_dims, generator=generator)
    vectors = (vectors / vectors.norm(dim=1, keepdim=True)).requires_grad_(True)
    optimiser = torch.optim.Adam([vectors], lr=lr)
    # The gradient is written by hand: G = d loss / d dots is sign(dot) where the hinge is active
    # and 2 norm_weight (dot - 1) on the diagonal, and d loss / d vectors = G V + G^T V, the two
    # products autograd's matmul backward forms (G^T as a transposed view, as it passes it). The
    # same operations in the same order give autograd's gradients bit for bit, without gathering
    # the million off-diagonal entries through a boolean mask and scattering them back each step.
    grad_dots = torch.empty(n_vectors, n_vectors)
    grad_off_diagonal = _off_diagonal(grad_dots)
    losses = []
    with torch.no_grad():
        for _ in range(steps):
            dots = vectors @ vectors.T
            off_diagonal = _off_diagonal(dots)
            hinge = off_diagonal.abs().sub_(cutoff)
            deviation = dots.diagonal() - 1
            loss = hinge.relu().sum() + norm_weight * (deviation**2).sum()
            torch.sign(off_diagonal, out=grad_off_diagonal).mul_(hinge > 0)
            grad_dots.diagonal().copy_(norm_weight * (2 * deviation))
            vectors.grad = grad_dots.mm(vectors) + grad_dots.T.mm(vectors)
            optimiser.step()
            losses.append(loss.item())
    final = vectors.detach().numpy()
    return SuperpositionToy(loss=np.array(losses), vectors=final, angles=pair_angles(final))


def compute(model: HookedTransformer, params: MlpParams, seed: int) -> MlpResult:
    """Train the superposition toy, and measure how the MLP neurons fire on the prompts."""
    from unraveled.activations import collect_activations

    toy = superposition_toy(
        params.toy_vectors,
        params.toy_dims,
        params.toy_steps,
        params.toy_lr,
        params.toy_cutoff,
        seed,
        params.toy_norm_weight,
    )
    n_layers = model.cfg.n_layers
    gated = bool(model.cfg.gated_mlp)
    # A gated MLP's hook_post is act(gate) * up, whose sign says nothing about the neuron firing;
    # the gate's pre-activation does (SiLU and GELU are positive exactly where their input is).
    activity_hook = "hook_pre" if gated else "hook_post"
    active_rule, active_means = GATED_ACTIVE_RULE if gated else ACTIVE_RULE
    post_hooks = [f"blocks.{layer}.mlp.hook_post" for layer in range(n_layers)]
    activity_hooks = [f"blocks.{layer}.mlp.{activity_hook}" for layer in range(n_layers)]
    acts = collect_activations(model, params.prompts, {*post_hooks, *activity_hooks})
    rng = np.random.default_rng(seed)
    post_samples, active = [], []
    for layer in range(n_layers):
        real = acts.cache[post_hooks[layer]][acts.mask]  # [real tokens, d_mlp]: padding left out
        values = real.flatten().numpy()
        post_samples.append(rng.choice(values, size=min(20000, len(values)), replace=False))
        active.append(float((acts.cache[activity_hooks[layer]][acts.mask] > 0).float().mean()))
    summary = {
        "d_mlp": model.cfg.d_mlp,
        "act_fn": model.cfg.act_fn,
        "gated_mlp": gated,
        "superposition_toy": {
            "vectors": params.toy_vectors,
            "dims": params.toy_dims,
            "final_loss": float(toy.loss[-1]),
            **toy.angles.summary(),
        },
        "fraction_of_neurons_active_per_layer": active,
        "active_means": active_means,
        "active_measured_at": f"blocks.L.mlp.{activity_hook}",
        "post_activation_mean_per_layer": [float(s.mean()) for s in post_samples],
        "prompts": params.prompts,
    }
    return MlpResult(
        toy=toy,
        post_samples=post_samples,
        active_fraction=np.array(active),
        active_rule=active_rule,
        summary=summary,
    )


def _angle_histogram(axes: Axes, angles: PairAngles) -> None:
    edges, counts = angles.histogram_edges, angles.histogram_counts
    axes.stairs(counts, edges, fill=True, color="steelblue")
    axes.set(
        title="Angles between all pairs of vectors (log count)",
        xlabel="angle (degrees)",
        ylabel="pairs",
        yscale="log",
        xlim=(0, 180),
    )
    axes.set_xticks(range(0, 181, 30))
    axes.set_ylim(bottom=0.5)
    axes.grid(True, alpha=0.4)
    axes.text(
        0.06,
        0.97,
        f"pairs: {angles.n_pairs:,}\n"
        f"within 1° of 90°: {100 * angles.fraction_within_1_degree:.1f}%\n"
        f"RMS cosine: {angles.rms_cosine:.4f}\n"
        f"  (Welch bound: ≥ {angles.welch_bound_rms_cosine:.4f})\n"
        f"largest |cosine|: {angles.max_abs_cosine:.4f}\n"
        f"more than 45° off 90°: {angles.pairs_more_than_45_degrees_off:,}",
        transform=axes.transAxes,
        va="top",
        fontsize=8,
        family="monospace",
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9},
    )
    # Text and inset sit between the spikes near 0, 90 and 180 degrees.
    inset = axes.inset_axes((0.58, 0.5, 0.33, 0.4))
    inset.stairs(angles.zoom_counts, angles.zoom_edges, fill=True, color="darkorange")
    outside = angles.n_pairs - int(angles.zoom_counts.sum())
    inset.set_title(f"zoom 89-91° ({outside:,} pairs outside)", fontsize=7)
    inset.tick_params(labelsize=6)


def render(result: MlpResult) -> Iterator[Artifact]:
    """The toy's loss and angle histogram, and the activations and active fraction per layer."""
    from unraveled.render.figures import panels

    figure, (left, right) = panels(2, width_ratios=[1.0, 1.6])
    left.plot(result.toy.loss)
    left.set(
        title="Superposition toy: loss",
        xlabel="Adam step",
        ylabel="hinge on |dot| + unit-norm penalty",
        yscale="log",
    )
    left.grid(True, alpha=0.4)
    _angle_histogram(right, result.toy.angles)
    n_vectors, n_dims = result.toy.vectors.shape
    figure.suptitle(
        f"{n_vectors} vectors in {n_dims} dimensions: "
        "most pairs can be made nearly orthogonal, not all"
    )
    yield Figure(
        "06_angle_distribution",
        figure,
        f"Superposition toy: {100 * result.toy.angles.fraction_within_1_degree:.1f}% of pairs "
        f"within 1° of orthogonal; RMS cosine {result.toy.angles.rms_cosine:.3f} "
        f"against a Welch bound of {result.toy.angles.welch_bound_rms_cosine:.3f}",
    )

    figure, (left, right) = panels(2, width_ratios=[2.0, 1.0])
    left.violinplot(result.post_samples, showextrema=False)
    left.set(
        title="MLP post-activations per layer (mlp.hook_post)",
        xlabel="Layer",
        ylabel="activation",
        yscale="symlog",
    )
    left.set_xticks(
        range(1, len(result.post_samples) + 1),
        [str(i) for i in range(len(result.post_samples))],
        fontsize=7,
    )
    right.bar(range(len(result.active_fraction)), result.active_fraction, color="teal")
    right.set(
        title=f"Fraction of neurons active\n({result.active_rule})",
        xlabel="Layer",
        ylabel="fraction",
        ylim=(0, 1),
    )
    right.title.set_fontsize(9)
    yield Figure(
        "07_mlp_activations",
        figure,
        "Distribution of MLP activations and fraction of neurons active "
        f"({result.active_rule}), per layer",
    )


EXPERIMENT = Experiment(
    title="MLPs and superposition", params=MlpParams, compute=compute, render=render, weights="raw"
)
