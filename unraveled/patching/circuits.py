"""Edge-level faithfulness: only a circuit's edges carry clean information.

The clean prompts run with every downstream input (a head's query, key or value input, an MLP's
input, the logits') rebuilt as its value on the corrupted prompts plus, for each kept edge into it,
what the upstream component writes now minus what it wrote on the corrupted prompts. With every
edge kept this is the clean run; with none, the corrupted run. Many circuits run at once, one per
copy of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from unraveled.patching.edges import output_hooks
from unraveled.patching.metrics import Metric, logit_difference, metric_after_last_block
from unraveled.patching.pairs import Cache, PromptPairs
from unraveled.patching.patches import embedding_hooks, hook_layer, split_head_inputs

EDGE_BUFFER_BYTES = 24 * 1024 * 1024
"""Upper bound of the per-component delta buffer of one edge-faithfulness pass (see
``edge_circuit_metric``); circuits beyond it run in further passes, and a circuit whose buffer
alone exceeds it runs a few prompts per pass (at least one)."""


def circuit_hooks(model: HookedTransformer) -> list[str]:
    """What a corrupted cache for ``edge_circuit_metric`` holds.

    The embeddings, every ``attn.hook_z``, ``hook_mlp_out``, ``hook_resid_pre`` and
    ``hook_resid_mid``, and the last ``hook_resid_post``: every hook ``edge_attribution`` reads
    too.
    """
    n_layers = model.cfg.n_layers
    return [
        *output_hooks(model),
        *[
            f"blocks.{layer}.hook_resid_{point}"
            for layer in range(n_layers)
            for point in ("pre", "mid")
        ],
        f"blocks.{n_layers - 1}.hook_resid_post",
    ]


@dataclass(frozen=True)
class CircuitPass:
    """Which circuits and which rows one edge-faithfulness pass runs.

    Attributes:
        circuits: The circuits (indices into ``kept``).
        rows: The prompts.
    """

    circuits: slice
    rows: slice


def edge_circuit_passes(
    model: HookedTransformer,
    pairs: PromptPairs,
    n_circuits: int,
    n_upstream: int,
    buffer_bytes: int = EDGE_BUFFER_BYTES,
) -> list[CircuitPass]:
    """The passes of ``edge_circuit_metric``, circuit-major.

    As many circuits per pass as the buffer bound allows, or when one circuit's buffer alone
    exceeds it, as many prompts (at least one).
    """
    bytes_per_row = pairs.clean.shape[1] * model.cfg.d_model * n_upstream * 4
    rows_per_pass = min(pairs.size, max(1, buffer_bytes // bytes_per_row))
    circuits_per_pass = (
        max(1, buffer_bytes // (bytes_per_row * pairs.size)) if rows_per_pass == pairs.size else 1
    )
    return [
        CircuitPass(slice(first, first + circuits_per_pass), slice(row, row + rows_per_pass))
        for first in range(0, n_circuits, circuits_per_pass)
        for row in range(0, pairs.size, rows_per_pass)
    ]


def edge_circuit_metric(
    model: HookedTransformer,
    pairs: PromptPairs,
    corrupted_cache: Cache,
    kept: Bool[Tensor, "circuit upstream downstream"],
    metric: Metric = logit_difference,
    buffer_bytes: int = EDGE_BUFFER_BYTES,
) -> Float[Tensor, "circuit batch"]:
    """The clean prompts' metric with only the kept edges carrying clean information, per circuit.

    Args:
        model: The model.
        pairs: The prompt pairs.
        corrupted_cache: The corrupted run's activations: every hook of ``circuit_hooks``.
        kept: Per circuit, which edges it keeps, indexed as in ``edge_attribution``
            (``upstream_names`` by ``downstream_names``).
        metric: The score of each prompt from its last token's logits (``patching.metrics``).
        buffer_bytes: Upper bound of one pass's buffer of upstream outputs (its largest
            allocation): bounds memory; the results don't depend on it.

    Returns:
        The metric per circuit and prompt.
    """
    results = torch.empty(kept.shape[0], pairs.size)
    for one in edge_circuit_passes(model, pairs, kept.shape[0], kept.shape[1], buffer_bytes):
        circuits = kept[one.circuits]
        results[one.circuits, one.rows] = _CircuitForward(
            model, pairs.rows(one.rows), _RowsOf(corrupted_cache, one.rows), circuits
        ).run(metric)
    return results


class _RowsOf:
    """Rows ``selected`` of every activation of a cache (views, read as they are asked for)."""

    def __init__(self, cache: Cache, selected: slice) -> None:
        self._cache, self._selected = cache, selected

    def __getitem__(self, name: str) -> Tensor:
        return self._cache[name][self._selected]


class _CircuitForward:
    """One forward pass of several circuits over some prompts, one copy of the batch per circuit.

    As the pass reaches each upstream component, its output minus its corrupted output is written
    into one buffer (stacking at every input would copy it all); each downstream input is then
    rebuilt from the filled part.
    """

    def __init__(
        self,
        model: HookedTransformer,
        pairs: PromptPairs,
        corrupted_cache: Cache | _RowsOf,
        kept: Bool[Tensor, "circuit upstream downstream"],
    ) -> None:
        self.model, self.pairs, self.corrupted_cache = model, pairs, corrupted_cache
        self.circuits = kept.shape[0]
        self.kept = kept.to(torch.float32)
        # Upstream is the last axis, so each input's sum over kept edges is one batched matrix
        # product on a view of the filled part; with upstream first, einsum copied the whole
        # buffer per input.
        self.deltas = torch.zeros(
            self.circuits, pairs.size, pairs.clean.shape[1], model.cfg.d_model, kept.shape[1]
        )
        self.filled = 0
        self.embedded: dict[str, Tensor] = {}

    def run(self, metric: Metric) -> Float[Tensor, "circuit batch"]:
        """The metric per circuit and prompt."""
        with split_head_inputs(self.model), torch.inference_mode():
            residual = self.model.run_with_hooks(
                self.pairs.clean.repeat(self.circuits, 1),
                stop_at_layer=self.model.cfg.n_layers,
                fwd_hooks=self._hooks(),
            )
        return metric_after_last_block(self.model, residual, self.pairs, metric).reshape(
            self.circuits, self.pairs.size
        )

    def _hooks(self) -> list[tuple[str, object]]:
        """Each component's output recorded, each input rebuilt, in the order the pass runs."""
        n_layers, n_heads = self.model.cfg.n_layers, self.model.cfg.n_heads
        hooks: list[tuple[str, object]] = [
            (name, self._record_embedding) for name in embedding_hooks(self.model)
        ]
        qkv_width, mlp_column = 3 * n_heads, 3 * n_heads * n_layers
        for layer in range(n_layers):
            for offset, kind in enumerate("qkv"):
                columns = slice(layer * qkv_width + offset, (layer + 1) * qkv_width, 3)
                rebuild = partial(
                    self._rebuild, f"blocks.{layer}.hook_resid_pre", columns, per_head=True
                )
                hooks.append((f"blocks.{layer}.hook_{kind}_input", rebuild))
            hooks.append((f"blocks.{layer}.attn.hook_z", self._record_heads))
            columns = slice(mlp_column + layer, mlp_column + layer + 1)
            rebuild = partial(
                self._rebuild, f"blocks.{layer}.hook_resid_mid", columns, per_head=False
            )
            hooks.append((f"blocks.{layer}.hook_mlp_in", rebuild))
            hooks.append((f"blocks.{layer}.hook_mlp_out", self._record_mlp))
        final = f"blocks.{n_layers - 1}.hook_resid_post"
        columns = slice(mlp_column + n_layers, mlp_column + n_layers + 1)
        hooks.append((final, partial(self._rebuild, final, columns, per_head=False)))
        return hooks

    def _per_circuit(self, activation: Tensor) -> Tensor:
        """``activation`` with its rows split into [circuit, batch]."""
        return activation.reshape(self.circuits, self.pairs.size, *activation.shape[1:])

    def _append(self, values: Tensor) -> None:
        """``values``: [circuit, batch, pos, d_model, component], components in upstream order."""
        self.deltas[..., self.filled : self.filled + values.shape[-1]] = values
        self.filled += values.shape[-1]

    def _record_embedding(self, activation: Tensor, hook: HookPoint) -> Tensor:
        self.embedded[hook.name] = self._per_circuit(activation) - self.corrupted_cache[hook.name]
        if len(self.embedded) == len(embedding_hooks(self.model)):
            self._append(sum(self.embedded.values())[..., None])  # type: ignore[index]
        return activation

    def _record_heads(self, activation: Tensor, hook: HookPoint) -> Tensor:
        z = self._per_circuit(activation) - self.corrupted_cache[hook.name]
        layer = hook_layer(hook.name)
        assert layer is not None  # hook_z is inside a block
        self._append(torch.einsum("cbphd,hdm->cbpmh", z, self.model.blocks[layer].attn.W_O))
        return activation

    def _record_mlp(self, activation: Tensor, hook: HookPoint) -> Tensor:
        self._append((self._per_circuit(activation) - self.corrupted_cache[hook.name])[..., None])
        return activation

    def _rebuild(
        self,
        corrupted_name: str,
        columns: slice,
        activation: Tensor,
        hook: HookPoint,
        *,
        per_head: bool,
    ) -> Tensor:
        """The corrupted input plus the kept edges' deltas (``columns``: this input's edges)."""
        n = self.filled
        # A view: the leading axes are contiguous.
        written = self.deltas[..., :n].reshape(self.circuits, -1, n)
        added = torch.bmm(written, self.kept[:, :n, columns]).reshape(*self.deltas.shape[:4], -1)
        base = self.corrupted_cache[corrupted_name][None, :, :, None]
        added = added.movedim(-1, 3)  # [circuit, batch, pos, input, d_model]
        rebuilt = base + added if per_head else (base + added)[:, :, :, 0]
        return rebuilt.reshape(activation.shape)
