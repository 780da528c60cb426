"""The patching core against independent computations: exact patches against a plain hooked run of
the whole model, attribution estimates against exact patching where the metric is linear, edge
scores against each component's own gradient and against a closed form, and any metric in place
of the logit difference against a plain forward."""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer

from tests.helpers.patching import (
    N_PAIRS,
    check_attribution_is_exact_where_the_metric_is_linear,
    check_edge_circuits_agree_with_node_circuits,
    check_edge_scores_add_up_to_each_components_own_attribution,
    hand_built,
)
from unraveled.datasets.ioi import IOIParams, ioi_batch
from unraveled.logits import residual_hook_names
from unraveled.patching import (
    Patch,
    PromptPairs,
    answer_summary,
    attribution,
    circuit_hooks,
    edge_attribution,
    edge_circuit_metric,
    output_hooks,
    patchable_hooks,
    patched_metric,
    residual_patches,
    run_cache,
)


def _plain_patched_last_logits(
    model: HookedTransformer, tokens: torch.Tensor, pairs: PromptPairs, patch: Patch, source
) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The patch applied the plainest way: the whole model from the corrupted tokens, one hook;
    the logits at each prompt's last token."""

    def hook(activation: torch.Tensor, hook) -> torch.Tensor:  # type: ignore[no-untyped-def]
        value = source[patch.hook]
        for row in range(activation.shape[0]):
            for position in range(activation.shape[1]):
                if patch.positions is None or patch.positions[row, position]:
                    if patch.head is None:
                        activation[row, position] = value[row, position]
                    else:
                        activation[row, position, patch.head] = value[row, position, patch.head]
        return activation

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(patch.hook, hook)])
    return logits[torch.arange(pairs.size), pairs.last]


def _by_hand(last_logits: torch.Tensor, pairs: PromptPairs, metric: str) -> torch.Tensor:
    rows = torch.arange(pairs.size)
    correct = last_logits[rows, pairs.correct]
    return correct if metric == "correct logit" else correct - last_logits[rows, pairs.incorrect]


def correct_logit(last_logits: torch.Tensor, pairs: PromptPairs) -> torch.Tensor:
    """A metric other than the default: the correct answer's logit."""
    return last_logits[torch.arange(last_logits.shape[0]), pairs.correct]


@pytest.mark.parametrize("metric", ["logit difference", "correct logit"])
def test_exact_patches_match_a_plain_hooked_run(
    tiny_gpt2_or_llama: HookedTransformer, metric: str
) -> None:
    """Each patch set against the whole model run from the tokens with one plain hook, scored by
    hand; the correct answer's logit in place of the default metric is scored from the whole
    vocabulary's logits, the default from the two answers' unembedding columns alone."""
    model = tiny_gpt2_or_llama
    batch = ioi_batch(model, IOIParams(n_pairs=N_PAIRS), seed=0)
    pairs = batch.tokens
    hooks = patchable_hooks(model)
    _, clean_cache = run_cache(model, pairs, "clean", hooks)
    corrupted_logits, corrupted_cache = run_cache(model, pairs, "corrupted", hooks)
    patches = [
        Patch("blocks.1.attn.hook_z", head=2),
        Patch("blocks.0.hook_mlp_out"),
        Patch("blocks.1.hook_resid_pre", positions=batch.roles["S2"]),
        # before the prompts differ: changes nothing
        Patch("blocks.0.hook_resid_pre", positions=batch.roles["IO"]),
    ]
    chosen = {"correct logit": {"metric": correct_logit}, "logit difference": {}}[metric]
    ours = patched_metric(
        model,
        pairs,
        [[p] for p in patches] + [[]],
        clean_cache,
        "corrupted",
        corrupted_cache,
        max_rows=8,
        **chosen,
    )
    for row, patch in enumerate(patches):
        plain = _plain_patched_last_logits(model, pairs.corrupted, pairs, patch, clean_cache)
        torch.testing.assert_close(ours[row], _by_hand(plain, pairs, metric), atol=1e-4, rtol=1e-4)
    corrupted = _by_hand(corrupted_logits, pairs, metric)
    torch.testing.assert_close(ours[-1], corrupted, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[3], corrupted, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours[2], corrupted, atol=1e-3)  # S2 carries the difference


