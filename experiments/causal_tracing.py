"""Causal tracing of factual recall (Meng et al. 2022, ROME).

The paper: "Locating and Editing Factual Associations in GPT".

Of a set of factual prompts, the ones the model gets right (its top prediction is the answer) are
traced: the subject's token embeddings get Gaussian noise of 3 times the embeddings' standard
deviation, and clean states are restored one at a time (``unraveled.tracing``). The figures show
the restored probability of the answer for one prompt, and the average indirect effect (restored
minus corrupted probability) over the traced prompts, positions grouped as in the paper.

The MLP and attention windows are ROME's 10 blocks of GPT-2-XL's 48 scaled to the model's depth
(6 of SmolLM2's 30, 2 of GPT-2 small's 12), unless ``window`` says otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray
from pydantic import Field, model_validator

from unraveled.datasets.facts import FACTS, Fact
from unraveled.experiment import (
    RESOLVE_ANNOTATIONS,
    Artifact,
    Experiment,
    Figure,
    ParamError,
    Params,
    prompt_token_count,
)
from unraveled.spread import standard_error

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from matplotlib.axes import Axes
    from transformer_lens import HookedTransformer

    from unraveled.datasets.facts import TokenizedFact
    from unraveled.tracing import FactTrace

KINDS = {
    "residual": ("one residual-stream state", "Purples"),
    "mlp": ("the MLP outputs of a window", "Greens"),
    "attn": ("the attention outputs of a window", "Reds"),
}


class CausalTracingParams(Params):
    """The causal tracing experiment's params: which facts are traced, and how."""

    # Upper bounds keep a typo from asking for hours: each traced fact costs about
    # noise_samples x (its tokens after the subject) x 3 x n_layers restorations.
    n_facts: int = Field(
        3,
        ge=1,
        le=200,
        description="How many of the facts the model gets right are traced, in the set's order.",
    )
    noise_samples: int = Field(
        10,
        ge=1,
        le=50,
        description="Noise draws per prompt, ROME's 10; every restoration uses the same draws.",
    )
    max_traced_tokens: int | None = Field(
        7,
        ge=1,
        le=1024,
        description=(
            "Only facts with at most this many tokens from the subject's first token to the end "
            "are traced (a fact's time grows with the square of it); null traces any."
        ),
    )
    prepend_bos: bool = Field(
        False,
        description=(
            "Put the BOS token before each prompt; ROME does not "
            "(GPT-2 prompts as its tokenizer encodes them)."
        ),
    )
    noise_multiplier: float = Field(
        3.0,
        ge=0.0,
        le=100.0,
        description=(
            "Noise standard deviation, in standard deviations of the subjects' token embeddings."
        ),
    )
    window: int | None = Field(
        None,
        ge=1,
        le=128,
        description=(
            "Blocks restored together for MLP and attention; default ROME's 10 of 48, scaled."
        ),
    )
    example: int = Field(
        0, ge=0, description="Which traced fact the single-prompt figure shows (0 = the first)."
    )
    facts: list[Fact] | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="Facts to use instead of the bundled set (prompt, subject, answer).",
    )

    @model_validator(mode="after")
    def _example_among_traced(self) -> CausalTracingParams:
        if self.example >= self.n_facts:
            raise ValueError(
                f"example={self.example} but at most n_facts={self.n_facts} facts are traced; "
                f"use 0..{self.n_facts - 1}"
            )
        return self


def _facts_with_source(params: CausalTracingParams) -> tuple[str, list[Fact]]:
    """Where the facts come from (for error messages) and the facts."""
    return (
        ("params.facts", params.facts)
        if params.facts is not None
        else ("bundled fact", list(FACTS))
    )


@dataclass(frozen=True)
class TracedFact:
    """A fact the model gets right, and its trace."""

    tokenized: TokenizedFact
    trace: FactTrace


@dataclass(frozen=True)
class GroupedEffects:
    """Indirect effects (restored minus corrupted p(answer)) in the paper's position groups.

    Attributes:
        average: Over every traced (prompt, position) of each group and every noise sample.
        per_fact: Each fact's own, over its positions of each group and its noise samples; NaN
            for a group the fact lacks.
        per_sample: The average for noise sample ``s`` of every fact alone (its mean over the
            samples is ``average``).
    """

    average: Float[NDArray, "group layer"]
    per_fact: Float[NDArray, "fact group layer"]
    per_sample: Float[NDArray, "sample group layer"]


