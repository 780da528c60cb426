"""Store the weights TransformerLens rearranges at every forward pass already rearranged.

TransformerLens keeps its weights in the shapes interpretability reads (``W_Q``: head, d_model,
d_head; ``W_U``: d_model, d_vocab) and, in its forward pass, hands ``F.linear`` a transposed copy:
``W_U.T.contiguous()``, ``rearrange(W_Q, "h m d -> (h d) m")``, ``rearrange(W_O, "h d m -> m (h
d)").contiguous()``. That copies nearly every weight of the model at every forward pass: time,
and, when gradients flow, memory (autograd keeps each copy until the backward pass).

``store_rearranged`` gives those parameters the memory layout of the rearranged form. Their shapes
and values are unchanged (``model.W_Q`` reads as before); the rearrangement in the forward pass
becomes a view, and ``contiguous()`` returns it without copying. ``F.linear`` then receives the
same values in the same layout as before, so outputs are bit-identical.
"""

from __future__ import annotations

import torch
from torch import nn
from transformer_lens import HookedTransformer
from transformer_lens.components import GatedMLP, Unembed
from transformer_lens.components.abstract_attention import AbstractAttention

# Per module kind: parameter name -> the permutation TransformerLens applies before F.linear.
_REARRANGED: list[tuple[type[nn.Module], dict[str, tuple[int, ...]]]] = [
    (GatedMLP, {"W_gate": (1, 0), "W_in": (1, 0), "W_out": (1, 0)}),
    (Unembed, {"W_U": (1, 0)}),
    # Grouped-query attention reads its own key and value weights as _W_K and _W_V.
    (
        AbstractAttention,
        {
            "W_Q": (0, 2, 1),
            "W_K": (0, 2, 1),
            "W_V": (0, 2, 1),
            "_W_K": (0, 2, 1),
            "_W_V": (0, 2, 1),
            "W_O": (2, 0, 1),
        },
    ),
]


def inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes ``order``."""
    return tuple(sorted(range(len(order)), key=order.__getitem__))


def memory_order(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """The permutation under which ``tensor`` is contiguous, or None when none makes it so.

    The permutation lists its dimensions from the outermost in memory; None for a strided view
    or an expanded tensor.
    """
    order = tuple(sorted(range(tensor.dim()), key=lambda dim: -tensor.stride(dim)))
    return order if tensor.permute(order).is_contiguous() else None


def fills_its_storage(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is the whole of its storage, element for element, in some memory order.

    That is, not a view into a larger tensor (it may share the storage with an equal view, as a
    tied unembedding does with its embedding).
    """
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return whole and tensor.storage_offset() == 0 and memory_order(tensor) is not None


def store_rearranged(model: HookedTransformer) -> HookedTransformer:
    """Re-store ``model``'s rearranged weights in place (see the module docstring); returns it.

    Weights already stored that way (read from the converted-weights cache, or left so by weight
    processing, as the folded unembedding is) are not copied.
    """
    with torch.no_grad():
        for module in model.modules():
            for kind, orders in _REARRANGED:
                if not isinstance(module, kind):
                    continue
                for name, order in orders.items():
                    parameter = dict(module.named_parameters(recurse=False)).get(name)
                    if (
                        parameter is None
                        or parameter.dim() != len(order)
                        or parameter.permute(order).is_contiguous()
                    ):
                        continue
                    parameter.data = (
                        parameter.data.permute(order).contiguous().permute(inverse(order))
                    )
    return model


def share_tied_unembedding(model: HookedTransformer) -> None:
    """Make ``W_U`` a view of ``W_E`` when the checkpoint ties them and its weights are raw.

    TransformerLens gives the unembedding a copy of its own, even where the checkpoint ties it to
    the embedding (GPT-2, SmolLM2): 0.15 GB for GPT-2 small. Processing (LayerNorm folded into
    ``W_U``, both centred) makes them differ; raw weights keep them equal, and then one storage
    serves both, as in the checkpoint: an in-place edit of one is an edit of the other.
    """
    embedding, unembedding = model.embed.W_E, model.unembed.W_U
    if unembedding.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr():
        return  # tied already: converted from the tied checkpoint, or read from the cache
    if (
        embedding.shape != unembedding.T.shape
        or embedding.dtype != unembedding.dtype
        or not torch.equal(embedding, unembedding.T)
    ):
        return
    unembedding.data = embedding.data.T
