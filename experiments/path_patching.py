"""Path patching over IOI prompt pairs: the sender x receiver heatmaps of Wang et al. (2022).

Each sender head's output is patched from the corrupted prompts into the clean run with every
other head frozen to the clean run, so its change reaches the receiver by the direct path only
(``unraveled.patching.paths``). Two maps, as in the IOI paper: senders -> logits (the receiver is
the unembedding's input), and senders -> the name movers' queries (their query input replaced by
the frozen run's, at the last token by default, then everything after them recomputed).

Sign and scale, the paper's: the change of the mean logit difference relative to the clean run,
(patched - clean) / clean, in percent; negative means the path carries what the clean answer
needs. The corrupted prompts are IOI's ``abc`` (the repeated subject S2 becomes a third name) by
default; the paper's ABC distribution replaces all three names. The spread is the standard error
over pairs of each pair's change (``n_pairs`` in the metrics and the titles).

Receivers: ``params.receivers``, or on a GPT-2-small-shaped GPT-2 the published name movers 9.6,
9.9 and 10.0, or else the ``n_receivers`` heads whose path to the logits lowers the logit
difference most (the map's counterpart of name movers); the figure's title says which.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from jaxtyping import Float
from numpy.typing import NDArray
from pydantic import Field

from unraveled.datasets.ioi import IOIParams
from unraveled.experiment import (
    RESOLVE_ANNOTATIONS,
    Artifact,
    Experiment,
    Figure,
    ParamError,
    Params,
)
from unraveled.spread import standard_error

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from transformer_lens import HookedTransformer

GPT2_SMALL_NAME_MOVERS = ("9.6", "9.9", "10.0")
"""Wang et al. (2022)'s name movers in GPT-2 small, the default receivers there."""
GPT2_SMALL_NAMES = frozenset({"gpt2", "gpt2-small", "openai-community/gpt2"})
"""The names GPT-2 small is loaded under: only it gets the published name movers."""
MIN_CLEAN_LOGIT_DIFFERENCE = 0.1
"""Below this clean mean logit difference (IO - S) the model is refused: it doesn't do IOI."""
TOP_K = 10
HeadName = Annotated[str, Field(pattern=r"^\d+\.\d+$")]


class PathPatchingParams(Params):
    """The IOI pairs, the receivers and how the frozen run treats MLPs."""

    ioi: IOIParams = Field(
        # 16 pairs: at 3 the senders' sizes moved several-fold with the seed (docs/causal.md).
        default_factory=lambda: IOIParams(n_pairs=16, corruption="abc"),
        description=(
            "The IOI prompt pairs (16, corruption abc by default, as the paper's ABC runs)."
        ),
    )
    receivers: list[HeadName] | None = Field(
        None,
        max_length=32,
        description="Receiver heads 'L.H' for the second map; default: GPT-2 small's name movers "
        "9.6, 9.9, 10.0 on GPT-2 small (loaded as gpt2), else the n_receivers heads whose path to "
        "the logits lowers the logit difference most.",
    )
    n_receivers: int = Field(
        3, ge=1, le=32, description="How many receivers to choose when receivers is not given."
    )
    receiver_input: Literal["q", "k", "v"] = Field(
        "q", description="Which input of the receivers is patched (q: the IOI paper's queries)."
    )
    receiver_positions: Literal["last", "all"] = Field(
        "last",
        description="Where the receivers' input is patched: at the last token (END, as the "
        "paper's name-mover queries) or at every position.",
    )
    freeze_mlps: bool = Field(
        False,
        description="Freeze MLPs to the clean run too (only the residual-stream edge left); by "
        "default they are recomputed, as in the IOI paper.",
    )


