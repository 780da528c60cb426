"""Component names: how heads, head inputs, MLPs, the embeddings and the logits are written.

Metrics, figures and the patching core name a model's components by short strings: ``"9.6"`` is
head 6 of layer 9, ``"9.6.q"`` that head's query input (``k``, ``v`` for its key and value
inputs), ``"m3"`` the MLP of layer 3, ``"embed"`` the embeddings and ``"logits"`` the unembedding's
input. ``parse_component`` reads any of them and ``str`` writes them back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

HeadInput = Literal["q", "k", "v"]
EMBEDDINGS = "embed"
LOGITS = "logits"

_HEAD = re.compile(r"(\d+)\.(\d+)(?:\.([qkv]))?")
_MLP = re.compile(r"m(\d+)")


@dataclass(frozen=True)
class HeadComponent:
    """One attention head, or one of its query, key and value inputs.

    Attributes:
        layer: The head's layer.
        head: The head's index in its layer.
        input: ``"q"``, ``"k"`` or ``"v"`` for one of the head's inputs; None for the head itself.
    """

    layer: int
    head: int
    input: HeadInput | None = None

    def __str__(self) -> str:
        """``L.H``, or ``L.H.q`` (``k``, ``v``) for an input."""
        return f"{self.layer}.{self.head}" + (f".{self.input}" if self.input else "")

    @property
    def whole_head(self) -> HeadComponent:
        """The head itself (this input's head)."""
        return HeadComponent(self.layer, self.head)

    @classmethod
    def parse(cls, name: str) -> HeadComponent:
        """Read ``L.H`` or ``L.H.q`` (``k``, ``v``).

        Raises:
            ValueError: ``name`` is not a head's name.
        """
        found = _HEAD.fullmatch(name)
        if found is None:
            raise ValueError(
                f"{name!r} is not a head: expected 'layer.head' such as '9.6', or "
                "'layer.head.q' (or .k, .v) for one of its inputs"
            )
        layer, head, head_input = found.groups()
        return cls(int(layer), int(head), cast("HeadInput | None", head_input))


@dataclass(frozen=True)
class MLPComponent:
    """One layer's MLP, written ``mL``.

    Attributes:
        layer: The MLP's layer.
    """

    layer: int

    def __str__(self) -> str:
        """``mL``."""
        return f"m{self.layer}"


Component = HeadComponent | MLPComponent | Literal["embed", "logits"]
"""Any component an edge can start or end at."""


def parse_component(name: str) -> Component:
    """Read ``embed``, ``logits``, ``mL``, ``L.H`` or ``L.H.q`` (``k``, ``v``).

    Raises:
        ValueError: ``name`` names no component.
    """
    if name in (EMBEDDINGS, LOGITS):
        return cast("Literal['embed', 'logits']", name)
    found = _MLP.fullmatch(name)
    if found is not None:
        return MLPComponent(int(found.group(1)))
    if _HEAD.fullmatch(name) is None:
        raise ValueError(
            f"{name!r} names no component: expected 'embed', 'logits', 'mL' for the MLP of layer "
            "L, 'L.H' for head H of layer L, or 'L.H.q' (or .k, .v) for one of its inputs"
        )
    return HeadComponent.parse(name)
