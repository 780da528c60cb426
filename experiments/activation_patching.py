"""Activation patching: which activations carry the information that decides the answer.

The clean run's activations are patched into the corrupted run one at a time: the residual
stream at every layer and position, and every head's output (``hook_z``, all positions). Each
patch is scored by the share of the clean logit difference it recovers: 0 = corrupted, 1 = clean.
Patches of one layer run together as one batch, and start from the corrupted run's residual
stream at that layer: the layers before it would only recompute what the corrupted run cached
(``unraveled.patching``).

With ``prompts: ioi`` the patches run over a dataset of IOI prompt pairs instead of one pair, the
logit differences are averaged over the pairs, and the residual stream is patched per group of
positions (the names, the token after the first subject, the last token, the rest), since the
prompts' positions don't line up. With ``prompts: pairs`` they run over your own pairs
(``unraveled.datasets.pairs``): per position when every prompt has the same token length, else
per group of positions around the tokens the prompts differ in. From Python, ``metric`` replaces
the logit difference.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray
from pydantic import Field

from unraveled.datasets.ioi import IOIParams
from unraveled.datasets.pairs import PatchingMetricParams, check_pairs, metric_name
from unraveled.experiment import (
    RESOLVE_ANNOTATIONS,
    Answer,
    Artifact,
    Experiment,
    Figure,
    ParamError,
    Prompt,
    prompt_token_count,
)

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

TOP_K = 10


class ActivationPatchingParams(PatchingMetricParams):
    """One clean/corrupted pair and its answers, the IOI dataset, or your own pairs."""

    clean: Prompt = "When Mary and John went to the store, John gave a drink to"
    corrupted: Prompt = "When Mary and John went to the store, Mary gave a drink to"
    clean_answer: Answer = Field(" Mary", description="The clean prompt's answer (one token).")
    corrupted_answer: Answer = Field(
        " John", description="The corrupted prompt's answer (one token)."
    )
    prompts: Literal["pair", "ioi", "pairs"] = Field(
        "pair",
        description="pair: the one pair above; ioi: the IOI dataset in params.ioi; pairs: your "
        "own, in params.pairs or params.pairs_file.",
    )
    ioi: IOIParams = Field(
        default_factory=IOIParams, description="The IOI prompt pairs, when prompts is ioi."
    )


@dataclass(frozen=True)
class ActivationPatchingResult:
    """Shares recovered per residual point and position (or group), and per head."""

    tokens: list[str]
    residual_labels: list[str]
    residual: Float[NDArray, "point pos"]
    heads: Float[NDArray, "layer head"]
    clean_difference: float
    corrupted_difference: float
    seconds: float
    n_pairs: int = 1
    answers: dict[str, dict[str, float]] = field(default_factory=dict)
    position_groups: bool = False
    """Whether the residual's columns are groups of positions (``ROLES`` over IOI pairs,
    ``patching.CHANGE_GROUPS`` over your own pairs of different lengths) rather than positions."""
    pairs_kind: str = "IOI"
    """Whose pairs several pairs are, for titles: ``IOI`` or ``your``."""
    metric: str | None = None
    """The custom metric's qualified name; None for the logit difference."""
    metric_label: str = "logit difference"
    """How figures name the metric."""

    @property
    def position_kind(self) -> str:
        """The residual grid's column label."""
        return "Position group" if self.position_groups else "Position"

    def _residual_patch(self, index: int, n_pos: int) -> dict[str, Any]:
        """One residual patch by its flat index.

        Its position and token for one pair; over IOI pairs its group of positions (``ROLES``:
        the prompts' positions don't line up) and the group's index.
        """
        column = index % n_pos
        where = (
            {"position_group": self.tokens[column], "position_group_index": column}
            if self.position_groups
            else {"position": column, "token": self.tokens[column]}
        )
        return {
            "point": self.residual_labels[index // n_pos],
            **where,
            "recovered": float(self.residual.flat[index]),
        }

    def metrics(self) -> dict[str, Any]:
        """The numbers of metrics.json."""
        from unraveled.heads import top_heads

        order = np.argsort(-self.residual, axis=None)[:TOP_K]
        n_pos = self.residual.shape[1]
        scored = "logit_difference" if self.metric is None else "metric"
        return {
            "n_pairs": self.n_pairs,
            **({} if self.metric is None else {"metric": self.metric}),
            "position_groups" if self.position_groups else "tokens": self.tokens,
            f"clean_{scored}": self.clean_difference,
            f"corrupted_{scored}": self.corrupted_difference,
            "answers": self.answers,
            "residual_points": self.residual_labels,
            "residual_recovered": self.residual,
            "heads_recovered": self.heads,
            "top_residual_patches": [self._residual_patch(int(i), n_pos) for i in order],
            "top_heads": top_heads(self.heads, TOP_K),
            "bottom_heads": top_heads(self.heads, TOP_K, lowest=True),
            "patching_seconds": self.seconds,
        }


def compute(
    model: HookedTransformer, params: ActivationPatchingParams, seed: int
) -> ActivationPatchingResult:
    """Patch the residual stream and every head's output from the clean run into the corrupted."""
    import torch

    from unraveled.datasets.ioi import ROLES, corrupted_prompts_answer, ioi_batch
    from unraveled.logits import answer_token_id, residual_hook_names
    from unraveled.patching import (
        Recovery,
        answer_summary,
        head_patches,
        logit_difference,
        patched_metric,
        position_groups,
        residual_patches,
        run_cache,
        single_pair,
        user_pairs,
    )

    grouped = params.prompts == "ioi"
    if params.prompts == "ioi":
        batch = ioi_batch(model, params.ioi, seed, "params.ioi")
        pairs, groups, labels = batch.tokens, [batch.roles[role] for role in ROLES], list(ROLES)
    elif params.prompts == "pairs":
        pairs = user_pairs(model, [row.pair for row in params.rows()])
        labels, groups, grouped = position_groups(model, pairs)
    else:
        answers = (
            answer_token_id(model, params.clean_answer, "params.clean_answer"),
            answer_token_id(model, params.corrupted_answer, "params.corrupted_answer"),
        )
        pairs = single_pair(model, params.clean, params.corrupted, *answers)
        n_pos = pairs.clean.shape[1]
        groups = list(torch.eye(n_pos, dtype=torch.bool)[:, None, :])  # one group per position
        labels = [model.tokenizer.decode([token]) for token in pairs.clean[0].tolist()]
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    residual_hooks = residual_hook_names(n_layers)
    z_hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    clean_logits, clean_cache = run_cache(model, pairs, "clean", [*residual_hooks, *z_hooks])
    corrupted_logits, corrupted_cache = run_cache(model, pairs, "corrupted", residual_hooks)
    # The corrupted prompt of a pair of your own answers its corrupted answer, the pairs'
    # incorrect token.
    corrupted_answer = (
        corrupted_prompts_answer(params.ioi) if params.prompts == "ioi" else "incorrect"
    )
    clean, corrupted = (
        answer_summary(clean_logits, pairs),
        answer_summary(corrupted_logits, pairs, corrupted_answer),
    )
    metric = params.metric or logit_difference
    recovery = Recovery.of(
        metric,
        clean_logits,
        corrupted_logits,
        pairs,
        {"ioi": "params.ioi", "pairs": params.pairs_field}.get(params.prompts, "params"),
        metric_name(params.metric),
    )
    started = time.perf_counter()
    # Point p of the residual stream is the input to block p (the last point feeds the
    # unembedding).
    residual = patched_metric(
        model,
        pairs,
        residual_patches(model, groups),
        clean_cache,
        "corrupted",
        corrupted_cache,
        metric=metric,
    )
    heads = patched_metric(
        model, pairs, head_patches(model), clean_cache, "corrupted", corrupted_cache, metric=metric
    )
    seconds = time.perf_counter() - started
    return ActivationPatchingResult(
        tokens=labels,
        residual_labels=[
            *[f"before block {layer}" for layer in range(n_layers)],
            "after the last block",
        ],
        residual=recovery.share(residual).reshape(n_layers + 1, len(groups)).numpy(),
        heads=recovery.share(heads).reshape(n_layers, n_heads).numpy(),
        clean_difference=recovery.clean,
        corrupted_difference=recovery.corrupted,
        seconds=seconds,
        n_pairs=pairs.size,
        answers={"clean": clean, "corrupted": corrupted},
        position_groups=grouped,
        pairs_kind="IOI" if params.prompts == "ioi" else "your",
        metric=None if params.metric is None else metric_name(params.metric, qualified=True),
        metric_label=metric_name(params.metric),
    )


def render(result: ActivationPatchingResult) -> Iterator[Artifact]:
    """The residual stream's and the heads' shares recovered, as heatmaps."""
    from unraveled.render.figures import heatmap, panels

    figure, (axes,) = panels(1)
    figure.set_size_inches(
        max(8.0, 0.7 * len(result.tokens)), max(5.0, 0.3 * len(result.residual_labels))
    )
    over = "" if result.n_pairs == 1 else f", mean over {result.n_pairs} {result.pairs_kind} pairs"
    heatmap(
        axes,
        result.residual,
        f"Residual stream patched from the clean run: share of the {result.metric_label} "
        f"recovered{over}",
        result.position_kind,
        "",
        cmap="RdBu_r",
        colorbar_label="recovered (0 corrupted, 1 clean)",
        centre_zero=True,
    )
    axes.set_xticks(
        range(len(result.tokens)), [repr(t)[1:-1] for t in result.tokens], rotation=60, fontsize=7
    )
    axes.set_yticks(range(len(result.residual_labels)), result.residual_labels, fontsize=6)
    yield Figure(
        "01_residual_patching", figure, "Patching the residual stream, per layer and position"
    )

    figure, (axes,) = panels(1)
    heatmap(
        axes,
        result.heads,
        f"Head outputs patched from the clean run: share recovered{over}",
        "Head",
        "Layer",
        cmap="RdBu_r",
        colorbar_label="recovered (0 corrupted, 1 clean)",
        centre_zero=True,
    )
    yield Figure("02_head_patching", figure, "Patching each head's output at every position")


def check_before_loading(
    params: ActivationPatchingParams, tokenizer: PreTrainedTokenizerBase | None, n_ctx: int | None
) -> None:
    """Your own pairs, against the tokenizer: prompts that fit, one-token answers, equal lengths."""
    if params.prompts == "pairs" and tokenizer is not None:
        check_pairs(params, tokenizer, n_ctx)


def check(model: HookedTransformer, params: ActivationPatchingParams) -> None:
    """One pair is patched position by position: same token length.

    IOI names must be single tokens; your own pairs are checked as before loading.
    """
    from unraveled.datasets.ioi import check_ioi_names

    if params.prompts == "ioi":
        check_ioi_names(model, params.ioi)
        return
    if params.prompts == "pairs":
        check_pairs(params, model.tokenizer, model.cfg.n_ctx)
        return
    clean, corrupted = (
        prompt_token_count(model, params.clean),
        prompt_token_count(model, params.corrupted),
    )
    if clean != corrupted:
        raise ParamError(
            "corrupted",
            f"{corrupted} tokens, but params.clean has {clean}: patching position by position "
            "needs prompts of the same token length",
        )


EXPERIMENT = Experiment(
    title="Activation patching",
    params=ActivationPatchingParams,
    compute=compute,
    render=render,
    check=check,
    check_before_loading=check_before_loading,
    # Patches from a layer on; reads patched activations by their hook's name.
    needs=frozenset({"start_at_layer", "hook_names"}),
)
