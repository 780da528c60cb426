"""Direct logit attribution: the logit difference between a correct and an incorrect answer,
split into what the embeddings, every attention head and every MLP write directly to it.

Each component's output at the last position goes through the final norm with the scale the
model actually applied (cached), then onto the difference of the two answers' unembeddings. The
components plus the bias terms add up to the model's own logit difference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray
from pydantic import Field

from unraveled.experiment import RESOLVE_ANNOTATIONS, Answer, Artifact, Experiment, Figure, Params, Prompt

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from transformer_lens import HookedTransformer

TOP_K = 10


class LogitAttributionParams(Params):
    prompt: Prompt = "When Mary and John went to the store, John gave a drink to"
    correct: Answer = Field(" Mary", description="The answer the model should give (one token).")
    incorrect: Answer = Field(" John", description="The competing answer (one token).")


@dataclass(frozen=True)
class LogitAttributionResult:
    logit_difference: float
    embeddings: dict[str, float]
    heads: Float[NDArray, "layer head"]
    attention_bias: Float[NDArray, " layer"]
    mlp: Float[NDArray, " layer"]
    unembed_bias: float
    correct: str
    incorrect: str

    @property
    def attention_per_layer(self) -> Float[NDArray, " layer"]:
        return self.heads.sum(axis=1) + self.attention_bias

    def total(self) -> float:
        """Every component and bias added up: equals ``logit_difference``."""
        return float(sum(self.embeddings.values()) + self.attention_per_layer.sum() + self.mlp.sum() + self.unembed_bias)

    def metrics(self) -> dict[str, Any]:
        from unraveled.heads import top_heads

        return {
            "correct": self.correct,
            "incorrect": self.incorrect,
            "logit_difference": self.logit_difference,
            "sum_of_contributions": self.total(),
            "embeddings": self.embeddings,
            "heads": self.heads,
            "attention_output_bias_per_layer": self.attention_bias,
            "attention_per_layer": self.attention_per_layer,
            "mlp_per_layer": self.mlp,
            "unembed_bias": self.unembed_bias,
            "top_positive_heads": top_heads(self.heads, TOP_K),
            "top_negative_heads": top_heads(self.heads, TOP_K, lowest=True),
        }


def compute(model: HookedTransformer, params: LogitAttributionParams, seed: int) -> LogitAttributionResult:
    import torch
    from unraveled.activations import collect_activations
    from unraveled.logits import answer_token_id, logit_difference

    correct = answer_token_id(model, params.correct, "params.correct")
    incorrect = answer_token_id(model, params.incorrect, "params.incorrect")
    n_layers = model.cfg.n_layers
    embedding_hooks = ["hook_embed", *(["hook_pos_embed"] if model.cfg.positional_embedding_type == "standard" else [])]
    hooks = [
        *embedding_hooks,
        *[f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)],
        *[f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)],
        "ln_final.hook_scale",
    ]
    acts = collect_activations(model, [params.prompt], hooks)
    cache = acts.cache
    with torch.inference_mode():
        head_outputs = torch.stack(
            [torch.einsum("hd,hdm->hm", cache[f"blocks.{layer}.attn.hook_z"][0, -1], model.W_O[layer]) for layer in range(n_layers)]
        )  # [layer, head, d_model]
        components = torch.cat(
            [
                torch.stack([cache[hook][0, -1] for hook in embedding_hooks]),
                head_outputs.flatten(0, 1),
                model.b_O,
                torch.stack([cache[f"blocks.{layer}.hook_mlp_out"][0, -1] for layer in range(n_layers)]),
            ]
        )
        # The final norm as the model applied it: its cached scale at the last position.
        normed = cache.apply_ln_to_stack(components[:, None, :], pos_slice=-1)[:, 0]
        direction = model.W_U[:, correct] - model.W_U[:, incorrect]
        contributions = (normed @ direction).numpy()
    n_embed, n_heads = len(embedding_hooks), n_layers * model.cfg.n_heads
    head_part = contributions[n_embed : n_embed + n_heads].reshape(n_layers, model.cfg.n_heads)
    return LogitAttributionResult(
        logit_difference=float(logit_difference(acts.logits[0, -1], correct, incorrect)),
        embeddings={hook.removeprefix("hook_"): float(value) for hook, value in zip(embedding_hooks, contributions[:n_embed])},
        heads=head_part,
        attention_bias=contributions[n_embed + n_heads : n_embed + n_heads + n_layers],
        mlp=contributions[n_embed + n_heads + n_layers :],
        unembed_bias=float(model.b_U[correct] - model.b_U[incorrect]),
        correct=params.correct,
        incorrect=params.incorrect,
    )


def render(result: LogitAttributionResult) -> Iterator[Artifact]:
    from unraveled.render.figures import heatmap, panels

    answers = f"logit({result.correct!r}) - logit({result.incorrect!r}) = {result.logit_difference:.3f}"
    figure, (axes,) = panels(1)
    figure.set_size_inches(12, 5)
    layers = np.arange(len(result.mlp))
    axes.bar(layers - 0.2, result.attention_per_layer, width=0.4, label="attention (all heads + bias)", color="royalblue")
    axes.bar(layers + 0.2, result.mlp, width=0.4, label="MLP", color="darkorange")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set(title=f"Direct contribution to {answers}", xlabel="Layer", ylabel="contribution to the logit difference")
    axes.legend()
    yield Figure("01_attribution_per_layer", figure, "Direct logit attribution of attention and MLP, per layer")

    figure, (axes,) = panels(1)
    heatmap(axes, result.heads, f"Direct contribution of each head to {answers}", "Head", "Layer", cmap="RdBu_r", colorbar_label="contribution", centre_zero=True)
    yield Figure("02_attribution_per_head", figure, "Direct logit attribution of every head (red positive, blue negative)")


EXPERIMENT = Experiment(title="Direct logit attribution", params=LogitAttributionParams, compute=compute, render=render)
