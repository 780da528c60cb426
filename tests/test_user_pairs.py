"""Your own prompt pairs (YAML list, JSONL file, Python) and your own metric in the patching
experiments: a metric equal to the logit difference gives the built-in results, another metric
what naive one-hook patching gives for it, and bad pairs are refused naming the row on every
route, before any model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from unraveled.experiments import (
    activation_patching,
    attribution_patching,
    ioi_circuit,
    logit_attribution,
)

from tests.helpers.models import SharedTinyModels
from tests.helpers.pairs import (
    ROWS,
    clean_answer_log_prob,
    clean_scores,
    log_prob,
    logit_difference_by_hand,
    naive_scores,
    one_token,
)
from unraveled.cli import main
from unraveled.config import _format_validation_error, load_config
from unraveled.datasets.ioi import IOIParams
from unraveled.datasets.pairs import PromptPair
from unraveled.errors import ParamError
from unraveled.experiment import check_params
from unraveled.patching import CHANGE_GROUPS


@pytest.fixture(scope="module")
def model(tiny_gpt2_dir: Path, tiny_model: SharedTinyModels):  # type: ignore[no-untyped-def]
    return tiny_model(tiny_gpt2_dir, "processed")


def _close(ours: Any, theirs: Any, atol: float = 1e-4) -> None:
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=atol, rtol=1e-4)


def _share_tolerance(clean: float, corrupted: float) -> float:
    """How far a share ``(patched - corrupted) / (clean - corrupted)`` may be from a hand one.

    The experiments run in float32 and batch the pairs; the hand computations one pair at a time.
    Log-probabilities near -11 carry rounding of about 1e-6 nats, and on the random tiny model the
    clean and corrupted log-probabilities differ by only ~2e-3 nats, so a share divides that
    rounding by the gap: a fixed tolerance on the share failed on one CPU and passed on another.
    2e-5 nats on the numerator, divided by the gap.
    """
    return 2e-5 / abs(clean - corrupted)


# --- a metric equal to the logit difference gives the built-in results -------------------------


def test_activation_patching_with_the_logit_difference_as_a_metric(model) -> None:  # type: ignore[no-untyped-def]
    for prompts in ({}, {"prompts": "ioi", "ioi": IOIParams(n_pairs=3)}, {"pairs": ROWS}):
        params = activation_patching.ActivationPatchingParams(**prompts)
        built_in = activation_patching.compute(model, params, seed=0)
        custom = activation_patching.compute(
            model, params.model_copy(update={"metric": logit_difference_by_hand}), seed=0
        )
        _close(custom.residual, built_in.residual)
        _close(custom.heads, built_in.heads)
        assert custom.clean_difference == pytest.approx(built_in.clean_difference, abs=1e-5)
        assert custom.metrics()["clean_metric"] == pytest.approx(
            built_in.metrics()["clean_logit_difference"], abs=1e-5
        )
        assert custom.metrics()["metric"].endswith("pairs.logit_difference_by_hand")
        assert "metric" not in built_in.metrics()


def test_attribution_patching_with_the_logit_difference_as_a_metric(model) -> None:  # type: ignore[no-untyped-def]
    params = attribution_patching.AttributionPatchingParams()
    built_in = attribution_patching.compute(model, params, seed=0)
    custom = attribution_patching.compute(
        model, params.model_copy(update={"metric": logit_difference_by_hand}), seed=0
    )
    for name in ("heads", "mlps", "residual"):
        _close(getattr(custom, f"{name}_exact"), getattr(built_in, f"{name}_exact"))
        _close(getattr(custom, f"{name}_estimate"), getattr(built_in, f"{name}_estimate"))


def test_ioi_circuit_with_the_logit_difference_as_a_metric(model) -> None:  # type: ignore[no-untyped-def]
    params = ioi_circuit.IOICircuitParams(
        ioi=IOIParams(n_pairs=3), circuit_sizes=[2, 4], edge_counts=[5], random_draws=2
    )
    built_in = ioi_circuit.compute(model, params, seed=0)
    custom = ioi_circuit.compute(
        model, params.model_copy(update={"metric": logit_difference_by_hand}), seed=0
    )
    _close(custom.node_scores, built_in.node_scores)
    _close(custom.faithfulness, built_in.faithfulness)
    _close(custom.random_faithfulness, built_in.random_faithfulness)
    _close(custom.edge_faithfulness, built_in.edge_faithfulness)
    assert [e["from"] for e in custom.edges] == [e["from"] for e in built_in.edges]


def test_logit_attribution_refuses_a_metric_and_says_what_to_use() -> None:
    with pytest.raises(ValidationError, match="run attribution_patching with it"):
        logit_attribution.LogitAttributionParams(metric=clean_answer_log_prob)


# --- another metric gives what naive one-hook patching gives --------------------------------------


def _positions(clean: torch.Tensor, corrupted: torch.Tensor, group: str) -> list[int]:
    """A pair's positions in one of CHANGE_GROUPS, counted again from its own tokens."""
    differ = (clean[0] != corrupted[0]).tolist()
    last = len(differ) - 1
    first = differ.index(True)
    return {
        "before the change": list(range(first)),
        "changed": [p for p in range(last) if differ[p]],
        "after the change": [p for p in range(first, last) if not differ[p]],
        "end": [last],
    }[group]


