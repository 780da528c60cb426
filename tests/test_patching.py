"""The patching core against independent computations: exact patches against a plain hooked run of
the whole model, attribution estimates against exact patching where the metric is linear, edge
scores against each component's own gradient."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer

from tests.conftest import SharedTinyModels
from unraveled.datasets.ioi import ROLES, IOIParams, ioi_batch
from unraveled.patching import (
    Patch,
    PromptPairs,
    answer_summary,
    attribution,
    component_patches,
    edge_attribution,
    edge_circuit_logit_differences,
    estimates_per_component,
    head_patches,
    logit_differences,
    mlp_patches,
    patchable_hooks,
    patched_logit_differences,
    residual_patches,
    run_cache,
)

N_PAIRS = 4


@pytest.fixture(scope="module", params=["tiny_gpt2_dir", "tiny_llama_dir"])
def loaded(request: pytest.FixtureRequest, tiny_model: SharedTinyModels) -> HookedTransformer:
    return tiny_model(request.getfixturevalue(request.param), "processed")


def _hand_built(tiny_gpt2_dir: Path, attn_only: bool) -> HookedTransformer:
    """A model without any norm: the logit difference is linear in the last block's outputs and in
    the final residual stream."""
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=50257,
        n_ctx=64,
        act_fn="gelu",
        normalization_type=None,
        attn_only=attn_only,
        seed=1,
        initializer_range=0.3,  # large weights: far from linear
    )
    return (
        HookedTransformer(cfg, AutoTokenizer.from_pretrained(tiny_gpt2_dir))
        .eval()
        .requires_grad_(False)
    )


def _plain_patched_differences(
    model: HookedTransformer, tokens: torch.Tensor, pairs, patch: Patch, source
) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The patch applied the plainest way: the whole model from the corrupted tokens, one hook."""

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
    return logit_differences(logits, pairs)


def test_exact_patches_match_a_plain_hooked_run(loaded: HookedTransformer) -> None:
    batch = ioi_batch(loaded, IOIParams(n_pairs=N_PAIRS), seed=0)
    pairs = batch.tokens
    hooks = patchable_hooks(loaded)
    _, clean_cache = run_cache(loaded, pairs, "clean", hooks)
    corrupted_logits, corrupted_cache = run_cache(loaded, pairs, "corrupted", hooks)
    patches = [
        Patch("blocks.1.attn.hook_z", head=2),
        Patch("blocks.0.hook_mlp_out"),
        Patch("blocks.1.hook_resid_pre", positions=batch.roles["S2"]),
        Patch(
            "blocks.0.hook_resid_pre", positions=batch.roles["IO"]
        ),  # before the prompts differ: changes nothing
    ]
    ours = patched_logit_differences(
        loaded,
        pairs,
        [[p] for p in patches] + [[]],
        clean_cache,
        "corrupted",
        corrupted_cache,
        max_rows=8,
    )
    for row, patch in enumerate(patches):
        expected = _plain_patched_differences(loaded, pairs.corrupted, pairs, patch, clean_cache)
        torch.testing.assert_close(ours[row], expected, atol=1e-4, rtol=1e-4)
    rows = torch.arange(pairs.size)
    corrupted = corrupted_logits[rows, pairs.correct] - corrupted_logits[rows, pairs.incorrect]
    torch.testing.assert_close(ours[-1], corrupted, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[3], corrupted, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours[2], corrupted, atol=1e-3)  # S2 carries the difference