def test_restoring_the_whole_residual_stream_gives_the_clean_run(
    tiny_gpt2_or_llama: HookedTransformer,
) -> None:
    loaded = tiny_gpt2_or_llama
    pairs = ioi_batch(loaded, IOIParams(n_pairs=N_PAIRS), seed=1).tokens
    hooks = patchable_hooks(loaded)
    clean_logits, clean_cache = run_cache(loaded, pairs, "clean", hooks)
    _, corrupted_cache = run_cache(loaded, pairs, "corrupted", hooks)
    sets = [[Patch(f"blocks.{layer}.hook_resid_pre")] for layer in range(loaded.cfg.n_layers)]
    ours = patched_metric(loaded, pairs, sets, clean_cache, "corrupted", corrupted_cache)
    rows = torch.arange(pairs.size)
    clean = clean_logits[rows, pairs.correct] - clean_logits[rows, pairs.incorrect]
    torch.testing.assert_close(ours, clean.expand_as(ours), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn_only", [True, False])
def test_attribution_is_exact_where_the_metric_is_linear(
    tiny_gpt2_dir: Path, attn_only: bool
) -> None:
    check_attribution_is_exact_where_the_metric_is_linear(tiny_gpt2_dir, attn_only)


def test_edge_scores_add_up_to_each_components_own_attribution(
    tiny_gpt2_or_llama: HookedTransformer,
) -> None:
    check_edge_scores_add_up_to_each_components_own_attribution(tiny_gpt2_or_llama)


def _closed_form_edge_scores(
    model: HookedTransformer, pairs: PromptPairs
) -> dict[tuple[str, str], float]:
    """Edge scores of a one-layer model without norms or MLP, by hand in float64 numpy.

    The metric at the last position L is M = (x_L + sum_h sum_j A_hj (x_j W_V + b_V) W_O + b_O) . d,
    d = W_U[correct] - W_U[incorrect], x the embeddings, A_h = softmax(q_L . k_j / sqrt(d_head)).
    Its gradients at the clean run: the value input at j, A_hj W_V W_O d; the key input at j,
    dM/ds_j W_K q_L / sqrt(d_head); the query input (at L only),
    W_Q sum_j dM/ds_j k_j / sqrt(d_head);
    with dM/ds_j = A_j (o_j - sum_i A_i o_i), o_j = (x_j W_V + b_V) W_O . d. An edge's score is the
    embeddings' change (corrupted - clean) dotted with the gradient, summed over positions; a head's
    edge to the logits is its output's change at L dotted with d. Mean over prompts.
    """
    weights = {
        name: getattr(model, name).detach().double().numpy() for name in ("W_E", "W_pos", "W_U")
    }
    attn = model.blocks[0].attn
    W_Q, W_K, W_V, W_O = (
        getattr(attn, name).detach().double().numpy() for name in ("W_Q", "W_K", "W_V", "W_O")
    )
    b_Q, b_K, b_V = (
        getattr(attn, name).detach().double().numpy() for name in ("b_Q", "b_K", "b_V")
    )
    scale = np.sqrt(model.cfg.d_head)
    scores: dict[tuple[str, str], float] = defaultdict(float)
    for row in range(pairs.size):
        last = int(pairs.last[row])
        d = (
            weights["W_U"][:, int(pairs.correct[row])]
            - weights["W_U"][:, int(pairs.incorrect[row])]
        )
        x, x_corrupted = (
            (weights["W_E"][tokens[row, : last + 1].numpy()] + weights["W_pos"][: last + 1])
            for tokens in (pairs.clean, pairs.corrupted)
        )
        delta = x_corrupted - x
        for head in range(model.cfg.n_heads):
            outputs = []
            for inputs in (x, x_corrupted):
                q, k, v = (
                    inputs[last] @ W_Q[head] + b_Q[head],
                    inputs @ W_K[head] + b_K[head],
                    inputs @ W_V[head] + b_V[head],
                )
                s = k @ q / scale
                a = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                outputs.append((a, q, k, (v @ W_O[head]) @ d, (a @ v) @ W_O[head]))
            a, q, k, o, head_out = outputs[0]
            ds = a * (o - a @ o)
            grad_q = W_Q[head] @ (ds @ k) / scale
            grad_k = np.outer(ds, W_K[head] @ q) / scale
            grad_v = np.outer(a, W_V[head] @ W_O[head] @ d)
            scores["embed", f"0.{head}.q"] += delta[last] @ grad_q / pairs.size
            scores["embed", f"0.{head}.k"] += (delta * grad_k).sum() / pairs.size
            scores["embed", f"0.{head}.v"] += (delta * grad_v).sum() / pairs.size
            scores[f"0.{head}", "logits"] += (outputs[1][4] - head_out) @ d / pairs.size
        scores["embed", "logits"] += delta[last] @ d / pairs.size
    return scores


def test_edge_scores_match_a_closed_form_per_query_key_and_value_input(tiny_gpt2_dir: Path) -> None:
    """A one-layer model whose MLP writes nothing, so every edge score has a closed form; the
    prompts differ at two positions, one of them the last, so that the query path (read only at
    the last position) has an effect of its own beside the key and value paths. Swapping two of a
    head's input labels, or two heads, moves a value into the wrong column."""
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=16,
        d_vocab=50257,
        n_ctx=64,
        act_fn="gelu",
        normalization_type=None,
        seed=3,
        initializer_range=0.4,
    )
    model = (
        HookedTransformer(cfg, AutoTokenizer.from_pretrained(tiny_gpt2_dir))
        .eval()
        .requires_grad_(False)
    )
    for name in ("W_in", "b_in", "W_out", "b_out"):
        getattr(model.blocks[0].mlp, name).zero_()
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, cfg.d_vocab, (2, 7), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(0, cfg.d_vocab, (2,), generator=generator)
    corrupted[:, -1] = torch.randint(0, cfg.d_vocab, (2,), generator=generator)
    pairs = PromptPairs(
        clean, corrupted, torch.tensor([6, 6]), torch.tensor([11, 22]), torch.tensor([33, 44])
    )
    hooks = ["hook_embed", "hook_pos_embed", "blocks.0.attn.hook_z", "blocks.0.hook_mlp_out"]
    _, corrupted_cache = run_cache(model, pairs, "corrupted", hooks)
    found = edge_attribution(model, pairs, corrupted_cache, base="clean")
    expected = _closed_form_edge_scores(model, pairs)
    for (upstream, downstream), value in expected.items():
        ours = float(
            found.scores[found.upstream.index(upstream), found.downstream.index(downstream)]
        )
        assert ours == pytest.approx(value, rel=1e-3, abs=1e-5), (upstream, downstream)
    # The paths' effects differ enough that any swap of two labels would be seen.
    values = sorted(
        abs(value) for key, value in expected.items() if key[0] == "embed" and key[1] != "logits"
    )
    assert (
        values[0] > 1e-3
        and min(b - a for a, b in itertools.pairwise(values)) > 1e-3 + 1e-3 * values[-1]
    )
    # The MLP reads nothing and writes nothing.
    assert float(
        found.scores[found.upstream.index("embed"), found.downstream.index("m0")]
    ) == pytest.approx(0.0, abs=1e-7)