def test_activation_patching_with_a_nonlinear_metric_is_naive_one_hook_patching(model) -> None:  # type: ignore[no-untyped-def]
    result = activation_patching.compute(
        model,
        activation_patching.ActivationPatchingParams(pairs=ROWS, metric=clean_answer_log_prob),
        seed=0,
    )
    clean = np.mean(clean_scores(model, ROWS, log_prob))
    corrupted = np.mean(naive_scores(model, ROWS, log_prob))
    assert result.clean_difference == pytest.approx(clean, abs=1e-4)
    assert result.corrupted_difference == pytest.approx(corrupted, abs=1e-4)
    assert result.tokens == list(CHANGE_GROUPS) and result.position_groups

    def share(scores: list[float]) -> float:
        return (np.mean(scores) - corrupted) / (clean - corrupted)

    n_layers = model.cfg.n_layers
    for layer in range(n_layers):
        for head in range(model.cfg.n_heads):

            def head_from_clean(act, clean_act, _c, _x, head=head) -> None:  # type: ignore[no-untyped-def]
                act[:, :, head] = clean_act[:, :, head]

            naive = naive_scores(
                model, ROWS, log_prob, f"blocks.{layer}.attn.hook_z", head_from_clean
            )
            assert result.heads[layer, head] == pytest.approx(
                share(naive), abs=_share_tolerance(clean, corrupted)
            )
    hooks = [*[f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]]
    hooks.append(f"blocks.{n_layers - 1}.hook_resid_post")
    for point, hook in enumerate(hooks):
        for column, group in enumerate(CHANGE_GROUPS):

            def group_from_clean(act, clean_act, clean, corrupted, group=group) -> None:  # type: ignore[no-untyped-def]
                at = _positions(clean, corrupted, group)
                act[:, at] = clean_act[:, at]

            naive = naive_scores(model, ROWS, log_prob, hook, group_from_clean)
            # float32, batched and started mid-model against whole single runs
            assert result.residual[point, column] == pytest.approx(share(naive), rel=2e-3, abs=1e-3)
    # The last token restored after the last block is the clean run; before the change, nothing.
    assert result.residual[-1, CHANGE_GROUPS.index("end")] == pytest.approx(1.0, abs=1e-4)
    _close(result.residual[:, 0], 0.0)