def test_restoring_the_whole_residual_stream_gives_the_clean_run(loaded: HookedTransformer) -> None:
    pairs = ioi_batch(loaded, IOIParams(n_pairs=N_PAIRS), seed=1).tokens
    hooks = patchable_hooks(loaded)
    clean_logits, clean_cache = run_cache(loaded, pairs, "clean", hooks)
    _, corrupted_cache = run_cache(loaded, pairs, "corrupted", hooks)
    sets = [[Patch(f"blocks.{layer}.hook_resid_pre")] for layer in range(loaded.cfg.n_layers)]
    ours = patched_logit_differences(loaded, pairs, sets, clean_cache, "corrupted", corrupted_cache)
    rows = torch.arange(pairs.size)
    clean = clean_logits[rows, pairs.correct] - clean_logits[rows, pairs.incorrect]
    torch.testing.assert_close(ours, clean.expand_as(ours), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn_only", [True, False])
def test_attribution_is_exact_where_the_metric_is_linear(
    tiny_gpt2_dir: Path, attn_only: bool
) -> None:
    model = _hand_built(tiny_gpt2_dir, attn_only)
    batch = ioi_batch(model, IOIParams(n_pairs=N_PAIRS), seed=0)
    pairs, groups = batch.tokens, [batch.roles[role] for role in ROLES]
    hooks = (
        patchable_hooks(model)
        if not attn_only
        else [h for h in patchable_hooks(model) if "mlp" not in h]
    )
    _, clean_cache = run_cache(model, pairs, "clean", hooks)
    _, corrupted_cache = run_cache(model, pairs, "corrupted", hooks)
    base, estimates = attribution(model, pairs, hooks, clean_cache, base="corrupted")
    if attn_only:
        for hook in hooks:
            estimates.setdefault(hook.replace("attn.hook_z", "hook_mlp_out"), torch.zeros(1, 1, 1))
    heads, mlps, residual = estimates_per_component(model, estimates, groups)

    def exact(sets):  # type: ignore[no-untyped-def]
        return (
            patched_logit_differences(model, pairs, sets, clean_cache, "corrupted", corrupted_cache)
            - base
        ).mean(-1)

    last = model.cfg.n_layers - 1
    torch.testing.assert_close(
        residual[-1], exact(residual_patches(model, groups)[-len(groups) :]), atol=1e-4, rtol=1e-4
    )
    if attn_only:  # a last-layer head writes straight to the logits
        torch.testing.assert_close(
            heads[last], exact(head_patches(model)[-model.cfg.n_heads :]), atol=1e-4, rtol=1e-4
        )
        nonlinear = (
            heads[0],
            exact(head_patches(model)[: model.cfg.n_heads]),
        )  # through the next layer's softmax
    else:  # the last MLP writes straight to the logits
        torch.testing.assert_close(
            mlps[last : last + 1], exact(mlp_patches(model)[-1:]), atol=1e-4, rtol=1e-4
        )
        nonlinear = mlps[:1], exact(mlp_patches(model)[:1])
    estimate, truth = nonlinear
    assert (
        estimate - truth
    ).abs().max() > 0.01 * truth.abs().max()  # further from the logits, only an estimate


def test_edge_scores_add_up_to_each_components_own_attribution(loaded: HookedTransformer) -> None:
    pairs = ioi_batch(loaded, IOIParams(n_pairs=N_PAIRS), seed=2).tokens
    n_layers = loaded.cfg.n_layers
    hooks = [
        "hook_embed",
        *(["hook_pos_embed"] if loaded.cfg.positional_embedding_type == "standard" else []),
    ]
    hooks += [f"blocks.{l}.attn.hook_z" for l in range(n_layers)] + [
        f"blocks.{l}.hook_mlp_out" for l in range(n_layers)
    ]
    _, corrupted_cache = run_cache(loaded, pairs, "corrupted", hooks)
    settings = (
        loaded.cfg.use_split_qkv_input,
        loaded.cfg.use_hook_mlp_in,
        loaded.cfg.ungroup_grouped_query_attention,
    )
    scores = edge_attribution(loaded, pairs, corrupted_cache, base="clean")
    assert (
        loaded.cfg.use_split_qkv_input,
        loaded.cfg.use_hook_mlp_in,
        loaded.cfg.ungroup_grouped_query_attention,
    ) == settings
    n_heads = loaded.cfg.n_heads
    assert len(scores.upstream) == 1 + n_layers * (n_heads + 1)
    assert len(scores.downstream) == n_layers * (3 * n_heads + 1) + 1
    # Components only feed later ones: head 1.0 reads nothing from layer 1, MLP 0 reads head 0.x.
    assert torch.isnan(
        scores.scores[scores.upstream.index("1.0"), scores.downstream.index("1.2.q")]
    )
    assert not torch.isnan(
        scores.scores[scores.upstream.index("0.3"), scores.downstream.index("m0")]
    )
    # Independent route: the plain attribution of each head's z and each MLP's output.
    _, own = attribution(loaded, pairs, hooks, corrupted_cache, base="clean")
    for layer in range(n_layers):
        for head in range(n_heads):
            expected = own[f"blocks.{layer}.attn.hook_z"][:, :, head].sum() / pairs.size
            assert float(scores.nodes[scores.upstream.index(f"{layer}.{head}")]) == pytest.approx(
                float(expected), abs=1e-5
            )
        expected = own[f"blocks.{layer}.hook_mlp_out"].sum() / pairs.size
        assert float(scores.nodes[scores.upstream.index(f"m{layer}")]) == pytest.approx(
            float(expected), abs=1e-5
        )
    torch.testing.assert_close(
        torch.nansum(scores.scores, dim=1), scores.nodes, atol=1e-5, rtol=1e-4
    )


def _closed_form_edge_scores(
    model: HookedTransformer, pairs: PromptPairs
) -> dict[tuple[str, str], float]:
    """Edge scores of a one-layer model without norms or MLP, by hand in float64 numpy.

    The metric at the last position L is M = (x_L + sum_h sum_j A_hj (x_j W_V + b_V) W_O + b_O) . d,
    d = W_U[correct] - W_U[incorrect], x the embeddings, A_h = softmax(q_L . k_j / sqrt(d_head)).
    Its gradients at the clean run: the value input at j, A_hj W_V W_O d; the key input at j,
    dM/ds_j W_K q_L / sqrt(d_head); the query input (at L only), W_Q sum_j dM/ds_j k_j / sqrt(d_head);
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
        and min(b - a for a, b in zip(values, values[1:])) > 1e-3 + 1e-3 * values[-1]
    )
    # The MLP reads nothing and writes nothing.
    assert float(
        found.scores[found.upstream.index("embed"), found.downstream.index("m0")]
    ) == pytest.approx(0.0, abs=1e-7)


def test_edge_circuits_agree_with_node_circuits(loaded: HookedTransformer) -> None:
    """Keeping every edge out of a set of components is keeping those components (everything else
    corrupted): two different routes through the model must agree."""
    pairs = ioi_batch(loaded, IOIParams(n_pairs=3), seed=3).tokens
    n_layers = loaded.cfg.n_layers
    hooks = [
        "hook_embed",
        *(["hook_pos_embed"] if loaded.cfg.positional_embedding_type == "standard" else []),
    ]
    hooks += [f"blocks.{l}.attn.hook_z" for l in range(n_layers)] + [
        f"blocks.{l}.hook_mlp_out" for l in range(n_layers)
    ]
    hooks += [f"blocks.{l}.hook_resid_{p}" for l in range(n_layers) for p in ("pre", "mid")] + [
        f"blocks.{n_layers - 1}.hook_resid_post"
    ]
    clean_logits, _ = run_cache(loaded, pairs, "clean", [])
    corrupted_logits, corrupted_cache = run_cache(loaded, pairs, "corrupted", hooks)
    scores = edge_attribution(loaded, pairs, corrupted_cache, base="clean")
    valid = ~torch.isnan(scores.scores)
    keep_sets = [["embed", "0.1", "1.2", "m0"], ["embed", "0.0", "0.3", "m1", "1.1"]]
    masks = torch.stack([torch.zeros_like(valid), valid])  # nothing kept, everything kept
    node_masks = []
    for keep in keep_sets:
        rows = torch.tensor([name in keep for name in scores.upstream])
        node_masks.append(valid & rows[:, None])
    ours = edge_circuit_logit_differences(
        loaded, pairs, corrupted_cache, torch.cat([masks, torch.stack(node_masks)])
    )
    rows = torch.arange(pairs.size)
    torch.testing.assert_close(
        ours[0],
        corrupted_logits[rows, pairs.correct] - corrupted_logits[rows, pairs.incorrect],
        atol=1e-4,
        rtol=1e-4,
    )
    torch.testing.assert_close(
        ours[1],
        clean_logits[rows, pairs.correct] - clean_logits[rows, pairs.incorrect],
        atol=1e-4,
        rtol=1e-4,
    )
    node_sets = [
        [p for name in scores.upstream if name not in keep for p in component_patches(name, loaded)]
        for keep in keep_sets
    ]
    expected = patched_logit_differences(loaded, pairs, node_sets, corrupted_cache, base="clean")
    torch.testing.assert_close(ours[2:], expected, atol=1e-4, rtol=1e-4)


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
