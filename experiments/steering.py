"""Steering: a vector added to the residual stream while the model generates, and its price.

The vector is the mean over contrastive prompt pairs of the difference between the residual
stream of the positive and of the negative prompt at ``blocks.{layer}.hook_resid_pre``, read at
each prompt's last token (Rimsky et al. 2024, CAA; ``unraveled.interventions.steering``). For
each coefficient of the sweep it is added, times the coefficient, at that hook point at every
position from ``from_position`` on, and three things are measured against the unsteered model
(coefficient 0), with the same seed and sampling:

- the generations after each prompt, side by side;
- the change in the log-probability that the next token after each prompt is one of the target
  tokens (their probabilities summed), one value per prompt;
- the KL divergence of the steered next-token distribution from the unsteered one at every
  position of a neutral text: what steering costs where it should change nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray
from pydantic import Field, field_validator

from unraveled.experiment import (
    RESOLVE_ANNOTATIONS,
    Answer,
    Artifact,
    Experiment,
    Figure,
    LayerIndex,
    ParamError,
    Params,
    Prompt,
    Table,
)
from unraveled.interventions.sampling import Sampling

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
VectorText = Annotated[str, Field(min_length=1)]
MAX_PROMPT_TOKENS = 64


class ContrastivePrompts(Params):
    """A steering vector's source: prompt pairs, the positive and negative prompt of each.

    A vector from an SAE feature's decoder direction will be another source, a second member of
    ``SteeringParams.vector``'s type; the rest of the params stay as they are.
    """

    positive: list[VectorText] = Field(min_length=1)
    negative: list[VectorText] = Field(min_length=1)
    position: Literal["last", "mean"] = Field(
        "last",
        description="Where each prompt's residual stream is read: its last token (CAA) or the "
        "mean over its tokens.",
    )

    @field_validator("negative")
    @classmethod
    # ``info`` is pydantic's ValidationInfo, a Protocol the test suite's runtime type checks
    # can't check instances against.
    def _pairs_with_positive(cls, negative: list[str], info: Any) -> list[str]:
        positive = info.data.get("positive")
        if positive is not None and len(positive) != len(negative):
            raise ValueError(
                f"{len(negative)} negative prompts for {len(positive)} positive ones: "
                "each positive prompt needs its negative"
            )
        return negative


class SteeringParams(Params):
    """The steering experiment's params."""

    vector: ContrastivePrompts = ContrastivePrompts(
        positive=[
            "I love this, it is",
            "What a wonderful day, I feel",
            "She said she loves him and is",
            "This is great and I am",
        ],
        negative=[
            "I hate this, it is",
            "What a terrible day, I feel",
            "She said she hates him and is",
            "This is awful and I am",
        ],
    )
    layer: LayerIndex = Field(10, description="The block whose hook_resid_pre is read and steered.")
    coefficients: list[FiniteFloat] = Field(
        [-4.0, -2.0, 2.0, 4.0],
        min_length=1,
        max_length=12,
        description="Multiples of the vector added; the unsteered run (0) is always included.",
    )
    from_position: int = Field(
        0, ge=0, description="Steer this sequence position and every later one (0: all)."
    )
    prompts: list[Prompt] = Field(
        ["I think that you are", "The movie was", "My neighbour is"], min_length=1, max_length=8
    )
    max_new_tokens: int = Field(10, ge=1, le=256)
    n_samples: int = Field(2, ge=1, le=16, description="Samples per prompt and coefficient.")
    sampling: Sampling = Sampling(method="sample", temperature=0.8)
    targets: list[Answer] = Field([" love", " wonderful", " happy", " great"], min_length=1)
    neutral_text: Prompt = (
        "The train leaves the station at nine in the morning and arrives in the city before noon."
    )


