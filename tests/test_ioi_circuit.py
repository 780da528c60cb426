"""ioi_circuit: the circuit with everything kept is the clean run, with nothing kept the corrupted
run; the edges and the figures come out end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SharedTinyModels
from unraveled.experiments import ioi_circuit
from unraveled.cli import main
from unraveled.datasets.ioi import IOIParams


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_everything_kept_recovers_one_and_nothing_kept_zero(checkpoint: str, request: pytest.FixtureRequest, tiny_model: SharedTinyModels) -> None:
    model = tiny_model(request.getfixturevalue(checkpoint), "processed")
    params = ioi_circuit.IOICircuitParams(ioi=IOIParams(n_pairs=4), top_edges=5, circuit_sizes=[1, 3], edge_counts=[5])
    result = ioi_circuit.compute(model, params, seed=0)
    n_nodes = 1 + model.cfg.n_layers * (model.cfg.n_heads + 1)
    assert result.sizes == [0, 1, 3, n_nodes]
    assert result.faithfulness[0] == pytest.approx(0.0, abs=1e-5)
    assert result.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    assert result.random_faithfulness[0] == pytest.approx(0.0, abs=1e-5)
    assert result.random_faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    # The embeddings alone, everything else corrupted: the last token's residual is the corrupted one.
    assert result.faithfulness[1] == pytest.approx(0.0, abs=1e-5)
    assert result.edge_counts == [0, 5, result.n_edges]
    assert result.edge_faithfulness[0] == pytest.approx(0.0, abs=1e-5)
    assert result.edge_faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    assert len(result.edges) == 5
    assert abs(result.edges[0]["score"]) >= abs(result.edges[-1]["score"])
    assert result.edge_sum_error < 1e-4


def test_ioi_circuit_runs_through_cli_smoke(tiny_llama_dir: Path, tmp_path: Path, warm_weight_cache: Path) -> None:
    out = tmp_path / "out"
    assert main(["run", "ioi_circuit", "--model", str(tiny_llama_dir), "--out", str(out), "--set", "params.ioi.n_pairs=3"]) == 0
    run_dir = out / tiny_llama_dir.name / "ioi_circuit"
    assert {p.stem for p in (run_dir / "figures").glob("*.png")} == {"01_circuit_edges", "02_faithfulness", "03_component_scores"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["top_edges"]) == 30 and metrics["n_pairs"] == 3
    assert all(edge["input"] in {"q", "k", "v", "mlp", "logits"} for edge in metrics["top_edges"])
