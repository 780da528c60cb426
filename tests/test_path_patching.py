"""Path patching against a naive implementation (every head frozen by plain hooks on the whole
model, the receiver's input captured and patched by plain run_with_hooks), against edge
attribution where the path to the logits is linear (no norm, MLPs frozen), and its bad input."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import jaxtyping
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer
from unraveled.experiments import path_patching

from tests.helpers.patching import hand_built
from unraveled.components import HeadComponent
from unraveled.datasets.ioi import IOIParams, ioi_batch
from unraveled.errors import ParamError
from unraveled.experiment import check_params
from unraveled.patching import edge_attribution, output_hooks, run_cache
from unraveled.patching.paths import (
    path_patch_to_logits,
    path_patch_to_receivers,
    path_patching_hooks,
)


def _three_layers(tiny_gpt2_dir: Path, kind: str) -> HookedTransformer:
    """Three layers, so a head sits between sender and receiver: LayerNorm GPT-2-like, or RMSNorm
    with rotary and grouped-query attention (Llama-like)."""
    extra = (
        {"normalization_type": "LN", "act_fn": "gelu"}
        if kind == "gpt2"
        else {
            "normalization_type": "RMS",
            "act_fn": "silu",
            "gated_mlp": True,
            "positional_embedding_type": "rotary",
            "n_key_value_heads": 2,
        }
    )
    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        d_vocab=50257,
        n_ctx=64,
        seed=3,
        initializer_range=0.2,
        **extra,
    )
    return (
        HookedTransformer(cfg, AutoTokenizer.from_pretrained(tiny_gpt2_dir))
        .eval()
        .requires_grad_(False)
    )


def _naive_last_logit_difference(logits: torch.Tensor, pairs) -> torch.Tensor:  # type: ignore[no-untyped-def]
    rows = torch.arange(pairs.size)
    last = logits[rows, pairs.last]
    return last[rows, pairs.correct] - last[rows, pairs.incorrect]


def _freezing_hooks(model, clean, corrupted, sender, freeze_mlps):  # type: ignore[no-untyped-def]
    """Every head's z set to the clean run's, the sender's to the corrupted run's; MLPs from the
    sender's layer on to the clean run's when frozen."""

    def set_z(activation, hook):  # type: ignore[no-untyped-def]
        activation[:] = clean[hook.name]
        if hook.layer() == sender.layer:
            activation[:, :, sender.head] = corrupted[hook.name][:, :, sender.head]
        return activation

    def set_mlp(activation, hook):  # type: ignore[no-untyped-def]
        return clean[hook.name].clone()

    hooks = [(f"blocks.{layer}.attn.hook_z", set_z) for layer in range(model.cfg.n_layers)]
    if freeze_mlps:
        hooks += [
            (f"blocks.{layer}.hook_mlp_out", set_mlp)
            for layer in range(sender.layer, model.cfg.n_layers)
        ]
    return hooks


def _naive_to_logits(model, pairs, clean, corrupted, sender, freeze_mlps):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        logits = model.run_with_hooks(
            pairs.clean, fwd_hooks=_freezing_hooks(model, clean, corrupted, sender, freeze_mlps)
        )
    return _naive_last_logit_difference(logits, pairs)


def _naive_to_receivers(  # type: ignore[no-untyped-def]
    model, pairs, clean, corrupted, sender, receivers, freeze_mlps, last_only
):
    """Step 1: the frozen run, capturing each receiver's split input. Step 2: a plain clean run
    with those inputs (its head's slice, at the last token or everywhere) replaced."""
    captured = {}

    def capture(activation, hook):  # type: ignore[no-untyped-def]
        captured[hook.name] = activation.clone()
        return activation

    names = {f"blocks.{r.layer}.hook_{r.input}_input" for r in receivers}
    model.set_use_split_qkv_input(True)
    if model.cfg.n_key_value_heads is not None:
        model.set_ungroup_grouped_query_attention(True)
    try:
        with torch.no_grad():
            model.run_with_hooks(
                pairs.clean,
                fwd_hooks=_freezing_hooks(model, clean, corrupted, sender, freeze_mlps)
                + [(name, capture) for name in names],
            )

            def patch(activation, hook):  # type: ignore[no-untyped-def]
                for receiver in receivers:
                    if f"blocks.{receiver.layer}.hook_{receiver.input}_input" != hook.name:
                        continue
                    if receiver.layer <= sender.layer:  # not reached: keeps its clean input
                        continue
                    for row in range(pairs.size):
                        where = [int(pairs.last[row])] if last_only else slice(None)
                        activation[row, where, receiver.head] = captured[hook.name][
                            row, where, receiver.head
                        ]
                return activation

            logits = model.run_with_hooks(pairs.clean, fwd_hooks=[(n, patch) for n in names])
    finally:
        model.set_use_split_qkv_input(False)
        model.set_ungroup_grouped_query_attention(False)
    return _naive_last_logit_difference(logits, pairs)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def three_layer_model(request: pytest.FixtureRequest, tiny_gpt2_dir: Path) -> HookedTransformer:
    return _three_layers(tiny_gpt2_dir, request.param)


def _caches(model):  # type: ignore[no-untyped-def]
    pairs = ioi_batch(model, IOIParams(n_pairs=3, corruption="abc"), seed=1).tokens
    _, clean = run_cache(model, pairs, "clean", path_patching_hooks(model))
    _, corrupted = run_cache(model, pairs, "corrupted", path_patching_hooks(model))
    return pairs, clean, corrupted


@pytest.mark.parametrize("freeze_mlps", [False, True])
def test_senders_to_logits_match_a_naive_frozen_run(three_layer_model, freeze_mlps) -> None:  # type: ignore[no-untyped-def]
    model = three_layer_model
    pairs, clean, corrupted = _caches(model)
    senders = [HeadComponent(layer, head) for layer in range(3) for head in range(4)]
    # max_rows=2: senders split over passes that span layers.
    ours = path_patch_to_logits(
        model, pairs, clean, corrupted, senders, freeze_mlps=freeze_mlps, max_rows=2
    )
    expected = torch.stack(
        [_naive_to_logits(model, pairs, clean, corrupted, s, freeze_mlps) for s in senders]
    )
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    # Not trivially the clean run: some sender moves the logit difference.
    clean_difference = _naive_last_logit_difference(model(pairs.clean), pairs)
    assert (ours - clean_difference).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("inputs", "freeze_mlps", "last_only"),
    [("q", False, True), ("q", True, False), ("kv", False, False), ("qkv", False, True)],
)
def test_senders_to_receivers_match_a_naive_two_step_run(  # type: ignore[no-untyped-def]
    three_layer_model, inputs, freeze_mlps, last_only
) -> None:
    model = three_layer_model
    pairs, clean, corrupted = _caches(model)
    # Receivers in layers 1 and 2: a layer-0 sender reaches both, through head 1.x frozen.
    receivers = [HeadComponent(2, 1, kind) for kind in inputs] + [HeadComponent(1, 3, inputs[0])]
    senders = [HeadComponent(layer, head) for layer in range(3) for head in range(4)]
    ours = path_patch_to_receivers(
        model,
        pairs,
        clean,
        corrupted,
        receivers,
        senders,
        freeze_mlps=freeze_mlps,
        max_rows=5,
        positions="last" if last_only else "all",
    )
    assert torch.isnan(ours[8:]).all()  # layer 2 reaches no receiver
    expected = torch.stack(
        [
            _naive_to_receivers(
                model, pairs, clean, corrupted, s, receivers, freeze_mlps, last_only
            )
            for s in senders[:8]
        ]
    )
    torch.testing.assert_close(ours[:8], expected, atol=1e-4, rtol=1e-4)
    clean_difference = _naive_last_logit_difference(model(pairs.clean), pairs)
    assert (ours[:8] - clean_difference).abs().max() > 1e-3
    assert not model.cfg.use_split_qkv_input  # the model's settings restored