def grouped_effects(traced: list[TracedFact], kind: str) -> GroupedEffects:
    """``kind``'s indirect effects of the traced facts, averaged in position groups three ways."""
    from unraveled.tracing import grouped_mean, position_groups

    groups = [
        position_groups(len(t.tokenized.tokens), t.tokenized.subject_start, t.tokenized.subject_end)
        for t in traced
    ]
    effects = [t.trace.indirect_effects(kind) for t in traced]  # per fact [sample layer pos]
    return GroupedEffects(
        average=grouped_mean([effect.mean(axis=0) for effect in effects], groups),
        per_fact=np.stack(
            [
                grouped_mean([effect.mean(axis=0)], [fact_groups])
                for effect, fact_groups in zip(effects, groups, strict=True)
            ]
        ),
        per_sample=np.stack(
            [
                grouped_mean([effect[sample] for effect in effects], groups)
                for sample in range(effects[0].shape[0])
            ]
        ),
    )


@dataclass(frozen=True)
class CausalTracingResult:
    """The facts the model knows, the traces of those traced, and their grouped effects.

    Attributes:
        n_candidates: How many facts the set has.
        known: The facts whose answer is the model's top prediction.
        traced: The known facts traced, in the set's order.
        example: Which traced fact the single-prompt figure shows.
        embedding_std: Standard deviation of the subjects' token embeddings.
        noise_scale: Standard deviation of the noise added to them.
        window: Blocks restored together for MLP and attention.
        noise_samples: Noise draws per fact.
        prepend_bos: Whether a BOS token was prepended to the prompts.
        effects: Per kind of restoration (``KINDS``), the indirect effects in position groups.
        seconds: How long the tracing took.
    """

    n_candidates: int
    known: list[TokenizedFact]
    traced: list[TracedFact]
    example: int
    embedding_std: float
    noise_scale: float
    window: int
    noise_samples: int
    prepend_bos: bool
    effects: dict[str, GroupedEffects]
    seconds: float

    @property
    def average_effects(self) -> dict[str, Float[NDArray, "group layer"]]:
        """Per kind, the average indirect effect of each position group and layer."""
        return {kind: effects.average for kind, effects in self.effects.items()}

    def peak(self, kind: str) -> dict[str, Any]:
        """Layer and position group of ``kind``'s largest average indirect effect, and its spread.

        ``standard_error_over_samples`` is the standard deviation over noise samples of the
        average with each sample alone, over the square root of their count (how much another
        seed may move this cell); ``std_over_facts`` the standard deviation of the facts' own
        values (how much the facts differ), over the facts that have this position group.
        """
        from unraveled.tracing import POSITION_GROUPS

        effects = self.effects[kind]
        group, layer = np.unravel_index(np.nanargmax(effects.average), effects.average.shape)
        samples = effects.per_sample[:, group, layer]
        facts = effects.per_fact[:, group, layer]
        facts = facts[~np.isnan(facts)]
        return {
            "layer": int(layer),
            "position_group": POSITION_GROUPS[group],
            "average_indirect_effect": float(effects.average[group, layer]),
            "standard_error_over_samples": float(standard_error(samples))
            if len(samples) > 1
            else None,
            "std_over_facts": float(facts.std(ddof=1)) if len(facts) > 1 else None,
            "per_fact": [float(value) for value in effects.per_fact[:, group, layer]],
        }

    def metrics(self) -> dict[str, Any]:
        """The facts, their probabilities, the average effects and peaks, and the example."""
        from unraveled.tracing import POSITION_GROUPS

        clean = [t.trace.clean_probability for t in self.traced]
        corrupted = [t.trace.corrupted_probability for t in self.traced]
        example = self.traced[self.example]
        return {
            "facts_in_set": self.n_candidates,
            "facts_known": len(self.known),
            "facts_traced": len(self.traced),
            "known_facts": [f"{k.fact.prompt} ->{k.fact.answer}" for k in self.known],
            "traced_facts": [
                {
                    "prompt": t.tokenized.fact.prompt,
                    "subject": t.tokenized.fact.subject,
                    "answer": t.tokenized.fact.answer,
                    "tokens": t.tokenized.str_tokens,
                    "subject_span": [t.tokenized.subject_start, t.tokenized.subject_end],
                    "clean_probability": t.trace.clean_probability,
                    "corrupted_probability": t.trace.corrupted_probability,
                }
                for t in self.traced
            ],
            "clean_probability_mean": float(np.mean(clean)),
            "corrupted_probability_mean": float(np.mean(corrupted)),
            "average_total_effect": float(np.mean(clean) - np.mean(corrupted)),
            "embedding_std": self.embedding_std,
            "noise_scale": self.noise_scale,
            "noise_samples": self.noise_samples,
            "prepend_bos": self.prepend_bos,
            "window": self.window,
            "position_groups": list(POSITION_GROUPS),
            "average_indirect_effect": self.average_effects,
            "mlp_peak": self.peak("mlp"),
            "attn_peak": self.peak("attn"),
            "residual_peak": self.peak("residual"),
            "example": {
                "prompt": example.tokenized.fact.prompt,
                "tokens": example.tokenized.str_tokens,
                "subject_span": [example.tokenized.subject_start, example.tokenized.subject_end],
                "restored_probability": {
                    "residual": example.trace.residual,
                    "mlp": example.trace.mlp,
                    "attn": example.trace.attn,
                },
            },
            "tracing_seconds": self.seconds,
        }


