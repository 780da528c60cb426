"""Causal tracing: restorations checked against plain hooked forward passes and known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer
from transformers import AutoModelForCausalLM, GPT2TokenizerFast
from unraveled.experiments import causal_tracing

from tests.helpers.models import SharedTinyModels
from unraveled.cli import main
from unraveled.datasets.facts import FACTS, Fact, tokenize_fact
from unraveled.tracing import (
    FactTrace,
    embedding_noise_scale,
    grouped_mean,
    position_groups,
    scaled_window,
    trace_fact,
    window_layers,
)

PROMPT = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module", params=["tiny_gpt2_dir", "tiny_llama_dir"])
def checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def model(checkpoint: Path, tiny_model: SharedTinyModels) -> HookedTransformer:
    return tiny_model(checkpoint, "raw")


def _fact_inputs(model: HookedTransformer) -> tuple[torch.Tensor, tuple[int, int], int]:
    fact = tokenize_fact(model, FACTS[0], "facts[0]")
    return torch.tensor(fact.tokens), (fact.subject_start, fact.subject_end), fact.answer


def _noise(
    model: HookedTransformer, subject: tuple[int, int], samples: int, scale: float
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return scale * torch.randn(
        (samples, subject[1] - subject[0], model.cfg.d_model), generator=generator
    )


def _plain_restored_probability(
    model: HookedTransformer,
    tokens: torch.Tensor,
    subject: tuple[int, int],
    answer: int,
    noise: torch.Tensor,
    hook_names: list[str],
    position: int,
) -> float:
    """ROME's trace_with_patch, the slow way: a full forward per noise sample, hooks everywhere."""
    with torch.inference_mode():
        _, clean = model.run_with_cache(tokens[None])
        probabilities = []
        for sample in noise:

            def corrupt(
                embeddings: torch.Tensor, hook: object, sample: torch.Tensor = sample
            ) -> torch.Tensor:
                embeddings[0, subject[0] : subject[1]] = (
                    embeddings[0, subject[0] : subject[1]] + sample
                )
                return embeddings

            def restore(activation: torch.Tensor, hook: object) -> torch.Tensor:
                activation[0, position] = clean[hook.name][0, position]  # type: ignore[attr-defined]
                return activation

            logits = model.run_with_hooks(
                tokens[None],
                fwd_hooks=[("hook_embed", corrupt), *[(name, restore) for name in hook_names]],
            )
            probabilities.append(float(logits[0, -1].softmax(-1)[answer]))
    return float(np.mean(probabilities))


def test_zero_noise_restores_the_clean_probability_everywhere(model: HookedTransformer) -> None:
    tokens, subject, answer = _fact_inputs(model)
    trace = trace_fact(model, tokens, subject, answer, _noise(model, subject, 2, 0.0), window=2)
    with torch.inference_mode():
        clean = float(model(tokens[None])[0, -1].softmax(-1)[answer])
    assert trace.clean_probability == pytest.approx(clean, rel=1e-5)
    assert trace.corrupted_probability == pytest.approx(clean, rel=1e-5)
    for grid in (trace.residual, trace.mlp, trace.attn):
        assert grid.shape == (model.cfg.n_layers, len(tokens))
        np.testing.assert_allclose(grid, clean, rtol=1e-4)


def test_last_residual_at_the_last_position_restores_the_clean_probability(
    model: HookedTransformer,
) -> None:
    tokens, subject, answer = _fact_inputs(model)
    for scale in (0.5, 5.0):
        trace = trace_fact(
            model, tokens, subject, answer, _noise(model, subject, 3, scale), window=2
        )
        assert (
            abs(trace.corrupted_probability - trace.clean_probability)
            > 1e-4 * trace.clean_probability
        )  # the noise does something
        assert trace.residual[-1, -1] == pytest.approx(trace.clean_probability, rel=1e-4)
        # Positions before the subject are never corrupted: restoring them changes nothing.
        np.testing.assert_allclose(
            trace.residual[:, : subject[0]], trace.corrupted_probability, rtol=1e-6
        )


