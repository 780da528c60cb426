"""Exact activation patching: the base prompts run with chosen activations taken from a source.

Many patch sets run at once, each on its own copy of the batch. A copy starts from the base run's
cached residual stream at the first layer any of its patches touches, since the layers before it
would only recompute what the base run cached; a patch set that writes only what the base run
already has (positions before the prompts first differ) takes the base run's result, run once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from unraveled.patching.metrics import Metric, logit_difference, metric_after_last_block
from unraveled.patching.pairs import Cache, PromptPairs, Which
from unraveled.patching.patches import Patch, hook_layer

MAX_ROWS = 64
"""Rows (copies of prompts) run through the model at once: bounds memory (mostly the MLPs'
activation temporaries) and keeps batches efficient."""


@dataclass
class _Copy:
    """One copy of the batch in a patched pass, and which patch sets take its result.

    Attributes:
        patches: What the copy patches; none for the base run.
        results: The patch sets whose result it is: one, or for the base run every set that
            changes nothing.
    """

    patches: Sequence[Patch]
    results: list[int] = field(default_factory=list)


def patched_metric(
    model: HookedTransformer,
    pairs: PromptPairs,
    patch_sets: Sequence[Sequence[Patch]],
    source: Cache,
    base: Which = "corrupted",
    base_cache: Cache | None = None,
    metric: Metric = logit_difference,
    max_rows: int = MAX_ROWS,
) -> Float[Tensor, "patch_set batch"]:
    """The metric of the base prompts with each set of patches applied, one set at a time.

    Args:
        model: The model.
        pairs: The prompt pairs.
        patch_sets: Each set is applied to its own copy of the batch (an empty set is the base
            run).
        source: Activations to patch in, for every hook the patches name (batch first).
        base: Which prompts run: ``"corrupted"`` to restore clean activations into the corrupted
            run (denoising), ``"clean"`` to corrupt the clean run (noising).
        base_cache: The base run's ``hook_resid_pre`` of every layer (and the activations the
            patches name, to know which patches change nothing): copies then start at the first
            layer their patches touch. Without it every copy runs from the tokens.
        metric: The score of each prompt from its last token's logits (``patching.metrics``).
        max_rows: Largest number of rows per forward pass.

    Returns:
        The metric per patch set and prompt.
    """
    results = torch.empty(len(patch_sets), pairs.size)
    with torch.inference_mode():
        for start_layer, copies in _copies_by_start_layer(model, patch_sets, source, base_cache):
            per_pass = max(1, max_rows // pairs.size)
            for first in range(0, len(copies), per_pass):
                chosen = copies[first : first + per_pass]
                scores = _run_copies(
                    model, pairs, base, base_cache, start_layer, chosen, source, metric
                )
                for copy, score in zip(chosen, scores, strict=True):
                    results[copy.results] = score
    return results


def _copies_by_start_layer(
    model: HookedTransformer,
    patch_sets: Sequence[Sequence[Patch]],
    source: Cache,
    base_cache: Cache | None,
) -> list[tuple[int | None, list[_Copy]]]:
    """The copies to run, grouped by the layer they start at (None: from the tokens).

    The base run, when some set changes nothing, comes last in the last layer's group.
    """
    groups: dict[int | None, list[_Copy]] = defaultdict(list)
    base_run = _Copy(patches=[])
    for index, patch_set in enumerate(patch_sets):
        if base_cache is None:
            groups[None].append(_Copy(patch_set, [index]))
        elif _changes_nothing(patch_set, source, base_cache):
            base_run.results.append(index)
        else:
            groups[_start_layer(patch_set)].append(_Copy(patch_set, [index]))
    if base_run.results:  # from the last layer: it patches nothing
        groups[model.cfg.n_layers - 1].append(base_run)
    return list(groups.items())


def _start_layer(patch_set: Sequence[Patch]) -> int | None:
    """The first layer the set's patches touch; None when one patches the embeddings (or none)."""
    layers = [hook_layer(patch.hook) for patch in patch_set]
    if not layers or None in layers:
        return None
    return min(layer for layer in layers if layer is not None)


def _changes_nothing(patch_set: Sequence[Patch], source: Cache, base_cache: Cache) -> bool:
    """Whether every patch of the set writes what the base run already has.

    Its result is then the base run's, known without running it: true of positions before the
    prompts first differ.
    """
    for spec in patch_set:
        if spec.hook not in base_cache.keys():
            return False
        new, old = (
            _patched_part(source[spec.hook], spec),
            _patched_part(base_cache[spec.hook], spec),
        )
        if not torch.equal(new, old):
            return False
    return True


def _patched_part(activation: Tensor, spec: Patch) -> Tensor:
    """The elements of a (batch-first) activation that ``spec`` replaces."""
    if spec.head is not None:
        activation = activation[:, :, spec.head]
    if spec.positions is not None:
        activation = activation[spec.positions]
    return activation


def _run_copies(
    model: HookedTransformer,
    pairs: PromptPairs,
    base: Which,
    base_cache: Cache | None,
    start_layer: int | None,
    copies: Sequence[_Copy],
    source: Cache,
    metric: Metric,
) -> Float[Tensor, "copy batch"]:
    """One forward pass of several copies of the batch, each with its own patches."""
    by_hook: dict[str, list[tuple[int, Patch]]] = defaultdict(list)
    for index, copy in enumerate(copies):
        for spec in copy.patches:
            by_hook[spec.hook].append((index, spec))
    hooks = [(name, _PatchFrom(source, found, pairs.size)) for name, found in by_hook.items()]
    start: Int[Tensor, "rows pos"] | Float[Tensor, "rows pos d_model"]
    if start_layer is None:
        start = pairs.tokens(base).repeat(len(copies), 1)
    else:
        assert base_cache is not None  # copies start at a layer only from a cached base run
        start = base_cache[f"blocks.{start_layer}.hook_resid_pre"].repeat(len(copies), 1, 1)
    residual = model.run_with_hooks(
        start, start_at_layer=start_layer, stop_at_layer=model.cfg.n_layers, fwd_hooks=hooks
    )
    return metric_after_last_block(model, residual, pairs, metric).reshape(len(copies), pairs.size)


class _PatchFrom:
    """A forward hook writing the source's activation into the copies that patch this hook."""

    def __init__(self, source: Cache, patches: list[tuple[int, Patch]], batch: int) -> None:
        self._source, self._patches, self._batch = source, patches, batch

    def __call__(self, activation: Tensor, hook: HookPoint) -> Tensor:
        """Overwrite each patching copy's part of ``activation`` in place."""
        from_source = self._source[hook.name]
        for copy, spec in self._patches:
            target, value = activation[copy * self._batch : (copy + 1) * self._batch], from_source
            if spec.head is not None:
                target, value = target[:, :, spec.head], value[:, :, spec.head]
            if spec.positions is None:
                target.copy_(value)
            else:
                target[spec.positions] = value[spec.positions]
        return activation