def test_attribution_patching_with_a_nonlinear_metric(model) -> None:  # type: ignore[no-untyped-def]
    """Exact patches as naive patching gives them; each head's estimate as the derivative of the
    metric along (clean - corrupted) of its output, by central finite differences."""
    result = attribution_patching.compute(
        model,
        attribution_patching.AttributionPatchingParams(pairs=ROWS, metric=clean_answer_log_prob),
        seed=0,
    )
    assert result.roles == list(CHANGE_GROUPS) and result.pairs_kind == "your"
    clean = np.mean(clean_scores(model, ROWS, log_prob))
    corrupted = np.mean(naive_scores(model, ROWS, log_prob))
    span = clean - corrupted
    step = 1e-2
    for layer, head in [(0, 1), (1, 3)]:
        hook = f"blocks.{layer}.attn.hook_z"

        def head_from_clean(act, clean_act, _c, _x, head=head) -> None:  # type: ignore[no-untyped-def]
            act[:, :, head] = clean_act[:, :, head]

        naive = naive_scores(model, ROWS, log_prob, hook, head_from_clean)
        assert result.heads_exact[layer, head] == pytest.approx(
            (np.mean(naive) - corrupted) / span, abs=1e-3
        )
        slopes = []
        for sign in (1, -1):

            def nudged(act, clean_act, _c, _x, head=head, sign=sign) -> None:  # type: ignore[no-untyped-def]
                act[:, :, head] += sign * step * (clean_act[:, :, head] - act[:, :, head])

            slopes.append(np.mean(naive_scores(model, ROWS, log_prob, hook, nudged)))
        derivative = (slopes[0] - slopes[1]) / (2 * step)
        # Central differences of step 0.01 in float32: agree to about 1e-3 of the value.
        assert result.heads_estimate[layer, head] == pytest.approx(derivative / span, rel=3e-3)


def test_ioi_circuit_with_a_nonlinear_metric_keeps_what_naive_patching_keeps(model) -> None:  # type: ignore[no-untyped-def]
    """The clean runs with every component outside the circuit taking its corrupted output."""
    result = ioi_circuit.compute(
        model,
        ioi_circuit.IOICircuitParams(
            pairs=ROWS,
            metric=clean_answer_log_prob,
            circuit_sizes=[3],
            edge_counts=[5],
            random_draws=1,
        ),
        seed=0,
    )
    assert result.edge_faithfulness[0] == pytest.approx(0.0, abs=1e-4)
    assert result.edge_faithfulness[-1] == pytest.approx(1.0, abs=1e-4)
    assert result.edge_sum_error < 1e-4
    order = [0, *[i for i in np.argsort(-np.abs(result.node_scores), kind="stable") if i != 0]]
    dropped = [result.nodes[i] for i in order[3:]]
    kept = []
    for row in ROWS:
        clean, corrupted = model.to_tokens(row["clean"]), model.to_tokens(row["corrupted"])
        _, cache = model.run_with_cache(corrupted)
        hooks = []
        for node in dropped:
            if node.startswith("m"):
                name, head = f"blocks.{node[1:]}.hook_mlp_out", None
            else:
                layer, head = (int(part) for part in node.split("."))
                name = f"blocks.{layer}.attn.hook_z"

            def from_corrupted(act, hook, head=head, cache=cache):  # type: ignore[no-untyped-def]
                if head is None:
                    act[:] = cache[hook.name]
                else:
                    act[:, :, head] = cache[hook.name][:, :, head]
                return act

            hooks.append((name, from_corrupted))
        with torch.inference_mode():
            logits = model.run_with_hooks(clean, fwd_hooks=hooks)
        kept.append(log_prob(logits[0, -1], one_token(model, row["clean_answer"])))
    clean_mean = np.mean(clean_scores(model, ROWS, log_prob))
    corrupted_mean = np.mean(naive_scores(model, ROWS, log_prob))
    share = (np.mean(kept) - corrupted_mean) / (clean_mean - corrupted_mean)
    assert result.sizes == [0, 3, len(result.nodes)]
    assert result.faithfulness[1] == pytest.approx(
        share, abs=_share_tolerance(clean_mean, corrupted_mean)
    )