# Prompts per pass when finding the known facts: a pass over all the bundled facts at once was the
# experiment's peak (the MLP activations and GELU's temporaries of every prompt).
PREDICTION_BATCH = 16


def top_predictions(model: HookedTransformer, facts: list[TokenizedFact]) -> list[int]:
    """The model's top next token after each fact's prompt.

    The prompts run in right-padded batches of ``PREDICTION_BATCH``.
    """
    import torch

    from unraveled.logits import logit_lens

    predictions: list[int] = []
    for first in range(0, len(facts), PREDICTION_BATCH):
        batch = facts[first : first + PREDICTION_BATCH]
        longest = max(len(f.tokens) for f in batch)
        tokens = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, fact in enumerate(batch):
            tokens[row, : len(fact.tokens)] = torch.tensor(fact.tokens)
        # Causal attention: the padding after a prompt never reaches its own last position.
        last = torch.tensor([len(f.tokens) - 1 for f in batch])
        with torch.inference_mode():
            # Decoded at each prompt's last position only: logits at every position of every fact
            # would be the largest tensor of the whole experiment.
            residual = model(tokens, stop_at_layer=model.cfg.n_layers)
            predictions += (
                logit_lens(model, residual[torch.arange(len(batch)), last][:, None])[:, 0]
                .argmax(dim=-1)
                .tolist()
            )
    return predictions


def _known(model: HookedTransformer, facts: list[TokenizedFact]) -> list[TokenizedFact]:
    """The facts whose answer is the model's top prediction."""
    return [
        fact
        for fact, prediction in zip(facts, top_predictions(model, facts), strict=True)
        if prediction == fact.answer
    ]


