"""Activation patching: which activations carry the information that decides the answer.

The clean run's activations are patched into the corrupted run one at a time: the residual
stream at every layer and position, and every head's output (``hook_z``, all positions). Each
patch is scored by the share of the clean logit difference it recovers: 0 = corrupted, 1 = clean.
Patches of one layer run together as one batch, and start from the corrupted run's residual
stream at that layer: the layers before it would only recompute what the corrupted run cached.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray
from pydantic import Field

from unraveled.experiment import RESOLVE_ANNOTATIONS, Answer, Artifact, Experiment, Figure, ParamError, Params, Prompt, prompt_token_count

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from torch import Tensor
    from transformer_lens import HookedTransformer
    from transformer_lens.hook_points import HookPoint

TOP_K = 10


class ActivationPatchingParams(Params):
    clean: Prompt = "When Mary and John went to the store, John gave a drink to"
    corrupted: Prompt = "When Mary and John went to the store, Mary gave a drink to"
    clean_answer: Answer = Field(" Mary", description="The clean prompt's answer (one token).")
    corrupted_answer: Answer = Field(" John", description="The corrupted prompt's answer (one token).")


@dataclass(frozen=True)
class ActivationPatchingResult:
    tokens: list[str]
    residual_labels: list[str]
    residual: Float[NDArray, "point pos"]
    heads: Float[NDArray, "layer head"]
    clean_difference: float
    corrupted_difference: float
    seconds: float

    def metrics(self) -> dict[str, Any]:
        from unraveled.heads import top_heads

        order = np.argsort(-self.residual, axis=None)[:TOP_K]
        n_pos = self.residual.shape[1]
        return {
            "tokens": self.tokens,
            "clean_logit_difference": self.clean_difference,
            "corrupted_logit_difference": self.corrupted_difference,
            "residual_points": self.residual_labels,
            "residual_recovered": self.residual,
            "heads_recovered": self.heads,
            "top_residual_patches": [
                {"point": self.residual_labels[i // n_pos], "position": int(i % n_pos), "token": self.tokens[i % n_pos], "recovered": float(self.residual.flat[i])}
                for i in order
            ],
            "top_heads": top_heads(self.heads, TOP_K),
            "bottom_heads": top_heads(self.heads, TOP_K, lowest=True),
            "patching_seconds": self.seconds,
        }


def _differences_from_layer(
    model: HookedTransformer,
    residual: Float[Tensor, "patches pos d_model"],
    layer: int,
    answers: tuple[int, int],
    fwd_hooks: list[tuple[str, Callable[[Tensor, HookPoint], Tensor]]] | None = None,
) -> Float[Tensor, " patches"]:
    """Run the model from block ``layer`` on (patched) residual streams; the answers' logit difference."""
    import torch
    from unraveled.logits import logit_difference

    with torch.inference_mode():
        logits = model.run_with_hooks(residual, start_at_layer=layer, fwd_hooks=fwd_hooks or [])
    return logit_difference(logits[:, -1], *answers)


def compute(model: HookedTransformer, params: ActivationPatchingParams, seed: int) -> ActivationPatchingResult:
    import torch
    from unraveled.activations import collect_activations
    from unraveled.logits import answer_token_id, logit_difference, residual_hook_names

    answers = (answer_token_id(model, params.clean_answer, "params.clean_answer"), answer_token_id(model, params.corrupted_answer, "params.corrupted_answer"))
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    residual_hooks = residual_hook_names(n_layers)
    z_hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    clean = collect_activations(model, [params.clean], [*residual_hooks, *z_hooks])
    corrupted = collect_activations(model, [params.corrupted], residual_hooks)
    clean_difference = float(logit_difference(clean.logits[0, -1], *answers))
    corrupted_difference = float(logit_difference(corrupted.logits[0, -1], *answers))
    span = clean_difference - corrupted_difference
    if abs(span) < 1e-6:
        raise ValueError("the clean and corrupted prompts give the same logit difference: nothing to recover")
    n_pos = clean.tokens.shape[1]
    started = time.perf_counter()
    # Point p of the residual stream is the input to block p (the last point feeds the unembedding).
    residual = torch.empty(len(residual_hooks), n_pos)
    positions = torch.arange(n_pos)
    for point, hook in enumerate(residual_hooks):
        patched = corrupted.cache[hook][0].expand(n_pos, -1, -1).clone()
        patched[positions, positions] = clean.cache[hook][0]  # row i gets the clean state at position i
        residual[point] = _differences_from_layer(model, patched, point, answers)
    heads = torch.empty(n_layers, n_heads)
    head_rows = torch.arange(n_heads)
    for layer, hook in enumerate(z_hooks):
        source = clean.cache[hook][0]

        def patch_head(activation: Tensor, hook: HookPoint, source: Tensor = source) -> Tensor:
            activation[head_rows, :, head_rows] = source[:, head_rows].transpose(0, 1)  # row i gets head i's clean output
            return activation

        start = corrupted.cache[residual_hooks[layer]][0].expand(n_heads, -1, -1)
        heads[layer] = _differences_from_layer(model, start, layer, answers, [(hook, patch_head)])
    seconds = time.perf_counter() - started
    return ActivationPatchingResult(
        tokens=clean.str_tokens[0],
        residual_labels=[*[f"before block {layer}" for layer in range(n_layers)], "after the last block"],
        residual=((residual - corrupted_difference) / span).numpy(),
        heads=((heads - corrupted_difference) / span).numpy(),
        clean_difference=clean_difference,
        corrupted_difference=corrupted_difference,
        seconds=seconds,
    )


def render(result: ActivationPatchingResult) -> Iterator[Artifact]:
    from unraveled.render.figures import heatmap, panels

    figure, (axes,) = panels(1)
    figure.set_size_inches(max(8.0, 0.7 * len(result.tokens)), max(5.0, 0.3 * len(result.residual_labels)))
    heatmap(axes, result.residual, "Residual stream patched from the clean run: share of the logit difference recovered",
            "Position", "", cmap="RdBu_r", colorbar_label="recovered (0 corrupted, 1 clean)", centre_zero=True)
    axes.set_xticks(range(len(result.tokens)), [repr(t)[1:-1] for t in result.tokens], rotation=60, fontsize=7)
    axes.set_yticks(range(len(result.residual_labels)), result.residual_labels, fontsize=6)
    yield Figure("01_residual_patching", figure, "Patching the residual stream, per layer and position")

    figure, (axes,) = panels(1)
    heatmap(axes, result.heads, "Head outputs patched from the clean run: share recovered", "Head", "Layer",
            cmap="RdBu_r", colorbar_label="recovered (0 corrupted, 1 clean)", centre_zero=True)
    yield Figure("02_head_patching", figure, "Patching each head's output at every position")


def check(model: HookedTransformer, params: ActivationPatchingParams) -> None:
    """Patching position by position needs prompts of the same token length."""
    clean, corrupted = prompt_token_count(model, params.clean), prompt_token_count(model, params.corrupted)
    if clean != corrupted:
        raise ParamError("corrupted", f"{corrupted} tokens, but params.clean has {clean}: patching position by position needs prompts of the same token length")


EXPERIMENT = Experiment(title="Activation patching", params=ActivationPatchingParams, compute=compute, render=render, check=check)
