"""Causal tracing (Meng et al. 2022, ROME): corrupt a fact's subject with noise, restore clean states.

For one prompt, the subject's token embeddings get Gaussian noise (the same ``samples`` draws for
every restoration, as ROME's fixed-seed noise does). Then, one at a time, a clean state is put
back into the corrupted run and the probability of the correct answer is measured, averaged over
the noise samples:

- the residual stream after block ``l`` at position ``t`` (ROME's hidden state ``h_t^(l)``);
- the MLP outputs, or the attention outputs, at position ``t`` of every block in a window of
  ``window`` blocks centred on ``l`` (ROME: ``[l - window // 2, l + ceil(window / 2))``, clipped).

Every restoration of one layer runs as one batch (positions x noise samples), starting from the
corrupted run's residual stream at the first restored block: the blocks before it would only
recompute what the corrupted run cached. Positions before the subject are never corrupted, so
restoring them changes nothing; their cells are the corrupted probability without a forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from numpy.typing import NDArray
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from unraveled.logits import logit_lens

POSITION_GROUPS = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)
Component = Literal["mlp", "attn"]
_COMPONENT_HOOKS = {"mlp": "hook_mlp_out", "attn": "hook_attn_out"}


def embedding_noise_scale(model: HookedTransformer, token_ids: Sequence[int], multiplier: float) -> float:
    """``multiplier`` times the standard deviation of the token embeddings of ``token_ids``.

    As ROME's ``collect_embedding_std``: one standard deviation over every entry of the embedding
    vectors of the subjects' tokens (repeats counted), times 3 in the paper.
    """
    return multiplier * float(model.W_E[torch.tensor(list(token_ids))].std())


def window_layers(center: int, window: int, n_layers: int) -> range:
    """The blocks restored together for a window centred on ``center`` (ROME's convention)."""
    return range(max(0, center - window // 2), min(n_layers, center + -(-window // 2)))


def scaled_window(n_layers: int, reference_window: int = 10, reference_layers: int = 48) -> int:
    """ROME's window of 10 blocks for GPT-2-XL's 48, scaled to ``n_layers`` (at least 1)."""
    return max(1, round(reference_window * n_layers / reference_layers))


def position_groups(n_tokens: int, subject_start: int, subject_end: int) -> list[list[int]]:
    """Positions of each of ``POSITION_GROUPS``, as ROME's averaged figures group them.

    A position can be in two groups (a one-token subject is its first and last token; a prompt
    whose subject is followed by one token has that token as first subsequent and last), and a
    group can be empty (no middle subject tokens in a subject of two tokens).
    """
    if not 0 <= subject_start < subject_end < n_tokens:
        raise ValueError(f"subject span [{subject_start}, {subject_end}) must lie before the last of {n_tokens} tokens")
    last_subject, last = subject_end - 1, n_tokens - 1
    return [
        [subject_start],
        list(range(subject_start + 1, last_subject)),
        [last_subject],
        [subject_end],
        list(range(subject_end + 1, last)),
        [last],
    ]


@dataclass(frozen=True)
class FactTrace:
    """Restored probabilities of the answer for one prompt.

    Attributes:
        clean_probability: p(answer) on the clean prompt.
        corrupted_probability: p(answer) with the subject corrupted, mean over noise samples.
        residual: p(answer) with the residual stream after block ``layer`` restored at ``pos``.
        mlp: p(answer) with the MLP outputs of the window centred on ``layer`` restored at ``pos``.
        attn: The same for the attention outputs.
    """

    clean_probability: float
    corrupted_probability: float
    residual: Float[NDArray, "layer pos"]
    mlp: Float[NDArray, "layer pos"]
    attn: Float[NDArray, "layer pos"]


def _answer_probability(
    model: HookedTransformer, residual: Float[Tensor, "rows pos d_model"], start: int, answer: int, samples: int
) -> Float[Tensor, " restorations"]:
    """Run blocks ``start..`` and return p(answer) at the last position, averaged over noise samples.

    Rows are restorations x samples, samples varying fastest.
    """
    final = model(residual, start_at_layer=start, stop_at_layer=model.cfg.n_layers)
    probabilities = logit_lens(model, final[:, -1]).softmax(dim=-1)[:, answer]
    return probabilities.view(-1, samples).mean(dim=1)


def trace_fact(
    model: HookedTransformer,
    tokens: Int[Tensor, " pos"],
    subject: tuple[int, int],
    answer: int,
    noise: Float[Tensor, "sample subject_pos d_model"],
    window: int,
) -> FactTrace:
    """Causal traces of one prompt: residual stream, MLP and attention restorations.

    Args:
        model: The model.
        tokens: The prompt's token ids.
        subject: The subject's token span ``[start, end)``.
        answer: The answer's token id.
        noise: What is added to the subject's token embeddings, one row per noise sample
            (already scaled; zeros make the corrupted run the clean one).
        window: How many blocks' MLP or attention outputs are restored together.
    """
    n_layers, n_pos = model.cfg.n_layers, tokens.shape[0]
    start, end = subject
    samples = noise.shape[0]
    if noise.shape[1] != end - start:
        raise ValueError(f"noise covers {noise.shape[1]} positions, the subject {end - start}")
    names = [f"blocks.{layer}.{hook}" for layer in range(n_layers) for hook in ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out")]
    wanted = set(names)

    def corrupt(embeddings: Tensor, hook: HookPoint) -> Tensor:
        embeddings[:, start:end] += noise
        return embeddings

    with torch.inference_mode():
        clean_logits, clean = model.run_with_cache(tokens[None], names_filter=lambda name: name in wanted)
        with model.hooks(fwd_hooks=[("hook_embed", corrupt)]):
            corrupted_logits, corrupted = model.run_with_cache(tokens[None].expand(samples, -1), names_filter=lambda name: name in wanted)
        clean_probability = float(clean_logits[0, -1].softmax(-1)[answer])
        corrupted_probability = float(corrupted_logits[:, -1].softmax(-1)[:, answer].mean())

        traced = torch.arange(start, n_pos)  # earlier positions are never corrupted
        rows = torch.arange(len(traced) * samples)
        row_positions = traced.repeat_interleave(samples)

        def restored_batch(state: Tensor) -> Tensor:
            """The corrupted ``state`` [sample pos d_model], once per traced position."""
            return state.repeat(len(traced), 1, 1)

        residual = torch.full((n_layers, n_pos), corrupted_probability)
        for layer in range(n_layers):
            hook = f"blocks.{layer}.hook_resid_post"
            state = restored_batch(corrupted[hook])
            state[rows, row_positions] = clean[hook][0, row_positions]
            residual[layer, start:] = _answer_probability(model, state, layer + 1, answer, samples)

        windows = {}
        for component, hook_name in _COMPONENT_HOOKS.items():
            grid = torch.full((n_layers, n_pos), corrupted_probability)
            for center in range(n_layers):
                layers = window_layers(center, window, n_layers)

                def restore(activation: Tensor, hook: HookPoint) -> Tensor:
                    activation[rows, row_positions] = clean[hook.name][0, row_positions]
                    return activation

                hooks: list[tuple[str, Callable[[Tensor, HookPoint], Tensor]]] = [(f"blocks.{layer}.{hook_name}", restore) for layer in layers]
                with model.hooks(fwd_hooks=hooks):
                    state = restored_batch(corrupted[f"blocks.{layers.start}.hook_resid_pre"])
                    grid[center, start:] = _answer_probability(model, state, layers.start, answer, samples)
            windows[component] = grid
    return FactTrace(
        clean_probability=clean_probability,
        corrupted_probability=corrupted_probability,
        residual=residual.numpy(),
        mlp=windows["mlp"].numpy(),
        attn=windows["attn"].numpy(),
    )


def grouped_mean(
    effects: Sequence[Float[NDArray, "layer pos"]], groups: Sequence[Sequence[Sequence[int]]]
) -> Float[NDArray, "group layer"]:
    """Mean over every (prompt, position) of each position group; NaN for a group no prompt has.

    Args:
        effects: Per prompt, a value per layer and position.
        groups: Per prompt, the positions of each group (``position_groups``).
    """
    n_layers = effects[0].shape[0]
    means = np.full((len(POSITION_GROUPS), n_layers), np.nan)
    for index in range(len(POSITION_GROUPS)):
        columns = [effect[:, positions] for effect, prompt_groups in zip(effects, groups) for positions in [prompt_groups[index]] if positions]
        if columns:
            means[index] = np.concatenate(columns, axis=1).mean(axis=1)
    return means
