"""What the corpus engines accumulate, batch by batch, and merge exactly across shards.

The running state of every neuron, residual dimension and head, updated one batch of windows at
a time.

Definitions (also written into the atlas's metrics):

- A neuron's value is ``blocks.L.mlp.hook_post`` (what it writes through ``W_out``); it is
  *active* on a token when its pre-activation ``blocks.L.mlp.hook_pre`` is > 0 (for gated MLPs
  such as SmolLM2's, the gate's pre-activation; for GPT-2's GELU, its input).
- The residual stream is ``blocks.L.hook_resid_post``; its statistics are of absolute values:
  per dimension over all positions, per dimension at the sequence's first position alone (where
  massive activations sit), a histogram of every |value| of the layer (for its median), and
  each dimension's top tokens among the other positions.
- Head scores are per-window means over query positions, averaged over windows.
- When the model prepends a BOS token to each window, that position (identical in every
  window) is left out of the neuron statistics and top-k; residual and head statistics keep it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from unraveled.analysis import attention_entropy_by_head
from unraveled.corpus import with_bos
from unraveled.running_stats import LogHistogram, Moments, Sums, TopK, top_k_of_batch

HEAD_SCORES = ("entropy", "first_token", "previous_token", "duplicate_token", "induction")


@dataclass(frozen=True)
class AtlasSettings:
    """How much the state keeps; shared by every shard of one run so that states merge.

    No field has a default: the corpus atlas's params are the one source of them
    (``unraveled.experiments.corpus_atlas.atlas_settings``), so the bench measures the state
    ``make all`` keeps.

    Attributes:
        top_k: Top activating tokens kept per neuron.
        context_before: Tokens of context kept before each top token.
        context_after: Tokens of context kept after it.
        residual_top_k: Largest-magnitude tokens kept per residual dimension.
        batch_windows: Windows per forward pass.
        prepend_bos: Whether each window gets the model's BOS token in front.
        neuron_contexts: For how many of each neuron's top tokens the context is kept (None:
            all ``top_k``). Contexts are most of the state (GPT-2 small, 20 of them: 65 MB),
            and the neuron browser shows only its first few.
    """

    top_k: int
    context_before: int
    context_after: int
    residual_top_k: int
    batch_windows: int
    prepend_bos: bool
    neuron_contexts: int | None

    @property
    def context(self) -> int:
        """Tokens of context kept around each top token, the token itself included."""
        return self.context_before + 1 + self.context_after


@dataclass
class AtlasState:
    """Running statistics over the windows seen so far; ``merge`` combines two shards' states."""

    neurons: list[Moments]
    neuron_top: list[TopK]
    residual: list[Moments]
    residual_first: list[Moments]
    residual_histogram: list[LogHistogram]
    residual_top: list[TopK]
    heads: Sums
    n_windows: int

    @classmethod
    def empty(cls, n_layers: int, d_mlp: int, d_model: int, settings: AtlasSettings) -> AtlasState:
        """The state before any window: nothing counted, nothing kept."""
        return cls(
            neurons=[Moments.empty(d_mlp) for _ in range(n_layers)],
            neuron_top=[
                TopK.empty(settings.top_k, d_mlp, settings.context, settings.neuron_contexts)
                for _ in range(n_layers)
            ],
            residual=[Moments.empty(d_model) for _ in range(n_layers)],
            residual_first=[Moments.empty(d_model) for _ in range(n_layers)],
            residual_histogram=[LogHistogram.empty() for _ in range(n_layers)],
            residual_top=[
                TopK.empty(settings.residual_top_k, d_model, settings.context)
                for _ in range(n_layers)
            ],
            heads=Sums({}, 0),
            n_windows=0,
        )

    @classmethod
    def for_model(cls, model: HookedTransformer, settings: AtlasSettings) -> AtlasState:
        """The empty state sized to ``model``'s layers, MLP width and residual width."""
        cfg = model.cfg
        assert cfg.d_mlp is not None, "the corpus atlas needs MLP layers"
        return cls.empty(cfg.n_layers, cfg.d_mlp, cfg.d_model, settings)

    def merge(self, other: AtlasState) -> AtlasState:
        """The state of both shards' windows together (neither input is changed)."""
        return AtlasState(
            neurons=[a.merge(b) for a, b in zip(self.neurons, other.neurons, strict=True)],
            neuron_top=[a.merge(b) for a, b in zip(self.neuron_top, other.neuron_top, strict=True)],
            residual=[a.merge(b) for a, b in zip(self.residual, other.residual, strict=True)],
            residual_first=[
                a.merge(b) for a, b in zip(self.residual_first, other.residual_first, strict=True)
            ],
            residual_histogram=[
                a.merge(b)
                for a, b in zip(self.residual_histogram, other.residual_histogram, strict=True)
            ],
            residual_top=[
                a.merge(b) for a, b in zip(self.residual_top, other.residual_top, strict=True)
            ],
            heads=self.heads.merge(other.heads),
            n_windows=self.n_windows + other.n_windows,
        )


