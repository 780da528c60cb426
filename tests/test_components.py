"""Component names: each written form read back to the same component, and bad names refused
with the name and what was expected."""

from __future__ import annotations

import pytest
from transformer_lens import HookedTransformer

from unraveled.components import HeadComponent, MLPComponent, parse_component
from unraveled.heads import top_heads
from unraveled.patching import component_patches, downstream_names, upstream_names


@pytest.mark.parametrize(
    ("name", "component"),
    [
        ("embed", "embed"),
        ("logits", "logits"),
        ("m0", MLPComponent(0)),
        ("m11", MLPComponent(11)),
        ("0.0", HeadComponent(0, 0)),
        ("9.6", HeadComponent(9, 6)),
        ("10.11.q", HeadComponent(10, 11, "q")),
        ("3.2.k", HeadComponent(3, 2, "k")),
        ("0.1.v", HeadComponent(0, 1, "v")),
    ],
)
def test_names_read_and_write_back(name: str, component: object) -> None:
    assert parse_component(name) == component
    assert str(component) == name


def test_a_head_input_belongs_to_its_head() -> None:
    assert HeadComponent.parse("9.6.q").whole_head == HeadComponent.parse("9.6")


def test_every_edge_end_of_a_model_round_trips(tiny_gpt2_or_llama: HookedTransformer) -> None:
    names = [*upstream_names(tiny_gpt2_or_llama), *downstream_names(tiny_gpt2_or_llama)]
    assert [str(parse_component(name)) for name in names] == names
    heads = [parse_component(name) for name in names if "." in name]
    assert {(head.layer, head.head) for head in heads} == {  # type: ignore[union-attr]
        (layer, head)
        for layer in range(tiny_gpt2_or_llama.cfg.n_layers)
        for head in range(tiny_gpt2_or_llama.cfg.n_heads)
    }


def test_top_heads_are_named_as_heads() -> None:
    import numpy as np

    scores = np.arange(12.0).reshape(3, 4)  # layer 2, head 3 scores highest
    assert [HeadComponent.parse(str(entry["head"])) for entry in top_heads(scores, 2)] == [
        HeadComponent(2, 3),
        HeadComponent(2, 2),
    ]


@pytest.mark.parametrize(
    "name", ["", "9", "9.", "9.6.x", "9.6.q.k", "m", "mx", "a.b", " 9.6", "-1.2"]
)
def test_bad_names_are_refused_naming_what_was_expected(name: str) -> None:
    with pytest.raises(ValueError, match="expected 'embed', 'logits', 'mL'") as refused:
        parse_component(name)
    assert repr(name) in str(refused.value)


@pytest.mark.parametrize("name", ["m3", "embed", "9.6.q.k", "9"])
def test_a_head_name_is_refused_where_a_head_is_needed(name: str) -> None:
    with pytest.raises(ValueError, match=r"is not a head: expected 'layer.head'"):
        HeadComponent.parse(name)


def test_only_components_with_an_output_can_be_patched_whole(
    tiny_gpt2_or_llama: HookedTransformer,
) -> None:
    assert [patch.hook for patch in component_patches("m1", tiny_gpt2_or_llama)] == [
        "blocks.1.hook_mlp_out"
    ]
    (head,) = component_patches("1.2", tiny_gpt2_or_llama)
    assert (head.hook, head.head) == ("blocks.1.attn.hook_z", 2)
    for name in ("1.2.q", "logits"):
        with pytest.raises(ValueError, match="writes nothing to the residual stream"):
            component_patches(name, tiny_gpt2_or_llama)
    with pytest.raises(ValueError, match="names no component"):
        component_patches("head 1.2", tiny_gpt2_or_llama)
