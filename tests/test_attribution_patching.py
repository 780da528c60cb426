"""attribution_patching end to end: estimates beside exact values for every head, MLP and
residual point; agreement and times in the metrics; estimate-only cells marked on the figure.
(The estimate's correctness is tested in test_patching.py, where the metric is linear.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.patches import Rectangle
from scipy import stats
from unraveled.experiments import attribution_patching

from tests.helpers.models import SharedTinyModels
from unraveled.cli import main
from unraveled.datasets.ioi import ROLES, IOIParams
from unraveled.errors import ParamError


def test_estimates_sit_beside_exact_values(
    tiny_gpt2_dir: Path, tiny_model: SharedTinyModels
) -> None:
    model = tiny_model(tiny_gpt2_dir, "processed")
    result = attribution_patching.compute(
        model,
        attribution_patching.AttributionPatchingParams(
            ioi=IOIParams(n_pairs=4), exact_residual=True
        ),
        seed=0,
    )
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    assert result.heads_estimate.shape == result.heads_exact.shape == (n_layers, n_heads)
    assert (
        result.residual_estimate.shape == result.residual_exact.shape == (n_layers + 1, len(ROLES))
    )
    # The residual stream after the last block, at the last token, is all the answer reads.
    assert result.residual_exact[-1, ROLES.index("end")] == pytest.approx(1.0, abs=1e-4)
    # Positions before the prompts differ restore nothing, exactly and by the estimate.
    for role in ("IO", "S1", "S1+1"):
        assert np.abs(result.residual_exact[:, ROLES.index(role)]).max() < 1e-5
        assert np.abs(result.residual_estimate[:, ROLES.index(role)]).max() < 1e-5
    found = result.agreements()["heads"]
    assert found["pearson"] == pytest.approx(
        np.corrcoef(result.heads_estimate.ravel(), result.heads_exact.ravel())[0, 1], abs=1e-6
    )
    ranks = [
        stats.rankdata(values.ravel()) for values in (result.heads_estimate, result.heads_exact)
    ]
    assert found["spearman"] == pytest.approx(np.corrcoef(*ranks)[0, 1], abs=1e-6)
    errors = result.largest_errors()
    gaps = [abs(row["estimate"] - row["exact"]) for row in errors]
    assert gaps == sorted(gaps, reverse=True)


def test_attribution_patching_runs_through_cli_smoke(
    tiny_llama_dir: Path, tmp_path: Path, warm_weight_cache: Path
) -> None:
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                "attribution_patching",
                "--model",
                str(tiny_llama_dir),
                "--out",
                str(out),
                "--set",
                "params.ioi.n_pairs=3",
            ]
        )
        == 0
    )
    run_dir = out / tiny_llama_dir.name / "attribution_patching"
    assert {p.stem for p in (run_dir / "figures").glob("*.png")} == {
        "01_estimate_vs_exact",
        "02_heads_exact_and_estimate",
        "03_residual_exact_and_estimate",
    }
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # The config leaves exact residual patching off: exact values at the changed token and before
    # it only.
    assert set(metrics["agreement_estimate_vs_exact"]) == {
        "heads",
        "mlps",
        "heads_and_mlps",
        "residual",
    }
    assert set(metrics["seconds"]["exact_patching"]) == {"heads", "mlps", "residual"}
    assert metrics["residual_position_groups_patched_exactly"] == ["IO", "S1", "S1+1", "S2"]
    assert (
        len(metrics["residual_exact"])
        == len(metrics["residual_estimate"])
        == len(metrics["residual_points"])
    )
    for row in metrics["residual_exact"]:
        assert [value is None for value in row] == [False, False, False, False, True, True]
    assert metrics["residual_position_groups_before_the_change"] == ["IO", "S1", "S1+1"]
    assert metrics["agreement_estimate_vs_exact"]["residual"]["n"] == len(
        metrics["residual_points"]
    )  # S2's column only
    # Corrupted prompts (swap) are scored against their own answer, the subject.
    assert set(metrics["corrupted"]) == {
        "mean_logit_difference",
        "share_incorrect_over_correct",
        "share_incorrect_is_top_prediction",
    }


def test_names_that_are_not_one_token_fail_the_model_check(
    tiny_gpt2_dir: Path, tiny_model: SharedTinyModels
) -> None:
    model = tiny_model(tiny_gpt2_dir, "processed")
    names = ["Mary", "John", "Tom", "Xylophonicus"]
    assert len(model.to_tokens(" Xylophonicus", prepend_bos=False)[0]) > 1
    params = attribution_patching.AttributionPatchingParams(ioi=IOIParams(names=names))
    with pytest.raises(ParamError, match=r"params\.ioi\.names: 'Xylophonicus' is \d+ tokens"):
        attribution_patching.check(model, params)


def test_exact_residual_off_patches_the_changed_token_exactly(
    tiny_gpt2_dir: Path, tiny_model: SharedTinyModels
) -> None:
    """Off, the changed token (S2) and the groups before it hold exact values, the very ones a run
    with every group patched gives; the other groups are NaN, and the agreement reads only the
    exact cells."""
    model = tiny_model(tiny_gpt2_dir, "processed")
    ioi = IOIParams(n_pairs=3)
    default = attribution_patching.compute(
        model, attribution_patching.AttributionPatchingParams(ioi=ioi), seed=1
    )
    full = attribution_patching.compute(
        model, attribution_patching.AttributionPatchingParams(ioi=ioi, exact_residual=True), seed=1
    )
    exact_groups = [ROLES.index(role) for role in ("IO", "S1", "S1+1", "S2")]
    np.testing.assert_allclose(
        default.residual_exact[:, exact_groups], full.residual_exact[:, exact_groups], atol=1e-6
    )
    assert np.isnan(default.residual_exact[:, [ROLES.index("end"), ROLES.index("other")]]).all()
    assert not np.isnan(full.residual_exact).any()
    assert (
        abs(full.residual_exact[:, ROLES.index("S2")]).max() > 0.01
    )  # the changed token carries something
    # IO, S1 and S1+1 come before S2 in every template: restoring them changes nothing, and the
    # agreement leaves them out (both sides 0 there by construction).
    assert default.residual_groups_before_change == ["IO", "S1", "S1+1"]
    np.testing.assert_array_equal(default.residual_exact[:, exact_groups[:3]], 0.0)
    found = default.agreements()["residual"]
    assert found["n"] == model.cfg.n_layers + 1
    changed = [ROLES.index("S2")]
    cells = (
        default.residual_exact[:, changed].ravel(),
        default.residual_estimate[:, changed].ravel(),
    )
    assert found["pearson"] == pytest.approx(stats.pearsonr(cells[1], cells[0])[0], abs=1e-6)


def test_agreement_against_hand_counted_overlaps_and_scipy() -> None:
    exact = np.array([0.50, -0.40, 0.30, 0.20, -0.10, 0.04, 0.03, -0.02, 0.005, 0.0, 0.001, -0.004])
    # The estimate misses the second-largest effect (-0.40) and inflates two tiny ones (0.005, 0.0).
    estimate = np.array(
        [0.45, -0.01, 0.33, 0.18, -0.12, 0.05, 0.02, -0.03, 0.35, 0.015, 0.0, -0.002]
    )
    found = attribution_patching.agreement(estimate, exact)
    # Largest |exact|: indices 0 1 2 3 4 | 5 6 7 8 11; largest |estimate|: 0 8 2 3 4 | 5 7 6 9 1.
    assert found["top_k_overlap"] == {"5": 4, "10": 9}
    assert found["n"] == 12
    assert found["pearson"] == pytest.approx(np.corrcoef(estimate, exact)[0, 1], abs=1e-9)
    above = {row["threshold"]: row for row in found["above_threshold"]}
    assert set(above) == set(attribution_patching.EFFECT_THRESHOLDS) == {0.01, 0.05}
    assert above[0.05]["n"] == 5 and above[0.05]["share"] == pytest.approx(5 / 12)
    assert above[0.01]["n"] == 8
    kept = [0, 1, 2, 3, 4]
    assert above[0.05]["pearson"] == pytest.approx(
        np.corrcoef(estimate[kept], exact[kept])[0, 1], abs=1e-9
    )
    # Ranks by hand: estimate 0.45 -0.01 0.33 0.18 -0.12 -> 5 2 4 3 1; exact 5 1 4 3 2.
    assert above[0.05]["spearman"] == pytest.approx(
        np.corrcoef([5, 2, 4, 3, 1], [5, 1, 4, 3, 2])[0, 1], abs=1e-9
    )
    assert above[0.05]["spearman"] == pytest.approx(
        stats.spearmanr(estimate[kept], exact[kept])[0], abs=1e-9
    )
    # Too few components above a threshold: no correlation, not a crash or a NaN.
    few = attribution_patching.agreement(np.array([0.2, 0.0, 0.001]), np.array([0.3, 0.0, 0.002]))
    assert few["above_threshold"][1]["n"] == 1 and few["above_threshold"][1]["pearson"] is None


def _hand_made_result(residual_exact: np.ndarray) -> attribution_patching.AttributionPatchingResult:
    rng = np.random.default_rng(0)
    n_points = residual_exact.shape[0]
    return attribution_patching.AttributionPatchingResult(
        examples=[
            {"clean": "a", "corrupted": "b", "correct": " x", "incorrect": " y", "order": "ABBA"}
        ],
        clean={"mean_logit_difference": 1.0},
        corrupted={"mean_logit_difference": -1.0},
        residual_labels=[f"before block {layer}" for layer in range(n_points - 1)]
        + ["after the last block"],
        roles=list(ROLES),
        heads_estimate=rng.normal(size=(n_points - 1, 4)),
        heads_exact=rng.normal(size=(n_points - 1, 4)),
        mlps_estimate=rng.normal(size=n_points - 1),
        mlps_exact=rng.normal(size=n_points - 1),
        residual_estimate=np.zeros_like(residual_exact),
        residual_exact=residual_exact,
        residual_groups_before_change=[],
        attribution_seconds=1.0,
        exact_seconds={"heads": 1.0},
    )


def _marked_cells(figure, gid: str) -> list[set[tuple[int, int]]]:  # type: ignore[no-untyped-def]
    """Per heatmap panel, the (row, column) cells covered by rectangles tagged ``gid``."""
    return [
        {
            (round(patch.get_y() + 0.5), round(patch.get_x() + 0.5))
            for patch in axes.patches
            if isinstance(patch, Rectangle) and patch.get_gid() == gid
        }
        for axes in figure.axes
        if axes.images
    ]


def test_estimate_only_and_badly_estimated_residual_cells_are_marked_on_the_figure() -> None:
    exact = np.zeros((4, len(ROLES)))
    exact[:, [ROLES.index("end"), ROLES.index("other")]] = np.nan  # not patched exactly
    exact[1, ROLES.index("S2")] = 0.9  # the estimate (0) is off by far more than ESTIMATE_OFF
    figures = {
        figure.name: figure for figure in attribution_patching.render(_hand_made_result(exact))
    }
    residual = figures["03_residual_exact_and_estimate"].figure
    estimate_only = {(point, ROLES.index(role)) for point in range(4) for role in ("end", "other")}
    assert _marked_cells(residual, "estimate_only") == [estimate_only, estimate_only]  # both panels
    assert _marked_cells(residual, "estimate_off") == [set(), {(1, ROLES.index("S2"))}]
    assert any(
        "estimate only" in text.get_text()
        for legend in residual.legends
        for text in legend.get_texts()
    )
    # Every group patched exactly: nothing is marked estimate-only, and the legend doesn't say it.
    complete = np.where(np.isnan(exact), 0.0, exact)
    residual = {
        figure.name: figure for figure in attribution_patching.render(_hand_made_result(complete))
    }["03_residual_exact_and_estimate"].figure
    assert _marked_cells(residual, "estimate_only") == [set(), set()]
    assert not any(
        "estimate only" in text.get_text()
        for legend in residual.legends
        for text in legend.get_texts()
    )


def test_each_panel_draws_the_values_its_title_names() -> None:
    exact = np.zeros((4, len(ROLES)))
    exact[2, ROLES.index("IO")] = 0.7
    result = _hand_made_result(exact)
    figures = {figure.name: figure.figure for figure in attribution_patching.render(result)}
    for name, (left, right) in {
        "02_heads_exact_and_estimate": (result.heads_exact, result.heads_estimate),
        "03_residual_exact_and_estimate": (result.residual_exact, result.residual_estimate),
    }.items():
        panels = [axes for axes in figures[name].axes if axes.images]
        assert ["exact patching" in axes.get_title() for axes in panels] == [True, False]
        assert ["attribution estimate" in axes.get_title() for axes in panels] == [False, True]
        np.testing.assert_array_equal(np.ma.filled(panels[0].images[0].get_array(), 0.0), left)
        np.testing.assert_array_equal(np.ma.filled(panels[1].images[0].get_array(), 0.0), right)
