"""What an intervention is, and the context manager that puts interventions on a model.

An intervention is one object that knows where it hooks (``hook_names``), what its hooks do
(``hooks``) and what a model must have for it to apply (``validate``). ``intervening`` installs
any number of them through TransformerLens's own ``model.hooks`` context, which removes them on
the way out, also when the body raises.

Positions: a hook sees the activations of one forward pass. Without a key-value cache, position
0 of those activations is the sequence's position 0; with one, a generation step's forward pass
holds only the new token, at the sequence's position ``offset``. ``Positions`` carries that
offset to position-dependent interventions; ``unraveled.interventions.generate`` sets it before
every step. Under a plain ``intervening`` block it stays 0, which is right for any forward pass
that starts at the sequence's first token (``model(tokens)``, ``run_with_cache``,
``model.generate(..., use_past_kv_cache=False)``). A position-dependent hook that, untracked, sees
a 1-token pass right after a longer one (a cached step of TransformerLens's ``model.generate``)
raises rather than silently leave the step unsteered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unraveled.errors import ParamError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

HookFunction = Callable[..., Any]


@dataclass
class Positions:
    """The sequence position of the first activation a hook sees in the current forward pass.

    Attributes:
        offset: That position.
        tracked: True when a generation loop sets ``offset`` before each step (unraveled's
            ``generate``); False under a plain block, where every pass is taken to start at 0.
    """

    offset: int = 0
    tracked: bool = False


class Intervention(ABC):
    """One change to a model's forward pass, made by hooks at named hook points.

    Subclasses say where they hook, check the model can take them, and build their hook
    functions; ``intervening`` does the rest.
    """

    @property
    @abstractmethod
    def hook_names(self) -> tuple[str, ...]:
        """The hook points this intervention hooks (``blocks.3.hook_resid_pre``...)."""

    def validate(self, model: HookedTransformer) -> None:
        """Check that ``model`` has every hook point this intervention hooks.

        Subclasses extend it with their own checks (a vector's width, a position).

        Raises:
            ParamError: Naming the field at fault and what the model can take.
        """
        for name in self.hook_names:
            if name not in model.hook_dict:
                raise ParamError(
                    "hook_name",
                    f"{name!r} is not a hook point of this model "
                    f"({model.cfg.n_layers} layers; e.g. 'blocks.0.hook_resid_pre')",
                )

    @property
    def position_dependent(self) -> bool:
        """Whether the hook's effect depends on the sequence position (needs ``Positions``)."""
        return False

    @abstractmethod
    def hooks(
        self, model: HookedTransformer, positions: Positions
    ) -> list[tuple[str, HookFunction]]:
        """The ``(hook name, hook function)`` pairs, ready for ``model.hooks(fwd_hooks=...)``.

        Args:
            model: The model, already validated (the hooks may keep tensors on its device).
            positions: Where the current forward pass starts in the sequence.
        """


@contextmanager
def intervening(
    model: HookedTransformer, *interventions: Intervention, positions: Positions | None = None
) -> Iterator[Positions]:
    """Apply ``interventions`` to every forward pass of ``model`` inside the block.

    Every intervention is validated before any hook is added. On the way out, also when the body
    raises, the hooks added here are removed (TransformerLens's ``model.hooks`` context, which
    leaves hooks added elsewhere alone).

    Example:
        >>> with intervening(model, AddVector(vector, layer=6, coefficient=4.0)):
        ...     logits = model(tokens)

    Args:
        model: The model.
        *interventions: The interventions, applied in order at each hook point.
        positions: The position tracker the hooks read; a fresh one (offset 0) when None.

    Yields:
        The position tracker (``generate`` advances it between steps).

    Raises:
        ParamError: An intervention the model can't take.
    """
    for intervention in interventions:
        intervention.validate(model)
    positions = positions if positions is not None else Positions()
    fwd_hooks = [
        pair for intervention in interventions for pair in intervention.hooks(model, positions)
    ]
    with model.hooks(fwd_hooks=fwd_hooks):
        yield positions