@dataclass(frozen=True)
class SteeringResult:
    """A coefficient sweep: generations, target log-probabilities and the KL price.

    Attributes:
        hook_name: Where the vector was read and added.
        coefficients: The sweep, sorted, 0 (unsteered) included.
        vector_norm: The steering vector's L2 norm.
        resid_norm: The median residual-stream norm at the hook on the neutral text (the scale
            the vector is added to).
        prompts: The prompts continued.
        generations: Per coefficient, prompt and sample, the generated text.
        targets: The target tokens.
        target_log_prob: log P(next token is a target) after each prompt, per coefficient.
        kl: KL(unsteered || steered) at each neutral-text position, per coefficient.
        neutral_tokens: The neutral text's tokens.
    """

    hook_name: str
    coefficients: Float[NDArray, " coef"]
    vector_norm: float
    resid_norm: float
    prompts: list[str]
    generations: list[list[list[str]]]
    targets: list[str]
    target_log_prob: Float[NDArray, "coef prompt"]
    kl: Float[NDArray, "coef pos"]
    neutral_tokens: list[str]

    @property
    def unsteered(self) -> int:
        """The row of coefficient 0."""
        return int(np.flatnonzero(self.coefficients == 0)[0])

    @property
    def delta_log_prob(self) -> Float[NDArray, "coef prompt"]:
        """Change of ``target_log_prob`` from the unsteered row."""
        return self.target_log_prob - self.target_log_prob[self.unsteered]

    @property
    def with_the_sign(self) -> dict[float, int]:
        """Per steered coefficient, how many prompts' target log-prob moves with its sign."""
        return {
            float(coefficient): int((np.sign(row) == np.sign(coefficient)).sum())
            for coefficient, row in zip(self.coefficients, self.delta_log_prob, strict=True)
            if coefficient != 0
        }

    def metrics(self) -> dict[str, Any]:
        """Per coefficient: the target log-prob change (mean, spread, n) and the KL."""
        delta, n_prompts = self.delta_log_prob, len(self.prompts)
        return {
            "hook_name": self.hook_name,
            "vector_norm": self.vector_norm,
            "median_residual_norm_at_hook": self.resid_norm,
            "targets": self.targets,
            "coefficients": self.coefficients,
            "delta_target_log_prob": {
                "n_prompts": n_prompts,
                "mean": delta.mean(axis=1),
                "std": delta.std(axis=1, ddof=1) if n_prompts > 1 else np.zeros(len(delta)),
                "min": delta.min(axis=1),
                "max": delta.max(axis=1),
                "per_prompt": delta,
                "n_prompts_with_the_coefficients_sign": {
                    f"{coefficient:g}": count for coefficient, count in self.with_the_sign.items()
                },
            },
            "target_log_prob_unsteered_per_prompt": self.target_log_prob[self.unsteered],
            "kl_from_unsteered_on_neutral_text": {
                "n_positions": self.kl.shape[1],
                "mean": self.kl.mean(axis=1),
                "max": self.kl.max(axis=1),
            },
            "generations": {
                f"{coefficient:g}": per_prompt
                for coefficient, per_prompt in zip(self.coefficients, self.generations, strict=True)
            },
        }


def _check_vector_prompts(params: SteeringParams, tokenizer: PreTrainedTokenizerBase) -> None:
    for field in ("positive", "negative"):
        for index, text in enumerate(getattr(params.vector, field)):
            count = len(tokenizer.encode(text, add_special_tokens=False)) + 1
            if count > MAX_PROMPT_TOKENS:
                raise ParamError(
                    f"vector.{field}.{index}",
                    f"{count} tokens (BOS included), more than the {MAX_PROMPT_TOKENS} allowed",
                )


def _check_from_position(params: SteeringParams, prompt_lengths: list[int]) -> None:
    # The target log-prob is read at each prompt's last token: steering that starts after it
    # leaves that reading untouched (a change of 0) while it still moves the generations and KL.
    last = min(prompt_lengths) - 1
    if params.from_position > last:
        raise ParamError(
            "from_position",
            f"{params.from_position} is past the shortest prompt's last token (position {last}, "
            "BOS counted as 0), where the target log-prob is read, so it would report no change; "
            f"use at most {last}",
        )