def test_senders_to_logits_equal_edge_attribution_where_linear(tiny_gpt2_dir: Path) -> None:
    """No norm and MLPs frozen: the path from a head to the logits is linear, so patching it is
    exactly its edge attribution score into the logits (a gradient, computed another way)."""
    model = hand_built(tiny_gpt2_dir, attn_only=False)
    pairs = ioi_batch(model, IOIParams(n_pairs=4, corruption="abc"), seed=0).tokens
    clean_logits, clean = run_cache(model, pairs, "clean", path_patching_hooks(model))
    _, corrupted = run_cache(model, pairs, "corrupted", [*output_hooks(model)])
    ours = path_patch_to_logits(model, pairs, clean, corrupted, freeze_mlps=True)
    rows = torch.arange(pairs.size)
    change = (
        ours - (clean_logits[rows, pairs.correct] - clean_logits[rows, pairs.incorrect])
    ).mean(-1)
    edges = edge_attribution(model, pairs, corrupted, base="clean")
    heads = [f"{layer}.{head}" for layer in range(2) for head in range(4)]
    expected = torch.stack(
        [edges.scores[edges.upstream.index(h), edges.downstream.index("logits")] for h in heads]
    )
    torch.testing.assert_close(change, expected, atol=1e-4, rtol=1e-4)
    assert expected.abs().max() > 1e-2
    # With MLPs recomputed a layer-0 head also acts through MLP 0 and 1: no longer its edge.
    through_mlps = path_patch_to_logits(model, pairs, clean, corrupted, freeze_mlps=False)
    assert (through_mlps[:4] - ours[:4]).abs().max() > 1e-3


