"""One patching core for the causal experiments: exact patches, and their gradient estimates.

A *prompt pair* batch holds clean and corrupted prompts of equal length per pair, the index of
each prompt's last token and the two answers; the metric is the logit difference of the correct
over the incorrect answer at the last token.

- ``patched_logit_differences`` runs a *base* batch (the corrupted prompts, or the clean ones)
  with chosen activations replaced by those of a *source* cache, many patch sets at once: each
  patch set is one copy of the batch. Copies start from the base run's cached residual stream at
  the first layer any of their patches touches, since the layers before it would only recompute
  what the base run cached; only the last token's logits of the two answers are computed.
- ``attribution`` estimates every such patch at once (Nanda's attribution patching): the
  difference source minus base of an activation, times the gradient of the metric at the base
  run. One forward of each prompt set and one backward pass, whatever the number of components.
- ``edge_attribution`` does the same for every edge between components (Syed, Rager and Conmy
  2023), reading each head's query, key and value inputs and each MLP's input separately.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import ActivationCache, HookedTransformer
from transformer_lens.hook_points import HookPoint

from unraveled.logits import residual_hook_names
from unraveled.memory import return_freed_memory

MAX_ROWS = 64
"""Rows (copies of prompts) run through the model at once: bounds memory (on GPT-2 small, 64 rows
of 16 tokens peak at 0.1 GB above the model, mostly the MLPs' activation temporaries) and keeps
batches efficient."""

GRADIENT_TOKENS = 16
"""Tokens per forward-and-backward pass. Autograd keeps every intermediate activation of the pass
(with split head inputs, each head's own copy of the residual stream), so a gradient pass holds
many times what a plain forward pass does; rows are independent, so passes over fewer rows give
the same gradients."""

EDGE_BUFFER_BYTES = 24 * 1024 * 1024
"""Upper bound of the per-component delta buffer of one edge-faithfulness pass (see
``edge_circuit_logit_differences``); circuits beyond it run in further passes, and a circuit
whose buffer alone exceeds it runs a few prompts per pass (at least one). On GPT-2 small, 6 IOI
pairs of 16 tokens need 46 MB per circuit: 3 pairs per pass."""


@dataclass(frozen=True)
class PromptPairs:
    """Clean and corrupted prompts as token ids, right-padded, with their answers.

    Attributes:
        clean: Clean prompts; each is as long as its corrupted partner.
        corrupted: Corrupted prompts.
        last: Index of each prompt's last real token, where the answer is predicted.
        correct: The clean prompt's answer.
        incorrect: The competing answer (the corrupted prompt's answer when the answer flips).
    """

    clean: Int[Tensor, "batch pos"]
    corrupted: Int[Tensor, "batch pos"]
    last: Int[Tensor, " batch"]
    correct: Int[Tensor, " batch"]
    incorrect: Int[Tensor, " batch"]

    @property
    def size(self) -> int:
        return int(self.clean.shape[0])

    def tokens(self, which: Literal["clean", "corrupted"]) -> Int[Tensor, "batch pos"]:
        return self.clean if which == "clean" else self.corrupted

    def rows(self, selected: slice) -> PromptPairs:
        """The pairs in rows ``selected``."""
        return PromptPairs(
            self.clean[selected],
            self.corrupted[selected],
            self.last[selected],
            self.correct[selected],
            self.incorrect[selected],
        )


def single_pair(
    model: HookedTransformer,
    clean: str,
    corrupted: str,
    correct: int,
    incorrect: int,
    field: str = "params",
) -> PromptPairs:
    """One clean/corrupted pair; a clear error when their token lengths differ."""
    clean_ids, corrupted_ids = model.to_tokens(clean), model.to_tokens(corrupted)
    if clean_ids.shape != corrupted_ids.shape:
        raise ValueError(
            f"{field}.clean is {clean_ids.shape[1]} tokens and {field}.corrupted is {corrupted_ids.shape[1]}: "
            "patching position by position needs prompts of the same token length"
        )
    return PromptPairs(
        clean=clean_ids,
        corrupted=corrupted_ids,
        last=torch.tensor([clean_ids.shape[1] - 1]),
        correct=torch.tensor([correct]),
        incorrect=torch.tensor([incorrect]),
    )


def logit_differences(
    logits: Float[Tensor, "batch pos d_vocab"], pairs: PromptPairs
) -> Float[Tensor, " batch"]:
    """Correct minus incorrect logit at each prompt's last token."""
    rows = torch.arange(logits.shape[0])
    last_logits = logits[rows, pairs.last]
    return last_logits[rows, pairs.correct] - last_logits[rows, pairs.incorrect]


def _final_logit_differences(
    model: HookedTransformer, residual: Float[Tensor, "rows pos d_model"], pairs: PromptPairs
) -> Float[Tensor, " rows"]:
    """The metric from the residual stream after the last block, for copies of the batch."""
    copies = residual.shape[0] // pairs.size
    last, correct, incorrect = (
        pairs.last.repeat(copies),
        pairs.correct.repeat(copies),
        pairs.incorrect.repeat(copies),
    )
    final = residual[torch.arange(residual.shape[0]), last]
    if model.cfg.normalization_type is not None:
        final = model.ln_final(final[:, None])[:, 0]
    direction = model.W_U[:, correct] - model.W_U[:, incorrect]  # [d_model, rows]
    return (final * direction.T).sum(-1) + model.b_U[correct] - model.b_U[incorrect]


@dataclass(frozen=True)
class Patch:
    """Replace one activation by the source's.

    Attributes:
        hook: Full hook name, e.g. ``blocks.3.attn.hook_z`` or ``blocks.3.hook_resid_pre``.
        head: For per-head hooks (``hook_z``, ``hook_q_input``...), which head; else every one.
        positions: Which positions of each prompt; ``None`` for all of them.
    """

    hook: str
    head: int | None = None
    positions: Bool[Tensor, "batch pos"] | None = None


def hook_layer(hook: str) -> int | None:
    """The block a hook belongs to; ``None`` for hooks before the first block (embeddings)."""
    found = re.match(r"blocks\.(\d+)\.", hook)
    return int(found.group(1)) if found else None


def _start_layer(patch_set: Sequence[Patch]) -> int | None:
    layers = [hook_layer(patch.hook) for patch in patch_set]
    return None if not layers or None in layers else min(layers)  # type: ignore[type-var]


def _patching_hook(
    source: ActivationCache | dict[str, Tensor], entries: list[tuple[int, Patch]], batch: int
):
    def patch(activation: Tensor, hook: HookPoint) -> Tensor:
        from_source = source[hook.name]
        for copy, spec in entries:
            target, value = activation[copy * batch : (copy + 1) * batch], from_source
            if spec.head is not None:
                target, value = target[:, :, spec.head], value[:, :, spec.head]
            if spec.positions is None:
                target.copy_(value)
            else:
                target[spec.positions] = value[spec.positions]
        return activation

    return patch


def patched_logit_differences(
    model: HookedTransformer,
    pairs: PromptPairs,
    patch_sets: Sequence[Sequence[Patch]],
    source: ActivationCache | dict[str, Tensor],
    base: Literal["clean", "corrupted"] = "corrupted",
    base_cache: ActivationCache | dict[str, Tensor] | None = None,
    max_rows: int = MAX_ROWS,
) -> Float[Tensor, "patch_set batch"]:
    """The metric of the base prompts with each set of patches applied, one set at a time.

    Args:
        model: The model.
        pairs: The prompt pairs.
        patch_sets: Each set is applied to its own copy of the batch (an empty set is the base run).
        source: Activations to patch in, for every hook the patches name (batch first).
        base: Which prompts run: ``"corrupted"`` to restore clean activations into the corrupted
            run (denoising), ``"clean"`` to corrupt the clean run (noising).
        base_cache: The base run's ``hook_resid_pre`` of every layer: copies then start at the
            first layer their patches touch. Without it every copy runs from the tokens.
        max_rows: Largest number of rows per forward pass.

    Returns:
        The logit difference per patch set and prompt.
    """
    n_layers, batch = model.cfg.n_layers, pairs.size
    tokens = pairs.tokens(base)
    groups: dict[int | None, list[int]] = defaultdict(list)
    unchanged = []
    for index, patch_set in enumerate(patch_sets):
        if base_cache is not None and _changes_nothing(patch_set, source, base_cache):
            unchanged.append(index)
        else:
            groups[_start_layer(patch_set) if base_cache is not None else None].append(index)
    if unchanged:
        groups[model.cfg.n_layers - 1 if base_cache is not None else None].append(-1)
    results = torch.empty(len(patch_sets) + 1, batch)  # the last row: the base run
    copies_per_run = max(1, max_rows // batch)
    with torch.inference_mode():
        for layer, indices in groups.items():
            for chunk_start in range(0, len(indices), copies_per_run):
                chunk = indices[chunk_start : chunk_start + copies_per_run]
                entries: dict[str, list[tuple[int, Patch]]] = defaultdict(list)
                for copy, index in enumerate(chunk):
                    for spec in patch_sets[index] if index >= 0 else []:
                        entries[spec.hook].append((copy, spec))
                hooks = [
                    (name, _patching_hook(source, found, batch)) for name, found in entries.items()
                ]
                if layer is None:
                    start, start_at = tokens.repeat(len(chunk), 1), None
                else:
                    start, start_at = (
                        base_cache[f"blocks.{layer}.hook_resid_pre"].repeat(len(chunk), 1, 1),
                        layer,
                    )  # type: ignore[index]
                residual = model.run_with_hooks(
                    start, start_at_layer=start_at, stop_at_layer=n_layers, fwd_hooks=hooks
                )
                results[chunk] = _final_logit_differences(model, residual, pairs).reshape(
                    len(chunk), batch
                )
    results[unchanged] = results[-1].clone()
    return_freed_memory()
    return results[:-1]


def _changes_nothing(
    patch_set: Sequence[Patch],
    source: ActivationCache | dict[str, Tensor],
    base_cache: ActivationCache | dict[str, Tensor],
) -> bool:
    """Whether every patch of the set writes what the base run already has (so its result is the
    base run's, known without running it): true of positions before the prompts first differ.
    """
    for spec in patch_set:
        if spec.hook not in base_cache.keys():
            return False
        new, old = source[spec.hook], base_cache[spec.hook]
        if spec.head is not None:
            new, old = new[:, :, spec.head], old[:, :, spec.head]
        if spec.positions is not None:
            new, old = new[spec.positions], old[spec.positions]
        if not torch.equal(new, old):
            return False
    return True


def run_cache(
    model: HookedTransformer,
    pairs: PromptPairs,
    which: Literal["clean", "corrupted"],
    hooks: Sequence[str],
) -> tuple[Float[Tensor, "batch d_vocab"], ActivationCache]:
    """One forward of the clean or corrupted prompts: the logits at each last token, and a cache of ``hooks``."""
    wanted = set(hooks)
    with torch.inference_mode():
        logits, cache = model.run_with_cache(
            pairs.tokens(which), names_filter=lambda name: name in wanted
        )
    return logits[torch.arange(pairs.size), pairs.last], cache


def answer_summary(
    last_logits: Float[Tensor, "batch d_vocab"],
    pairs: PromptPairs,
    answer: Literal["correct", "incorrect"] = "correct",
) -> dict[str, float]:
    """Mean logit difference (correct minus incorrect: the patching metric), and how often the
    prompts give ``answer``: the share preferring it to the other answer, and the share whose top
    prediction it is.

    Score each prompt set against its own answer: the clean prompts against ``"correct"``, and
    corrupted prompts whose answer flips (IOI's ``swap``) against ``"incorrect"``; scored against
    the clean answer, a corrupted run that answers right reads 0.
    """
    rows = torch.arange(pairs.size)
    differences = last_logits[rows, pairs.correct] - last_logits[rows, pairs.incorrect]
    own, other, preferred = (
        (pairs.correct, "incorrect", differences > 0)
        if answer == "correct"
        else (pairs.incorrect, "correct", differences < 0)
    )
    return {
        "mean_logit_difference": float(differences.mean()),
        f"share_{answer}_over_{other}": float(preferred.float().mean()),
        f"share_{answer}_is_top_prediction": float((last_logits.argmax(-1) == own).float().mean()),
    }


def patchable_hooks(model: HookedTransformer) -> list[str]:
    """Every head's output (``hook_z``), every MLP's output and the residual stream at every layer."""
    n_layers = model.cfg.n_layers
    return [
        *[f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)],
        *[f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)],
        *residual_hook_names(n_layers),
    ]


def _with_gradients(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    pairs: PromptPairs,
    hooks: Sequence[str],
) -> tuple[Float[Tensor, " batch"], dict[str, Tensor], dict[str, Tensor]]:
    """One forward and one backward pass: the metric, and each hook's activation and gradient.

    The loaded models' weights don't require gradients, so the embeddings are made to: every
    later activation then carries a gradient, and no weight gradient is ever computed.
    """
    kept: dict[str, Tensor] = {}

    def track(activation: Tensor, hook: HookPoint) -> Tensor:
        if not activation.requires_grad:
            activation = activation.detach().requires_grad_(True)
        return activation

    def keep(activation: Tensor, hook: HookPoint) -> Tensor:
        kept[hook.name] = activation
        return activation

    tracked = [(name, track) for name in _embedding_hooks(model)]
    with torch.enable_grad():
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[*tracked, *[(name, keep) for name in hooks]]
        )
        differences = logit_differences(logits, pairs)
        grads = torch.autograd.grad(differences.sum(), [kept[name] for name in hooks])
    return (
        differences.detach(),
        {name: kept[name].detach() for name in hooks},
        dict(zip(hooks, grads)),
    )


def _gradient_passes(pairs: PromptPairs) -> list[slice]:
    """The rows of each gradient pass: at most ``GRADIENT_TOKENS`` tokens, at least one row."""
    rows = max(1, GRADIENT_TOKENS // pairs.clean.shape[1])
    return [slice(start, start + rows) for start in range(0, pairs.size, rows)]


def attribution(
    model: HookedTransformer,
    pairs: PromptPairs,
    hooks: Sequence[str],
    source: ActivationCache | dict[str, Tensor],
    base: Literal["clean", "corrupted"] = "corrupted",
) -> tuple[Float[Tensor, " batch"], dict[str, Tensor]]:
    """Attribution patching: (source - base activation) x gradient of the metric at the base run.

    Summed over any set of elements, this is the first-order estimate of patching those elements
    from the source into the base run: with ``base="corrupted"`` and a clean source, of restoring
    them (as activation patching does); with ``base="clean"`` and a corrupted source, of corrupting
    them. It is exact when the metric is linear in the activation, and fails where it is not
    (an attention pattern that saturates, a norm whose scale changes).

    Returns:
        The base run's logit differences, and per hook the elementwise estimate (same shape as
        the activation, batch first).
    """
    differences = torch.empty(pairs.size)
    estimates: dict[str, Tensor] = {}
    for rows in _gradient_passes(pairs):
        part = pairs.rows(rows)
        differences[rows], activations, grads = _with_gradients(
            model, part.tokens(base), part, hooks
        )
        for name in hooks:
            estimate = (source[name][rows] - activations[name]) * grads[name]
            estimates.setdefault(name, torch.empty(pairs.size, *estimate.shape[1:]))[rows] = (
                estimate
            )
    return_freed_memory()
    return differences, estimates


@contextmanager
def split_head_inputs(model: HookedTransformer) -> Iterator[None]:
    """Give every head its own query, key and value input hooks and every MLP an input hook.

    Grouped-query attention is ungrouped, so each query head has its own key and value input.
    The model's settings are restored afterwards (the runner shares one model between configs).
    """
    cfg = model.cfg
    saved = (cfg.use_split_qkv_input, cfg.use_hook_mlp_in, cfg.ungroup_grouped_query_attention)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    if cfg.n_key_value_heads is not None:
        model.set_ungroup_grouped_query_attention(True)
    try:
        yield
    finally:
        cfg.use_split_qkv_input, cfg.use_hook_mlp_in, cfg.ungroup_grouped_query_attention = saved


@dataclass(frozen=True)
class EdgeScores:
    """Edge attribution scores: upstream components' outputs into downstream components' inputs.

    Attributes:
        upstream: ``embed``, heads ``L.H`` and MLPs ``mL``, in the order they write.
        downstream: heads' inputs ``L.H.q``/``L.H.k``/``L.H.v``, MLP inputs ``mL`` and ``logits``.
        scores: Mean over prompts of the estimated change of the metric when the edge alone is
            patched from the source; NaN where the upstream component does not feed the
            downstream one.
        nodes: Per upstream component, the estimate of patching its whole output (the same
            as the sum of its edges' scores, but computed from its own gradient).
        base_difference: The base run's mean logit difference.
    """

    upstream: list[str]
    downstream: list[str]
    scores: Float[Tensor, "upstream downstream"]
    nodes: Float[Tensor, " upstream"]
    base_difference: float


def upstream_names(model: HookedTransformer) -> list[str]:
    """Components that write to the residual stream, in order: embeddings, then per layer heads and MLP."""
    n_heads = model.cfg.n_heads
    names = ["embed"]
    for layer in range(model.cfg.n_layers):
        names += [f"{layer}.{head}" for head in range(n_heads)] + [f"m{layer}"]
    return names


def _embedding_hooks(model: HookedTransformer) -> list[str]:
    return [
        "hook_embed",
        *(["hook_pos_embed"] if model.cfg.positional_embedding_type == "standard" else []),
    ]


def component_patches(name: str, model: HookedTransformer) -> list[Patch]:
    """What replacing one component's whole output means, in hooks: ``embed``, ``L.H`` or ``mL``."""
    if name == "embed":
        return [Patch(hook) for hook in _embedding_hooks(model)]
    if name.startswith("m"):
        return [Patch(f"blocks.{name[1:]}.hook_mlp_out")]
    layer, head = name.split(".")
    return [Patch(f"blocks.{layer}.attn.hook_z", head=int(head))]


def edge_attribution(
    model: HookedTransformer,
    pairs: PromptPairs,
    source: ActivationCache | dict[str, Tensor],
    base: Literal["clean", "corrupted"] = "clean",
) -> EdgeScores:
    """Edge attribution patching: for every edge u -> v, (source - base output of u) . gradient
    of the metric with respect to v's input, summed over positions, at the base run.

    ``source`` must cache ``hook_embed`` (and ``hook_pos_embed`` if the model has one), every
    ``attn.hook_z`` and ``hook_mlp_out``.
    """
    n_layers = model.cfg.n_layers
    outputs = [
        *_embedding_hooks(model),
        *[f"blocks.{l}.attn.hook_z" for l in range(n_layers)],
        *[f"blocks.{l}.hook_mlp_out" for l in range(n_layers)],
    ]
    inputs = [f"blocks.{l}.hook_{kind}_input" for l in range(n_layers) for kind in ("q", "k", "v")]
    inputs += [f"blocks.{l}.hook_mlp_in" for l in range(n_layers)] + [
        f"blocks.{n_layers - 1}.hook_resid_post"
    ]
    differences = torch.empty(pairs.size)
    scores: Tensor | None = None
    nodes: Tensor | None = None
    # Every score is a sum over prompts: each gradient pass adds its rows' share.
    for rows in _gradient_passes(pairs):
        part = pairs.rows(rows)
        with split_head_inputs(model):
            differences[rows], activations, grads = _with_gradients(
                model, part.tokens(base), part, [*outputs, *inputs]
            )
        deltas = {name: source[name][rows] - activations[name] for name in outputs}
        del activations
        part_scores, part_nodes = _edge_score_sums(model, deltas, grads)
        del deltas, grads
        scores = part_scores if scores is None else scores + part_scores
        nodes = part_nodes if nodes is None else nodes + part_nodes
        return_freed_memory()
    assert scores is not None and nodes is not None
    return EdgeScores(
        upstream=upstream_names(model),
        downstream=downstream_names(model),
        scores=scores / pairs.size,
        nodes=nodes / pairs.size,
        base_difference=float(differences.mean()),
    )


def downstream_names(model: HookedTransformer) -> list[str]:
    """Edge targets in ``EdgeScores.scores``' column order: every head's q, k and v input layer by
    layer, then every MLP's input, then the logits.
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = [
        f"{layer}.{head}.{kind}"
        for layer in range(n_layers)
        for head in range(n_heads)
        for kind in ("q", "k", "v")
    ]
    return [*heads, *[f"m{layer}" for layer in range(n_layers)], "logits"]


def _edge_score_sums(
    model: HookedTransformer, deltas: dict[str, Tensor], grads: dict[str, Tensor]
) -> tuple[Float[Tensor, "upstream downstream"], Float[Tensor, " upstream"]]:
    """Edge and node scores summed over the rows of one gradient pass (not yet averaged)."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    # What each upstream component adds to the residual stream, source minus base, one row per
    # component: [up, batch * pos * d_model]. Every edge score is then a matrix product with the
    # gradients laid out as [batch * pos * d_model, input] (einsum would permute ``up`` anew per input).
    upstream = [sum(deltas[name] for name in _embedding_hooks(model))]
    for layer in range(n_layers):
        z = deltas[f"blocks.{layer}.attn.hook_z"]  # [batch, pos, head, d_head]
        upstream += list(torch.einsum("bphd,hdm->hbpm", z, model.blocks[layer].attn.W_O))
        upstream.append(deltas[f"blocks.{layer}.hook_mlp_out"])
    up = torch.stack(upstream).flatten(1)
    del upstream
    up_layers = torch.tensor(
        [-1] + [layer for layer in range(n_layers) for _ in range(n_heads + 1)]
    )
    up_is_mlp = torch.tensor(
        [False] + [h == n_heads for _ in range(n_layers) for h in range(n_heads + 1)]
    )

    columns = []
    for layer in range(n_layers):
        # Per layer: [batch, pos, 3 * head, d_model] in the order head 0 q, k, v, head 1 q, ...
        qkv = torch.stack(
            [grads[f"blocks.{layer}.hook_{kind}_input"] for kind in ("q", "k", "v")], dim=3
        ).flatten(2, 3)
        scores = up @ qkv.movedim(2, 3).reshape(up.shape[1], -1)
        feeds = up_layers < layer
        scores[~feeds] = torch.nan
        columns.append(scores)
    for layer in range(n_layers):
        scores = (up @ grads[f"blocks.{layer}.hook_mlp_in"].reshape(-1))[:, None]
        feeds = (up_layers < layer) | ((up_layers == layer) & ~up_is_mlp)
        scores[~feeds] = torch.nan
        columns.append(scores)
    columns.append((up @ grads[f"blocks.{n_layers - 1}.hook_resid_post"].reshape(-1))[:, None])

    # Each component's own attribution, from the gradient at its output.
    node_scores = [(sum(deltas[name] * grads[name] for name in _embedding_hooks(model))).sum()]
    for layer in range(n_layers):
        name = f"blocks.{layer}.attn.hook_z"
        node_scores += list((deltas[name] * grads[name]).sum(dim=(0, 1, 3)))
        name = f"blocks.{layer}.hook_mlp_out"
        node_scores.append((deltas[name] * grads[name]).sum())
    return torch.cat(columns, dim=1), torch.stack([torch.as_tensor(s) for s in node_scores])


def head_patches(model: HookedTransformer) -> list[list[Patch]]:
    """One patch set per head (its output at every position), layer by layer."""
    return [
        [Patch(f"blocks.{layer}.attn.hook_z", head=head)]
        for layer in range(model.cfg.n_layers)
        for head in range(model.cfg.n_heads)
    ]


def mlp_patches(model: HookedTransformer) -> list[list[Patch]]:
    """One patch set per MLP (its output at every position)."""
    return [[Patch(f"blocks.{layer}.hook_mlp_out")] for layer in range(model.cfg.n_layers)]


def residual_patches(
    model: HookedTransformer, groups: Sequence[Bool[Tensor, "batch pos"]]
) -> list[list[Patch]]:
    """One patch set per residual-stream point (``residual_hook_names``) and group of positions, point-major."""
    return [
        [Patch(hook, positions=group)]
        for hook in residual_hook_names(model.cfg.n_layers)
        for group in groups
    ]


def estimates_per_component(
    model: HookedTransformer,
    estimates: dict[str, Tensor],
    groups: Sequence[Bool[Tensor, "batch pos"]],
) -> tuple[Float[Tensor, "layer head"], Float[Tensor, " layer"], Float[Tensor, "point group"]]:
    """Attribution estimates summed per head, per MLP and per residual point and group of
    positions, averaged over prompts: the same components as ``head_patches``, ``mlp_patches``
    and ``residual_patches``.
    """
    n_layers = model.cfg.n_layers
    heads = torch.stack(
        [
            estimates[f"blocks.{layer}.attn.hook_z"].sum(dim=(1, 3)).mean(0)
            for layer in range(n_layers)
        ]
    )
    mlps = torch.stack(
        [
            estimates[f"blocks.{layer}.hook_mlp_out"].sum(dim=(1, 2)).mean(0)
            for layer in range(n_layers)
        ]
    )
    residual = torch.stack(
        [
            torch.stack([(estimates[hook].sum(-1) * group).sum(-1).mean(0) for group in groups])
            for hook in residual_hook_names(n_layers)
        ]
    )
    return heads, mlps, residual


def edge_circuit_logit_differences(
    model: HookedTransformer,
    pairs: PromptPairs,
    corrupted_cache: ActivationCache | dict[str, Tensor],
    kept: Bool[Tensor, "circuit upstream downstream"],
) -> Float[Tensor, "circuit batch"]:
    """The clean prompts run with only the kept edges carrying clean information (edge-level
    faithfulness), one circuit per copy of the batch.

    Every downstream input (a head's query, key or value input, an MLP's input, the logits') is
    rebuilt as its value on the corrupted prompts plus, for each kept edge into it, what the
    upstream component writes now minus what it wrote on the corrupted prompts. With every edge
    kept this is the clean run; with none, the corrupted run. Edges are indexed as in
    ``edge_attribution`` (``upstream_names`` by its downstream order).

    ``corrupted_cache`` must hold the embeddings, every ``attn.hook_z``, ``hook_mlp_out``,
    ``hook_resid_pre`` and ``hook_resid_mid``, and the last ``hook_resid_post``.
    """
    bytes_per_row = pairs.clean.shape[1] * model.cfg.d_model * kept.shape[1] * 4
    rows_per_pass = min(pairs.size, max(1, EDGE_BUFFER_BYTES // bytes_per_row))
    per_pass = (
        max(1, EDGE_BUFFER_BYTES // (bytes_per_row * pairs.size))
        if rows_per_pass == pairs.size
        else 1
    )
    row_slices = [
        slice(first, first + rows_per_pass) for first in range(0, pairs.size, rows_per_pass)
    ]
    circuit_passes = []
    for start in range(0, kept.shape[0], per_pass):
        circuits = kept[start : start + per_pass]
        by_rows = [
            _edge_circuits_in_one_pass(
                model, pairs.rows(rows), _RowsOf(corrupted_cache, rows), circuits
            )
            for rows in row_slices
        ]
        circuit_passes.append(torch.cat(by_rows, dim=1))
    differences = torch.cat(circuit_passes)
    return_freed_memory()
    return differences


class _RowsOf:
    """Rows ``selected`` of every activation of a cache (views, read as they are asked for)."""

    def __init__(self, cache: ActivationCache | dict[str, Tensor], selected: slice) -> None:
        self._cache, self._selected = cache, selected

    def __getitem__(self, name: str) -> Tensor:
        return self._cache[name][self._selected]


def _edge_circuits_in_one_pass(
    model: HookedTransformer,
    pairs: PromptPairs,
    corrupted_cache: ActivationCache | dict[str, Tensor] | _RowsOf,
    kept: Bool[Tensor, "circuit upstream downstream"],
) -> Float[Tensor, "circuit batch"]:
    cfg = model.cfg
    n_layers, n_heads, batch = cfg.n_layers, cfg.n_heads, pairs.size
    circuits = kept.shape[0]
    kept = kept.to(torch.float32)
    # Per upstream component, in upstream order, what it writes now minus on the corrupted prompts;
    # filled as the forward pass reaches it (one buffer: stacking at every input would copy it all).
    # Upstream is the last axis, so each input's sum over kept edges is one batched matrix product
    # on a view of the filled part; with upstream first, einsum copied the whole buffer per input.
    deltas = torch.zeros(circuits, batch, pairs.clean.shape[1], cfg.d_model, kept.shape[1])
    filled = [0]
    embedding_hooks = _embedding_hooks(model)
    embedded: dict[str, Tensor] = {}

    def rows(tensor: Tensor) -> Tensor:
        return tensor.reshape(circuits, batch, *tensor.shape[1:])

    def append(values: Tensor) -> None:
        """``values``: [circuit, batch, pos, d_model, component], components in upstream order."""
        deltas[..., filled[0] : filled[0] + values.shape[-1]] = values
        filled[0] += values.shape[-1]

    def record_embedding(activation: Tensor, hook: HookPoint) -> Tensor:
        embedded[hook.name] = rows(activation) - corrupted_cache[hook.name]
        if len(embedded) == len(embedding_hooks):
            append(sum(embedded.values())[..., None])  # type: ignore[index]
        return activation

    def record_heads(activation: Tensor, hook: HookPoint) -> Tensor:
        z = rows(activation) - corrupted_cache[hook.name]
        append(torch.einsum("cbphd,hdm->cbpmh", z, model.blocks[hook_layer(hook.name)].attn.W_O))
        return activation

    def record_mlp(activation: Tensor, hook: HookPoint) -> Tensor:
        append((rows(activation) - corrupted_cache[hook.name])[..., None])
        return activation

    def rebuild(corrupted_name: str, columns: slice, per_head: bool):
        def hook(activation: Tensor, hook: HookPoint) -> Tensor:
            n = filled[0]
            written = deltas[..., :n].reshape(
                circuits, -1, n
            )  # a view: the leading axes are contiguous
            added = torch.bmm(written, kept[:, :n, columns]).reshape(
                *deltas.shape[:4], -1
            )  # [c, b, p, d, v]
            base = corrupted_cache[corrupted_name][None, :, :, None]
            added = added.movedim(-1, 3)  # [c, b, p, v, d]
            rebuilt = base + added if per_head else (base + added)[:, :, :, 0]
            return rebuilt.reshape(activation.shape)

        return hook

    hooks: list[tuple[str, object]] = [(name, record_embedding) for name in embedding_hooks]
    qkv_width, mlp_start = 3 * n_heads, 3 * n_heads * n_layers
    for layer in range(n_layers):
        for offset, kind in enumerate("qkv"):
            columns = slice(layer * qkv_width + offset, (layer + 1) * qkv_width, 3)
            hooks.append(
                (
                    f"blocks.{layer}.hook_{kind}_input",
                    rebuild(f"blocks.{layer}.hook_resid_pre", columns, per_head=True),
                )
            )
        hooks.append((f"blocks.{layer}.attn.hook_z", record_heads))
        hooks.append(
            (
                f"blocks.{layer}.hook_mlp_in",
                rebuild(
                    f"blocks.{layer}.hook_resid_mid",
                    slice(mlp_start + layer, mlp_start + layer + 1),
                    per_head=False,
                ),
            )
        )
        hooks.append((f"blocks.{layer}.hook_mlp_out", record_mlp))
    final = f"blocks.{n_layers - 1}.hook_resid_post"
    hooks.append(
        (
            final,
            rebuild(final, slice(mlp_start + n_layers, mlp_start + n_layers + 1), per_head=False),
        )
    )
    with split_head_inputs(model), torch.inference_mode():
        residual = model.run_with_hooks(
            pairs.clean.repeat(circuits, 1), stop_at_layer=n_layers, fwd_hooks=hooks
        )  # type: ignore[arg-type]
    return _final_logit_differences(model, residual, pairs).reshape(circuits, batch)