def test_a_metric_giving_one_number_is_refused_naming_it(model) -> None:  # type: ignore[no-untyped-def]
    def total(last_logits, pairs):  # type: ignore[no-untyped-def]
        return clean_answer_log_prob(last_logits, pairs).sum()

    params = activation_patching.ActivationPatchingParams(pairs=ROWS, metric=total)
    with pytest.raises(ParamError, match=r"params\.metric: total returned \(\); expected"):
        activation_patching.compute(model, params, seed=0)


# --- the same pairs from YAML, JSONL and Python ---------------------------------------------------


def _write_config(folder: Path, name: str, params: dict[str, Any], experiment: str) -> Path:
    import yaml

    path = folder / f"{name}.yaml"
    text = yaml.safe_dump(
        {"experiment": experiment, "description": "Your pairs.", "params": params},
        sort_keys=False,
        allow_unicode=True,
    )
    path.write_text(text, encoding="utf-8")
    return path


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_pairs_from_yaml_jsonl_and_python_give_the_same_results(
    model,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    _write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    from_yaml = load_config(
        str(_write_config(tmp_path, "listed", {"pairs": ROWS}, "activation_patching"))
    ).params
    from_file = load_config(
        str(_write_config(tmp_path, "filed", {"pairs_file": "pairs.jsonl"}, "activation_patching"))
    ).params
    tuples = [tuple(row[key] for key in PromptPair.model_fields) for row in ROWS]
    from_python = activation_patching.ActivationPatchingParams(pairs=tuples)
    assert from_yaml.prompts == from_file.prompts == from_python.prompts == "pairs"
    assert (
        [row.pair for row in from_yaml.rows()]
        == [row.pair for row in from_file.rows()]
        == [row.pair for row in from_python.rows()]
    )
    results = [
        activation_patching.compute(model, params, seed=0)
        for params in (from_yaml, from_file, from_python)
    ]
    for other in results[1:]:
        np.testing.assert_array_equal(other.residual, results[0].residual)
        np.testing.assert_array_equal(other.heads, results[0].heads)
    # The manifest records the pairs as given, and none of the new params of a run without them.
    assert from_file.model_dump(mode="json")["pairs_file"] == "pairs.jsonl"
    assert from_yaml.model_dump(mode="json")["pairs"] == ROWS
    assert set(activation_patching.ActivationPatchingParams().model_dump()) == {
        "clean",
        "corrupted",
        "clean_answer",
        "corrupted_answer",
        "prompts",
        "ioi",
    }
    assert set(ioi_circuit.IOICircuitParams().model_dump()) == {
        "ioi",
        "top_edges",
        "circuit_sizes",
        "edge_counts",
        "random_draws",
    }


def test_the_manifest_names_a_custom_metric(model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    params = attribution_patching.AttributionPatchingParams(metric=clean_answer_log_prob)
    dumped = params.model_dump(mode="json")
    assert dumped["metric"] == "tests.helpers.pairs.clean_answer_log_prob"
    assert "metric" not in attribution_patching.AttributionPatchingParams().model_dump()


def test_logit_attribution_over_your_pairs_is_over_their_clean_prompts(model) -> None:  # type: ignore[no-untyped-def]
    rows = [{**row, "corrupted": "A corrupted prompt of another length"} for row in ROWS]
    over = logit_attribution.compute(
        model, logit_attribution.LogitAttributionParams(pairs=rows), seed=0
    )
    singles = [
        logit_attribution.compute(
            model,
            logit_attribution.LogitAttributionParams(
                prompt=row["clean"], correct=row["clean_answer"], incorrect=row["corrupted_answer"]
            ),
            seed=0,
        )
        for row in ROWS
    ]
    assert over.n_prompts == 3
    _close(over.heads, np.mean([s.heads for s in singles], axis=0), atol=1e-5)
    assert over.logit_difference == pytest.approx(
        np.mean([s.logit_difference for s in singles]), abs=1e-5
    )


# --- bad pairs: refused naming the row, through the CLI and through Python ------------------------

LONG = "word " * 70
BAD_CASES: dict[str, tuple[dict[str, Any], list[Any] | None, str]] = {
    # name: (params, the JSONL file's rows or None, the message)
    "missing_key": (
        {"pairs": [ROWS[0], {k: v for k, v in ROWS[1].items() if k != "corrupted"}]},
        None,
        "params.pairs[1].corrupted: required, but missing",
    ),
    "empty_prompt": (
        {"pairs": [{**ROWS[0], "clean": ""}]},
        None,
        "params.pairs[0].clean: String should have at least 1 character",
    ),
    "unknown_key": (
        {"pairs": [{**ROWS[0], "answer": " Mary"}]},
        None,
        "params.pairs[0].answer: unknown key",
    ),
    "answer_of_two_tokens": (
        {"pairs": [ROWS[0], {**ROWS[1], "clean_answer": " Xylophonicus"}]},
        None,
        "params.pairs[1].clean_answer: ' Xylophonicus' is",
    ),
    "lengths_differ": (
        {"pairs": [ROWS[0], ROWS[1], {**ROWS[2], "corrupted": "Tom gave it to"}]},
        None,
        "params.pairs[2].corrupted: 5 tokens, but its clean prompt has 14",
    ),
    "same_prompts": (
        {"pairs": [{**ROWS[0], "corrupted": ROWS[0]["clean"]}]},
        None,
        "params.pairs[0].corrupted: the same tokens as its clean prompt",
    ),
    "prompt_too_long": (
        {"pairs": [{**ROWS[0], "clean": LONG, "corrupted": LONG.replace("word", "text")}]},
        None,
        "params.pairs[0].clean: 72 tokens (BOS included), more than the 64 allowed by the model",
    ),
    "too_many": (
        {"pairs": ROWS, "max_pairs": 2},
        None,
        "params.pairs has 3 pairs, more than max_pairs=2",
    ),
    "both_sources": (
        {"pairs": ROWS, "pairs_file": "pairs.jsonl"},
        ROWS,
        "give params.pairs (a list of pairs) or params.pairs_file",
    ),
    "pairs_but_ioi": ({"prompts": "ioi", "pairs": ROWS}, None, "set prompts to pairs"),
    "metric_in_yaml": (
        {"metric": "log_prob"},
        None,
        "params.metric: a metric is set from Python only",
    ),
    "file_missing": ({"pairs_file": "nothing.jsonl"}, None, "nothing.jsonl: no such file"),
    "file_bad_json": (
        {"pairs_file": "pairs.jsonl"},
        [ROWS[0], "{not json"],
        "pairs.jsonl line 2: not valid JSON",
    ),
    "file_not_an_object": (
        {"pairs_file": "pairs.jsonl"},
        [ROWS[0], ["a", "b"]],
        "pairs.jsonl line 2: expected a JSON object",
    ),
    "file_missing_key": (
        {"pairs_file": "pairs.jsonl"},
        [ROWS[0], ROWS[1], {k: v for k, v in ROWS[2].items() if k != "clean_answer"}],
        "pairs.jsonl line 3: clean_answer: required, but missing",
    ),
    "file_answer_of_two_tokens": (
        {"pairs_file": "pairs.jsonl"},
        [ROWS[0], {**ROWS[1], "corrupted_answer": " Xylophonicus"}],
        "params.pairs_file: pairs.jsonl line 2: corrupted_answer: ' Xylophonicus' is",
    ),
    "file_lengths_differ": (
        {"pairs_file": "pairs.jsonl"},
        [{**ROWS[0], "corrupted": "When Mary went to the store"}],
        "params.pairs_file: pairs.jsonl line 1: corrupted: 7 tokens, but its clean prompt has 15",
    ),
    "file_too_many": (
        {"pairs_file": "pairs.jsonl", "max_pairs": 2},
        ROWS,
        "pairs.jsonl: more than max_pairs=2 pairs (line 3 is one more)",
    ),
    "file_empty": ({"pairs_file": "pairs.jsonl"}, [], "pairs.jsonl: no pairs"),
}


def _bad_case(case: str, folder: Path) -> tuple[dict[str, Any], str]:
    params, rows, message = BAD_CASES[case]
    if rows is not None:
        (folder / "pairs.jsonl").write_text(
            "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows),
            encoding="utf-8",
        )
    return params, message


def _no_model_load(*args: object, **kwargs: object) -> None:
    raise AssertionError("a model was loaded before the pairs were checked")


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_pairs_exit_2_naming_the_row_before_the_model_loads(
    case: str,
    tmp_path: Path,
    tiny_gpt2_dir: Path,
    warm_weight_cache: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("unraveled.runner.load_planned", _no_model_load)
    params, message = _bad_case(case, tmp_path)
    config = _write_config(tmp_path, "mine", params, "activation_patching")
    out = tmp_path / "out"
    status = main(["run", str(config), "--model", str(tiny_gpt2_dir), "--out", str(out)])
    error = " ".join(capsys.readouterr().err.split())
    assert status == 2, error
    assert message in error and str(config) in error
    assert not out.exists()


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_pairs_from_python_raise_naming_the_row(
    case: str,
    tmp_path: Path,
    model,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    """The same message, from the schema (a ValidationError) or from the checks (ParamError)."""
    monkeypatch.chdir(tmp_path)
    params, message = _bad_case(case, tmp_path)
    for experiment in (activation_patching, attribution_patching, ioi_circuit):
        with pytest.raises((ValidationError, ParamError)) as raised:
            checked = experiment.EXPERIMENT.params(**params)
            check_params(experiment.EXPERIMENT, checked, model)
        error = raised.value
        if isinstance(error, ValidationError):  # worded as the CLI words it
            schema = experiment.EXPERIMENT.params
            error = _format_validation_error(error, "python", "params", schema, (), "")
        assert message in " ".join(str(error).split())


def test_logit_attribution_needs_no_equal_lengths_but_one_token_answers(model) -> None:  # type: ignore[no-untyped-def]
    rows = [{**ROWS[0], "corrupted": "Short"}]
    check_params(
        logit_attribution.EXPERIMENT, logit_attribution.LogitAttributionParams(pairs=rows), model
    )
    rows = [{**ROWS[0], "clean_answer": " Xylophonicus"}]
    with pytest.raises(ParamError, match=r"params\.pairs\[0\]\.clean_answer: ' Xylophonicus'"):
        check_params(
            logit_attribution.EXPERIMENT,
            logit_attribution.LogitAttributionParams(pairs=rows),
            model,
        )


def test_pairs_of_one_length_are_patched_at_each_position(model) -> None:  # type: ignore[no-untyped-def]
    rows = [
        ROWS[1],
        {
            "clean": "The capital of Spain is the city of",
            "corrupted": "The capital of Japan is the city of",
            "clean_answer": " Madrid",
            "corrupted_answer": " Tokyo",
        },
    ]
    result = activation_patching.compute(
        model,
        activation_patching.ActivationPatchingParams(pairs=rows, metric=clean_answer_log_prob),
        seed=0,
    )
    n_pos = model.to_tokens(rows[0]["clean"]).shape[1]
    assert not result.position_groups and len(result.tokens) == n_pos
    # Shared tokens are labels; where the prompts differ, the position's index.
    assert result.tokens[1] == "The" and result.tokens[4] == "position 4"
    clean = np.mean(clean_scores(model, rows, log_prob))
    corrupted = np.mean(naive_scores(model, rows, log_prob))
    for position in (3, 4, n_pos - 1):

        def one_position(act, clean_act, _c, _x, position=position) -> None:  # type: ignore[no-untyped-def]
            act[:, position] = clean_act[:, position]

        naive = naive_scores(model, rows, log_prob, "blocks.1.hook_resid_pre", one_position)
        share = (np.mean(naive) - corrupted) / (clean - corrupted)
        assert result.residual[1, position] == pytest.approx(share, abs=1e-3)