def test_edge_circuits_agree_with_node_circuits(tiny_gpt2_or_llama: HookedTransformer) -> None:
    check_edge_circuits_agree_with_node_circuits(tiny_gpt2_or_llama)


def test_answer_summary_scores_each_prompt_set_against_its_own_answer() -> None:
    """Hand-made last-token logits of three prompts: the shares counted by hand."""
    zeros = torch.zeros(3, 4, dtype=torch.long)
    pairs = PromptPairs(
        zeros,
        zeros,
        torch.full((3,), 3),
        correct=torch.tensor([1, 1, 2]),
        incorrect=torch.tensor([2, 3, 1]),
    )
    logits = torch.tensor(
        [
            [0.0, 1.0, 3.0, 0.0, 0.0],  # prefers the incorrect answer (2), its top prediction
            [0.0, 2.0, 0.0, 1.0, 5.0],  # prefers the correct answer (1); top prediction 4, neither
            [0.0, 4.0, 1.0, 0.0, 0.0],  # prefers the incorrect answer (1), its top prediction
        ]
    )
    assert answer_summary(logits, pairs) == pytest.approx(
        {
            "mean_logit_difference": (-2.0 + 1.0 - 3.0) / 3,
            "share_correct_over_incorrect": 1 / 3,
            "share_correct_is_top_prediction": 0.0,
        }
    )
    assert answer_summary(logits, pairs, answer="incorrect") == pytest.approx(
        {
            "mean_logit_difference": (-2.0 + 1.0 - 3.0) / 3,
            "share_incorrect_over_correct": 2 / 3,
            "share_incorrect_is_top_prediction": 2 / 3,
        }
    )


