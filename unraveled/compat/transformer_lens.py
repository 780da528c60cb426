"""What unraveled relies on in TransformerLens beyond its public API; checked against 3.9.0.

Three things, each for a reason its public API has no answer to:

- Weight processing without its copies (``without_copies``). Each step of
  ``ProcessWeights`` (fold LayerNorm, centre the writing weights and the unembedding, fold the
  value biases) starts by cloning the whole state dict, then builds new tensors for what it
  changes and modifies nothing in place. Those defensive copies were a conversion's peak, well
  above the model itself. A ``CloneFreeTensor``'s ``clone()`` is itself,
  which is right only while no step edits a tensor in place: so it refuses any in-place edit,
  and a version that starts making them fails loudly instead of editing the checkpoint's
  tensors.
- LayerNorm folded step by step (``fold_layer_norm``): ``ProcessWeights.fold_layer_norm``
  folds every block, then the final norm into the unembedding, in one call; the blocks'
  checkpoint tensors it replaced are freed by then, and handing them back to the system before
  the unembedding (the largest tensor) is folded lowers a conversion's peak. Its private steps
  (``_fold_layer``, ``_fold_final_rms_bias``, ``_fold_unembed_layer_norm``) are called in its
  order, with the caller's ``between`` in between.
- The table of model names (``model_names``), read from ``supported_models.py``'s source:
  importing it imports all of TransformerLens and torch first (seconds), and resolving a
  name in the CLI must stay fast. The table must stay literal lists and dicts.

All are checked for TransformerLens 3.9.x (``CHECKED``), and the private steps' presence; any
other version stops with ``IncompatibleDependencyError`` before use.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unraveled import compat

DISTRIBUTION = "transformer-lens"
CHECKED = ((3, 9), (3, 10))  # the first release checked, and the first one not checked

_IN_PLACE_OPERATORS = {
    f"__i{op}__"
    for op in (
        "add",
        "sub",
        "mul",
        "matmul",
        "truediv",
        "floordiv",
        "mod",
        "pow",
        "and",
        "or",
        "xor",
        "lshift",
        "rshift",
    )
} | {"__setitem__"}


def check_version(relies_on: str) -> None:
    """Raise ``IncompatibleDependencyError`` unless TransformerLens is a checked version."""
    compat.require_version(DISTRIBUTION, *CHECKED, relies_on)


def without_copies(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every tensor a ``CloneFreeTensor``: processing it copies nothing.

    Raises:
        IncompatibleDependencyError: TransformerLens is not a version this was checked on.
    """
    check_version("its weight processing editing no tensor in place (to skip its copies)")
    return {key: value.as_subclass(_clone_free_tensor()) for key, value in state_dict.items()}


def plain(tensor: Any) -> Any:
    """A tensor from ``without_copies`` as an ordinary ``torch.Tensor`` again (no copy)."""
    import torch

    return tensor.as_subclass(torch.Tensor)


@functools.cache
def _clone_free_tensor() -> type:
    """``CloneFreeTensor``, defined on first use so that importing this module imports no torch."""
    import torch

    class CloneFreeTensor(torch.Tensor):
        """A tensor whose ``clone()`` is itself, and whose results are clone-free tensors too."""

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.Tensor.clone:
                return args[0]
            # An in-place edit of a "clone" would edit the tensor it came from (in the
            # transformers model, or another step's input): refuse it rather than give wrong
            # weights silently.
            name = getattr(func, "__name__", "")
            if (
                (name.endswith("_") and not name.endswith("__"))
                or name in _IN_PLACE_OPERATORS
                or (kwargs or {}).get("out") is not None
            ):
                raise RuntimeError(
                    f"weight processing edits a tensor in place ({name}), which the lean "
                    f"conversion can't allow (TransformerLens "
                    f"{compat.installed_version(DISTRIBUTION)})"
                )
            return super().__torch_function__(func, types, args, kwargs)

    return CloneFreeTensor


FOLD_STEPS = ("_fold_layer", "_fold_final_rms_bias", "_fold_unembed_layer_norm")


def fold_layer_norm(
    state_dict: dict[str, Any],
    cfg: Any,
    fold_biases: bool,
    center_weights: bool,
    between: Callable[[], None],
) -> dict[str, Any]:
    """``ProcessWeights.fold_layer_norm`` step for step, ``between()`` before the unembedding.

    For TransformerLens's own layout (no adapter); ``between`` is called once the blocks and the
    final norm's bias are folded, before the final norm is folded into the unembedding.

    Raises:
        IncompatibleDependencyError: TransformerLens is not a version this was checked on, or
            lacks one of its steps.
    """
    from transformer_lens.weight_processing import ProcessWeights

    relies_on = f"the steps of ProcessWeights.fold_layer_norm ({', '.join(FOLD_STEPS)})"
    check_version(relies_on)
    fold_layer, fold_final_rms_bias, fold_unembed = (
        _step(ProcessWeights, name, relies_on) for name in FOLD_STEPS
    )
    gqa = "" if getattr(cfg, "n_key_value_heads", None) is None else "_"
    for layer in range(cfg.n_layers):
        state_dict = fold_layer(state_dict, cfg, layer, fold_biases, center_weights, None, gqa)
    state_dict = fold_final_rms_bias(state_dict, cfg, fold_biases, None)
    between()
    return fold_unembed(state_dict, cfg, fold_biases, center_weights, None)  # type: ignore[no-any-return]


def _step(owner: type, name: str, relies_on: str) -> Callable[..., Any]:
    step = getattr(owner, name, None)
    if not callable(step):
        raise compat.missing(DISTRIBUTION, f"{owner.__name__}.{name}", relies_on)
    return step


@functools.cache
def model_names() -> dict[str, str]:
    """TransformerLens's model names and aliases (lower case) mapped to official names.

    The same mapping as ``loading_from_pretrained.make_model_alias_map``, without importing
    TransformerLens; empty when it is not installed.

    Raises:
        IncompatibleDependencyError: TransformerLens is not a version this was checked on, or its
            table is not where, or not what, it was.
    """
    spec = importlib.util.find_spec("transformer_lens")
    if spec is None or not spec.submodule_search_locations:
        return {}
    relies_on = "its model-name table, supported_models.py, read without importing it"
    check_version(relies_on)
    path = Path(next(iter(spec.submodule_search_locations))) / "supported_models.py"
    try:
        table = _literal_assignments(path.read_text(encoding="utf-8"))
        official_names, aliases = table["OFFICIAL_MODEL_NAMES"], table["MODEL_ALIASES"]
    except (OSError, KeyError, ValueError, SyntaxError) as error:
        raise compat.missing(
            DISTRIBUTION, f"literal OFFICIAL_MODEL_NAMES and MODEL_ALIASES in {path}", relies_on
        ) from error
    names: dict[str, str] = {}
    for official in official_names:
        for alias in aliases.get(official, []):
            names[alias.lower()] = official
        names[official.lower()] = official
    return names


def _literal_assignments(source: str) -> dict[str, Any]:
    """The module-level assignments of literal values in ``source``, by name, never executed."""
    values: dict[str, Any] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                try:
                    values[target.id] = ast.literal_eval(value)
                except ValueError:
                    continue  # not a literal: a name the table must not need
    return values
