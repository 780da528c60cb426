"""What the feature browser shows of each SAE feature, streamed over corpus windows.

Per feature of an SAE at one hook: its top activating contexts (``running_stats.TopK``, the
corpus atlas's exactly-mergeable top-k), a histogram of its active activations' sizes in fixed
log bins, its density (the fraction of tokens it is active on), its largest activation, and the
tokens its decoder direction promotes and suppresses through the unembedding. Which tokens count
and what "active" means are ``unraveled.sae.positions``'s definitions, the ones training and the
evaluation use (neither the prepended BOS nor a special token counts; active is ``!= 0``), so the
browser's density of a feature is the evaluation's density table's, on the same windows.

The state is a fixed size whatever the number of windows: windows are folded in one batch at a
time (``update``), and two states of disjoint windows ``merge`` exactly.

Promoted and suppressed tokens are read as the logit lens reads a residual stream: the decoder
direction goes through the linear part of the final norm (LayerNorm's centring; the norm's
weight where it is not folded into ``W_U``) and then ``W_U``. The norm's scale divides by the
residual stream's size at each position: a positive factor, which changes no token's rank, so
it is left out; the biases are the same for every feature and left out too. The logit effects
shown are therefore per unit of feature activation and up to that positive factor.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from numpy.typing import NDArray
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

from unraveled.corpus import with_bos
from unraveled.running_stats import Moments, TopK, top_k_of_batch
from unraveled.sae.activations import run_to_hook
from unraveled.sae.positions import counted_positions, excluded_token_ids, is_active


@dataclass(frozen=True)
class BrowserSettings:
    """What the feature browser keeps; shared by every shard of one run so that states merge.

    Attributes:
        top_k: Top activating tokens kept per feature (each with its context).
        context_before: Tokens of context kept before each top token.
        context_after: Tokens of context kept after it.
        batch_windows: Windows per forward pass (bounds memory: the SAE's activations of one
            batch, ``batch_windows x positions x d_sae``, are the largest allocation).
        prepend_bos: Whether each window gets the model's BOS token in front (that position,
            like every special token's, is left out of every statistic and is no top token).
        histogram_low: Log10 of the histogram's lowest bin edge.
        histogram_high: Log10 of its highest bin edge.
        bins_per_decade: Histogram bins per factor of 10.
        logit_tokens: Promoted and suppressed tokens kept per feature.
        logit_features: Features whose logit effects are computed at once (bounds memory: a
            ``[logit_features, d_vocab]`` block; all 1024 features of the default SAE on
            SmolLM2's 49,152 tokens would be 192 MiB at once, 128 of them are 24 MiB).
    """

    top_k: int = 20
    context_before: int = 8
    context_after: int = 4
    batch_windows: int = 8
    prepend_bos: bool = True
    histogram_low: int = -3
    histogram_high: int = 3
    bins_per_decade: int = 10
    logit_tokens: int = 10
    logit_features: int = 128

    @property
    def context(self) -> int:
        """Tokens of context kept around each top token, the token itself included."""
        return self.context_before + 1 + self.context_after

    @property
    def bin_edges(self) -> Float[NDArray, " edge"]:
        """The histogram's bin edges (activations, not their logarithm)."""
        n_bins = (self.histogram_high - self.histogram_low) * self.bins_per_decade
        return 10.0 ** (self.histogram_low + np.arange(n_bins + 1) / self.bins_per_decade)


@dataclass
class BrowserState:
    """Running per-feature statistics over the windows seen so far.

    Attributes:
        moments: Count, mean, max and active count (its ``positive``) per feature, over the
            counted tokens (``running_stats.Moments``).
        top: Top activating tokens with their contexts; only counted tokens where the feature
            is active.
        histogram: ``[feature, bin]`` counts of active activations by size (``|a|``; ``a``
            itself for the ReLU-based architectures, whose activations are never negative):
            bin 0 below the lowest edge, the last bin above the highest, the bins between as
            ``settings.bin_edges``.
        n_windows: Windows folded in.
    """

    moments: Moments
    top: TopK
    histogram: Int[NDArray, "feature bin"]
    n_windows: int

    @classmethod
    def empty(cls, d_sae: int, settings: BrowserSettings) -> BrowserState:
        """The state before any window."""
        return cls(
            moments=Moments.empty(d_sae),
            top=TopK.empty(settings.top_k, d_sae, settings.context),
            histogram=np.zeros((d_sae, len(settings.bin_edges) + 1), dtype=np.int64),
            n_windows=0,
        )

    def merge(self, other: BrowserState) -> BrowserState:
        """The state of both shards' windows together (neither input is changed)."""
        return BrowserState(
            moments=self.moments.merge(other.moments),
            top=self.top.merge(other.top),
            histogram=self.histogram + other.histogram,
            n_windows=self.n_windows + other.n_windows,
        )


def feature_activations(
    model: HookedTransformer, sae: SAE, hook_name: str, tokens: Int[Tensor, "window pos"]
) -> Float[Tensor, "window pos feature"]:
    """The SAE's feature activations on ``tokens``, the model stopped at the hook."""
    activation = run_to_hook(model, hook_name, tokens)
    with torch.inference_mode():
        return sae.encode(activation.to(sae.dtype))


def update(
    state: BrowserState,
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    windows: Int[NDArray, "window pos"],
    window_numbers: Int[NDArray, " window"],
    settings: BrowserSettings,
) -> BrowserState:
    """Run one batch of windows through model and SAE and fold it into ``state``; returns it.

    Args:
        state: The state so far; updated in place.
        model: The model.
        sae: The SAE at ``hook_name``.
        hook_name: The hook the SAE reads.
        windows: Token ids of the batch's windows (without BOS).
        window_numbers: Each window's number in the run: a token's global index (its tie-break
            in the top-k) is ``number * window length + position`` in any shard.
        settings: What to keep.
    """
    tokens = with_bos(
        model, torch.as_tensor(np.asarray(windows), dtype=torch.long), settings.prepend_bos
    )
    counted = counted_positions(tokens, excluded_token_ids(model), settings.prepend_bos).numpy()
    first = 1 if settings.prepend_bos else 0
    acts = feature_activations(model, sae, hook_name, tokens.to(model.cfg.device))
    values = acts.float().cpu().numpy()
    counted_values = values[counted]
    active = is_active(values)
    if len(counted_values):  # a batch of nothing but special tokens has no moments
        state.moments = state.moments.merge(Moments.of(counted_values, positive_of=active[counted]))
    # Top contexts rank by |a|, as "active" (!= 0) and the histogram measure a feature: an
    # AbsTopK SAE fires negative too, and its strongest firings are its largest |a|. Inactive
    # and uncounted tokens are no top activating context: ranked as -inf, they are never kept,
    # and a feature active on fewer than k tokens keeps unfilled rows. Contexts show the
    # activations as they are (signed), uncounted positions included.
    ranked = np.where(active & counted[..., None], np.abs(values), -np.inf).astype(np.float32)
    offsets = np.asarray(window_numbers, dtype=np.int64) * tokens.shape[1]
    top = top_k_of_batch(
        ranked,
        tokens.numpy(),
        offsets,
        settings.top_k,
        settings.context_before,
        settings.context_after,
        slice(first, None),
        shown=values,
    )
    state.top = state.top.merge(top)
    state.histogram += _histogram(counted_values, settings)
    state.n_windows += len(windows)
    return state


def _histogram(
    values: Float[NDArray, "token feature"], settings: BrowserSettings
) -> Int[NDArray, "feature bin"]:
    """Per feature, counts of its active values' sizes (``|a|``) in the fixed bins of ``settings``.

    Every active value is binned, so a feature's counts add up to its active tokens.
    """
    edges = settings.bin_edges
    token, feature = np.nonzero(is_active(values))
    sizes = np.abs(values[token, feature])
    slot = np.searchsorted(edges, sizes, side="right")  # 0: below the first edge
    n_slots = len(edges) + 1
    return np.bincount(feature * n_slots + slot, minlength=values.shape[1] * n_slots).reshape(
        values.shape[1], n_slots
    )


@dataclass(frozen=True)
class FeatureBrowserData:
    """Everything the feature browser draws, per feature of one SAE.

    Attributes:
        hook_name: The hook the SAE reads.
        n_tokens: Tokens the statistics are over (the counted positions,
            ``unraveled.sae.positions``: prepended BOS and special tokens left out).
        n_windows: Corpus windows they come from.
        density: Fraction of the tokens on which each feature is active (``!= 0``).
        max_activation: Largest activation (0 for a feature never active).
        mean_activation: Mean activation over the counted tokens, active or not.
        top_values: ``[k, feature]`` top activations, signed, in descending order of ``|a|``
            (an AbsTopK SAE's strongest firings may be negative); NaN where a feature has fewer
            than k active tokens.
        top_index: ``[k, feature]`` their global token index (window * length + position).
        context_ids: ``[k, feature, context]`` token ids around each top token (-1: outside
            its window).
        context_values: ``[k, feature, context]`` the feature's activation on those tokens.
        histogram: ``[feature, bin]`` counts of active activations' sizes (``BrowserState``).
        bin_edges: The histogram's bin edges; bin 0 is below the first, the last above the last.
        promoted_ids: ``[feature, n]`` tokens whose logits the decoder direction raises most.
        promoted_logits: ``[feature, n]`` by how much, per unit of activation (see module doc).
        suppressed_ids: ``[feature, n]`` tokens it lowers most.
        suppressed_logits: ``[feature, n]`` by how much (negative).
        vocab: Text of every token id shown (contexts, promoted, suppressed).
    """

    hook_name: str
    n_tokens: int
    n_windows: int
    density: Float[NDArray, " feature"]
    max_activation: Float[NDArray, " feature"]
    mean_activation: Float[NDArray, " feature"]
    top_values: Float[NDArray, "k feature"]
    top_index: Int[NDArray, "k feature"]
    context_ids: Int[NDArray, "k feature context"]
    context_values: Float[NDArray, "k feature context"]
    histogram: Int[NDArray, "feature bin"]
    bin_edges: Float[NDArray, " edge"]
    promoted_ids: Int[NDArray, "feature n"]
    promoted_logits: Float[NDArray, "feature n"]
    suppressed_ids: Int[NDArray, "feature n"]
    suppressed_logits: Float[NDArray, "feature n"]
    vocab: dict[int, str]

    @property
    def d_sae(self) -> int:
        """The number of features."""
        return len(self.density)


def logit_effects(
    model: HookedTransformer, sae: SAE, features: slice = slice(None)
) -> Float[Tensor, "feature vocab"]:
    """Each feature's decoder direction through the final norm's linear part and ``W_U``.

    See the module docstring for what of the final norm is applied and why. ``features``: which
    features (default all); each feature's row is the same whichever others are computed with it.
    """
    with torch.inference_mode():
        directions = sae.W_dec[features].detach().to(model.W_U.dtype).to(model.W_U.device)
        if model.cfg.normalization_type in ("LN", "LNPre"):
            directions = directions - directions.mean(dim=-1, keepdim=True)
        weight = getattr(model.ln_final, "w", None)
        if isinstance(weight, Tensor):
            directions = directions * weight
        return directions @ model.W_U


@dataclass(frozen=True)
class TopTokens:
    """Per feature, the tokens whose logits it moves most one way, and by how much.

    Attributes:
        indices: ``[feature, n]`` token ids, the largest move first.
        values: ``[feature, n]`` the moves (logit effects, see ``logit_effects``).
    """

    indices: Int[NDArray, "feature n"]
    values: Float[NDArray, "feature n"]


def top_logit_effects(
    model: HookedTransformer, sae: SAE, settings: BrowserSettings
) -> tuple[TopTokens, TopTokens]:
    """The ``settings.logit_tokens`` tokens each feature promotes and suppresses most.

    The logit effects are computed ``settings.logit_features`` features at a time and only
    their top tokens kept, so the ``[d_sae, d_vocab]`` matrix is never held whole.
    """
    promoted: list[tuple[Tensor, Tensor]] = []
    suppressed: list[tuple[Tensor, Tensor]] = []
    for start in range(0, sae.cfg.d_sae, settings.logit_features):
        effects = logit_effects(model, sae, slice(start, start + settings.logit_features))
        n = min(settings.logit_tokens, effects.shape[1])
        promoted.append(effects.topk(n, dim=1))
        suppressed.append(effects.topk(n, dim=1, largest=False))
    return _joined(promoted), _joined(suppressed)


def _joined(blocks: list[tuple[Tensor, Tensor]]) -> TopTokens:
    """Blocks of ``topk`` results (values, indices), one after another, as one ``TopTokens``."""
    return TopTokens(
        indices=torch.cat([indices for _, indices in blocks]).cpu().numpy().astype(np.int64),
        values=torch.cat([values for values, _ in blocks]).float().cpu().numpy(),
    )


def finish(
    state: BrowserState,
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    settings: BrowserSettings,
) -> FeatureBrowserData:
    """The merged state as the browser's arrays, with the logit effects and the tokens' text."""
    promoted, suppressed = top_logit_effects(model, sae, settings)
    filled = np.isfinite(state.top.values)
    shown = np.concatenate(
        [state.top.context_ids.ravel(), promoted.indices.ravel(), suppressed.indices.ravel()]
    )
    vocab = {int(i): model.tokenizer.decode([int(i)]) for i in np.unique(shown) if i >= 0}
    moments = state.moments
    return FeatureBrowserData(
        hook_name=hook_name,
        n_tokens=moments.count,
        n_windows=state.n_windows,
        density=moments.positive_fraction,
        max_activation=np.where(moments.positive > 0, moments.maximum, 0.0),
        mean_activation=moments.mean,
        # The top rows are ranked by |a|; the signed value is the context's centre.
        top_values=np.where(
            filled, state.top.context_values[:, :, settings.context_before], np.nan
        ).astype(np.float32),
        top_index=state.top.index,
        context_ids=state.top.context_ids,
        context_values=state.top.context_values,
        histogram=state.histogram,
        bin_edges=settings.bin_edges,
        promoted_ids=promoted.indices,
        promoted_logits=promoted.values,
        suppressed_ids=suppressed.indices,
        suppressed_logits=suppressed.values,
        vocab=vocab,
    )


def feature_browser_data(
    model: HookedTransformer,
    sae: SAE,
    hook_name: str,
    windows: Int[NDArray, "window pos"] | Iterable[Int[NDArray, "window pos"]],
    settings: BrowserSettings | None = None,
) -> FeatureBrowserData:
    """The browser's data of every feature of ``sae`` over ``windows``, in bounded memory.

    Args:
        model: The model the SAE was trained on.
        sae: The SAE (SAELens's ``SAE``).
        hook_name: The hook it reads (``sae.cfg.metadata.hook_name`` unless the caller knows
            better).
        windows: Token windows (without BOS), all of one length: one array (memory-mapped is
            fine: it is read ``settings.batch_windows`` at a time), or an iterable of batches,
            e.g. streamed from the corpus.
        settings: What to keep (default ``BrowserSettings()``).

    Returns:
        The per-feature arrays; for any batching of the same windows in the same order, the same
        tokens kept, and values equal up to the forward pass's float rounding.
    """
    settings = settings or BrowserSettings()
    batches: Iterable[Int[NDArray, "window pos"]]
    if isinstance(windows, np.ndarray | Tensor):
        size = settings.batch_windows
        batches = (windows[start : start + size] for start in range(0, len(windows), size))
    else:
        batches = windows
    state = BrowserState.empty(sae.cfg.d_sae, settings)
    for batch in batches:
        batch_array = np.asarray(batch)
        numbers = np.arange(state.n_windows, state.n_windows + len(batch_array))
        state = update(state, model, sae, hook_name, batch_array, numbers, settings)
    return finish(state, model, sae, hook_name, settings)
