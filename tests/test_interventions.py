"""Interventions, generation under hooks and steering vectors, against independent computations
on the tiny models: hand-written hooks, run_with_cache, TransformerLens's own generate and
torch's KL."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from unraveled.errors import ParamError
from unraveled.interventions import (
    Ablate,
    AddVector,
    Intervention,
    contrastive_vector,
    generate,
    intervening,
    kl_per_position,
    next_token_log_probs,
    steer,
    target_log_prob,
)

PROMPT = "When Mary and John went to the store"
POSITIVE = ["I love this, it is", "What a wonderful day"]
NEGATIVE = ["I hate this", "What a terrible day, I feel"]


def _hooked(model: Any) -> list[str]:
    return [name for name, point in model.hook_dict.items() if point.fwd_hooks or point.bwd_hooks]


def _random_vector(model: Any, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(model.cfg.d_model, generator=generator)


class _FailsAtStep(Intervention):
    """Raises on its hook's ``fail_at``-th call: generation stops halfway."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.calls = fail_at, 0

    @property
    def hook_names(self) -> tuple[str, ...]:
        return ("blocks.1.hook_resid_pre",)

    def hooks(self, model: Any, positions: Any) -> list[tuple[str, Any]]:
        def hook(activation: torch.Tensor, hook: object) -> torch.Tensor:
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("boom")
            return activation

        return [(self.hook_names[0], hook)]


