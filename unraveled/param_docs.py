"""An experiment's params as a reader wants them: name, type, default, bounds, description.

Read from the experiment's own pydantic ``Params`` class, the schema that validates YAML configs
and Python keyword arguments, so what ``unraveled params NAME`` prints can't drift from what is
accepted. Nested params (``ioi`` of the patching experiments) are expanded as ``ioi.n_pairs``.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema

from unraveled.experiment import DEFAULT_MAX_PROMPT_TOKENS, ModelBound

_BOUNDS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.MinLen, "min_length", "min_length"),
    (annotated_types.MaxLen, "max_length", "max_length"),
)
_MODEL_BOUND = {
    "prompt": "a prompt: at most {max_prompt_tokens} tokens (BOS included) and the model's context",
    "single_token": "one token of the model's tokenizer",
    "head": "a head index the model has",
    "layer": "a layer index the model has",
}
_LONG_DEFAULT = 60
PYTHON_ONLY = "Python only: a config or --set can't give it"


@dataclass(frozen=True)
class ParamDoc:
    """One param (or a nested param, ``ioi.n_pairs``) as ``unraveled params`` shows it."""

    name: str
    type: str
    default: str
    bounds: str
    description: str


def _type_text(annotation: Any) -> str:
    """``annotation`` as written in Python, markers and constraints left out."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _type_text(typing.get_args(annotation)[0])
    if annotation is type(None):
        return "None"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:  # the choices are listed with the bounds
        return " | ".join(dict.fromkeys(type(arg).__name__ for arg in args))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(arg) for arg in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_text(arg) for arg in args)}]" if args else name
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _constraints(metadata: list[Any], max_prompt_tokens: int) -> list[str]:
    """The bounds and model checks among a field's (or an item's) metadata."""
    found = []
    for item in metadata:
        if isinstance(item, FieldInfo):  # Field(...) inside Annotated, for a list's items
            found.extend(_constraints(item.metadata, max_prompt_tokens))
        elif isinstance(item, ModelBound):
            found.append(_MODEL_BOUND[item.kind].format(max_prompt_tokens=max_prompt_tokens))
        for kind, attribute, symbol in _BOUNDS:
            if isinstance(item, kind):
                found.append(f"{symbol} {getattr(item, attribute)}")
    return found


def _item_constraints(annotation: Any, max_prompt_tokens: int) -> list[str]:
    """Bounds on a list's items (``list[Prompt]``): each one's constraints."""
    found = []
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is typing.Annotated:
            found.extend(_constraints(list(typing.get_args(arg)[1:]), max_prompt_tokens))
        elif typing.get_args(arg):
            found.extend(_item_constraints(arg, max_prompt_tokens))
    return found


def _python_only(info: FieldInfo) -> bool:
    """Left out of the config schema (a Python callable, such as a metric of your own)."""
    return any(isinstance(item, SkipJsonSchema) for item in info.metadata)


def _choices(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Annotated:
        return _choices(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return [choice for arg in typing.get_args(annotation) for choice in _choices(arg)]


def _default_text(info: FieldInfo, parent_default: BaseModel | None, name: str) -> str:
    # A nested field's default is its parent's default's value: the parent's default may set it
    # (SteeringParams.vector's prompts) or differ from the nested class's own (its sampling).
    if parent_default is not None:
        value = getattr(parent_default, name)
    elif info.is_required():
        return "(required)"
    else:
        value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(below)"
    text = repr(value)
    return text if len(text) <= _LONG_DEFAULT else text[: _LONG_DEFAULT - 1] + "…"


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def describe_params(
    params: type[BaseModel],
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
    prefix: str = "",
    parent_default: BaseModel | None = None,
) -> list[ParamDoc]:
    """Every field of ``params`` in declaration order, nested models' fields after their own row.

    Args:
        params: An experiment's ``Params`` class (or a nested one).
        max_prompt_tokens: The experiment's cap on a prompt's tokens (``Experiment``'s).
        prefix: Put before each name (``ioi.`` for the fields of a nested ``ioi`` block).
        parent_default: For a nested block, its parent field's default value, where the defaults
            shown come from; None for the top level or a parent field without a default.

    Returns:
        One ``ParamDoc`` per field, nested fields named ``parent.child``.
    """
    docs = []
    for name, info in params.model_fields.items():
        bounds = _constraints(info.metadata, max_prompt_tokens)
        item_bounds = _item_constraints(info.annotation, max_prompt_tokens)
        if item_bounds:
            bounds.append("each item: " + ", ".join(item_bounds))
        choices = _choices(info.annotation)
        if choices:
            bounds.insert(0, "one of " + ", ".join(repr(choice) for choice in choices))
        if _python_only(info):
            bounds.insert(0, PYTHON_ONLY)
        docs.append(
            ParamDoc(
                name=prefix + name,
                type=_type_text(info.annotation),
                default=_default_text(info, parent_default, name),
                bounds="; ".join(bounds),
                description=" ".join((info.description or "").split()),
            )
        )
        nested = _nested_model(info.annotation)
        if nested is not None:
            if parent_default is not None:
                default = getattr(parent_default, name)
            elif info.is_required():
                default = None
            else:
                default = info.get_default(call_default_factory=True)
            docs.extend(
                describe_params(
                    nested,
                    max_prompt_tokens,
                    f"{prefix}{name}.",
                    default if isinstance(default, nested) else None,
                )
            )
    return docs
