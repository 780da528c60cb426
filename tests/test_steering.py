"""The steering experiment: its numbers against independent computations on the tiny models, and
its bad input refused through the CLI (exit 2 naming the field, nothing written)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from unraveled.experiments import steering

from tests.helpers.cli import run_cli
from unraveled.errors import ParamError
from unraveled.interventions import AddVector, generate

SMALL = {
    "vector": {
        "positive": ["I love this, it is", "A wonderful day"],
        "negative": ["I hate this, it is", "A terrible day"],
    },
    "layer": 1,
    "coefficients": [-3.0, 6.0],
    "prompts": ["I think that you are", "The movie was"],
    "max_new_tokens": 4,
    "n_samples": 2,
    "targets": [" love", " great"],
    "neutral_text": "The train leaves the station at nine.",
}


def _params(**changes: Any) -> steering.SteeringParams:
    return steering.SteeringParams.model_validate({**SMALL, **changes})


def _manual_logits(model: Any, text: str, vector: torch.Tensor, coefficient: float) -> torch.Tensor:
    def add(activation: torch.Tensor, hook: object) -> torch.Tensor:
        return activation + coefficient * vector

    with torch.inference_mode():
        return model.run_with_hooks(
            model.to_tokens(text), fwd_hooks=[("blocks.1.hook_resid_pre", add)]
        )[0]


def test_sweep_against_hand_computations(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    params = _params()
    result = steering.compute(model, params, seed=3)
    assert result.coefficients.tolist() == [-3.0, 0.0, 6.0]
    # The vector by hand: last-token residuals, one prompt at a time.
    hook = "blocks.1.hook_resid_pre"

    def last(text: str) -> torch.Tensor:
        return model.run_with_cache(model.to_tokens(text), names_filter=hook)[1][hook][0, -1]

    vector = torch.stack(
        [
            last(p) - last(n)
            for p, n in zip(SMALL["vector"]["positive"], SMALL["vector"]["negative"], strict=True)
        ]
    ).mean(dim=0)
    assert result.vector_norm == pytest.approx(float(vector.norm()), rel=1e-4)
    target_ids = [model.to_single_token(t) for t in SMALL["targets"]]
    hand = np.zeros((len(result.coefficients), len(SMALL["prompts"])))
    for row, coefficient in enumerate(result.coefficients):
        # Log P(target set) after each prompt, from logits steered by a hand-written hook.
        for column, prompt in enumerate(SMALL["prompts"]):
            probs = _manual_logits(model, prompt, vector, coefficient)[-1].double().softmax(-1)
            hand[row, column] = float(probs[target_ids].sum().log())
            assert result.target_log_prob[row, column] == pytest.approx(hand[row, column], abs=1e-4)
        # KL on the neutral text, by hand with scipy-free numpy.
        p = _manual_logits(model, SMALL["neutral_text"], vector, 0.0).double().softmax(-1).numpy()
        q = _manual_logits(model, SMALL["neutral_text"], vector, coefficient).double().softmax(-1)
        expected = (p * (np.log(p) - np.log(q.numpy()))).sum(-1)
        np.testing.assert_allclose(result.kl[row], expected, atol=1e-5)
        # The generations: unsteered ones are plain sampling with the same seed.
        for column, prompt in enumerate(SMALL["prompts"]):
            interventions = [AddVector(vector, 1, coefficient)] if coefficient else []
            expected_texts = generate(
                model,
                prompt,
                4,
                interventions,
                seed=3,
                method="sample",
                temperature=0.8,
                n_samples=2,
            ).texts
            assert result.generations[row][column] == expected_texts
    metrics = result.metrics()
    assert metrics["delta_target_log_prob"]["n_prompts"] == 2
    # Prompts moving with each coefficient's sign, counted from the hand-computed log-probs.
    assert metrics["delta_target_log_prob"]["n_prompts_with_the_coefficients_sign"] == {
        "-3": int(sum(hand[0, column] < hand[1, column] for column in range(2))),
        "6": int(sum(hand[2, column] > hand[1, column] for column in range(2))),
    }
    np.testing.assert_array_equal(metrics["delta_target_log_prob"]["per_prompt"][1], [0.0, 0.0])
    assert metrics["kl_from_unsteered_on_neutral_text"]["mean"][1] == 0
    assert metrics["kl_from_unsteered_on_neutral_text"]["mean"][2] > 0
    artifacts = list(steering.render(result))
    assert [a.name for a in artifacts] == ["01_effect_and_price", "02_generations", "generations"]
    table = artifacts[2].columns
    assert len(table["text"]) == 3 * 2 * 2 and table["text"][0] == result.generations[0][0][0]


def test_the_sign_count_and_its_words_on_known_changes() -> None:
    # Known changes from the unsteered row (the middle one): at -2 one prompt falls, one rises;
    # at +3 one rises and one doesn't move, which is not moving with the sign.
    result = steering.SteeringResult(
        hook_name="blocks.0.hook_resid_pre",
        coefficients=np.array([-2.0, 0.0, 3.0]),
        vector_norm=1.0,
        resid_norm=1.0,
        prompts=["a", "b"],
        generations=[[["x"], ["y"]]] * 3,
        targets=[" t"],
        target_log_prob=np.array([[-2.0, -0.5], [-1.0, -1.0], [-0.25, -1.0]]),
        kl=np.zeros((3, 4)),
        neutral_tokens=["n"] * 4,
    )
    assert result.with_the_sign == {-2.0: 1, 3.0: 1}
    assert steering._sign_summary(result) == (
        "prompts of 2 moving with the coefficient's sign: 1 at -2, 1 at +3"
    )
    agreeing = dataclasses.replace(result, target_log_prob=np.array([[-2.0], [-1.0], [0.0]]))
    agreeing = dataclasses.replace(agreeing, prompts=["a"])
    assert steering._sign_summary(agreeing) == (
        "1 of 1 prompts move with the coefficient's sign at every coefficient"
    )


def test_steering_runs_through_the_cli(
    tiny_gpt2_dir: Path, tmp_path: Path, warm_weight_cache: Path
) -> None:
    out = tmp_path / "out"
    done = run_cli(
        [
            "run",
            "steering",
            "--model",
            str(tiny_gpt2_dir),
            "--out",
            str(out),
            "--set",
            "params.layer=1",
            "--set",
            "params.max_new_tokens=3",
            "--set",
            "params.n_samples=1",
            "--set",
            "params.coefficients=[2.0]",
        ],
        {"UNRAVELED_CACHE": str(warm_weight_cache)},
    )
    assert done.returncode == 0, done.stderr
    run_dir = out / tiny_gpt2_dir.name / "steering"
    assert {p.name for p in (run_dir / "figures").glob("*.png")} == {
        "01_effect_and_price.png",
        "02_generations.png",
    }
    assert (run_dir / "generations.npz").is_file()


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("params.layer=2", "params.layer (from --set): 2 is out of range: the model has 2 layers"),
        ("params.vector.positive=[]", "params.vector.positive (from --set)"),
        ("params.vector.negative=[a]", "params.vector.negative"),
        ("params.coefficients=[1.0, .inf]", "params.coefficients[1] (from --set)"),
        ("params.max_new_tokens=0", "params.max_new_tokens (from --set)"),
        ("params.max_new_tokens=60", "params.max_new_tokens (from --set): 60 new tokens"),
        (
            "params.from_position=4",
            "params.from_position (from --set): 4 is past the shortest prompt's last token "
            "(position 3,",
        ),
    ],
)
def test_bad_input_exits_2_naming_the_field(
    override: str, said: str, tiny_gpt2_dir: Path, tmp_path: Path, warm_weight_cache: Path
) -> None:
    out = tmp_path / "out"
    done = run_cli(
        ["run", "steering", "--model", str(tiny_gpt2_dir), "--out", str(out), "--set", override],
        {"UNRAVELED_CACHE": str(warm_weight_cache)},
    )
    assert done.returncode == 2, done.stderr
    assert said in " ".join(done.stderr.split()), done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_from_position_past_a_prompt_is_refused(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    # "The movie was" is the shortest prompt: its last token is at len(to_tokens) - 1 (BOS is 0
    # when the model prepends it); the target log-prob is read there.
    last = model.to_tokens("The movie was").shape[1] - 1
    steering.check(model, _params(from_position=last))
    with pytest.raises(ParamError, match="from_position"):
        steering.check(model, _params(from_position=last + 1))


def test_the_generation_budget_counts_bos_only_once_the_model_says_it_adds_one(
    tiny_gpt2_or_llama: Any,
) -> None:
    model = tiny_gpt2_or_llama
    n_ctx = model.cfg.n_ctx
    longest = max(SMALL["prompts"], key=lambda prompt: model.to_tokens(prompt).shape[1])
    without_bos = model.to_tokens(longest, prepend_bos=False).shape[1]
    fits_without_bos = _params(max_new_tokens=n_ctx - without_bos)
    # Before loading, whether BOS is added is unknown: refuse only a budget too long either way.
    steering.check_before_loading(fits_without_bos, model.tokenizer, n_ctx)
    with pytest.raises(ParamError, match="max_new_tokens"):
        steering.check_before_loading(
            _params(max_new_tokens=n_ctx - without_bos + 1), model.tokenizer, n_ctx
        )
    # Loaded, the count is exact: with BOS the same budget is one too many ...
    with pytest.raises(ParamError, match="max_new_tokens"):
        steering.check(model, fits_without_bos)
    # ... without, it fills the context exactly, as generation shows.
    adds_bos, model.cfg.default_prepend_bos = model.cfg.default_prepend_bos, False
    try:
        steering.check(model, fits_without_bos)
        generation = generate(model, longest, fits_without_bos.max_new_tokens)
    finally:
        model.cfg.default_prepend_bos = adds_bos
    assert adds_bos and generation.tokens.shape == (1, n_ctx)


def test_steered_greedy_generation_against_a_hand_written_loop(tiny_gpt2_or_llama: Any) -> None:
    model = tiny_gpt2_or_llama
    params = _params(sampling={"method": "greedy"}, n_samples=1, coefficients=[6.0])
    result = steering.compute(model, params, seed=0)
    hook = "blocks.1.hook_resid_pre"

    def last(text: str) -> torch.Tensor:
        return model.run_with_cache(model.to_tokens(text), names_filter=hook)[1][hook][0, -1]

    vector = torch.stack(
        [
            last(p) - last(n)
            for p, n in zip(SMALL["vector"]["positive"], SMALL["vector"]["negative"], strict=True)
        ]
    ).mean(dim=0)

    def add(activation: torch.Tensor, hook: object) -> torch.Tensor:
        return activation + 6.0 * vector

    row = result.coefficients.tolist().index(6.0)
    for column, prompt in enumerate(SMALL["prompts"]):
        # No cache: the whole sequence each step, the vector added at every position, argmax.
        tokens = model.to_tokens(prompt)
        n_prompt = tokens.shape[1]
        with torch.inference_mode():
            for _ in range(SMALL["max_new_tokens"]):
                logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, add)])
                tokens = torch.cat([tokens, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
        expected = model.tokenizer.decode(tokens[0, n_prompt:])
        assert result.generations[row][column] == [expected]
