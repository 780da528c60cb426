"""What the corpus engines accumulate: the running state of every neuron, residual dimension and
head, updated one batch of windows at a time and merged exactly across shards.

Definitions (also written into the atlas's metrics):

- A neuron's value is ``blocks.L.mlp.hook_post`` (what it writes through ``W_out``); it is
  *active* on a token when its pre-activation ``blocks.L.mlp.hook_pre`` is > 0 (for gated MLPs
  such as SmolLM2's, the gate's pre-activation; for GPT-2's GELU, its input).
- The residual stream is ``blocks.L.hook_resid_post``; its statistics are of absolute values.
- Head scores are per-window means over query positions, averaged over windows.
- When the model prepends a BOS token to each window, that position (identical in every
  window) is left out of the neuron statistics and top-k; residual and head statistics keep it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from unraveled.analysis import attention_entropy_by_head, attention_sink_by_head
from unraveled.heads import duplicate_token_score, previous_token_score
from unraveled.running_stats import Moments, Sums, TopK, top_k_of_batch

HEAD_SCORES = ("entropy", "first_token", "previous_token", "duplicate_token", "induction")


@dataclass(frozen=True)
class AtlasSettings:
    """How much the state keeps; shared by every shard of one run so that states merge.

    Attributes:
        top_k: Top activating tokens kept per neuron.
        context_before: Tokens of context kept before each top token.
        context_after: Tokens of context kept after it.
        residual_top_k: Largest-magnitude tokens kept per residual dimension.
        batch_windows: Windows per forward pass.
        prepend_bos: Whether each window gets the model's BOS token in front.
    """

    top_k: int = 20
    context_before: int = 12
    context_after: int = 3
    residual_top_k: int = 3
    batch_windows: int = 4
    prepend_bos: bool = False

    @property
    def context(self) -> int:
        return self.context_before + 1 + self.context_after


@dataclass
class AtlasState:
    """Running statistics over the windows seen so far; ``merge`` combines two shards' states."""

    neurons: list[Moments]
    neuron_top: list[TopK]
    residual: list[Moments]
    residual_top: list[TopK]
    heads: Sums
    n_windows: int

    @classmethod
    def empty(cls, n_layers: int, d_mlp: int, d_model: int, settings: AtlasSettings) -> AtlasState:
        return cls(
            neurons=[Moments.empty(d_mlp) for _ in range(n_layers)],
            neuron_top=[TopK.empty(settings.top_k, d_mlp, settings.context) for _ in range(n_layers)],
            residual=[Moments.empty(d_model) for _ in range(n_layers)],
            residual_top=[TopK.empty(settings.residual_top_k, d_model, settings.context) for _ in range(n_layers)],
            heads=Sums({}, 0),
            n_windows=0,
        )

    @classmethod
    def for_model(cls, model: HookedTransformer, settings: AtlasSettings) -> AtlasState:
        cfg = model.cfg
        assert cfg.d_mlp is not None, "the corpus atlas needs MLP layers"
        return cls.empty(cfg.n_layers, cfg.d_mlp, cfg.d_model, settings)

    def merge(self, other: AtlasState) -> AtlasState:
        return AtlasState(
            neurons=[a.merge(b) for a, b in zip(self.neurons, other.neurons)],
            neuron_top=[a.merge(b) for a, b in zip(self.neuron_top, other.neuron_top)],
            residual=[a.merge(b) for a, b in zip(self.residual, other.residual)],
            residual_top=[a.merge(b) for a, b in zip(self.residual_top, other.residual_top)],
            heads=self.heads.merge(other.heads),
            n_windows=self.n_windows + other.n_windows,
        )