@dataclass(frozen=True)
class RepeatMasks:
    """Where each window's tokens repeat: computed once per batch, used by every layer.

    Attributes:
        earlier: ``[window, query, key]`` key < query holds the query's token.
        has_earlier: ``[window, query]`` the query's token occurred before.
        induction_target: ``[window, query]`` the position after the latest earlier occurrence
            ``j`` with ``j + 1 < query`` (0 where there is none).
        has_target: ``[window, query]`` such an occurrence exists.
    """

    earlier: Bool[Tensor, "window query_pos key_pos"]
    has_earlier: Bool[Tensor, "window query_pos"]
    induction_target: Int[Tensor, "window query_pos"]
    has_target: Bool[Tensor, "window query_pos"]

    @classmethod
    def of(cls, tokens: Int[Tensor, "window pos"]) -> RepeatMasks:
        """The masks of a batch of token windows."""
        same = tokens[:, :, None] == tokens[:, None, :]
        with_successor = torch.tril(same, diagonal=-2)  # earlier j with j + 1 < q
        latest = (with_successor * torch.arange(tokens.shape[1])).argmax(dim=-1)
        has_target = with_successor.any(dim=-1)
        earlier = torch.tril(same, diagonal=-1)
        return cls(earlier, earlier.any(dim=-1), torch.where(has_target, latest + 1, 0), has_target)


def head_scores_per_window(
    patterns: Float[Tensor, "window head query_pos key_pos"], masks: RepeatMasks
) -> dict[str, Float[Tensor, "window head"]]:
    """Each head's scores in each window (see ``HEAD_SCORES``), computed for the whole batch.

    ``first_token``, ``previous_token`` and ``duplicate_token`` follow ``unraveled.analysis`` and
    ``unraveled.heads`` (which take one prompt); ``induction`` is the natural-text version of
    ``unraveled.heads.induction_score``, which needs a repeated random segment: attention from
    each token to the token right after the latest earlier occurrence of the same token,
    averaged over the tokens that have one whose successor is not the query itself (zero when
    none has).
    """
    duplicate_mass = torch.einsum("whqk,wqk->whq", patterns, masks.earlier.to(patterns.dtype))
    target = masks.induction_target[:, None, :, None].expand(-1, patterns.shape[1], -1, 1)
    induction_mass = patterns.gather(-1, target)[..., 0]
    return {
        "entropy": attention_entropy_by_head(patterns),
        # As unraveled.analysis.attention_sink_by_head: query 0 can only attend to itself, so it
        # is left out.
        "first_token": patterns[..., 1:, 0].mean(dim=-1),
        "previous_token": patterns.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=-1),
        "duplicate_token": _mean_where(duplicate_mass, masks.has_earlier),
        "induction": _mean_where(induction_mass, masks.has_target),
    }


def _mean_where(
    values: Float[Tensor, "window head query"], mask: Bool[Tensor, "window query"]
) -> Float[Tensor, "window head"]:
    """Mean over the queries where ``mask`` holds, 0 for a window where it never does."""
    weights = mask[:, None, :].to(values.dtype)
    return (values * weights).sum(dim=-1) / weights.sum(dim=-1).clamp_min(1)


def model_inputs(
    model: HookedTransformer, windows: Int[np.ndarray, "window pos"], settings: AtlasSettings
) -> Int[Tensor, "window seq"]:
    """The windows as model input: token ids, with the BOS token in front if the model wants one.

    Raises:
        ValueError: ``settings.prepend_bos`` for a tokenizer without a BOS token (``with_bos``).
    """
    tokens = with_bos(model, torch.as_tensor(windows, dtype=torch.long), settings.prepend_bos)
    return tokens.to(model.cfg.device)