def test_bad_receivers_are_refused_naming_the_field(tiny_model, tiny_gpt2_dir) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(tiny_gpt2_dir, "processed")
    experiment = path_patching.EXPERIMENT
    for receivers, says in [
        (["1.4"], "out of range"),  # 4 heads
        (["2.0"], "out of range"),  # 2 layers
        (["0.1", "0.2"], "layer 0"),
    ]:
        params = path_patching.PathPatchingParams(receivers=receivers)
        with pytest.raises(ParamError, match=says) as raised:
            check_params(experiment, params, model)
        assert raised.value.exit_code == 2
        assert "receivers" in str(raised.value)
    with pytest.raises(ValueError, match="receivers"):
        path_patching.PathPatchingParams(receivers=["9"])
    with pytest.raises(ValueError, match=r"sender 5\.0"):
        path_patch_to_logits(model, *_dummy_pairs_and_caches(model), [HeadComponent(5, 0)])


def _dummy_pairs_and_caches(model):  # type: ignore[no-untyped-def]
    pairs, clean, corrupted = _caches(model)
    return pairs, clean, corrupted


def test_a_model_that_does_not_do_ioi_is_refused(tiny_model, tiny_gpt2_dir) -> None:  # type: ignore[no-untyped-def]
    """The random tiny model prefers S to IO on these pairs: changes relative to that would
    invert their signs, so it is refused, naming its clean mean logit difference."""
    model = tiny_model(tiny_gpt2_dir, "processed")
    params = path_patching.PathPatchingParams(ioi=IOIParams(n_pairs=2, corruption="abc"))
    pairs = ioi_batch(model, params.ioi, seed=0).tokens
    logits = model(pairs.clean)[torch.arange(pairs.size), pairs.last]
    rows = torch.arange(pairs.size)
    clean_mean = float((logits[rows, pairs.correct] - logits[rows, pairs.incorrect]).mean())
    assert clean_mean < path_patching.MIN_CLEAN_LOGIT_DIFFERENCE
    with pytest.raises(ParamError, match=rf"doesn't do IOI.* {clean_mean:.3g}") as raised:
        path_patching.compute(model, params, seed=0)
    assert raised.value.field == "ioi"


def _doing_ioi(model: HookedTransformer, params: IOIParams) -> HookedTransformer:
    """A copy of ``model`` whose unembedding bias favours each pair's IO over its S."""
    rigged = copy.deepcopy(model)
    pairs = ioi_batch(model, params, seed=0).tokens
    with torch.no_grad():
        rigged.b_U[pairs.correct] += 5.0
        rigged.b_U[pairs.incorrect] -= 5.0
    return rigged


def test_only_gpt2_by_name_gets_the_published_name_movers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)  # a stand-in: a config only
    shape = {"original_architecture": "GPT2LMHeadModel", "n_layers": 12, "n_heads": 12}
    for name, published in [("gpt2", True), ("gpt2-small", True), ("my-gpt2-finetune", False)]:
        model = SimpleNamespace(cfg=SimpleNamespace(model_name=name, d_model=768, **shape))
        assert path_patching._is_gpt2_small(model) is published, name  # type: ignore[arg-type]


def test_experiment_runs_on_a_tiny_model(tiny_model, tiny_gpt2_dir) -> None:  # type: ignore[no-untyped-def]
    params = path_patching.PathPatchingParams(ioi=IOIParams(n_pairs=2, corruption="abc"))
    model = _doing_ioi(tiny_model(tiny_gpt2_dir, "processed"), params.ioi)
    result = path_patching.compute(model, params, seed=0)
    metrics = result.metrics()
    assert metrics["n_pairs"] == 2 and len(result.receivers) == 3
    assert all(name.split(".")[0] == "1" for name in result.receivers)  # layer 0 can't receive
    assert metrics["top_senders_to_logits"][0]["standard_error_percent"] >= 0
    assert [figure.name for figure in path_patching.render(result)] == [
        "01_senders_to_logits",
        "02_senders_to_receivers",
    ]