@pytest.mark.parametrize("attn_only", [True, False])
def test_attribution_with_another_metric_is_exact_where_it_is_linear(
    tiny_gpt2_dir: Path, attn_only: bool
) -> None:
    """The correct answer's logit is linear in the final residual stream of a model without
    norms: its estimate there equals the exact patch, and the base run's value is the corrupted
    run's correct logit, read by hand from a plain forward."""
    model = hand_built(tiny_gpt2_dir, attn_only)
    batch = ioi_batch(model, IOIParams(n_pairs=N_PAIRS), seed=0)
    pairs = batch.tokens
    points = residual_hook_names(model.cfg.n_layers)
    final = points[-1]
    _, clean_cache = run_cache(model, pairs, "clean", points)
    _, corrupted_cache = run_cache(model, pairs, "corrupted", points)
    base, estimates = attribution(
        model, pairs, [final], clean_cache, base="corrupted", metric=correct_logit
    )
    with torch.no_grad():
        plain = model(pairs.corrupted)[torch.arange(pairs.size), pairs.last]
    torch.testing.assert_close(base, _by_hand(plain, pairs, "correct logit"))
    groups = [batch.roles["end"]]
    exact = patched_metric(
        model,
        pairs,
        residual_patches(model, groups)[-1:],
        clean_cache,
        "corrupted",
        corrupted_cache,
        metric=correct_logit,
    )[0]
    estimate = (estimates[final].sum(-1) * groups[0]).sum(-1)
    torch.testing.assert_close(estimate, exact - base, atol=1e-4, rtol=1e-4)
    # Not the logit difference's estimate: the metric reached the gradient.
    _, default = attribution(model, pairs, [final], clean_cache, base="corrupted")
    assert not torch.allclose((default[final].sum(-1) * groups[0]).sum(-1), estimate, atol=1e-3)


def test_edges_and_circuits_with_another_metric(tiny_gpt2_or_llama: HookedTransformer) -> None:
    """Edge attribution with the correct answer's logit: each component's score is its own
    attribution under that metric, and its edges add up to it; a circuit keeping every edge scores
    the clean run's correct logit, one keeping none the corrupted run's, both read by hand."""
    model = tiny_gpt2_or_llama
    pairs = ioi_batch(model, IOIParams(n_pairs=3), seed=3).tokens
    clean_logits, _ = run_cache(model, pairs, "clean", [])
    corrupted_logits, corrupted_cache = run_cache(model, pairs, "corrupted", circuit_hooks(model))
    scores = edge_attribution(model, pairs, corrupted_cache, base="clean", metric=correct_logit)
    _, own = attribution(
        model, pairs, output_hooks(model), corrupted_cache, base="clean", metric=correct_logit
    )
    for layer in range(model.cfg.n_layers):
        expected = own[f"blocks.{layer}.hook_mlp_out"].sum() / pairs.size
        assert float(scores.nodes[scores.upstream.index(f"m{layer}")]) == pytest.approx(
            float(expected), abs=1e-5
        )
    torch.testing.assert_close(
        torch.nansum(scores.scores, dim=1), scores.nodes, atol=1e-5, rtol=1e-4
    )
    assert scores.base_difference == pytest.approx(
        float(_by_hand(clean_logits, pairs, "correct logit").mean()), abs=1e-4
    )
    valid = ~torch.isnan(scores.scores)
    kept = torch.stack([valid, torch.zeros_like(valid)])
    ours = edge_circuit_metric(model, pairs, corrupted_cache, kept, metric=correct_logit)
    torch.testing.assert_close(
        ours[0], _by_hand(clean_logits, pairs, "correct logit"), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        ours[1], _by_hand(corrupted_logits, pairs, "correct logit"), atol=1e-4, rtol=1e-4
    )
