"""The interventions: add a vector to an activation, or replace the activation by a value.

Both act at every position from ``from_position`` on (0: every position), at one hook point:
``blocks.{layer}.hook_resid_pre`` by default, or any hook point named. A position is the token's
index in the whole sequence, prompt and generated tokens alike (BOS, when prepended, is 0).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from jaxtyping import Float

from unraveled.errors import ParamError
from unraveled.experiment import RESOLVE_ANNOTATIONS
from unraveled.interventions.base import HookFunction, Intervention, Positions

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:
    from torch import Tensor
    from transformer_lens import HookedTransformer

# Hook points whose activations are [batch, pos, d_model]: a vector for them has d_model entries.
_RESIDUAL_WIDTH_SUFFIXES = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
)


def _hook_point(layer: int | None, hook_name: str | None) -> str:
    if (layer is None) == (hook_name is None):
        raise ParamError("layer", "give exactly one of layer (for its hook_resid_pre) or hook_name")
    return hook_name if hook_name is not None else f"blocks.{layer}.hook_resid_pre"


def _check_layer(model: HookedTransformer, layer: int | None) -> None:
    n_layers = model.cfg.n_layers
    if layer is not None and not 0 <= layer < n_layers:
        raise ParamError(
            "layer",
            f"{layer} is out of range: the model has {n_layers} layers (use 0..{n_layers - 1})",
        )


def _check_from_position(from_position: int) -> None:
    if from_position < 0:
        raise ParamError("from_position", f"{from_position}: expected a position >= 0")


def _check_vector(model: HookedTransformer, hook_name: str, vector: Tensor, field: str) -> None:
    import torch

    if not bool(torch.isfinite(vector).all()):
        raise ParamError(field, "has entries that are not finite (nan or inf)")
    if hook_name.endswith(_RESIDUAL_WIDTH_SUFFIXES) and tuple(vector.shape) != (model.cfg.d_model,):
        raise ParamError(
            field,
            f"has shape {tuple(vector.shape)}; {hook_name} is d_model = {model.cfg.d_model} wide",
        )


# Hook points whose sequence-position axis is known. Attention patterns and scores are
# [batch, head, query, key]: a token's position there is its query (axis 2); every other hook
# point named here is [batch, pos, ...] (hook_z/q/k/v are [batch, pos, head, d_head]).
_QUERY_AXIS_SUFFIXES = ("attn.hook_pattern", "attn.hook_attn_scores")
_POSITION_AXIS_1_SUFFIXES = (
    *_RESIDUAL_WIDTH_SUFFIXES,
    "hook_embed",
    "hook_pos_embed",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_z",
    "attn.hook_result",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_q_input",
    "hook_k_input",
    "hook_v_input",
    "hook_attn_in",
    "hook_mlp_in",
)


def position_axis(hook_name: str) -> int | None:
    """The sequence-position axis of the hook point's activation; None when not known."""
    if hook_name.endswith(_QUERY_AXIS_SUFFIXES):
        return 2
    if hook_name.endswith(_POSITION_AXIS_1_SUFFIXES):
        return 1
    return None


def _check_position_axis(hook_name: str, from_position: int) -> None:
    if from_position > 0 and position_axis(hook_name) is None:
        raise ParamError(
            "from_position",
            f"{from_position}: {hook_name} has no known position axis, so a position can't be "
            "told apart there; use from_position 0 or a residual, attention or MLP hook point",
        )