def check_before_loading(
    params: SteeringParams, tokenizer: PreTrainedTokenizerBase | None, n_ctx: int | None
) -> None:
    """The contrastive prompts fit; from_position is within every prompt; each prompt fits.

    Whether the model prepends BOS is not known yet, so only what is wrong either way is refused
    (``prompt_token_range``); ``check`` counts exactly on the loaded model.
    """
    from unraveled.experiment import prompt_token_range
    from unraveled.interventions.generation import check_generation_length

    if tokenizer is None:
        return
    _check_vector_prompts(params, tokenizer)
    ranges = [prompt_token_range(tokenizer, prompt) for prompt in params.prompts]
    _check_from_position(params, [most for _, most in ranges])
    if n_ctx is not None:
        check_generation_length(n_ctx, max(fewest for fewest, _ in ranges), params.max_new_tokens)


def check(model: HookedTransformer, params: SteeringParams) -> None:
    """The same checks, on the loaded model (exact prompt token counts)."""
    from unraveled.interventions.generation import check_generation_length, prompt_tokens

    _check_vector_prompts(params, model.tokenizer)
    _check_from_position(params, [len(prompt_tokens(model, prompt)) for prompt in params.prompts])
    for prompt in params.prompts:
        check_generation_length(
            model.cfg.n_ctx, len(prompt_tokens(model, prompt)), params.max_new_tokens
        )


def compute(model: HookedTransformer, params: SteeringParams, seed: int) -> SteeringResult:
    """Build the vector, then per coefficient: generate, score the targets, measure the KL."""
    import torch

    from unraveled.activations import collect_activations
    from unraveled.interventions.edits import AddVector
    from unraveled.interventions.generation import generate
    from unraveled.interventions.steering import (
        contrastive_vector,
        kl_per_position,
        next_token_log_probs,
        target_log_prob,
    )

    vector = contrastive_vector(
        model,
        params.vector.positive,
        params.vector.negative,
        params.layer,
        params.vector.position,
    )
    hook_name = f"blocks.{params.layer}.hook_resid_pre"
    resid = collect_activations(model, [params.neutral_text], [hook_name], logits=False)
    resid_norm = float(resid.cache[hook_name][0].norm(dim=-1).median())
    target_ids = [model.to_single_token(target) for target in params.targets]
    coefficients = sorted({0.0, *params.coefficients})
    reference = next_token_log_probs(model, params.neutral_text)
    generations, log_probs, kls = [], [], []
    for coefficient in coefficients:
        steering = (
            [AddVector(vector, params.layer, coefficient, from_position=params.from_position)]
            if coefficient != 0
            else []
        )
        generations.append(
            [
                generate(
                    model,
                    prompt,
                    params.max_new_tokens,
                    steering,
                    seed=seed,
                    n_samples=params.n_samples,
                    **params.sampling.model_dump(),
                ).texts
                for prompt in params.prompts
            ]
        )
        log_probs.append(target_log_prob(model, params.prompts, target_ids, steering))
        kls.append(
            kl_per_position(reference, next_token_log_probs(model, params.neutral_text, steering))
        )
    return SteeringResult(
        hook_name=hook_name,
        coefficients=np.array(coefficients),
        vector_norm=float(vector.double().norm()),
        resid_norm=resid_norm,
        prompts=list(params.prompts),
        generations=generations,
        targets=list(params.targets),
        target_log_prob=torch.stack(log_probs).numpy(),
        kl=torch.stack(kls).numpy(),
        neutral_tokens=model.to_str_tokens(params.neutral_text),
    )


def _sign_summary(result: SteeringResult) -> str:
    """How many of the prompts move with each coefficient's sign, in a few words."""
    n_prompts = len(result.prompts)
    counts = result.with_the_sign
    if all(count == n_prompts for count in counts.values()):
        return (
            f"{n_prompts} of {n_prompts} prompts move with the coefficient's sign at every "
            "coefficient"
        )
    each = ", ".join(f"{count} at {coefficient:+g}" for coefficient, count in counts.items())
    return f"prompts of {n_prompts} moving with the coefficient's sign: {each}"