def test_batched_restorations_equal_plain_hooked_runs(model: HookedTransformer) -> None:
    tokens, subject, answer = _fact_inputs(model)
    noise = _noise(model, subject, 2, 1.0)
    n_layers, last = model.cfg.n_layers, len(tokens) - 1
    trace = trace_fact(model, tokens, subject, answer, noise, window=2)
    for layer, position in [
        (0, subject[0]),
        (0, subject[1] - 1),
        (n_layers - 1, subject[1]),
        (0, last),
    ]:
        expected = _plain_restored_probability(
            model, tokens, subject, answer, noise, [f"blocks.{layer}.hook_resid_post"], position
        )
        assert trace.residual[layer, position] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    for kind, hook in (("mlp", "hook_mlp_out"), ("attn", "hook_attn_out")):
        for center, position in [(0, subject[1] - 1), (1, subject[0]), (1, last)]:
            names = [f"blocks.{layer}.{hook}" for layer in window_layers(center, 2, n_layers)]
            expected = _plain_restored_probability(
                model, tokens, subject, answer, noise, names, position
            )
            assert getattr(trace, kind)[center, position] == pytest.approx(
                expected, rel=1e-4, abs=1e-7
            )


def test_restorations_split_into_small_passes_give_the_same_grids(
    model: HookedTransformer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import unraveled.tracing

    tokens, subject, answer = _fact_inputs(model)
    noise = _noise(model, subject, 3, 1.0)
    whole = trace_fact(model, tokens, subject, answer, noise, window=2)
    monkeypatch.setattr(
        unraveled.tracing, "ROW_TOKENS_PER_PASS", 7
    )  # a few rows per pass, a pass per row near the start
    monkeypatch.setattr(
        unraveled.tracing, "DECODED_ROWS", 2
    )  # and a pass's rows decoded two at a time
    split = trace_fact(model, tokens, subject, answer, noise, window=2)
    for kind in ("residual", "mlp", "attn"):
        np.testing.assert_allclose(split.restored[kind], whole.restored[kind], rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(split.corrupted_probabilities, whole.corrupted_probabilities)


def test_noise_scale_is_three_standard_deviations_of_the_checkpoint_embeddings(
    model: HookedTransformer, checkpoint: Path, gpt2_tokenizer: GPT2TokenizerFast
) -> None:
    # Independently: the subject tokens from the tokenizer's character offsets, the embedding
    # matrix from the Hugging Face checkpoint itself.
    ids = []
    for fact in FACTS[:20]:
        encoding = gpt2_tokenizer(fact.prompt, return_offsets_mapping=True)
        first = fact.prompt.find(fact.subject)
        last = first + len(fact.subject)
        ids += [
            token
            for token, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
            if a < last and b > first
        ]
    embeddings = (
        AutoModelForCausalLM.from_pretrained(checkpoint).get_input_embeddings().weight.detach()
    )
    expected = 3.0 * float(embeddings[ids].std())
    assert embedding_noise_scale(model, ids, 3.0) == pytest.approx(expected, rel=1e-5)
    params = causal_tracing.CausalTracingParams(
        facts=[*FACTS[:20], _known_fact(model)],
        n_facts=1,
        noise_samples=1,
        window=1,
        max_traced_tokens=None,
    )
    result = causal_tracing.compute(model, params, seed=0)
    ours = [
        t
        for f in [tokenize_fact(model, fact, "") for fact in FACTS[:20]]
        for t in f.tokens[f.subject_start : f.subject_end]
    ]
    assert sorted(ours) == sorted(ids)
    last_subject = tokenize_fact(model, _known_fact(model), "")
    with_last = [*ids, *last_subject.tokens[last_subject.subject_start : last_subject.subject_end]]
    assert result.noise_scale == pytest.approx(3.0 * float(embeddings[with_last].std()), rel=1e-5)


def test_position_groups_on_a_known_layout() -> None:
    # BOS, "The", " E", "iff", "el", " Tower", " is", " in", " the", " city", " of"
    assert position_groups(11, 2, 6) == [[2], [3, 4], [5], [6], [7, 8, 9], [10]]
    # A one-token subject is both first and last; nothing in the middle; one token after it.
    assert position_groups(3, 1, 2) == [[1], [], [1], [2], [], [2]]
    with pytest.raises(ValueError, match="before the last"):
        position_groups(4, 1, 4)


def test_grouped_mean_averages_every_prompt_and_position() -> None:
    a = np.array([[1.0, 2.0, 3.0, 4.0]])  # one layer, four positions
    b = np.array([[10.0, 20.0, 30.0]])
    groups = [position_groups(4, 0, 2), position_groups(3, 0, 1)]
    means = grouped_mean([a, b], groups)
    assert means.shape == (6, 1)
    np.testing.assert_allclose(
        means[:, 0], [(1 + 10) / 2, np.nan, (2 + 10) / 2, (3 + 20) / 2, np.nan, (4 + 30) / 2]
    )


def test_window_follows_rome() -> None:
    assert list(window_layers(0, 10, 48)) == list(range(0, 5))
    assert list(window_layers(20, 10, 48)) == list(range(15, 25))
    assert list(window_layers(47, 10, 48)) == list(range(42, 48))
    assert list(window_layers(5, 3, 30)) == [4, 5, 6]
    assert (scaled_window(48), scaled_window(30), scaled_window(12), scaled_window(2)) == (
        10,
        6,
        2,
        1,
    )


def _known_fact(model: HookedTransformer) -> Fact:
    """A prompt with the tiny model's own top prediction as its answer, so the model 'knows' it."""
    for prompt in [PROMPT, "The Colosseum is located in the city of", "Madrid is the capital of"]:
        with torch.inference_mode():
            predicted = int(model(model.to_tokens(prompt, prepend_bos=False))[0, -1].argmax())
        text = model.tokenizer.decode([predicted])
        if text.strip() and model.to_tokens(text, prepend_bos=False)[0].tolist() == [predicted]:
            subject = (
                "Eiffel Tower"
                if "Eiffel" in prompt
                else prompt.split()[1]
                if prompt.startswith("The")
                else prompt.split()[0]
            )
            return Fact(prompt=prompt, subject=subject, answer=text)
    raise AssertionError("no prompt whose prediction re-tokenizes to one token")


def test_compute_keeps_known_facts(model: HookedTransformer) -> None:
    known = _known_fact(model)
    unknown = Fact(
        prompt=known.prompt,
        subject=known.subject,
        answer=" Paris" if known.answer != " Paris" else " Rome",
    )
    params = causal_tracing.CausalTracingParams(
        facts=[unknown, known], noise_samples=2, window=2, max_traced_tokens=None
    )
    result = causal_tracing.compute(model, params, seed=0)
    assert [t.tokenized.fact for t in result.traced] == [known]
    metrics = result.metrics()
    assert (metrics["facts_in_set"], metrics["facts_known"], metrics["facts_traced"]) == (2, 1, 1)
    trace = result.traced[0].trace
    assert metrics["average_total_effect"] == pytest.approx(
        trace.clean_probability - trace.corrupted_probability
    )
    # Same seed, same noise, same numbers.
    again = causal_tracing.compute(model, params, seed=0)
    np.testing.assert_array_equal(again.traced[0].trace.residual, trace.residual)
    # A cap below the fact's tokens from its subject on leaves nothing to trace, and says so.
    fact = result.traced[0].tokenized
    capped = params.model_copy(
        update={"max_traced_tokens": len(fact.tokens) - fact.subject_start - 1}
    )
    with pytest.raises(ValueError, match="max_traced_tokens"):
        causal_tracing.compute(model, capped, seed=0)


def _hand_fact(
    prompt_tokens: int,
    subject: tuple[int, int],
    restored: dict[str, np.ndarray],
    corrupted: list[float],
) -> causal_tracing.TracedFact:
    from unraveled.datasets.facts import TokenizedFact

    tokenized = TokenizedFact(
        fact=Fact(prompt="A b c d e f", subject="b", answer=" x"),
        tokens=list(range(prompt_tokens)),
        str_tokens=[str(i) for i in range(prompt_tokens)],
        subject_start=subject[0],
        subject_end=subject[1],
        answer=0,
    )
    return causal_tracing.TracedFact(
        tokenized,
        FactTrace(
            clean_probability=0.9, corrupted_probabilities=np.array(corrupted), restored=restored
        ),
    )


def test_peak_and_spread_match_a_hand_computation() -> None:
    # Two layers. Fact A: 5 tokens, subject [0, 3): first 0, middle 1, last 2, subsequent 3, last 4.
    # Fact B: 3 tokens, subject [0, 1): first = last subject 0, subsequent = last 2... (1), last 2.
    # Two noise samples; corrupted p per sample: A 0.1, 0.3; B 0.0, 0.2.
    zeros_a, zeros_b = np.zeros((2, 2, 5)), np.zeros((2, 2, 3))
    mlp_a = zeros_a.copy()
    mlp_a[:, :, :] = [[0.1], [0.3]]  # restoring changes nothing by default: effect 0
    # Sample 0, layer 1, middle token: raw 0.9, effect 0.8 (a single cell, the group's only one).
    mlp_a[0, 1, 1] = 0.9
    mlp_a[1, 1, 1] = 0.3  # sample 1: effect 0.0 -> A's middle group at layer 1: 0.4
    mlp_a[0, 0, 2] = 0.6  # last subject token, layer 0: effects 0.5 and 0.5
    mlp_a[1, 0, 2] = 0.8
    mlp_b = zeros_b.copy()
    mlp_b[:, :, :] = [[0.0], [0.2]]
    mlp_b[0, 0, 0] = 0.3  # B's subject token (first and last), layer 0: effects 0.3 and 0.1
    mlp_b[1, 0, 0] = 0.3
    a = _hand_fact(5, (0, 3), {"mlp": mlp_a, "residual": mlp_a, "attn": mlp_a}, [0.1, 0.3])
    b = _hand_fact(3, (0, 1), {"mlp": mlp_b, "residual": mlp_b, "attn": mlp_b}, [0.0, 0.2])
    effects = causal_tracing.grouped_effects([a, b], "mlp")
    # Last subject token, layer 0: A's position 2 (0.5, 0.5) and B's position 0 (0.3, 0.1).
    # Pooled over (fact, position): (0.5 + 0.2) / 2 = 0.35; per sample: (0.5 + 0.3) / 2,
    # (0.5 + 0.1) / 2. Middle subject tokens, layer 1: only A: (0.8 + 0.0) / 2 = 0.4 -> the peak,
    # though last-subject holds the largest per-fact mean at layer 0 (A: 0.5) and the raw
    # probability 0.9 sits elsewhere.
    assert effects.average[1, 1] == pytest.approx(0.4)
    assert effects.average[2, 0] == pytest.approx(0.35)
    np.testing.assert_allclose(effects.per_sample[:, 2, 0], [0.4, 0.3])
    np.testing.assert_allclose(effects.per_fact[:, 2, 0], [0.5, 0.2])
    assert np.isnan(effects.per_fact[1, 1, 1])  # B has no middle subject tokens
    result = causal_tracing.CausalTracingResult(
        n_candidates=2,
        known=[a.tokenized, b.tokenized],
        traced=[a, b],
        example=0,
        embedding_std=1.0,
        noise_scale=3.0,
        window=1,
        noise_samples=2,
        prepend_bos=False,
        effects={
            kind: causal_tracing.grouped_effects([a, b], kind)
            for kind in ("residual", "mlp", "attn")
        },
        seconds=0.0,
    )
    peak = result.peak("mlp")
    assert (peak["layer"], peak["position_group"]) == (1, "middle subject tokens")
    assert peak["average_indirect_effect"] == pytest.approx(0.4)
    # Samples 0.8 and 0.0 at that cell: standard deviation 0.5657, standard error 0.4.
    assert peak["standard_error_over_samples"] == pytest.approx(0.4)
    assert peak["std_over_facts"] is None  # one fact has middle tokens
    assert peak["per_fact"][0] == pytest.approx(0.4) and np.isnan(peak["per_fact"][1])


def test_top_predictions_over_several_batches_are_each_prompts_own(
    model: HookedTransformer,
) -> None:
    facts = [tokenize_fact(model, fact, f"facts[{index}]") for index, fact in enumerate(FACTS)]
    assert (
        len(facts) > 2 * causal_tracing.PREDICTION_BATCH + 1
    )  # full batches, and a last partial one
    with torch.inference_mode():
        alone = [
            int(model(torch.tensor([fact.tokens]))[0, -1].argmax()) for fact in facts
        ]  # no padding, no batch
    assert causal_tracing.top_predictions(model, facts) == alone


def test_multi_token_answer_in_compute_is_refused(model: HookedTransformer) -> None:
    params = causal_tracing.CausalTracingParams(
        facts=[Fact(prompt=PROMPT, subject="Eiffel Tower", answer=" Parisville-sur-Seine")]
    )
    with pytest.raises(
        ValueError, match=r"params.facts\[0\].answer=' Parisville-sur-Seine' is \d+ tokens"
    ):
        causal_tracing.compute(model, params, seed=0)


def test_causal_tracing_runs_through_cli_smoke(
    model: HookedTransformer, checkpoint: Path, tmp_path: Path, warm_weight_cache: Path
) -> None:
    facts = json.dumps([_known_fact(model).model_dump()])
    out = tmp_path / "out"
    args = [
        "run",
        "causal_tracing",
        "--model",
        str(checkpoint),
        "--out",
        str(out),
        "--set",
        f"params.facts={facts}",
        "--set",
        "params.noise_samples=2",
        "--set",
        "params.max_traced_tokens=null",
    ]
    assert main(args) == 0
    run_dir = out / checkpoint.name / "causal_tracing"
    assert {p.stem for p in (run_dir / "figures").glob("*.png")} == {
        "01_example_trace",
        "02_average_indirect_effect",
        "03_peak_spread",
    }
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        metrics["facts_known"] == 1 and metrics["window"] == 1
    )  # 10 of 48 blocks, scaled to 2 layers
    assert metrics["noise_samples"] == 2 and metrics["prepend_bos"] is False
    # The peak by hand from the written grid: one fact, so each group's value is the mean of its
    # positions' restored p minus the corrupted p, positions listed from the subject span.
    example = metrics["example"]
    start, end = example["subject_span"]
    last = len(example["tokens"]) - 1
    assert example["tokens"][0] != "<|endoftext|>"  # no BOS, as ROME
    by_hand = {
        "first subject token": [start],
        "middle subject tokens": list(range(start + 1, end - 1)),
        "last subject token": [end - 1],
        "first subsequent token": [end],
        "further tokens": list(range(end + 1, last)),
        "last token": [last],
    }
    corrupted = metrics["traced_facts"][0]["corrupted_probability"]
    for kind in ("residual", "mlp", "attn"):
        grid = np.array(example["restored_probability"][kind])
        cells = [
            (float(np.mean(grid[layer, positions])) - corrupted, layer, group)
            for group, positions in by_hand.items()
            if positions
            for layer in range(grid.shape[0])
        ]
        value, layer, group = max(cells)
        peak = metrics[f"{kind}_peak"]
        assert (peak["layer"], peak["position_group"]) == (layer, group)
        assert peak["average_indirect_effect"] == pytest.approx(value, abs=1e-6)


def _tree(folder: Path) -> dict[str, bytes]:
    return (
        {
            str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        if folder.exists()
        else {}
    )


@pytest.mark.parametrize(
    ("fact", "expected"),
    [
        (
            {"prompt": PROMPT, "subject": "Eiffel Tower", "answer": " Parisville-sur-Seine"},
            "params.facts[0].answer=' Parisville-sur-Seine' is",
        ),
        (
            {"prompt": PROMPT, "subject": "Eiffe", "answer": " Paris"},
            "params.facts[0].subject='Eiffe' does not start and end on token boundaries",
        ),
        (
            {"prompt": "The Louvre is in", "subject": "Eiffel", "answer": " Paris"},
            "does not occur in prompt",
        ),
    ],
    ids=["multi_token_answer", "subject_cuts_a_token", "subject_not_in_prompt"],
)
def test_bad_fact_exits_2_naming_the_field_before_anything_is_written(
    fact: dict[str, str],
    expected: str,
    tiny_gpt2_dir: Path,
    tmp_path: Path,
    warm_weight_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    (out / "earlier").mkdir(parents=True)
    (out / "earlier" / "kept.txt").write_text("an earlier run")
    before = _tree(out)
    args = [
        "run",
        "causal_tracing",
        "--model",
        str(tiny_gpt2_dir),
        "--out",
        str(out),
        "--set",
        f"params.facts={json.dumps([fact])}",
    ]
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "facts" in err and expected in err, err
    assert _tree(out) == before


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("params.n_facts=100000", "n_facts"),
        ("params.noise_samples=100000", "noise_samples"),
        ("params.window=100000", "window"),
        ("params.example=4", "example"),
    ],
)
def test_sizes_past_their_bounds_exit_2(
    override: str,
    field: str,
    tmp_path: Path,
    warm_weight_cache: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "causal_tracing", "--out", str(tmp_path / "out"), "--set", override]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.heavy
def test_default_peaks_survive_a_change_of_seed_on_smollm2(
    smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A model that knows the facts is needed (the tiny ones know none), so the bundled SmolLM2, at
    # the config's own params: 3 facts x 10 noise samples. One noise sample moved the MLP peak from
    # layer 1 (middle subject tokens) to layer 6 (last subject token) with the seed.
    import yaml

    from unraveled.config import load_config
    from unraveled.models import load_model

    monkeypatch.setenv("UNRAVELED_CACHE", str(smollm2_cache))
    model = load_model("smollm2-135m", "raw").model
    defaults = yaml.safe_load(load_config("causal_tracing").path.read_text(encoding="utf-8"))[
        "params"
    ]
    params = causal_tracing.CausalTracingParams(**defaults)
    assert params.noise_samples >= 10  # ROME's count
    peaks = [causal_tracing.compute(model, params, seed=seed).metrics() for seed in (0, 1)]
    for kind in ("mlp", "attn", "residual"):
        first, second = (metrics[f"{kind}_peak"] for metrics in peaks)
        assert first["position_group"] == second["position_group"], (kind, first, second)
        assert abs(first["layer"] - second["layer"]) <= 1, (kind, first, second)