def test_hooks_are_removed_when_the_body_raises(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    vector = _random_vector(model)
    with pytest.raises(RuntimeError, match="inside"):
        with intervening(
            model, AddVector(vector, 0, 2.0), Ablate(hook_name="blocks.1.hook_mlp_out")
        ):
            assert set(_hooked(model)) == {"blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"}
            raise RuntimeError("inside")
    assert _hooked(model) == []
    with pytest.raises(RuntimeError, match="inside"):
        with steer(model, vector, 1, 3.0):
            assert _hooked(model) == ["blocks.1.hook_resid_pre"]
            raise RuntimeError("inside")
    assert _hooked(model) == []
    failing = _FailsAtStep(fail_at=3)
    with pytest.raises(RuntimeError, match="boom"):
        generate(model, PROMPT, 6, [AddVector(vector, 0, 1.0), failing])
    assert failing.calls == 3 and _hooked(model) == []


def test_hooks_added_elsewhere_are_left_alone(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    model.add_hook("blocks.0.hook_resid_post", lambda activation, hook: activation)
    try:
        with steer(model, _random_vector(model), 1, 1.0):
            pass
        assert _hooked(model) == ["blocks.0.hook_resid_post"]
    finally:
        model.reset_hooks()


def test_a_bad_intervention_adds_no_hook(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    good = AddVector(_random_vector(model), 0, 1.0)
    with pytest.raises(ParamError, match="layer") as caught:
        with intervening(model, good, AddVector(_random_vector(model), 5, 1.0)):
            pass
    assert caught.value.field == "layer" and "2 layers" in str(caught.value)
    assert _hooked(model) == []


@pytest.mark.parametrize("from_position", [0, 3, 6])
def test_addition_equals_a_hand_written_hook(tiny_gpt2_or_llama: Any, from_position: int) -> None:
    model = tiny_gpt2_or_llama
    vector, coefficient = _random_vector(model), 2.5
    tokens = model.to_tokens(PROMPT)

    def add_by_hand(activation: torch.Tensor, hook: object) -> torch.Tensor:
        activation = activation.clone()
        activation[:, from_position:] += coefficient * vector
        return activation

    with torch.inference_mode():
        expected = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.hook_resid_pre", add_by_hand)]
        )
        plain = model(tokens)
        with intervening(model, AddVector(vector, 1, coefficient, from_position=from_position)):
            steered = model(tokens)
    torch.testing.assert_close(steered, expected)
    assert not torch.allclose(steered, plain)
    torch.testing.assert_close(steered[:, :from_position], plain[:, :from_position])


def test_ablation_equals_a_hand_written_hook(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    tokens = model.to_tokens(PROMPT)
    value = _random_vector(model, seed=3)

    def by_hand(activation: torch.Tensor, hook: object) -> torch.Tensor:
        activation = activation.clone()
        activation[:, 4:] = value
        return activation

    with torch.inference_mode():
        expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", by_hand)])
        with intervening(
            model, Ablate(hook_name="blocks.0.hook_mlp_out", value=value, from_position=4)
        ):
            ablated = model(tokens)
    torch.testing.assert_close(ablated, expected)


@pytest.mark.parametrize("from_position", [0, 1, "inside generation"])
@pytest.mark.parametrize("method", ["greedy", "sample"])
def test_cached_generation_equals_uncached_under_a_hook(
    tiny_gpt2_or_llama: Any, from_position: Any, method: str
) -> None:
    model = tiny_gpt2_or_llama
    n_prompt = model.to_tokens(PROMPT).shape[1]
    # A position among the generated tokens: with the cache only a step's own token is in its
    # forward pass, so the hook must know where that token is in the sequence.
    start = n_prompt + 3 if from_position == "inside generation" else from_position
    steering = [AddVector(_random_vector(model), 1, 8.0, from_position=start)]
    sampling: dict[str, Any] = {"method": method, "seed": 5, "n_samples": 3}
    if method == "sample":
        sampling["top_k"] = 20
    cached = generate(model, PROMPT, 10, steering, **sampling)
    uncached = generate(model, PROMPT, 10, steering, use_past_kv_cache=False, **sampling)
    assert cached.tokens.tolist() == uncached.tokens.tolist()
    unsteered = generate(model, PROMPT, 10, **sampling)
    # The steering changed what was generated, and only from its position on.
    assert cached.tokens.tolist() != unsteered.tokens.tolist()
    if from_position == "inside generation":
        assert cached.tokens[:, : start + 1].tolist() == unsteered.tokens[:, : start + 1].tolist()
    assert _hooked(model) == []


def test_greedy_generation_equals_transformer_lens_generate(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    tokens = model.to_tokens(PROMPT)
    expected = model.generate(
        tokens, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False
    )
    zero = AddVector(_random_vector(model), 1, 0.0)
    for interventions in ([], [zero]):
        generation = generate(model, tokens[0], 8, interventions)
        assert generation.tokens.tolist() == expected.tolist()
        assert generation.texts == [model.tokenizer.decode(expected[0, tokens.shape[1] :])]


def test_steer_under_transformer_lens_generate_matches_ours(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    tokens = model.to_tokens(PROMPT)
    vector = _random_vector(model)
    with steer(model, vector, 1, 8.0):
        theirs = model.generate(
            tokens, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False
        )
    ours = generate(model, tokens[0], 8, [AddVector(vector, 1, 8.0)])
    assert ours.tokens.tolist() == theirs.tolist()


def test_the_same_seed_samples_the_same_tokens(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = generate(model, PROMPT, 12, seed=1, method="sample", temperature=1.5, n_samples=4)
    again = generate(model, PROMPT, 12, seed=1, method="sample", temperature=1.5, n_samples=4)
    other = generate(model, PROMPT, 12, seed=2, method="sample", temperature=1.5, n_samples=4)
    assert first.tokens.tolist() == again.tokens.tolist() != other.tokens.tolist()
    # Samples of one batch differ from each other, and the caller's random state is untouched.
    assert len({tuple(row) for row in first.tokens.tolist()}) > 1
    assert torch.equal(torch.random.get_rng_state(), state)


def test_generation_bounds_are_param_errors(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    n_prompt = model.to_tokens(PROMPT).shape[1]
    room = model.cfg.n_ctx - n_prompt
    assert generate(model, PROMPT, room).tokens.shape == (1, model.cfg.n_ctx)
    for bad in (room + 1, 0):
        with pytest.raises(ParamError) as caught:
            generate(model, PROMPT, bad)
        assert caught.value.field == "max_new_tokens"
        if bad > room:
            assert f"use at most {room}" in str(caught.value)
    with pytest.raises(ParamError) as caught:
        generate(model, PROMPT, 3, method="sample")
    assert caught.value.field == "seed"
    with pytest.raises(ParamError) as caught:
        generate(model, PROMPT, 3, seed=0, method="sample", top_k=3, top_p=0.5)
    assert "top_k and top_p" in str(caught.value)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_coefficient_that_is_not_finite_is_refused(bad: float) -> None:
    with pytest.raises(ParamError) as caught:
        AddVector(torch.zeros(4), 0, bad)
    assert caught.value.field == "coefficient"


def test_a_vector_of_the_wrong_width_is_refused(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    with pytest.raises(ParamError) as caught:
        with steer(model, torch.zeros(model.cfg.d_model + 1), 0, 1.0):
            pass
    assert caught.value.field == "vector" and _hooked(model) == []


@pytest.mark.parametrize("position", ["last", "mean"])
def test_contrastive_vector_is_the_mean_difference_by_hand(
    tiny_gpt2_or_llama: Any, position: str
) -> None:
    model = tiny_gpt2_or_llama
    hook = "blocks.1.hook_resid_pre"

    # Pairs of unequal length: a BOS averaged in would not cancel between them.
    assert [len(model.to_tokens(p)[0]) for p in POSITIVE] != [
        len(model.to_tokens(n)[0]) for n in NEGATIVE
    ]

    def reading(prompt: str) -> torch.Tensor:
        # One prompt at a time: no padding, nothing to mask.
        tokens = model.to_tokens(prompt)
        _, cache = model.run_with_cache(tokens, names_filter=hook)
        resid = cache[hook][0]
        if position == "last":
            return resid[-1]
        # The mean leaves out BOS, which the model prepends.
        assert int(tokens[0, 0]) == model.tokenizer.bos_token_id
        return resid[1:].mean(dim=0)

    expected = torch.stack(
        [reading(p) - reading(n) for p, n in zip(POSITIVE, NEGATIVE, strict=True)]
    ).mean(dim=0)
    vector = contrastive_vector(model, POSITIVE, NEGATIVE, 1, position)  # type: ignore[arg-type]
    torch.testing.assert_close(vector, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("positive", "negative", "field"),
    [([], ["a"], "positive"), (["a"], [], "negative"), (["a", "b"], ["c"], "negative")],
)
def test_contrastive_sets_must_pair_up(
    tiny_gpt2_or_llama: Any, positive: list[str], negative: list[str], field: str
) -> None:
    with pytest.raises(ParamError) as caught:
        contrastive_vector(tiny_gpt2_or_llama, positive, negative, 0)
    assert caught.value.field == field
    with pytest.raises(ParamError) as caught:
        contrastive_vector(tiny_gpt2_or_llama, ["a"], ["b"], 2)
    assert caught.value.field == "layer"


def test_target_log_prob_by_hand(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    prompts = ["The cat sat on the", "When Mary and John went to the store, John gave"]
    targets = [model.to_single_token(" mat"), model.to_single_token(" Mary")]
    steering = [AddVector(_random_vector(model), 0, 3.0)]
    for interventions in ([], steering):
        expected = []
        for prompt in prompts:
            with intervening(model, *interventions):
                probs = model(model.to_tokens(prompt))[0, -1].double().softmax(dim=-1)
            expected.append(float(probs[targets].sum().log()))
        got = target_log_prob(model, prompts, targets, interventions)
        torch.testing.assert_close(
            got, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0
        )


def test_kl_against_torch(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    reference = next_token_log_probs(model, PROMPT)
    steered = next_token_log_probs(model, PROMPT, [AddVector(_random_vector(model), 1, 4.0)])
    expected = torch.nn.functional.kl_div(
        steered, reference, log_target=True, reduction="none"
    ).sum(dim=-1)
    got = kl_per_position(reference, steered)
    torch.testing.assert_close(got, expected)
    assert float(got.min()) > 0
    assert float(kl_per_position(reference, reference).abs().max()) < 1e-12


def test_ablating_a_pattern_from_a_position_zeroes_query_rows_not_heads(
    tiny_gpt2_or_llama: Any,
) -> None:
    model = tiny_gpt2_or_llama
    tokens = model.to_tokens(PROMPT)
    hook_name = "blocks.0.attn.hook_pattern"

    def by_hand(activation: torch.Tensor, hook: object) -> torch.Tensor:
        activation = activation.clone()
        activation[:, :, 2:] = 0.0  # [batch, head, query, key]: queries 2 on
        return activation

    with torch.inference_mode():
        expected = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, by_hand)])
        with intervening(model, Ablate(hook_name=hook_name, from_position=2)):
            ablated = model(tokens)
    torch.testing.assert_close(ablated, expected)


def test_from_position_at_a_hook_with_no_known_position_axis_is_refused(
    tiny_gpt2_or_llama: Any,
) -> None:
    model = tiny_gpt2_or_llama
    with pytest.raises(ParamError, match="from_position"):
        Ablate(hook_name="blocks.0.ln1.hook_scale", from_position=2).validate(model)


def test_an_ablation_value_of_the_wrong_shape_is_refused(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    bad = torch.zeros(model.cfg.d_head + 1)
    with pytest.raises(ParamError, match="value"):
        Ablate(hook_name="blocks.0.attn.hook_z", value=bad).validate(model)
    Ablate(hook_name="blocks.0.attn.hook_z", value=torch.zeros(model.cfg.d_head)).validate(model)


@pytest.mark.parametrize("prompt", [PROMPT, "Hi"])
def test_a_per_head_pattern_value_ablates_prompts_of_any_length(
    tiny_gpt2_or_llama: Any, prompt: str
) -> None:
    model = tiny_gpt2_or_llama
    tokens = model.to_tokens(prompt)
    hook_name = "blocks.0.attn.hook_pattern"
    value = torch.rand(model.cfg.n_heads, 1, 1, generator=torch.Generator().manual_seed(5))

    def by_hand(activation: torch.Tensor, hook: object) -> torch.Tensor:
        activation = activation.clone()
        for head in range(model.cfg.n_heads):  # [batch, head, query, key]: queries 1 on
            activation[:, head, 1:, :] = float(value[head, 0, 0])
        return activation

    with torch.inference_mode():
        expected = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, by_hand)])
        with intervening(model, Ablate(hook_name=hook_name, value=value, from_position=1)):
            ablated = model(tokens)
    torch.testing.assert_close(ablated, expected)


@pytest.mark.parametrize("where", ["pattern", "z"])
def test_an_ablation_value_sized_for_one_sequence_length_is_refused(
    tiny_gpt2_or_llama: Any, where: str
) -> None:
    model = tiny_gpt2_or_llama
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    # Each fits the 2-token activation exactly, so only a check at other lengths catches it.
    hook_name, bad, expected = {
        "pattern": ("blocks.0.attn.hook_pattern", torch.zeros(n_heads, 2, 2), (n_heads, 1, 1)),
        "z": ("blocks.0.attn.hook_z", torch.zeros(2, n_heads, d_head), (n_heads, d_head)),
    }[where]
    with pytest.raises(ParamError) as caught:
        Ablate(hook_name=hook_name, value=bad).validate(model)
    assert caught.value.field == "value"
    assert f"expected a shape that broadcasts to {expected}" in str(caught.value)


def test_a_later_position_under_transformer_lens_cached_generate_raises(
    tiny_gpt2_or_llama: Any,
) -> None:
    model = tiny_gpt2_or_llama
    tokens = model.to_tokens(PROMPT)
    vector = _random_vector(model)
    with (
        pytest.raises(ParamError, match="from_position"),
        steer(model, vector, 1, 8.0, from_position=2),
    ):
        model.generate(tokens, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    assert _hooked(model) == []


def test_a_later_position_under_transformer_lens_uncached_generate_matches_ours(
    tiny_gpt2_or_llama: Any,
) -> None:
    model = tiny_gpt2_or_llama
    tokens = model.to_tokens(PROMPT)
    vector = _random_vector(model)
    start = tokens.shape[1] + 2  # among the generated tokens
    with steer(model, vector, 1, 8.0, from_position=start):
        theirs = model.generate(
            tokens,
            max_new_tokens=6,
            do_sample=False,
            stop_at_eos=False,
            verbose=False,
            use_past_kv_cache=False,
        )
    ours = generate(model, tokens[0], 6, [AddVector(vector, 1, 8.0, from_position=start)])
    unsteered = generate(model, tokens[0], 6)
    assert ours.tokens.tolist() == theirs.tolist()
    assert ours.tokens.tolist() != unsteered.tokens.tolist()
