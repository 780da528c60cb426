"""Direct logit attribution: a logit difference split into what each component writes to it.

The logit difference between a correct and an incorrect answer is split into what the
embeddings, every attention head and every MLP write directly to it.

Each component's output at the last position goes through the final norm with the scale the
model actually applied (cached), then onto the difference of the two answers' unembeddings. The
components plus the bias terms add up to the model's own logit difference. A head is credited with
what depends on where it attends: its value bias, which it writes wherever it attends, is folded
into the layer's attention output bias by the processed weights (TransformerLens's
``fold_value_biases``) and counted there.

With ``prompts: ioi`` the attribution is averaged over a dataset of IOI prompts (the clean
prompts of ``unraveled.datasets.ioi``; correct = the indirect object, incorrect = the subject),
each at its own last token with its own answers; the parts still add up to the mean logit
difference. With ``prompts: pairs``, over the clean prompts of your own pairs
(``unraveled.datasets.pairs``), correct = each pair's clean answer, incorrect = its corrupted
answer; their corrupted prompts are not read.

A metric of your own (the patching experiments' ``metric``) is refused: the attribution is exact
because the logit difference is linear in the final residual stream (given the final norm's
scale), and a nonlinear metric has no such split. Its gradient would give a first-order estimate
instead, which is what ``attribution_patching`` reports, beside exact patching.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray
from pydantic import Field, field_validator
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from unraveled.datasets.ioi import IOIParams
from unraveled.datasets.pairs import PromptPairsParams, check_pairs
from unraveled.experiment import (
    RESOLVE_ANNOTATIONS,
    Answer,
    Artifact,
    Experiment,
    Figure,
    Prompt,
)

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

TOP_K = 10


NO_METRIC = (
    "direct logit attribution splits the logit difference of two answers exactly, because it is "
    "linear in what each component writes; a metric of your own has no such split (its gradient "
    "gives a first-order estimate: run attribution_patching with it). Leave metric unset"
)


class LogitAttributionParams(PromptPairsParams):
    """The logit attribution experiment's params: the prompt, IOI prompts or yours, the answers."""

    SAME_LENGTH: ClassVar[bool] = False  # the corrupted prompts are not read

    prompt: Prompt = "When Mary and John went to the store, John gave a drink to"
    correct: Answer = Field(" Mary", description="The answer the model should give (one token).")
    incorrect: Answer = Field(" John", description="The competing answer (one token).")
    prompts: Literal["single", "ioi", "pairs"] = Field(
        "single",
        description="single: the prompt above; ioi: the clean prompts of params.ioi; pairs: the "
        "clean prompts of your own pairs (params.pairs or params.pairs_file) and their answers.",
    )
    ioi: IOIParams = Field(
        default_factory=IOIParams, description="The IOI prompts, when prompts is ioi."
    )
    metric: SkipJsonSchema[None] = Field(None, exclude=True, description=f"Refused: {NO_METRIC}.")

    @field_validator("metric", mode="before")
    @classmethod
    def _no_metric(cls, value: Any) -> Any:
        if value is not None:
            raise PydanticCustomError("metric", NO_METRIC)
        return value


