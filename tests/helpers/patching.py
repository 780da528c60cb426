"""Checks of the patching core shared by test_patching (default pass sizes) and
test_patching_passes (the smallest and uneven passes): each holds however the work is split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer

from unraveled.datasets.ioi import ROLES, IOIParams, ioi_batch
from unraveled.patching import (
    EDGE_BUFFER_BYTES,
    GRADIENT_TOKENS,
    attribution,
    circuit_hooks,
    component_patches,
    edge_attribution,
    edge_circuit_metric,
    estimates_per_component,
    head_patches,
    mlp_patches,
    output_hooks,
    patchable_hooks,
    patched_metric,
    residual_patches,
    run_cache,
)

N_PAIRS = 4


def hand_built(tiny_gpt2_dir: Path, attn_only: bool) -> HookedTransformer:
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


def check_attribution_is_exact_where_the_metric_is_linear(
    tiny_gpt2_dir: Path, attn_only: bool, tokens_per_pass: int = GRADIENT_TOKENS
) -> None:
    model = hand_built(tiny_gpt2_dir, attn_only)
    batch = ioi_batch(model, IOIParams(n_pairs=N_PAIRS), seed=0)
    pairs, groups = batch.tokens, [batch.roles[role] for role in ROLES]
    hooks = (
        patchable_hooks(model)
        if not attn_only
        else [h for h in patchable_hooks(model) if "mlp" not in h]
    )
    _, clean_cache = run_cache(model, pairs, "clean", hooks)
    _, corrupted_cache = run_cache(model, pairs, "corrupted", hooks)
    base, estimates = attribution(
        model, pairs, hooks, clean_cache, base="corrupted", tokens_per_pass=tokens_per_pass
    )
    if attn_only:
        for hook in hooks:
            estimates.setdefault(hook.replace("attn.hook_z", "hook_mlp_out"), torch.zeros(1, 1, 1))
    heads, mlps, residual = estimates_per_component(model, estimates, groups)

    def exact(sets):  # type: ignore[no-untyped-def]
        return (
            patched_metric(model, pairs, sets, clean_cache, "corrupted", corrupted_cache) - base
        ).mean(-1)

    last = model.cfg.n_layers - 1
    torch.testing.assert_close(
        residual[-1], exact(residual_patches(model, groups)[-len(groups) :]), atol=1e-4, rtol=1e-4
    )
    if attn_only:  # a last-layer head writes straight to the logits
        torch.testing.assert_close(
            heads[last], exact(head_patches(model)[-model.cfg.n_heads :]), atol=1e-4, rtol=1e-4
        )
        # through the next layer's softmax
        nonlinear = heads[0], exact(head_patches(model)[: model.cfg.n_heads])
    else:  # the last MLP writes straight to the logits
        torch.testing.assert_close(
            mlps[last : last + 1], exact(mlp_patches(model)[-1:]), atol=1e-4, rtol=1e-4
        )
        nonlinear = mlps[:1], exact(mlp_patches(model)[:1])
    estimate, truth = nonlinear
    # further from the logits, only an estimate
    assert (estimate - truth).abs().max() > 0.01 * truth.abs().max()


def check_edge_scores_add_up_to_each_components_own_attribution(
    model: HookedTransformer, tokens_per_pass: int = GRADIENT_TOKENS
) -> None:
    pairs = ioi_batch(model, IOIParams(n_pairs=N_PAIRS), seed=2).tokens
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    hooks = output_hooks(model)
    _, corrupted_cache = run_cache(model, pairs, "corrupted", hooks)
    settings = (
        model.cfg.use_split_qkv_input,
        model.cfg.use_hook_mlp_in,
        model.cfg.ungroup_grouped_query_attention,
    )
    scores = edge_attribution(
        model, pairs, corrupted_cache, base="clean", tokens_per_pass=tokens_per_pass
    )
    assert (
        model.cfg.use_split_qkv_input,
        model.cfg.use_hook_mlp_in,
        model.cfg.ungroup_grouped_query_attention,
    ) == settings
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
    _, own = attribution(model, pairs, hooks, corrupted_cache, base="clean")
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


def check_edge_circuits_agree_with_node_circuits(
    model: HookedTransformer, buffer_bytes: int = EDGE_BUFFER_BYTES
) -> None:
    """Keeping every edge out of a set of components is keeping those components (everything else
    corrupted): two different routes through the model must agree."""
    pairs = ioi_batch(model, IOIParams(n_pairs=3), seed=3).tokens
    clean_logits, _ = run_cache(model, pairs, "clean", [])
    corrupted_logits, corrupted_cache = run_cache(model, pairs, "corrupted", circuit_hooks(model))
    scores = edge_attribution(model, pairs, corrupted_cache, base="clean")
    valid = ~torch.isnan(scores.scores)
    keep_sets = [["embed", "0.1", "1.2", "m0"], ["embed", "0.0", "0.3", "m1", "1.1"]]
    masks = torch.stack([torch.zeros_like(valid), valid])  # nothing kept, everything kept
    node_masks = []
    for keep in keep_sets:
        rows = torch.tensor([name in keep for name in scores.upstream])
        node_masks.append(valid & rows[:, None])
    ours = edge_circuit_metric(
        model,
        pairs,
        corrupted_cache,
        torch.cat([masks, torch.stack(node_masks)]),
        buffer_bytes=buffer_bytes,
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
        [p for name in scores.upstream if name not in keep for p in component_patches(name, model)]
        for keep in keep_sets
    ]
    expected = patched_metric(model, pairs, node_sets, corrupted_cache, base="clean")
    torch.testing.assert_close(ours[2:], expected, atol=1e-4, rtol=1e-4)
