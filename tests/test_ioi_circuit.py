"""ioi_circuit: the circuit with everything kept is the clean run, with nothing kept the corrupted
run; the edges and the figures come out end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from unraveled.experiments import ioi_circuit

from tests.helpers.models import SharedTinyModels
from unraveled.cli import main
from unraveled.datasets.ioi import IOIParams


@pytest.mark.parametrize("checkpoint", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_everything_kept_recovers_one_and_nothing_kept_zero(
    checkpoint: str, request: pytest.FixtureRequest, tiny_model: SharedTinyModels
) -> None:
    model = tiny_model(request.getfixturevalue(checkpoint), "processed")
    params = ioi_circuit.IOICircuitParams(
        ioi=IOIParams(n_pairs=4), top_edges=5, circuit_sizes=[1, 3], edge_counts=[5]
    )
    result = ioi_circuit.compute(model, params, seed=0)
    n_nodes = 1 + model.cfg.n_layers * (model.cfg.n_heads + 1)
    assert result.sizes == [0, 1, 3, n_nodes]
    assert result.faithfulness[0] == pytest.approx(0.0, abs=1e-5)
    assert result.faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    assert result.random_faithfulness.shape == (params.random_draws, len(result.sizes))
    np.testing.assert_allclose(result.random_faithfulness[:, 0], 0.0, atol=1e-5)
    np.testing.assert_allclose(result.random_faithfulness[:, -1], 1.0, atol=1e-5)
    # The embeddings alone, everything else corrupted: the last token's residual is the corrupted
    # one.
    assert result.faithfulness[1] == pytest.approx(0.0, abs=1e-5)
    assert result.edge_counts == [0, 5, result.n_edges]
    assert result.edge_faithfulness[0] == pytest.approx(0.0, abs=1e-5)
    assert result.edge_faithfulness[-1] == pytest.approx(1.0, abs=1e-5)
    assert len(result.edges) == 5
    assert abs(result.edges[0]["score"]) >= abs(result.edges[-1]["score"])
    assert result.edge_sum_error < 1e-4


def test_corrupted_prompts_are_scored_against_their_own_answer(
    tiny_llama_dir: Path, tiny_model: SharedTinyModels
) -> None:
    """Each swap-corrupted prompt run alone: its own answer is the subject, compared by hand."""
    from unraveled.datasets.ioi import ioi_pairs

    model = tiny_model(tiny_llama_dir, "processed")
    ioi = IOIParams(n_pairs=3)
    prefers_subject = []
    for pair in ioi_pairs(ioi, seed=0):
        logits = model(pair.corrupted)[0, -1]
        io, subject = (model.to_single_token(f" {name}") for name in (pair.io, pair.s))
        prefers_subject.append(float(logits[subject] > logits[io]))
    params = ioi_circuit.IOICircuitParams(
        ioi=ioi, top_edges=5, circuit_sizes=[1], edge_counts=[5], random_draws=1
    )
    corrupted = ioi_circuit.compute(model, params, seed=0).metrics()["corrupted"]
    assert corrupted["share_incorrect_over_correct"] == pytest.approx(np.mean(prefers_subject))


def test_ioi_circuit_runs_through_cli_smoke(
    tiny_llama_dir: Path, tmp_path: Path, warm_weight_cache: Path
) -> None:
    out = tmp_path / "out"
    assert (
        main(
            [
                "run",
                "ioi_circuit",
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
    run_dir = out / tiny_llama_dir.name / "ioi_circuit"
    assert {p.stem for p in (run_dir / "figures").glob("*.png")} == {
        "01_circuit_edges",
        "02_faithfulness",
        "03_component_scores",
    }
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["top_edges"]) == 30 and metrics["n_pairs"] == 3
    assert all(edge["input"] in {"q", "k", "v", "mlp", "logits"} for edge in metrics["top_edges"])


# Each head's weight in the hand-built model below: the share of the clean logit difference it
# carries is its weight over their sum. Ranked by |weight|: 1.1, 0.1, 1.0, 0.0.
HEAD_WEIGHTS = {(0, 0): 1.0, (0, 1): -3.0, (1, 0): 2.0, (1, 1): 6.0}


def _heads_that_copy_the_prompt(folder: Path):  # type: ignore[no-untyped-def]
    """A 2-layer, 2-head model, norm-free and linear, whose ranking of components is known.

    Token embeddings live in dimensions 0-3 (no position embeddings). Every head attends
    uniformly (zero queries and keys), reads dimensions 0-3 and writes the mean embedding of the
    prompt so far, times its weight, into dimensions 4-7; the unembedding reads dimensions 4-7
    against each token's embedding. Heads never read each other and the MLPs write nothing, so
    each head adds weight * (mean embedding) . (E[IO] - E[S]) to the logit difference, and the
    corrupted S2 (the IO name in place of S) moves it by -weight * |E[IO] - E[S]|^2 / length, in
    the same proportion for every prompt.
    """
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        folder
    )  # GPT-2's tokenizer, saved with the tiny checkpoint

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=8,
        n_ctx=64,
        d_head=4,
        n_heads=2,
        d_mlp=4,
        d_vocab=len(tokenizer),
        act_fn="gelu",
        normalization_type=None,
        positional_embedding_type="standard",
        seed=0,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(cfg.d_vocab, 4, generator=generator)
    copy = torch.eye(4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_().requires_grad_(False)  # as the loaded models' weights
        model.embed.W_E[:, :4] = embeddings
        model.unembed.W_U[4:] = embeddings.T
        for (layer, head), weight in HEAD_WEIGHTS.items():
            model.blocks[layer].attn.W_V[head, :4] = copy
            model.blocks[layer].attn.W_O[head, :, 4:] = weight * copy
    return model.eval()


def test_faithfulness_curves_keep_the_components_in_the_known_order(tiny_gpt2_dir: Path) -> None:
    """The interior of both curves, on a model where each head's share is known: the circuit
    of the embeddings and the top k heads keeps the sum of their weights over all the weights.
    A ranking reversed (or ignored) keeps other heads and fails."""
    model = _heads_that_copy_the_prompt(tiny_gpt2_dir)
    params = ioi_circuit.IOICircuitParams(
        ioi=IOIParams(n_pairs=4),
        top_edges=8,
        circuit_sizes=[1, 2, 3, 4, 5, 6],
        edge_counts=[2, 4, 6, 8],
        random_draws=5,
    )
    result = ioi_circuit.compute(model, params, seed=0)
    weights = sorted(HEAD_WEIGHTS.values(), key=abs, reverse=True)
    kept = np.cumsum(weights) / sum(weights)  # shares: 1, 0.5, 0.83, 1
    assert result.nodes == ["embed", "0.0", "0.1", "m0", "1.0", "1.1", "m1"]
    # Sizes 0..7: nothing, the embeddings alone, then the heads by |weight|, then the MLPs (which
    # write nothing).
    np.testing.assert_allclose(result.faithfulness, [0, 0, *kept, 1, 1], atol=1e-5)
    # Each head's two edges (embeddings into its value input, its output into the logits) carry
    # its share only together: 2k edges kept is the top k heads.
    assert result.edge_counts[1:-1] == [2, 4, 6, 8]
    np.testing.assert_allclose(result.edge_faithfulness[1:-1], kept, atol=1e-5)
    assert {(edge["from"], edge["to"], edge["input"]) for edge in result.edges} == {
        *{("embed", f"{layer}.{head}", "v") for layer, head in HEAD_WEIGHTS},
        *{(f"{layer}.{head}", "logits", "logits") for layer, head in HEAD_WEIGHTS},
    }


def test_random_baseline_draws_different_circuits_each_keeping_its_heads_share(
    tiny_gpt2_dir: Path,
) -> None:
    """Every draw at every size keeps the share of some set of that many components (the
    embeddings, then heads and MLPs), and the draws are not all the same circuit."""
    from itertools import combinations

    model = _heads_that_copy_the_prompt(tiny_gpt2_dir)
    params = ioi_circuit.IOICircuitParams(
        ioi=IOIParams(n_pairs=4),
        top_edges=5,
        circuit_sizes=[2, 3, 4, 5],
        edge_counts=[],
        random_draws=6,
    )
    result = ioi_circuit.compute(model, params, seed=0)
    component_weights = [*HEAD_WEIGHTS.values(), 0.0, 0.0]  # the four heads and the two silent MLPs
    total = sum(HEAD_WEIGHTS.values())
    draws = result.random_faithfulness
    assert draws.shape == (6, len(result.sizes))
    for column, size in enumerate(result.sizes):
        possible = (
            {
                round(sum(subset) / total, 4)
                for subset in combinations(component_weights, max(size - 1, 0))
            }
            if size < 7
            else {1.0}
        )
        assert {round(float(share), 4) for share in draws[:, column]} <= possible, (
            size,
            draws[:, column],
            possible,
        )
    assert np.ptp(draws, axis=0).max() > 0.3  # different draws, different circuits
    metrics = result.metrics()["faithfulness"]["random_circuits_of_the_same_sizes"]
    np.testing.assert_allclose(metrics["mean"], draws.mean(0))
    np.testing.assert_allclose(metrics["min"], draws.min(0))
    np.testing.assert_allclose(metrics["max"], draws.max(0))
