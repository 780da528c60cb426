"""Which heads do what: induction, previous-token, duplicate-token and first-token scores.

Every attention head gets each score (first-token: attention sinks), and a view shows the top
induction heads at work.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jaxtyping import Float, Int
from numpy.typing import NDArray
from pydantic import Field

from unraveled.components import HeadComponent
from unraveled.experiment import (
    RESOLVE_ANNOTATIONS,
    Artifact,
    Experiment,
    Figure,
    ParamError,
    Params,
    Prompt,
    View,
)

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from torch import Tensor
    from transformer_lens import HookedTransformer

    from unraveled.activations import Activations

DEFAULT_PROMPTS = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The cat sat on the mat. The dog sat on the log. The cat saw the dog.",
    "Alice gave Bob a goose, and he gave her a duck.",
    "In 1905, Albert Einstein published four papers; in 1915 he published general relativity.",
]
SCORES = ("induction", "previous_token", "duplicate_token", "first_token")
TOP_K = 10
VIEWED_INDUCTION_HEADS = 6


class HeadTaxonomyParams(Params):
    """Natural prompts, and the random sequences repeated twice for the induction score."""

    prompts: list[Prompt] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS), min_length=1, description="Natural prompts."
    )
    repeat_batch: int = Field(8, ge=1, le=256, description="Random sequences, each repeated twice.")
    repeat_length: int = Field(40, ge=2, description="Tokens in each random segment.")


@dataclass(frozen=True)
class HeadTaxonomyResult:
    """Every score of every head, and the patterns of the top induction heads."""

    scores: dict[str, Float[NDArray, "layer head"]]
    repeated_tokens: list[str]
    repeated_patterns: Float[NDArray, "viewed query_pos key_pos"]
    viewed_heads: list[str]

    def metrics(self) -> dict[str, Any]:
        """The numbers of metrics.json."""
        from unraveled.heads import top_heads

        return {
            "scores": self.scores,
            "top_heads": {name: top_heads(values, TOP_K) for name, values in self.scores.items()},
            "score_definitions": {
                "induction": "random segments repeated twice: attention from the copy to the "
                "token after each token's first occurrence",
                "previous_token": "attention to the immediately preceding token (mean of "
                "repeated sequences and natural prompts)",
                "duplicate_token": "attention to earlier occurrences of the same token (mean of "
                "repeated sequences and natural prompts)",
                "first_token": "attention to position 0 from queries 1.. (query 0 can only "
                "attend to itself; mean of repeated sequences and natural prompts)",
            },
        }


def repeated_random_tokens(
    model: HookedTransformer, batch: int, length: int, seed: int
) -> Int[Tensor, "batch pos"]:
    """BOS, then ``length`` random token ids, then the same ids again, for each row."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    segment = torch.randint(0, model.cfg.d_vocab, (batch, length), generator=generator)
    bos = torch.full((batch, 1), model.tokenizer.bos_token_id or 0, dtype=torch.long)
    return torch.cat([bos, segment, segment], dim=1)


def _per_prompt_patterns(
    acts: Activations, n_layers: int
) -> Iterator[tuple[Float[Tensor, "layer head q k"], Int[Tensor, " pos"]]]:
    from unraveled.analysis import stack_patterns

    for index, length in enumerate(acts.lengths):
        yield (
            stack_patterns(acts.cache, n_layers, index)[..., :length, :length],
            acts.tokens[index, :length],
        )


def _prompt_scores(
    patterns: Float[Tensor, "layer head q k"], tokens: Int[Tensor, " pos"]
) -> dict[str, Float[Tensor, "layer head"]]:
    """The scores every prompt gets, repeated or natural."""
    from unraveled.analysis import attention_sink_by_head
    from unraveled.heads import duplicate_token_score, previous_token_score

    return {
        "previous_token": previous_token_score(patterns),
        "duplicate_token": duplicate_token_score(patterns, tokens),
        "first_token": attention_sink_by_head(patterns),
    }


def _mean_over_prompts(
    per_prompt: list[dict[str, Tensor]],
) -> dict[str, Float[Tensor, "layer head"]]:
    import torch

    return {
        name: torch.stack([scores[name] for scores in per_prompt]).mean(dim=0)
        for name in per_prompt[0]
    }


def _mean_scores(acts: Activations, n_layers: int) -> dict[str, Float[Tensor, "layer head"]]:
    return _mean_over_prompts(
        [
            _prompt_scores(patterns, tokens)
            for patterns, tokens in _per_prompt_patterns(acts, n_layers)
        ]
    )


REPEATED_ROWS_PER_PASS = 2
"""Repeated sequences run through the model at once: each pass's scores are kept and its cache
freed, so the patterns of all of them are never held together (all of them in one pass raised
the config's peak); rows are independent, so the scores are the same."""