@dataclass(frozen=True)
class PathPatchingResult:
    """Each sender's patched logit difference per pair, to the logits and to the receivers."""

    n_pairs: int
    corruption: str
    clean: dict[str, float]
    corrupted: dict[str, float]
    clean_per_pair: Float[NDArray, " batch"]
    to_logits: Float[NDArray, "layer head batch"]
    to_receivers: Float[NDArray, "layer head batch"]
    receivers: list[str]
    receiver_choice: str
    receiver_input: str
    receiver_positions: str
    freeze_mlps: bool
    seconds: dict[str, float]

    def relative(self, patched: Float[NDArray, "layer head batch"]) -> Float[NDArray, "layer head"]:
        """(patched - clean) / clean mean logit difference, in percent (the paper's figures)."""
        return _relative(patched, self.clean_per_pair)

    def standard_error(
        self, patched: Float[NDArray, "layer head batch"]
    ) -> Float[NDArray, "layer head"]:
        """Standard error over pairs of each pair's change, on ``relative``'s scale.

        NaN with one pair.
        """
        change = patched - self.clean_per_pair
        clean = abs(float(self.clean_per_pair.mean()))
        return standard_error(change, axis=-1, scale=100.0) / clean

    def _top(self, patched: Float[NDArray, "layer head batch"]) -> list[dict[str, Any]]:
        """The senders with the largest |relative change|, with their standard errors."""
        relative, error = self.relative(patched), self.standard_error(patched)
        span = self.clean["mean_logit_difference"] - self.corrupted["mean_logit_difference"]
        magnitude = np.nan_to_num(np.abs(relative), nan=-1.0)
        order = np.argsort(-magnitude, axis=None, kind="stable")[:TOP_K]
        n_heads = relative.shape[1]
        return [
            {
                "sender": f"{index // n_heads}.{index % n_heads}",
                "relative_change_percent": float(relative.flat[index]),
                "standard_error_percent": float(error.flat[index]),
                "normalised_0_clean_minus_1_corrupted": float(
                    (patched.mean(-1).flat[index] - self.clean["mean_logit_difference"]) / span
                ),
            }
            for index in order
            if magnitude.flat[index] >= 0
        ]

    def metrics(self) -> dict[str, Any]:
        """The numbers of metrics.json."""
        return {
            "n_pairs": self.n_pairs,
            "corruption": self.corruption,
            "clean": self.clean,
            "corrupted": self.corrupted,
            "scale": "relative_change_percent: 100 * (patched - clean) / clean mean logit "
            "difference (Wang et al. 2022's figures); standard_error_percent: over pairs, of each "
            "pair's change; normalised_0_clean_minus_1_corrupted: (patched - clean) / (clean - "
            "corrupted), ARENA's scale",
            "frozen_run": "every head but the sender frozen to the clean run; MLPs "
            + ("frozen" if self.freeze_mlps else "recomputed"),
            "receivers": self.receivers,
            "receiver_choice": self.receiver_choice,
            "receiver_input": self.receiver_input,
            "receiver_positions": self.receiver_positions,
            "top_senders_to_logits": self._top(self.to_logits),
            "top_senders_to_receivers": self._top(self.to_receivers),
            "senders_to_logits_relative_change_percent": self.relative(self.to_logits),
            "senders_to_receivers_relative_change_percent": self.relative(self.to_receivers),
            "seconds": self.seconds,
        }


def _relative(
    patched: Float[NDArray, "layer head batch"], clean_per_pair: Float[NDArray, " batch"]
) -> Float[NDArray, "layer head"]:
    clean = float(clean_per_pair.mean())
    return 100 * (patched.mean(-1) - clean) / clean


def _check_does_ioi(clean_per_pair: Float[NDArray, " batch"]) -> None:
    # Changes are relative to the clean mean: at or below 0 their signs invert (and the receivers
    # chosen from them), near 0 they blow up. A model that doesn't prefer IO has no IOI circuit.
    clean = float(clean_per_pair.mean())
    if clean < MIN_CLEAN_LOGIT_DIFFERENCE:
        raise ParamError(
            "ioi",
            f"the model doesn't do IOI on these pairs: its clean mean logit difference (IO - S) "
            f"is {clean:.3g}, expected at least {MIN_CLEAN_LOGIT_DIFFERENCE} for changes "
            "relative to it to mean anything",
        )