def _check_value_shape(model: HookedTransformer, hook_name: str, value: Tensor) -> None:
    """The value broadcasts to the hook point's activation at every sequence length.

    The activation is read from forward passes on 2 and on 3 tokens: an axis whose size differs
    between them is a position axis (query and key, for an attention pattern), where the value
    must have size 1 or no axis, since the prompts it will replace have any length.
    """
    import torch

    shapes = []
    for n_tokens in (2, 3):
        probe = torch.zeros((1, n_tokens), dtype=torch.long, device=model.cfg.device)
        with torch.inference_mode():
            _, cache = model.run_with_cache(probe, names_filter=[hook_name])
        shapes.append(tuple(cache[hook_name].shape))
    # Size 1 on the batch and position axes: what a value must broadcast to.
    on_two, on_three = shapes
    every_length = tuple(
        1 if axis == 0 or two != three else two
        for axis, (two, three) in enumerate(zip(on_two, on_three, strict=True))
    )
    try:
        fits = torch.broadcast_shapes(tuple(value.shape), every_length) == every_length
    except RuntimeError:
        fits = False
    if not fits:
        expected = list(every_length[1:])
        while expected and expected[0] == 1:
            expected.pop(0)
        raise ParamError(
            "value",
            f"has shape {tuple(value.shape)}, which does not broadcast to {hook_name}'s "
            f"activation at every sequence length (shape {on_two} on 2 tokens, {on_three} "
            f"on 3); expected a shape that broadcasts to {tuple(expected)}, with size 1 on the "
            "position axes (e.g. a mean over positions)",
        )


def _from_position_on(
    activation: Tensor,
    positions: Positions,
    from_position: int,
    edit: HookFunction,
    axis: int,
) -> Tensor:
    """``edit`` applied to the activation's positions (along ``axis``) from ``from_position`` on."""
    import torch

    start = from_position - positions.offset
    if start <= 0:
        return edit(activation)
    if start >= activation.shape[axis]:
        return activation
    before, after = activation.split([start, activation.shape[axis] - start], dim=axis)
    return torch.cat([before, edit(after)], dim=axis)


def _positioned_hook(
    positions: Positions, from_position: int, edit: HookFunction, axis: int
) -> HookFunction:
    """A hook applying ``edit`` from ``from_position`` on, refusing passes it can't position."""
    previous_length = 0

    def hook(activation: Tensor, hook: object) -> Tensor:
        nonlocal previous_length
        length = activation.shape[axis]
        # Untracked, a 1-token pass after a longer one is a key-value-cached generation step
        # (TransformerLens's model.generate): its token is at an unknown position, not at 0.
        if from_position > 0 and not positions.tracked and length == 1 and previous_length > 1:
            raise ParamError(
                "from_position",
                f"{from_position}: a 1-token forward pass followed a {previous_length}-token one, "
                "as in a cached generation step, whose position the hook can't know; generate "
                "with unraveled.interventions.generate, or model.generate(..., "
                "use_past_kv_cache=False)",
            )
        previous_length = length
        return _from_position_on(activation, positions, from_position, edit, axis)

    return hook


class _OneHookPointFromPosition(Intervention):
    """An edit at one hook point, from a sequence position on: what AddVector and Ablate share.

    Subclasses check their own tensor in ``validate`` (after this one's checks) and build their
    hooks with ``_edit_hooks``.
    """

    def __init__(self, layer: int | None, hook_name: str | None, from_position: int) -> None:
        """Keep the hook point (``layer``'s hook_resid_pre, or ``hook_name``) and the position."""
        _check_from_position(from_position)
        self.hook_name = _hook_point(layer, hook_name)
        self.layer = layer
        self.from_position = from_position

    @property
    def hook_names(self) -> tuple[str, ...]:
        """The one hook point it edits."""
        return (self.hook_name,)

    @property
    def position_dependent(self) -> bool:
        """True when it starts after position 0."""
        return self.from_position > 0

    def validate(self, model: HookedTransformer) -> None:
        """The layer is in range, the hook point exists and has a position axis if one is needed."""
        _check_layer(model, self.layer)
        super().validate(model)
        _check_position_axis(self.hook_name, self.from_position)

    def _edit_hooks(
        self, positions: Positions, edit: HookFunction
    ) -> list[tuple[str, HookFunction]]:
        """One hook applying ``edit`` to the activation from ``from_position`` on."""
        axis = position_axis(self.hook_name) or 1
        return [(self.hook_name, _positioned_hook(positions, self.from_position, edit, axis))]