def _repeated_pass_scores(
    model: HookedTransformer, tokens: Int[Tensor, "batch pos"], hooks: list[str], repeat_length: int
) -> tuple[
    dict[str, Float[Tensor, "layer head"]], Float[Tensor, "layer head query_pos key_pos"], list[str]
]:
    """Every score of each repeated sequence, averaged over them.

    Also the first sequence's patterns and tokens; ``REPEATED_ROWS_PER_PASS`` sequences per
    forward pass.
    """
    from unraveled.activations import collect_activations
    from unraveled.analysis import stack_patterns
    from unraveled.heads import induction_score

    n_layers = model.cfg.n_layers
    per_row: list[dict[str, Tensor]] = []
    first_row, first_tokens = None, []
    for start in range(0, tokens.shape[0], REPEATED_ROWS_PER_PASS):
        acts = collect_activations(
            model, tokens[start : start + REPEATED_ROWS_PER_PASS], hooks, logits=False
        )
        for patterns, row_tokens in _per_prompt_patterns(acts, n_layers):
            per_row.append(
                {
                    "induction": induction_score(patterns, repeat_length),
                    **_prompt_scores(patterns, row_tokens),
                }
            )
        if first_row is None:
            first_row, first_tokens = stack_patterns(acts.cache, n_layers, 0), acts.str_tokens[0]
        del acts
    assert first_row is not None
    return _mean_over_prompts(per_row), first_row, first_tokens


def compute(model: HookedTransformer, params: HeadTaxonomyParams, seed: int) -> HeadTaxonomyResult:
    """Score every head on repeated random sequences and on the natural prompts."""
    import torch

    from unraveled.activations import collect_activations
    from unraveled.heads import top_heads

    n_layers = model.cfg.n_layers
    hooks = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    tokens = repeated_random_tokens(model, params.repeat_batch, params.repeat_length, seed)
    on_repeated, first_row, first_tokens = _repeated_pass_scores(
        model, tokens, hooks, params.repeat_length
    )
    on_natural = _mean_scores(
        collect_activations(model, params.prompts, hooks, logits=False), n_layers
    )
    scores = {
        "induction": on_repeated["induction"],
        **{name: (on_repeated[name] + on_natural[name]) / 2 for name in on_natural},
    }
    scores_np = {name: scores[name].numpy() for name in SCORES}
    viewed = [entry["head"] for entry in top_heads(scores_np["induction"], VIEWED_INDUCTION_HEADS)]
    viewed_patterns = torch.stack(
        [first_row[head.layer, head.head] for head in map(HeadComponent.parse, viewed)]
    )
    return HeadTaxonomyResult(
        scores=scores_np,
        repeated_tokens=first_tokens,
        repeated_patterns=viewed_patterns.numpy(),
        viewed_heads=viewed,
    )


def render(result: HeadTaxonomyResult) -> Iterator[Artifact]:
    """The scores as heatmaps, the top heads per score, and the induction heads' patterns."""
    from unraveled.heads import top_heads
    from unraveled.render import views
    from unraveled.render.figures import heatmap, panels

    figure, axes_list = panels(2, 2)
    for axes, name in zip(axes_list, SCORES, strict=True):
        heatmap(
            axes,
            result.scores[name],
            f"{name.replace('_', '-')} score",
            "Head",
            "Layer",
            cmap="viridis",
            colorbar_label="score",
        )
    yield Figure(
        "01_head_scores",
        figure,
        "Induction, previous-token, duplicate-token and first-token scores of every head",
    )

    figure, axes_list = panels(2, 2)
    for axes, name in zip(axes_list, SCORES, strict=True):
        ranked = top_heads(result.scores[name], TOP_K)
        axes.barh(
            [entry["head"] for entry in ranked][::-1],
            [entry["score"] for entry in ranked][::-1],
            color="slateblue",
        )
        axes.set(
            title=f"Top {TOP_K} heads: {name.replace('_', '-')}",
            xlabel="score",
            ylabel="head (layer.head)",
        )
    yield Figure("02_top_heads", figure, f"The top {TOP_K} heads for each score")

    names = [f"L{head.layer}H{head.head}" for head in map(HeadComponent.parse, result.viewed_heads)]
    element = views.attention_heads(
        result.repeated_patterns,
        result.repeated_tokens,
        "Top induction heads on a repeated random sequence",
        names,
    )
    yield View(
        "top_induction_heads",
        "Top induction heads on a repeated random sequence",
        [element],
        {
            "heads": ", ".join(result.viewed_heads),
            "sequence": "BOS, random tokens, the same tokens again",
        },
    )


def check(model: HookedTransformer, params: HeadTaxonomyParams) -> None:
    """BOS plus the random segment twice must fit the model's context."""
    needed = 1 + 2 * params.repeat_length
    if needed > model.cfg.n_ctx:
        raise ParamError(
            "repeat_length",
            f"{params.repeat_length} needs {needed} positions (BOS + the segment twice), more "
            f"than the model's context of {model.cfg.n_ctx}",
        )


EXPERIMENT = Experiment(
    title="Attention-head taxonomy",
    params=HeadTaxonomyParams,
    compute=compute,
    render=render,
    check=check,
)