@dataclass(frozen=True)
class LogitAttributionResult:
    """The logit difference and what each component writes directly to it.

    Attributes:
        logit_difference: logit(correct) - logit(incorrect), mean over the prompts.
        embeddings: Per embedding hook (``embed``, ``pos_embed``), its contribution.
        heads: Each head's contribution.
        attention_bias: Each layer's attention output bias (value biases folded in).
        mlp: Each layer's MLP output.
        unembed_bias: The unembedding bias's difference between the two answers.
        correct: The correct answer (or, for IOI prompts, what it stands for).
        incorrect: The incorrect answer (or what it stands for).
        n_prompts: How many prompts the attribution is averaged over.
    """

    logit_difference: float
    embeddings: dict[str, float]
    heads: Float[NDArray, "layer head"]
    attention_bias: Float[NDArray, " layer"]
    mlp: Float[NDArray, " layer"]
    unembed_bias: float
    correct: str
    incorrect: str
    n_prompts: int = 1
    prompts_kind: str = "IOI"
    """Whose prompts several are: ``IOI`` or ``your pairs'``."""

    @property
    def attention_per_layer(self) -> Float[NDArray, " layer"]:
        """Each layer's attention contribution: its heads and its output bias."""
        return self.heads.sum(axis=1) + self.attention_bias

    def total(self) -> float:
        """Every component and bias added up: equals ``logit_difference``."""
        return float(
            sum(self.embeddings.values())
            + self.attention_per_layer.sum()
            + self.mlp.sum()
            + self.unembed_bias
        )

    def metrics(self) -> dict[str, Any]:
        """The logit difference, every contribution, their sum, and the top heads."""
        from unraveled.heads import top_heads

        return {
            "n_prompts": self.n_prompts,
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


def compute(
    model: HookedTransformer, params: LogitAttributionParams, seed: int
) -> LogitAttributionResult:
    """Attribute the logit difference at the last position of the prompt(s) to each component."""
    import torch

    from unraveled.datasets.ioi import ioi_batch
    from unraveled.logits import answer_token_id
    from unraveled.patching import PromptPairs, embedding_hooks, logit_differences, user_pairs

    if params.prompts == "ioi":
        pairs = ioi_batch(model, params.ioi, seed, "params.ioi").tokens
        correct_name, incorrect_name = "the indirect object", "the subject"
    elif params.prompts == "pairs":
        pairs = user_pairs(model, [row.pair for row in params.rows()], clean_only=True)
        correct_name, incorrect_name = "the clean answer", "the corrupted answer"
    else:
        correct = answer_token_id(model, params.correct, "params.correct")
        incorrect = answer_token_id(model, params.incorrect, "params.incorrect")
        tokens = model.to_tokens(params.prompt)
        last = torch.tensor([tokens.shape[1] - 1])
        pairs = PromptPairs(
            clean=tokens,
            corrupted=tokens,
            last=last,
            correct=torch.tensor([correct]),
            incorrect=torch.tensor([incorrect]),
        )
        correct_name, incorrect_name = params.correct, params.incorrect
    n_layers = model.cfg.n_layers
    embedding_hook_names = embedding_hooks(model)
    normalized = model.cfg.normalization_type is not None
    hooks = [
        *embedding_hook_names,
        *[f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)],
        *[f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)],
        *(["ln_final.hook_scale"] if normalized else []),
    ]
    wanted = set(hooks)
    rows = torch.arange(pairs.size)
    with torch.inference_mode():
        logits, cache = model.run_with_cache(pairs.clean, names_filter=lambda name: name in wanted)

        def at_last(hook: str) -> torch.Tensor:
            return cache[hook][rows, pairs.last]

        # Each block's own W_O, not model.W_O[layer]: model.W_O stacks every layer's (28 MB for
        # GPT-2 small) on each read. contiguous(): the layout of a row of that stack (the weight is
        # stored rearranged for the forward pass), so einsum sums in the same order as before.
        head_outputs = torch.stack(
            [
                torch.einsum(
                    "bhd,hdm->bhm",
                    at_last(f"blocks.{layer}.attn.hook_z"),
                    model.blocks[layer].attn.W_O.contiguous(),
                )
                for layer in range(n_layers)
            ],
            dim=1,
        )  # [batch, layer, head, d_model]
        components = torch.cat(
            [
                torch.stack([at_last(hook) for hook in embedding_hook_names], dim=1),
                head_outputs.flatten(1, 2),
                model.b_O.expand(pairs.size, -1, -1),
                torch.stack(
                    [at_last(f"blocks.{layer}.hook_mlp_out") for layer in range(n_layers)], dim=1
                ),
            ],
            dim=1,
        )  # [batch, component, d_model]
        # The final norm as the model applied it: centred (LayerNorm) and divided by its cached
        # scale.
        if model.cfg.normalization_type in ("LN", "LNPre"):
            components = components - components.mean(-1, keepdim=True)
        if normalized:
            components = components / at_last("ln_final.hook_scale")[:, None]
        direction = (
            model.W_U[:, pairs.correct] - model.W_U[:, pairs.incorrect]
        ).T  # [batch, d_model]
        contributions = torch.einsum("bcm,bm->bc", components, direction).mean(0).numpy()
    n_embed, n_heads = len(embedding_hook_names), n_layers * model.cfg.n_heads
    head_part = contributions[n_embed : n_embed + n_heads].reshape(n_layers, model.cfg.n_heads)
    return LogitAttributionResult(
        logit_difference=float(logit_differences(logits, pairs).mean()),
        embeddings={
            hook.removeprefix("hook_"): float(value)
            for hook, value in zip(embedding_hook_names, contributions[:n_embed], strict=True)
        },
        heads=head_part,
        attention_bias=contributions[n_embed + n_heads : n_embed + n_heads + n_layers],
        mlp=contributions[n_embed + n_heads + n_layers :],
        unembed_bias=float((model.b_U[pairs.correct] - model.b_U[pairs.incorrect]).mean()),
        correct=correct_name,
        incorrect=incorrect_name,
        n_prompts=pairs.size,
        prompts_kind="IOI" if params.prompts != "pairs" else "clean",
    )