def hook_names(n_layers: int) -> list[str]:
    """Every hook the atlas reads; nothing after the last block (the unembedding) is run."""
    names = []
    for layer in range(n_layers):
        names += [f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.attn.hook_pattern"]
    return names


def natural_induction_score(patterns: Float[Tensor, "layer head query_pos key_pos"], tokens: Int[Tensor, " pos"]) -> Float[Tensor, "layer head"]:
    """Induction on natural text: attention from each token to the token right after the most
    recent earlier occurrence of the same token, averaged over the tokens that have one (whose
    successor is not the query itself); zero when no token qualifies.

    ``unraveled.heads.induction_score`` needs a repeated random segment; this needs any text.
    """
    length = len(tokens)
    same = torch.tril(tokens[:, None] == tokens[None, :], diagonal=-2)  # earlier j with j + 1 < q
    has_earlier = same.any(dim=-1)
    if not has_earlier.any():
        return torch.zeros(patterns.shape[:2], dtype=patterns.dtype)
    # The latest such j: argmax of j * same over j.
    latest = (same * torch.arange(length)[None, :]).argmax(dim=-1)
    queries = torch.arange(length)[has_earlier]
    return patterns[..., queries, latest[has_earlier] + 1].mean(dim=-1)


def model_inputs(model: HookedTransformer, windows: Int[np.ndarray, "window pos"], settings: AtlasSettings) -> Int[Tensor, "window seq"]:
    """The windows as model input: token ids, with the BOS token in front when the model wants one."""
    tokens = torch.as_tensor(windows, dtype=torch.long)
    if settings.prepend_bos:
        bos = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else 0
        tokens = torch.cat([torch.full((len(tokens), 1), bos, dtype=torch.long), tokens], dim=1)
    return tokens.to(model.cfg.device)


def update(
    state: AtlasState,
    model: HookedTransformer,
    windows: Int[np.ndarray, "window pos"],
    window_numbers: Int[np.ndarray, " window"],
    settings: AtlasSettings,
) -> AtlasState:
    """Run one batch of windows and fold its statistics into ``state``; the batch is dropped after.

    Args:
        state: The state so far.
        model: The model.
        windows: Token ids of the batch's windows (without BOS).
        window_numbers: Each window's number in the run, which makes every token's global
            index (``number * sequence length + position``) the same in any shard.
        settings: What to keep.
    """
    n_layers = model.cfg.n_layers
    tokens = model_inputs(model, windows, settings)
    seq_len = tokens.shape[1]
    wanted = set(hook_names(n_layers))
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in wanted, stop_at_layer=n_layers)
    token_ids = tokens.cpu().numpy()
    offsets = np.asarray(window_numbers, dtype=np.int64) * seq_len
    first = 1 if settings.prepend_bos else 0
    batch = AtlasState.empty(0, 0, 0, settings)
    head_totals: dict[str, list[Tensor]] = {name: [] for name in HEAD_SCORES}
    for layer in range(n_layers):
        pre = cache[f"blocks.{layer}.mlp.hook_pre"].float().cpu().numpy()
        post = cache[f"blocks.{layer}.mlp.hook_post"].float().cpu().numpy()
        batch.neurons.append(Moments.of(post[:, first:].reshape(-1, post.shape[-1]), positive_of=pre[:, first:].reshape(-1, pre.shape[-1])))
        batch.neuron_top.append(top_k_of_batch(post, token_ids, offsets, settings.top_k, settings.context_before, settings.context_after, slice(first, None)))
        magnitude = np.abs(cache[f"blocks.{layer}.hook_resid_post"].float().cpu().numpy())
        batch.residual.append(Moments.of(magnitude.reshape(-1, magnitude.shape[-1])))
        batch.residual_top.append(top_k_of_batch(magnitude, token_ids, offsets, settings.residual_top_k, settings.context_before, settings.context_after))
        patterns = cache[f"blocks.{layer}.attn.hook_pattern"].float().cpu()[:, None]  # [window, 1, head, q, k]
        for window_patterns, window_tokens in zip(patterns, tokens.cpu()):
            scores = {
                "entropy": attention_entropy_by_head(window_patterns),
                "first_token": attention_sink_by_head(window_patterns),
                "previous_token": previous_token_score(window_patterns),
                "duplicate_token": duplicate_token_score(window_patterns, window_tokens),
                "induction": natural_induction_score(window_patterns, window_tokens),
            }
            for name, value in scores.items():
                head_totals[name].append(value[0])
        del pre, post, magnitude, patterns
    del cache
    n_windows = len(windows)
    # head_totals[name] holds layer-major [layer * window] rows of [head]: sum over windows per layer.
    totals = {name: torch.stack(rows).reshape(n_layers, n_windows, -1).sum(dim=1).double().numpy() for name, rows in head_totals.items()}
    batch.heads = Sums(totals, n_windows)
    batch.n_windows = n_windows
    return state.merge(batch)
