"""Causal tracing (Meng et al. 2022, ROME): corrupt a fact's subject, restore clean states.

For one prompt, the subject's token embeddings get Gaussian noise (the same ``samples`` draws for
every restoration, as ROME's fixed-seed noise does). Then, one at a time, a clean state is put
back into the corrupted run and the probability of the correct answer is measured, averaged over
the noise samples:

- the residual stream after block ``l`` at position ``t`` (ROME's hidden state ``h_t^(l)``);
- the MLP outputs, or the attention outputs, at position ``t`` of every block in a window of
  ``window`` blocks centred on ``l`` (ROME: ``[l - window // 2, l + ceil(window / 2))``, clipped).

Only what a restoration changes is computed: the blocks from the first restored one on (the ones
before it would recompute the corrupted run), and the positions from the restored one on (the
earlier ones keep the corrupted run's keys and values). Positions before the subject are never
corrupted, so restoring them changes nothing: their cells are the corrupted probability.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from numpy.typing import NDArray
from torch import Tensor
from transformer_lens import (
    HookedTransformer,
    TransformerLensKeyValueCache,
    TransformerLensKeyValueCacheEntry,
)
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


def embedding_noise_scale(
    model: HookedTransformer, token_ids: Sequence[int], multiplier: float
) -> float:
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
        raise ValueError(
            f"subject span [{subject_start}, {subject_end}) "
            f"must lie before the last of {n_tokens} tokens"
        )
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
    """Restored probabilities of the answer for one prompt, per noise sample.

    Attributes:
        clean_probability: p(answer) on the clean prompt.
        corrupted_probabilities: p(answer) with the subject corrupted, one per noise sample.
        restored: Per kind (``KINDS``), p(answer) per noise sample with the residual stream after
            block ``layer`` (``residual``), or the MLP or attention outputs of the window centred
            on ``layer`` (``mlp``, ``attn``), restored at ``pos``.
    """

    clean_probability: float
    corrupted_probabilities: Float[NDArray, " sample"]
    restored: dict[str, Float[NDArray, "sample layer pos"]]

    @property
    def corrupted_probability(self) -> float:
        """p(answer) with the subject corrupted, mean over the noise samples."""
        return float(self.corrupted_probabilities.mean())

    @property
    def residual(self) -> Float[NDArray, "layer pos"]:
        """Residual-stream restorations, mean over the noise samples."""
        return self.restored["residual"].mean(axis=0)

    @property
    def mlp(self) -> Float[NDArray, "layer pos"]:
        """MLP-window restorations, mean over the noise samples."""
        return self.restored["mlp"].mean(axis=0)

    @property
    def attn(self) -> Float[NDArray, "layer pos"]:
        """Attention-window restorations, mean over the noise samples."""
        return self.restored["attn"].mean(axis=0)

    def indirect_effects(self, kind: str) -> Float[NDArray, "sample layer pos"]:
        """Restored minus corrupted p(answer), each noise sample against its own corrupted run."""
        return self.restored[kind] - self.corrupted_probabilities[:, None, None]


KINDS = ("residual", "mlp", "attn")

# Restored runs per pass are capped at this many (row, position) pairs: the transients of a pass
# (MLP hidden activations, attention scores) grow with it, and ten noise samples of every
# restoration at once would be several times that on a long prompt.
ROW_TOKENS_PER_PASS = 1024
DECODED_ROWS = 64


def _restored_probabilities(
    model: HookedTransformer,
    states: Float[Tensor, "rows suffix d_model"],
    starts: Int[Tensor, " rows"],
    ends: Int[Tensor, " rows"],
    kinds: Int[Tensor, " rows"],
    past: list[tuple[Tensor, Tensor]],
    sample_of_row: Int[Tensor, " rows"],
    clean_outputs: dict[str, Float[Tensor, " d_model"]],
    answer: int,
) -> Float[Tensor, " rows"]:
    """Run each row from block ``starts[row]`` on the positions from the restored one onwards.

    Row ``row`` holds the residual stream before block ``starts[row]`` at the restored position
    and the ones after it; the positions before it are those of the corrupted run, whose keys and
    values (``past``, per block) the rows attend to. Rows of kind 1 (MLP) or 2 (attention) get the
    clean output of that component at the restored position in every block before ``ends[row]``.
    Returns p(answer) at the last position of every row.
    """
    active = torch.empty(0, dtype=torch.long)

    def restore(kind: int) -> Callable[[Tensor, HookPoint], Tensor]:
        def hook(activation: Tensor, hook: HookPoint) -> Tensor:
            layer = int(hook.name.split(".")[1])  # type: ignore[union-attr]
            rows = (kinds[active] == kind) & (ends[active] > layer)
            activation[rows, 0] = clean_outputs[hook.name]  # type: ignore[index]
            return activation

        return hook

    hooks = [
        (f"blocks.{layer}.{name}", restore(kind))
        for layer in range(model.cfg.n_layers)
        for kind, name in ((1, "hook_mlp_out"), (2, "hook_attn_out"))
    ]
    states = states.clone()
    with model.hooks(fwd_hooks=hooks):
        for layer, block in enumerate(model.blocks):
            active = (starts <= layer).nonzero()[:, 0]
            if len(active) == 0:
                continue
            keys, values = past[layer]
            entry = TransformerLensKeyValueCacheEntry(
                keys[sample_of_row[active]], values[sample_of_row[active]], frozen=True
            )
            states[active] = block(states[active], past_kv_cache_entry=entry)
    # Decoded a few rows at a time: a pass of short suffixes holds up to ROW_TOKENS_PER_PASS rows,
    # and their full-vocabulary logits and softmax at once would be the experiment's largest
    # tensors.
    last = states[:, -1:]
    return torch.cat(
        [
            logit_lens(model, last[first : first + DECODED_ROWS])[:, 0].softmax(dim=-1)[:, answer]
            for first in range(0, len(last), DECODED_ROWS)
        ]
    )


def trace_fact(
    model: HookedTransformer,
    tokens: Int[Tensor, " pos"],
    subject: tuple[int, int],
    answer: int,
    noise: Float[Tensor, "sample subject_pos d_model"],
    window: int,
) -> FactTrace:
    """Causal traces of one prompt: residual stream, MLP and attention restorations.

    Restorations at one position run as batches of rows (kinds x layers x noise samples, the noise
    samples side by side as ROME's batch does), block by block, each row joining at its first
    block; a batch holds at most ``ROW_TOKENS_PER_PASS`` (row, position) pairs. A restoration at
    position ``t`` changes nothing before ``t``, so only positions ``t..`` are computed, attending
    to the corrupted run's cached keys and values of the earlier positions: the work is what each
    restoration really changes.

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
    state_names = [
        *[f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)],
        f"blocks.{n_layers - 1}.hook_resid_post",
    ]
    output_names = [
        f"blocks.{layer}.{name}"
        for layer in range(n_layers)
        for name in ("hook_mlp_out", "hook_attn_out")
    ]
    wanted = set(state_names) | set(output_names)

    def corrupt(embeddings: Tensor, hook: HookPoint) -> Tensor:
        embeddings[:, start:end] += noise
        return embeddings

    with torch.inference_mode():
        clean_logits, clean = model.run_with_cache(
            tokens[None], names_filter=lambda name: name in wanted
        )
        past_kv = TransformerLensKeyValueCache.init_cache(
            model.cfg, model.cfg.device, batch_size=samples
        )
        with model.hooks(fwd_hooks=[("hook_embed", corrupt)]):
            # An explicit mask: otherwise a cache makes TransformerLens guess padding from
            # pad-token ids.
            batch = tokens[None].expand(samples, -1)
            corrupted_logits, corrupted = model.run_with_cache(
                batch,
                names_filter=lambda name: name in wanted,
                past_kv_cache=past_kv,
                attention_mask=torch.ones_like(batch),
            )
        clean_probability = float(clean_logits[0, -1].softmax(-1)[answer])
        corrupted_probabilities = corrupted_logits[:, -1].softmax(-1)[:, answer]
        clean_states = torch.stack(
            [clean[name][0] for name in state_names]
        )  # [point pos d_model]; point p is before block p
        corrupted_states = torch.stack(
            [corrupted[name] for name in state_names]
        )  # [point sample pos d_model]

        # Rows: kind (residual, mlp, attn) x centre layer x sample, samples fastest.
        layers = torch.arange(n_layers).repeat_interleave(samples)
        sample_of_row = torch.arange(samples).repeat(n_layers * len(KINDS))
        windows = [window_layers(center, window, n_layers) for center in range(n_layers)]
        window_starts = torch.tensor([w.start for w in windows]).repeat_interleave(samples)
        window_ends = torch.tensor([w.stop for w in windows]).repeat_interleave(samples)
        starts = torch.cat([layers + 1, window_starts, window_starts])
        ends = torch.cat([layers + 1, window_ends, window_ends])
        kinds = torch.arange(len(KINDS)).repeat_interleave(n_layers * samples)
        # Positions before the subject are never corrupted: there, restoring gives the corrupted
        # run.
        grids = corrupted_probabilities[sample_of_row][:, None].repeat(1, n_pos)
        outputs_at = {name: clean[name][0] for name in output_names}
        for position in range(start, n_pos):  # earlier positions are never corrupted
            past = [
                (entry.past_keys[:, :position], entry.past_values[:, :position])
                for entry in past_kv.entries
            ]
            outputs = {name: value[position] for name, value in outputs_at.items()}
            rows_per_pass = max(1, ROW_TOKENS_PER_PASS // (n_pos - position))
            for first in range(0, len(kinds), rows_per_pass):
                chunk = slice(first, first + rows_per_pass)
                states = corrupted_states[starts[chunk], sample_of_row[chunk], position:]
                residual_rows = kinds[chunk] == 0
                # Restoring the state after block l at this position = the clean state before
                # block l + 1.
                states[residual_rows, 0] = clean_states[starts[chunk][residual_rows], position]
                grids[chunk, position] = _restored_probabilities(
                    model,
                    states,
                    starts[chunk],
                    ends[chunk],
                    kinds[chunk],
                    past,
                    sample_of_row[chunk],
                    outputs,
                    answer,
                )
    restored = grids.view(len(KINDS), n_layers, samples, n_pos).transpose(1, 2).numpy()
    return FactTrace(
        clean_probability=clean_probability,
        corrupted_probabilities=corrupted_probabilities.numpy(),
        restored={kind: restored[index] for index, kind in enumerate(KINDS)},
    )


def grouped_mean(
    effects: Sequence[Float[NDArray, "layer _"]], groups: Sequence[Sequence[Sequence[int]]]
) -> Float[NDArray, "group layer"]:
    """Mean over every (prompt, position) of each position group; NaN for a group no prompt has.

    Args:
        effects: Per prompt, a value per layer and position.
        groups: Per prompt, the positions of each group (``position_groups``).
    """
    n_layers = effects[0].shape[0]
    means = np.full((len(POSITION_GROUPS), n_layers), np.nan)
    for index in range(len(POSITION_GROUPS)):
        columns = [
            effect[:, positions]
            for effect, prompt_groups in zip(effects, groups, strict=True)
            for positions in [prompt_groups[index]]
            if positions
        ]
        if columns:
            means[index] = np.concatenate(columns, axis=1).mean(axis=1)
    return means
