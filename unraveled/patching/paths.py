"""Path patching (Wang et al. 2022, appendix B; Goldowsky-Dill et al. 2023): one path at a time.

A sender head's output is patched from the corrupted run into the clean run while every other
head's output stays frozen to the clean run, so its change reaches the receiver only along the
direct path (through the residual stream), not through any other head:

- **senders -> logits**: the metric of that frozen run (the receiver is the unembedding's input).
- **senders -> receivers' query, key or value inputs**: the receivers' inputs are taken from that
  frozen run; a final clean run then takes those inputs for the receivers alone, everything
  downstream of them recomputed, and is scored.

MLPs are recomputed in the frozen run by default, as in the IOI paper (and ARENA's and Redwood's
code): a sender's path through an MLP then counts as direct. ``freeze_mlps`` freezes them to the
clean run too, leaving only the residual-stream edge from the sender to the receiver. The final
LayerNorm (or RMSNorm) is always recomputed, so its scale follows the patched residual stream, as
is each receiver's own input norm.

With every head after the sender frozen nothing moves information between positions, so the
frozen run is computed position by position from the clean run's cached residual stream and
attention outputs: the sender's change added at its layer, the MLPs recomputed, no attention.
The logits need it at each prompt's last token only. Senders of one layer run side by side, one
copy of the batch each, at most ``max_rows`` copies of a prompt per pass.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities.attention import simple_attn_linear

from unraveled.components import HeadComponent
from unraveled.patching.activation import MAX_ROWS, patched_metric
from unraveled.patching.metrics import Metric, logit_difference, metric_after_last_block
from unraveled.patching.pairs import Cache, PromptPairs
from unraveled.patching.patches import Patch, split_head_inputs


def path_patching_hooks(model: HookedTransformer) -> list[str]:
    """What the clean cache of the path-patching functions holds.

    Every layer's ``hook_resid_pre``, ``attn.hook_z``, ``hook_attn_out`` and ``hook_mlp_out``; the
    corrupted cache needs only the ``attn.hook_z``.
    """
    names = ["hook_resid_pre", "attn.hook_z", "hook_attn_out"]
    if not model.cfg.attn_only:
        names.append("hook_mlp_out")
    return [f"blocks.{layer}.{name}" for layer in range(model.cfg.n_layers) for name in names]


def all_heads(model: HookedTransformer) -> list[HeadComponent]:
    """Every head, layer by layer: the default senders."""
    return [
        HeadComponent(layer, head)
        for layer in range(model.cfg.n_layers)
        for head in range(model.cfg.n_heads)
    ]


def path_patch_to_logits(
    model: HookedTransformer,
    pairs: PromptPairs,
    clean_cache: Cache,
    corrupted_cache: Cache,
    senders: Sequence[HeadComponent] | None = None,
    freeze_mlps: bool = False,
    metric: Metric = logit_difference,
    max_rows: int = MAX_ROWS,
) -> Float[Tensor, "sender batch"]:
    """The clean prompts' metric with one sender at a time patched along its path to the logits.

    Args:
        model: The model.
        pairs: The prompt pairs.
        clean_cache: The clean run's ``path_patching_hooks``.
        corrupted_cache: The corrupted run's ``attn.hook_z`` of every layer.
        senders: The sender heads (``HeadComponent`` without an input); every head by default.
        freeze_mlps: Freeze every MLP to the clean run too (only the sender's residual-stream edge
            to the logits is left); by default MLPs are recomputed, as in the IOI paper.
        metric: The score of each prompt from its last token's logits (``patching.metrics``).
        max_rows: Bounds a pass to as many tokens as ``max_rows`` whole prompts (here each copy
            of a prompt is its last token only); the results don't depend on it.

    Returns:
        The metric per sender and prompt.
    """
    _check_architecture(model)
    senders = _checked_senders(model, senders)
    n_layers = model.cfg.n_layers
    rows = torch.arange(pairs.size)
    # Each prompt's last token alone, as a one-token prompt (the metric reads ``last``).
    at_last = PromptPairs(
        pairs.clean[rows, pairs.last][:, None],
        pairs.corrupted[rows, pairs.last][:, None],
        torch.zeros_like(pairs.last),
        pairs.correct,
        pairs.incorrect,
    )
    per_pass = max(1, max_rows * pairs.clean.shape[1] // pairs.size)
    results = torch.empty(len(senders), pairs.size)
    with torch.inference_mode():
        for chosen in _passes(senders, per_pass):
            residual = _frozen_residuals(
                model,
                clean_cache,
                corrupted_cache,
                [senders[index] for index in chosen],
                {n_layers},
                freeze_mlps,
                positions=(rows, pairs.last),
            )[n_layers]
            scores = metric_after_last_block(model, residual, at_last, metric)
            results[chosen] = scores.reshape(len(chosen), pairs.size)
    return results


def path_patch_to_receivers(
    model: HookedTransformer,
    pairs: PromptPairs,
    clean_cache: Cache,
    corrupted_cache: Cache,
    receivers: Sequence[HeadComponent],
    senders: Sequence[HeadComponent] | None = None,
    freeze_mlps: bool = False,
    metric: Metric = logit_difference,
    max_rows: int = MAX_ROWS,
    positions: Literal["all", "last"] = "all",
) -> Float[Tensor, "sender batch"]:
    """The clean prompts' metric with one sender at a time patched into the receivers' inputs.

    Per sender: (1) the frozen run (the sender's output from the corrupted run, every other head's
    output from the clean run, MLPs recomputed unless ``freeze_mlps``) gives each receiver's
    input (its ``input``: ``q``, ``k`` or ``v``); (2) the clean prompts run with only those
    inputs replaced (at ``positions``), everything else recomputed, and are scored. Receivers in
    the sender's layer or before it are not reached by it and keep their clean input.

    Args:
        model: The model.
        pairs: The prompt pairs.
        clean_cache: The clean run's ``path_patching_hooks``.
        corrupted_cache: The corrupted run's ``attn.hook_z`` of every layer.
        receivers: Receiver heads' inputs, each a ``HeadComponent`` with ``input`` set; patched
            together, as in the IOI paper.
        senders: The sender heads; every head by default.
        freeze_mlps: Freeze every MLP to the clean run in step (1) too.
        metric: The score of each prompt from its last token's logits (``patching.metrics``).
        max_rows: Most copies of a prompt per pass; the results don't depend on it.
        positions: Where the receivers' inputs are patched: at every position, or only at each
            prompt's last token (the IOI paper's name-mover queries, at END).

    Returns:
        The metric per sender and prompt; NaN for a sender that reaches no receiver (one at or
        after the last receiver's layer).

    Raises:
        ValueError: A receiver without an input (q, k or v), or a head the model doesn't have.
    """
    _check_architecture(model)
    for receiver in receivers:
        if receiver.input is None:
            raise ValueError(f"receiver {receiver} names no input: expected e.g. '{receiver}.q'")
        _check_head(model, receiver, "receiver")
    senders = _checked_senders(model, senders)
    # Senders grouped by the receivers they reach (those in later layers): each group's step (2)
    # patches the same inputs, so its copies share passes.
    groups: dict[tuple[HeadComponent, ...], list[int]] = defaultdict(list)
    for index, sender in enumerate(senders):
        reached = tuple(receiver for receiver in receivers if receiver.layer > sender.layer)
        if reached:
            groups[reached].append(index)
    results = torch.full((len(senders), pairs.size), torch.nan)
    rows = torch.arange(pairs.size)
    at = (rows, pairs.last) if positions == "last" else None
    # Queries are patched at ``hook_q``, computed from the frozen stream; keys and values at the
    # split input hooks (grouped-query attention shares a key and value between heads, so they
    # need the heads ungrouped, at the cost of every head's own norm and projections).
    split = any(receiver.input != "q" for receiver in receivers)
    with split_head_inputs(model) if split else nullcontext(), torch.inference_mode():
        for reached, indices in groups.items():
            layers = {receiver.layer for receiver in reached}
            start_hook = f"blocks.{min(layers)}.hook_resid_pre"
            for chosen in _passes([senders[i] for i in indices], max(1, max_rows // pairs.size)):
                chosen = [indices[i] for i in chosen]
                frozen = _frozen_residuals(
                    model,
                    clean_cache,
                    corrupted_cache,
                    [senders[index] for index in chosen],
                    layers,
                    freeze_mlps,
                    at,
                )
                copies = pairs.repeat(len(chosen))
                source, patches = _receiver_patches(model, copies, reached, frozen, at is not None)
                base = {start_hook: clean_cache[start_hook].repeat(len(chosen), 1, 1)}
                scores = patched_metric(
                    model, copies, [patches], source, "clean", base, metric, copies.size
                )
                results[chosen] = scores.reshape(len(chosen), pairs.size)
    return results


def _receiver_patches(
    model: HookedTransformer,
    copies: PromptPairs,
    receivers: Sequence[HeadComponent],
    frozen: dict[int, Tensor],
    last_only: bool,
) -> tuple[dict[str, Tensor], list[Patch]]:
    """Step (2)'s source and patches: each receiver's input as the frozen run has it.

    A query is patched at ``hook_q``: the receiver's norm and query projection of the frozen
    stream (rotary embeddings come after the hook). A key or value is patched at its split input
    hook, which is the residual stream before the head's own norm. With ``last_only`` the frozen
    run has each prompt's last token alone: it is placed there, and only there is patched.
    """
    n_heads, n_pos = model.cfg.n_heads, copies.clean.shape[1]
    rows = torch.arange(copies.size)
    where = None
    if last_only:
        where = torch.zeros(copies.size, n_pos, dtype=torch.bool)
        where[rows, copies.last] = True
    source: dict[str, Tensor] = {}
    patches = []
    for receiver in receivers:
        stream = frozen[receiver.layer]
        if last_only:
            placed = stream.new_zeros(copies.size, n_pos, stream.shape[-1])
            placed[rows, copies.last] = stream[:, 0]
            stream = placed
        if receiver.input == "q":
            hook = f"blocks.{receiver.layer}.attn.hook_q"
            if hook not in source:
                block = model.blocks[receiver.layer]
                source[hook] = simple_attn_linear(block.ln1(stream), block.attn.W_Q, block.attn.b_Q)
        else:
            hook = _input_hook(receiver)
            source[hook] = stream[:, :, None].expand(-1, -1, n_heads, -1)
        patches.append(Patch(hook, head=receiver.head, positions=where))
    return source, patches


def _check_architecture(model: HookedTransformer) -> None:
    """Refuse norms after a block's attention or MLP: a head's output is then not additive.

    Raises:
        ValueError: The model normalises a sublayer's output before adding it to the residual
            stream.
    """
    cfg = model.cfg
    if cfg.use_normalization_before_and_after or cfg.original_architecture in (
        "Olmo2ForCausalLM",
        "Olmo3ForCausalLM",
    ):
        raise ValueError(
            f"{cfg.model_name}: path patching adds a head's output to the residual stream, but "
            "this model normalises attention outputs before adding them"
        )


def _check_head(model: HookedTransformer, head: HeadComponent, role: str) -> None:
    """Raise a ValueError naming ``role`` when the model has no such head."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if not (0 <= head.layer < n_layers and 0 <= head.head < n_heads):
        raise ValueError(
            f"{role} {head}: the model has {n_layers} layers of {n_heads} heads "
            f"(layers 0..{n_layers - 1}, heads 0..{n_heads - 1})"
        )


def _checked_senders(
    model: HookedTransformer, senders: Sequence[HeadComponent] | None
) -> list[HeadComponent]:
    """The senders (every head by default), each checked to be a head the model has.

    Raises:
        ValueError: A sender names a head's input, or a head the model doesn't have.
    """
    if senders is None:
        return all_heads(model)
    for sender in senders:
        if sender.input is not None:
            raise ValueError(f"sender {sender} is a head's input: a sender is a head ('L.H')")
        _check_head(model, sender, "sender")
    return list(senders)


def _passes(senders: Sequence[HeadComponent], per_pass: int) -> list[list[int]]:
    """Indices into ``senders`` in layer order, ``per_pass`` at a time.

    Senders of many layers share a pass: a copy joins it at its sender's layer.
    """
    order = sorted(range(len(senders)), key=lambda index: senders[index].layer)
    return [order[first : first + per_pass] for first in range(0, len(order), per_pass)]


def _input_hook(receiver: HeadComponent) -> str:
    """The split input hook of a receiver's query, key or value input."""
    return f"blocks.{receiver.layer}.hook_{receiver.input}_input"


def _frozen_residuals(
    model: HookedTransformer,
    clean_cache: Cache,
    corrupted_cache: Cache,
    senders: Sequence[HeadComponent],
    stops: set[int],
    freeze_mlps: bool,
    positions: tuple[Tensor, Tensor] | None = None,
) -> dict[int, Float[Tensor, "rows pos d_model"]]:
    """The frozen run's residual stream before each block in ``stops`` (``n_layers``: after all).

    One copy of the batch per sender, copy-major; ``senders`` in layer order, each copy joining
    the pass at its sender's layer from the clean residual stream. Every head's output is the
    clean run's except the sender's, its corrupted output: no position reads another, so the
    stream is rebuilt position by position (only ``positions``, (rows, positions) index pairs,
    when given: one position per prompt). Each stop's stream holds the copies whose sender comes
    before it.
    """

    def clean(name: str, copies: int) -> Tensor:
        activation = clean_cache[name]
        picked = activation[positions][:, None] if positions is not None else activation
        return picked.repeat(copies, *[1] * (picked.ndim - 1))

    found: dict[int, Tensor] = {}
    residual: Tensor | None = None
    first, last = senders[0].layer, max(stops)
    for layer in range(first, last):
        joining = [sender.head for sender in senders if sender.layer == layer]
        active = sum(sender.layer <= layer for sender in senders)
        attention = clean(f"blocks.{layer}.hook_attn_out", active)
        if joining:
            start = clean(f"blocks.{layer}.hook_resid_pre", len(joining))
            residual = start if residual is None else torch.cat([residual, start])
            z_hook = f"blocks.{layer}.attn.hook_z"
            z = torch.stack(
                [corrupted_cache[z_hook][:, :, h] - clean_cache[z_hook][:, :, h] for h in joining]
            )  # [copy, batch, pos, d_head]
            if positions is not None:
                z = z[:, positions[0], positions[1]][:, :, None]
            w_o = model.blocks[layer].attn.W_O[joining]  # [copy, d_head, d_model]
            change = torch.einsum("cbpd,cdm->cbpm", z, w_o).flatten(0, 1)
            attention[attention.shape[0] - change.shape[0] :] += change
        assert residual is not None  # the first layer is the first sender's
        middle = residual + attention
        if not model.cfg.attn_only:
            if freeze_mlps:
                mlp_out = clean(f"blocks.{layer}.hook_mlp_out", active)
            else:
                block = model.blocks[layer]
                mlp_in = residual if model.cfg.parallel_attn_mlp else middle
                mlp_out = block.apply_mlp(block.ln2(mlp_in))
            middle = middle + mlp_out
        residual = middle
        if layer + 1 in stops:
            found[layer + 1] = residual
    return found