def render(result: SteeringResult) -> Iterator[Artifact]:
    """The log-prob change and KL per coefficient; the generations side by side; the table."""
    import textwrap

    from unraveled.render.figures import panels

    coefficients, delta = result.coefficients, result.delta_log_prob
    n_prompts = delta.shape[1]
    figure, (effect_axes, price_axes) = panels(2)
    for column, prompt in enumerate(result.prompts):
        effect_axes.plot(
            coefficients, delta[:, column], marker="o", alpha=0.5, label=repr(prompt)[:30]
        )
    effect_axes.plot(coefficients, delta.mean(axis=1), color="black", lw=2.5, label="mean")
    effect_axes.axhline(0, color="grey", lw=0.8)
    effect_axes.set(
        title=f"Change in log P(next token in {result.targets})"[:80]
        + f"\n{_sign_summary(result)}",
        xlabel="steering coefficient",
        ylabel=f"Δ log-probability (nats), n = {n_prompts} prompts",
    )
    effect_axes.legend(fontsize=7)
    price_axes.plot(coefficients, result.kl.mean(axis=1), marker="o", color="crimson", label="mean")
    price_axes.fill_between(
        coefficients,
        result.kl.min(axis=1),
        result.kl.max(axis=1),
        color="crimson",
        alpha=0.15,
        label="min to max over positions",
    )
    price_axes.set(
        title="Price: KL(unsteered || steered), neutral text",
        xlabel="steering coefficient",
        ylabel=f"KL (nats), n = {result.kl.shape[1]} positions",
    )
    price_axes.legend(fontsize=7)
    for axes in (effect_axes, price_axes):
        axes.grid(True, alpha=0.4)
    yield Figure(
        "01_effect_and_price",
        figure,
        f"Steering at {result.hook_name}: the target tokens' log-probability change per "
        f"coefficient ({_sign_summary(result)}; forward passes without sampling, the same under "
        "every seed), and the KL it costs on neutral text",
    )

    width = 60
    n_coef = len(coefficients)
    figure, axes_list = panels(1, len(result.prompts))
    figure.set_size_inches(11, 0.9 * n_coef * len(result.prompts) + 0.6)
    for axes, (column, prompt) in zip(axes_list, enumerate(result.prompts), strict=True):
        axes.axis("off")
        axes.set_title(f"{prompt!r} ... (sample 1 of each coefficient)", fontsize=9, loc="left")
        for row, coefficient in enumerate(coefficients):
            text = textwrap.shorten(
                " ".join(result.generations[row][column][0].split()), width * 2, placeholder="…"
            )
            label = "unsteered" if coefficient == 0 else f"coef {coefficient:+g}"
            y = 1 - (row + 0.5) / n_coef
            weight = "bold" if coefficient == 0 else "normal"
            axes.text(0, y, label, fontsize=8, va="center", fontweight=weight)
            axes.text(0.13, y, "\n".join(textwrap.wrap(text, width)), fontsize=8, va="center")
    yield Figure(
        "02_generations",
        figure,
        "Generations per coefficient side by side with the unsteered one (same seed, sampling)",
    )

    rows = [
        (coefficient, prompt, sample, text)
        for coefficient, per_prompt in zip(coefficients, result.generations, strict=True)
        for prompt, samples in zip(result.prompts, per_prompt, strict=True)
        for sample, text in enumerate(samples)
    ]
    yield Table(
        "generations",
        {
            "coefficient": np.array([row[0] for row in rows]),
            "prompt": np.array([row[1] for row in rows]),
            "sample": np.array([row[2] for row in rows]),
            "text": np.array([row[3] for row in rows]),
        },
        "Every generation: coefficient (0 = unsteered), prompt, sample index, generated text",
    )


EXPERIMENT = Experiment(
    title="Steering",
    params=SteeringParams,
    compute=compute,
    render=render,
    max_prompt_tokens=MAX_PROMPT_TOKENS,
    check=check,
    check_before_loading=check_before_loading,
)