def update(
    state: AtlasState,
    model: HookedTransformer,
    windows: Int[np.ndarray, "window pos"],
    window_numbers: Int[np.ndarray, " window"],
    settings: AtlasSettings,
) -> AtlasState:
    """Run one batch of windows and fold its statistics into ``state``, in place; returns it.

    In place, so that each layer's old statistics are freed as soon as they are merged: a copy
    of the state beside the old one was the corpus atlas's largest allocation (the state holds
    top contexts for every neuron of every layer).

    Args:
        state: The state so far; updated.
        model: The model.
        windows: Token ids of the batch's windows (without BOS).
        window_numbers: Each window's number in the run, which makes every token's global
            index (``number * sequence length + position``) the same in any shard.
        settings: What to keep.
    """
    n_layers = model.cfg.n_layers
    tokens = model_inputs(model, windows, settings)
    token_ids = tokens.cpu().numpy()
    offsets = np.asarray(window_numbers, dtype=np.int64) * tokens.shape[1]
    first = 1 if settings.prepend_bos else 0
    masks = RepeatMasks.of(tokens.cpu())
    head_totals = {name: np.zeros((n_layers, model.cfg.n_heads)) for name in HEAD_SCORES}
    held: dict[str, Tensor] = {}

    def hold(activation: Tensor, hook: HookPoint) -> None:
        held[hook.name.rsplit(".", 1)[-1]] = activation  # type: ignore[union-attr]

    def fold_layer(residual: Tensor, hook: HookPoint) -> None:
        # hook_resid_post is the layer's last hook: its statistics are folded in here, so only
        # one layer's activations are ever held (not a cache of every layer's).
        layer = int(hook.name.split(".")[1])  # type: ignore[union-attr]
        pre = held.pop("hook_pre").float().cpu().numpy()
        post = held.pop("hook_post").float().cpu().numpy()
        neurons = Moments.of(
            post[:, first:].reshape(-1, post.shape[-1]),
            positive_of=pre[:, first:].reshape(-1, pre.shape[-1]),
        )
        state.neurons[layer] = state.neurons[layer].merge(neurons)
        top = top_k_of_batch(
            post,
            token_ids,
            offsets,
            settings.top_k,
            settings.context_before,
            settings.context_after,
            slice(first, None),
            settings.neuron_contexts,
        )
        state.neuron_top[layer] = state.neuron_top[layer].merge(top)
        magnitude = np.abs(residual.float().cpu().numpy())
        state.residual[layer] = state.residual[layer].merge(
            Moments.of(magnitude.reshape(-1, magnitude.shape[-1]))
        )
        state.residual_first[layer] = state.residual_first[layer].merge(Moments.of(magnitude[:, 0]))
        state.residual_histogram[layer] = state.residual_histogram[layer].merge(
            LogHistogram.of(magnitude)
        )
        # Position 0 (BOS, or the window's first token where there is none) carries the largest
        # values in every window whatever its token: its top tokens would be the windows' starts.
        top = top_k_of_batch(
            magnitude,
            token_ids,
            offsets,
            settings.residual_top_k,
            settings.context_before,
            settings.context_after,
            slice(1, None),
        )
        state.residual_top[layer] = state.residual_top[layer].merge(top)
        for name, per_window in head_scores_per_window(
            held.pop("hook_pattern").float().cpu(), masks
        ).items():
            head_totals[name][layer] = per_window.double().sum(dim=0).numpy()

    hooks: list[tuple[str, Callable[[Tensor, HookPoint], None]]] = []
    for layer in range(n_layers):
        hooks += [
            (f"blocks.{layer}.mlp.hook_pre", hold),
            (f"blocks.{layer}.mlp.hook_post", hold),
            (f"blocks.{layer}.attn.hook_pattern", hold),
        ]
        hooks.append((f"blocks.{layer}.hook_resid_post", fold_layer))
    with torch.inference_mode():
        model.run_with_hooks(tokens, fwd_hooks=hooks, stop_at_layer=n_layers)  # type: ignore[arg-type]
    state.heads = state.heads.merge(Sums(head_totals, len(windows)))
    state.n_windows += len(windows)
    return state