def _is_gpt2_small(model: HookedTransformer) -> bool:
    # By name too: a fine-tune or a random checkpoint of GPT-2 small's shape has its own heads.
    cfg = model.cfg
    return cfg.model_name in GPT2_SMALL_NAMES and (
        cfg.original_architecture,
        cfg.n_layers,
        cfg.n_heads,
        cfg.d_model,
    ) == ("GPT2LMHeadModel", 12, 12, 768)


def _receivers(
    model: HookedTransformer,
    params: PathPatchingParams,
    relative: Float[NDArray, "layer head"],
) -> tuple[list[str], str]:
    """The receiver heads and how they were chosen."""
    if params.receivers is not None:
        return list(params.receivers), "params.receivers"
    if _is_gpt2_small(model):
        return list(GPT2_SMALL_NAME_MOVERS), "GPT-2 small's name movers (Wang et al. 2022)"
    n_heads = relative.shape[1]
    # A receiver in layer 0 could be reached by no sender.
    candidates = np.where(np.arange(relative.size) >= n_heads, relative.flatten(), np.inf)
    order = np.argsort(candidates, kind="stable")[: params.n_receivers]
    return (
        [f"{index // n_heads}.{index % n_heads}" for index in order],
        f"the {params.n_receivers} heads whose path to the logits lowers the logit difference most",
    )


def compute(model: HookedTransformer, params: PathPatchingParams, seed: int) -> PathPatchingResult:
    """Path-patch every head to the logits, then to the receivers' inputs."""
    from unraveled.components import HeadComponent
    from unraveled.datasets.ioi import corrupted_prompts_answer, ioi_batch
    from unraveled.patching import answer_summary, logit_difference, run_cache
    from unraveled.patching.paths import (
        path_patch_to_logits,
        path_patch_to_receivers,
        path_patching_hooks,
    )

    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    pairs = ioi_batch(model, params.ioi, seed, "params.ioi").tokens
    clean_logits, clean_cache = run_cache(model, pairs, "clean", path_patching_hooks(model))
    corrupted_logits, corrupted_cache = run_cache(
        model, pairs, "corrupted", [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    )
    clean_per_pair = logit_difference(clean_logits, pairs).numpy()
    _check_does_ioi(clean_per_pair)
    clean = answer_summary(clean_logits, pairs)
    corrupted = answer_summary(corrupted_logits, pairs, corrupted_prompts_answer(params.ioi))
    started = time.perf_counter()
    to_logits = path_patch_to_logits(
        model, pairs, clean_cache, corrupted_cache, freeze_mlps=params.freeze_mlps
    ).reshape(n_layers, n_heads, pairs.size)
    logits_seconds = time.perf_counter() - started
    relative = _relative(to_logits.numpy(), clean_per_pair)
    receivers, choice = _receivers(model, params, relative)
    started = time.perf_counter()
    to_receivers = path_patch_to_receivers(
        model,
        pairs,
        clean_cache,
        corrupted_cache,
        [
            HeadComponent(*map(int, name.split(".")), params.receiver_input)  # type: ignore[arg-type]
            for name in receivers
        ],
        freeze_mlps=params.freeze_mlps,
        positions=params.receiver_positions,
    ).reshape(n_layers, n_heads, pairs.size)
    return PathPatchingResult(
        n_pairs=pairs.size,
        corruption=params.ioi.corruption,
        clean=clean,
        corrupted=corrupted,
        clean_per_pair=clean_per_pair,
        to_logits=to_logits.numpy(),
        to_receivers=to_receivers.numpy(),
        receivers=receivers,
        receiver_choice=choice,
        receiver_input=params.receiver_input,
        receiver_positions=params.receiver_positions,
        freeze_mlps=params.freeze_mlps,
        seconds={
            "senders_to_logits": logits_seconds,
            "senders_to_receivers": time.perf_counter() - started,
        },
    )


def _map_figure(
    result: PathPatchingResult,
    patched: Float[NDArray, "layer head batch"],
    title: str,
    outlined: list[str],
) -> Any:
    """A sender heatmap beside the top senders' bars with their standard errors."""
    from matplotlib.patches import Rectangle

    from unraveled.render.figures import heatmap, panels

    relative, error = result.relative(patched), result.standard_error(patched)
    figure, (grid, bars) = panels(2, width_ratios=[1.6, 1.0])
    figure.set_size_inches(14, max(5.0, 0.22 * relative.shape[0] + 2))
    heatmap(
        grid,
        relative,
        title,
        "Sender head",
        "Sender layer",
        cmap="RdBu",
        colorbar_label="(patched - clean) / clean logit difference, %",
        centre_zero=True,
    )
    for name in outlined:
        layer, head = map(int, name.split("."))
        grid.add_patch(
            Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5)
        )
    order = np.argsort(-np.nan_to_num(np.abs(relative), nan=-1.0), axis=None, kind="stable")
    shown = [int(i) for i in order[:TOP_K] if not np.isnan(relative.flat[i])][::-1]
    n_heads = relative.shape[1]
    bars.barh(
        range(len(shown)),
        [relative.flat[i] for i in shown],
        xerr=[error.flat[i] for i in shown],
        color=["tab:red" if relative.flat[i] < 0 else "tab:blue" for i in shown],
        capsize=3,
    )
    bars.set_yticks(range(len(shown)), [f"{i // n_heads}.{i % n_heads}" for i in shown])
    bars.axvline(0, color="black", linewidth=0.6)
    bars.set(
        title=f"Top {len(shown)} senders, ± standard error over {result.n_pairs} pairs",
        xlabel="(patched - clean) / clean, %",
    )
    return figure