def compute(
    model: HookedTransformer, params: CausalTracingParams, seed: int
) -> CausalTracingResult:
    """Find the facts the model knows, and trace the first ``n_facts`` short enough."""
    import torch

    from unraveled.datasets.facts import tokenize_fact
    from unraveled.tracing import embedding_noise_scale, scaled_window, trace_fact

    source, facts = _facts_with_source(params)
    tokenized = [
        tokenize_fact(model, fact, f"{source}[{index}]", prepend_bos=params.prepend_bos)
        for index, fact in enumerate(facts)
    ]
    known = _known(model, tokenized)
    if not known:
        raise ValueError(
            f"{model.cfg.model_name} gets none of the {len(facts)} facts right: nothing to trace"
        )
    cap = params.max_traced_tokens
    short_enough = [
        fact for fact in known if cap is None or len(fact.tokens) - fact.subject_start <= cap
    ]
    if not short_enough:
        raise ValueError(
            f"none of the {len(known)} facts {model.cfg.model_name} knows has at most "
            f"params.max_traced_tokens={cap} tokens from its subject on; raise it or set it to null"
        )
    chosen = short_enough[: params.n_facts]
    if params.example >= len(chosen):
        raise ValueError(
            f"params.example={params.example} but only {len(chosen)} facts are traced; "
            f"use 0..{len(chosen) - 1}"
        )
    window = params.window or scaled_window(model.cfg.n_layers)
    # As ROME: the spread of the subjects' token embeddings over the whole set, not just the
    # traced facts.
    subject_tokens = [
        token for fact in tokenized for token in fact.tokens[fact.subject_start : fact.subject_end]
    ]
    embedding_std = embedding_noise_scale(model, subject_tokens, 1.0)
    noise_scale = params.noise_multiplier * embedding_std
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    traced = []
    for fact in chosen:
        noise = torch.randn(
            (params.noise_samples, fact.subject_end - fact.subject_start, model.cfg.d_model),
            generator=generator,
        )
        trace = trace_fact(
            model,
            torch.tensor(fact.tokens),
            (fact.subject_start, fact.subject_end),
            fact.answer,
            noise * noise_scale,
            window,
        )
        traced.append(TracedFact(fact, trace))
    effects = {kind: grouped_effects(traced, kind) for kind in KINDS}
    return CausalTracingResult(
        n_candidates=len(facts),
        known=known,
        traced=traced,
        example=params.example,
        embedding_std=embedding_std,
        noise_scale=noise_scale,
        window=window,
        noise_samples=params.noise_samples,
        prepend_bos=params.prepend_bos,
        effects=effects,
        seconds=time.perf_counter() - started,
    )


def _trace_heatmap(
    axes: Axes,
    values: Float[NDArray, "rows layer"],
    row_labels: list[str],
    title: str,
    cmap: str,
    colorbar_label: str,
    vmin: float,
    vmax: float,
) -> None:
    image = axes.imshow(
        values, aspect="auto", cmap=cmap, interpolation="nearest", vmin=vmin, vmax=vmax
    )
    axes.figure.colorbar(image, ax=axes, label=colorbar_label)
    axes.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    axes.set(title=title, xlabel="Layer (centre of the window)" if "window" in title else "Layer")