class AddVector(_OneHookPointFromPosition):
    """Add ``coefficient * vector`` to an activation (activation addition, steering).

    Args:
        vector: The direction, as wide as the activation's last axis (``d_model`` for the
            residual stream).
        layer: Add at ``blocks.{layer}.hook_resid_pre``; or give ``hook_name`` instead.
        coefficient: The multiple of ``vector`` added; must be finite.
        hook_name: Any hook point, instead of ``layer``.
        from_position: Add at this sequence position and every later one (0: all positions).

    Raises:
        ParamError: A coefficient that is not finite, a negative position, a later position at
            a hook point with no known position axis, or neither or both of layer and hook_name.
    """

    def __init__(
        self,
        vector: Float[Tensor, " d"],
        layer: int | None = None,
        coefficient: float = 1.0,
        *,
        hook_name: str | None = None,
        from_position: int = 0,
    ) -> None:
        """Keep the vector and where it goes; checked against a model by ``validate``."""
        if not math.isfinite(coefficient):
            raise ParamError("coefficient", f"{coefficient}: expected a finite number")
        super().__init__(layer, hook_name, from_position)
        self.vector = vector
        self.coefficient = float(coefficient)

    def __repr__(self) -> str:
        """Where it hooks, with what coefficient and from which position."""
        return (
            f"AddVector({self.hook_name}, coefficient={self.coefficient}, "
            f"from_position={self.from_position}, |vector|={float(self.vector.norm()):.3g})"
        )

    def validate(self, model: HookedTransformer) -> None:
        """The hook point's checks, and the vector is finite and fits."""
        super().validate(model)
        _check_vector(model, self.hook_name, self.vector, "vector")

    def hooks(
        self, model: HookedTransformer, positions: Positions
    ) -> list[tuple[str, HookFunction]]:
        """One hook adding the scaled vector from ``from_position`` on."""
        delta = (self.coefficient * self.vector.detach().double()).to(
            device=model.cfg.device, dtype=model.cfg.dtype
        )

        def add(activation: Tensor) -> Tensor:
            return activation + delta

        return self._edit_hooks(positions, add)


class Ablate(_OneHookPointFromPosition):
    """Replace an activation by zero, or by a fixed ``value`` (e.g. its mean over a dataset).

    Args:
        layer: Ablate ``blocks.{layer}.hook_resid_pre``; or give ``hook_name`` instead.
        hook_name: Any hook point, instead of ``layer``.
        value: What the activation becomes, broadcast over batch and positions, so it has no
            position axis or size 1 there (``(n_heads, 1, 1)`` at an attention pattern); zero
            if None.
        from_position: Ablate this sequence position and every later one (0: all positions).
    """

    def __init__(
        self,
        layer: int | None = None,
        *,
        hook_name: str | None = None,
        value: Float[Tensor, "*shape"] | None = None,
        from_position: int = 0,
    ) -> None:
        """Keep where it goes and the value; checked against a model by ``validate``."""
        super().__init__(layer, hook_name, from_position)
        self.value = value

    def validate(self, model: HookedTransformer) -> None:
        """The hook point's checks, and a value is finite and fits."""
        super().validate(model)
        if self.value is not None:
            _check_vector(model, self.hook_name, self.value, "value")
            _check_value_shape(model, self.hook_name, self.value)

    def hooks(
        self, model: HookedTransformer, positions: Positions
    ) -> list[tuple[str, HookFunction]]:
        """One hook replacing the activation from ``from_position`` on."""
        import torch

        value = (
            None
            if self.value is None
            else self.value.detach().to(device=model.cfg.device, dtype=model.cfg.dtype)
        )

        def replace(activation: Tensor) -> Tensor:
            if value is None:
                return torch.zeros_like(activation)
            return value.expand_as(activation).clone()

        return self._edit_hooks(positions, replace)