def render(result: PathPatchingResult) -> Iterator[Artifact]:
    """The two sender maps of the IOI paper."""
    mlps = "frozen" if result.freeze_mlps else "recomputed"
    over = f"{result.n_pairs} IOI pairs, corruption {result.corruption}, MLPs {mlps}"
    figure = _map_figure(
        result,
        result.to_logits,
        f"Path patching: senders -> logits\n({over}; boxed: the receivers of the next map)",
        result.receivers,
    )
    yield Figure(
        "01_senders_to_logits",
        figure,
        "Each head's direct effect on the logit difference, every other head frozen",
    )
    where = "last token" if result.receiver_positions == "last" else "every position"
    figure = _map_figure(
        result,
        result.to_receivers,
        f"Path patching: senders -> {result.receiver_input} input of "
        f"{', '.join(result.receivers)} at the {where}\n(receivers: {result.receiver_choice}; "
        f"{over}; blank: reaches none)",
        [],
    )
    yield Figure(
        "02_senders_to_receivers",
        figure,
        f"Each head's effect through the receivers' {result.receiver_input} input alone",
    )


def check(model: HookedTransformer, params: PathPatchingParams) -> None:
    """IOI names are single tokens; receivers are heads the model has, not all in layer 0."""
    from unraveled.datasets.ioi import check_ioi_names

    check_ioi_names(model, params.ioi)
    if params.receivers is None:
        return
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    for name in params.receivers:
        layer, head = map(int, name.split("."))
        if layer >= n_layers or head >= n_heads:
            raise ParamError(
                "receivers",
                f"{name!r} is out of range: the model has {n_layers} layers of {n_heads} heads "
                f"(layers 0..{n_layers - 1}, heads 0..{n_heads - 1})",
            )
    if all(name.split(".")[0] == "0" for name in params.receivers):
        raise ParamError("receivers", "every receiver is in layer 0, where no head can send to it")


EXPERIMENT = Experiment(
    title="Path patching (IOI)",
    params=PathPatchingParams,
    compute=compute,
    render=render,
    check=check,
    needs=frozenset({"start_at_layer", "hook_names", "block_internals"}),
)