def render(result: CausalTracingResult) -> Iterator[Artifact]:
    """The example's trace, the average indirect effects, and the spread at each peak."""
    from unraveled.render.figures import panels
    from unraveled.tracing import POSITION_GROUPS

    example = result.traced[result.example]
    fact, trace = example.tokenized, example.trace
    labels = [
        repr(token)[1:-1] + ("*" if fact.subject_start <= i < fact.subject_end else "")
        for i, token in enumerate(fact.str_tokens)
    ]
    figure, axes = panels(3)
    figure.set_size_inches(17, max(4.0, 0.35 * len(labels) + 1.5))
    for ax, (kind, (name, cmap)) in zip(axes, KINDS.items(), strict=True):
        values = getattr(trace, kind).T  # tokens as rows, as in the paper
        title = f"Restoring {name}" + (f" ({result.window} blocks)" if kind != "residual" else "")
        _trace_heatmap(
            ax,
            values,
            labels,
            title,
            cmap,
            f"p({fact.fact.answer.strip()})",
            trace.corrupted_probability,
            max(trace.clean_probability, float(values.max())),
        )
    bos = "BOS prepended, unlike ROME" if result.prepend_bos else "no BOS, as ROME"
    figure.suptitle(
        f"Causal trace of {fact.fact.prompt!r} -> {fact.fact.answer!r} "
        f"(* = subject, noised; mean over {result.noise_samples} noise samples; {bos}): "
        f"clean p = {trace.clean_probability:.3f}, corrupted p = {trace.corrupted_probability:.3f}"
    )
    yield Figure(
        "01_example_trace",
        figure,
        "Probability of the answer with one state (or window) restored, for one prompt",
    )

    figure, axes = panels(3)
    figure.set_size_inches(17, 4.2)
    bound = max(float(np.nanmax(effects)) for effects in result.average_effects.values()) or 1.0
    group_labels = [label.capitalize() for label in POSITION_GROUPS]
    for ax, (kind, (name, cmap)) in zip(axes, KINDS.items(), strict=True):
        title = f"Restoring {name}" + (f" ({result.window} blocks)" if kind != "residual" else "")
        _trace_heatmap(
            ax,
            result.average_effects[kind],
            group_labels,
            title,
            cmap,
            "average indirect effect on p(answer)",
            0.0,
            bound,
        )
    metrics = result.metrics()
    figure.suptitle(
        f"Average indirect effect over {len(result.traced)} prompts the model gets right "
        f"x {result.noise_samples} noise samples "
        f"({len(result.known)} of {result.n_candidates} known): "
        f"mean clean p = {metrics['clean_probability_mean']:.3f}, "
        f"corrupted p = {metrics['corrupted_probability_mean']:.3f}"
    )
    yield Figure(
        "02_average_indirect_effect",
        figure,
        "Restored minus corrupted probability, averaged over prompts, "
        "positions grouped as in the paper",
    )

    figure, axes = panels(3)
    figure.set_size_inches(17, 4.2)
    layers = np.arange(result.average_effects["residual"].shape[1])
    for ax, (kind, (name, cmap)) in zip(axes, KINDS.items(), strict=True):
        peak = metrics[f"{kind}_peak"]
        group = POSITION_GROUPS.index(peak["position_group"])
        effects = result.effects[kind]
        samples = effects.per_sample[:, group]
        error = standard_error(samples, axis=0) if len(samples) > 1 else np.zeros(len(layers))
        color = _dark_shade(cmap)
        for index, per_fact in enumerate(effects.per_fact[:, group]):
            ax.plot(
                layers,
                per_fact,
                color=color,
                alpha=0.35,
                linewidth=1,
                label="each fact" if index == 0 else None,
            )
        ax.errorbar(
            layers,
            effects.average[group],
            yerr=error,
            color=color,
            linewidth=2,
            capsize=2,
            label=f"average, +-1 standard error over {len(samples)} noise samples",
        )
        ax.axvline(peak["layer"], color="grey", linestyle=":", linewidth=1)
        title = f"Restoring {name}" + (f" ({result.window} blocks)" if kind != "residual" else "")
        ax.set(
            title=f"{title}\nat the {peak['position_group']} (peak: layer {peak['layer']})",
            xlabel="Layer (centre of the window)" if kind != "residual" else "Layer",
            ylabel="indirect effect on p(answer)",
        )
        ax.legend(fontsize=7, loc="upper left")
    figure.suptitle(
        f"Spread at each kind's peak position group: {len(result.traced)} facts (thin lines), "
        f"{result.noise_samples} noise samples each (error bars)"
    )
    yield Figure(
        "03_peak_spread",
        figure,
        "The average indirect effect at each peak's position group, "
        "with each fact's own curve and the standard error over noise samples",
    )


def _dark_shade(cmap: str) -> tuple[float, float, float, float]:
    """A dark shade of a sequential colormap, for lines drawn in a heatmap's colours."""
    from matplotlib import colormaps

    return colormaps[cmap](0.8)


def check(model: HookedTransformer, params: CausalTracingParams) -> None:
    """Every fact fits the model's context, its answer is one token and its subject whole tokens."""
    from unraveled.datasets.facts import tokenize_fact

    source, facts = _facts_with_source(params)
    advice = (
        "" if params.facts is not None else "; give params.facts that this model's tokenizer takes"
    )
    cap = min(EXPERIMENT.max_prompt_tokens, model.cfg.n_ctx)
    for index, fact in enumerate(facts):
        count = prompt_token_count(model, fact.prompt)
        if count > cap:
            raise ParamError(
                "facts",
                f"{source}[{index}].prompt is {count} tokens (BOS included), "
                f"more than the {cap} allowed; shorten it{advice}",
            )
        try:
            tokenize_fact(model, fact, f"{source}[{index}]")
        except ValueError as error:
            raise ParamError("facts", f"{error}{advice}") from error


EXPERIMENT = Experiment(
    title="Causal tracing",
    params=CausalTracingParams,
    compute=compute,
    render=render,
    weights="raw",
    check=check,
    # The residual stream after the last block decodes predictions; restored states are put
    # back by their hook's name.
    needs=frozenset({"stop_at_layer", "hook_names"}),
)