def render(result: LogitAttributionResult) -> Iterator[Artifact]:
    """Per-layer attention and MLP bars, and the heads' heatmap."""
    from unraveled.render.figures import heatmap, panels

    answers = (
        f"logit({result.correct!r}) - logit({result.incorrect!r}) = {result.logit_difference:.3f}"
    )
    if result.n_prompts > 1:
        answers = (
            f"logit({result.correct}) - logit({result.incorrect}) = "
            f"{result.logit_difference:.3f}, mean over {result.n_prompts} "
            f"{result.prompts_kind} prompts"
        )
    figure, (axes,) = panels(1)
    figure.set_size_inches(12, 5)
    layers = np.arange(len(result.mlp))
    axes.bar(
        layers - 0.2,
        result.attention_per_layer,
        width=0.4,
        label="attention (all heads + bias)",
        color="royalblue",
    )
    axes.bar(layers + 0.2, result.mlp, width=0.4, label="MLP", color="darkorange")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set(
        title=f"Direct contribution to {answers}",
        xlabel="Layer",
        ylabel="contribution to the logit difference",
    )
    axes.legend()
    yield Figure(
        "01_attribution_per_layer",
        figure,
        "Direct logit attribution of attention and MLP, per layer",
    )

    figure, (axes,) = panels(1)
    heatmap(
        axes,
        result.heads,
        f"Direct contribution of each head to {answers}",
        "Head",
        "Layer",
        cmap="RdBu_r",
        colorbar_label="contribution",
        centre_zero=True,
    )
    yield Figure(
        "02_attribution_per_head",
        figure,
        "Direct logit attribution of every head (red positive, blue negative)",
    )


def check_before_loading(
    params: LogitAttributionParams, tokenizer: PreTrainedTokenizerBase | None, n_ctx: int | None
) -> None:
    """Your own pairs, against the tokenizer: prompts that fit, one-token answers."""
    if params.prompts == "pairs" and tokenizer is not None:
        check_pairs(params, tokenizer, n_ctx)


def check(model: HookedTransformer, params: LogitAttributionParams) -> None:
    """With IOI prompts, every name must be one token for this model; your pairs as before."""
    from unraveled.datasets.ioi import check_ioi_names

    if params.prompts == "ioi":
        check_ioi_names(model, params.ioi)
    if params.prompts == "pairs":
        check_pairs(params, model.tokenizer, model.cfg.n_ctx)


EXPERIMENT = Experiment(
    title="Direct logit attribution",
    params=LogitAttributionParams,
    compute=compute,
    render=render,
    check=check,
    check_before_loading=check_before_loading,
)
