"""The local engine against direct computation over the full activation tensor, on tiny models,
and a hand-wired neuron that fires on one token only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

from tests.helpers.corpus import CONTEXT, SETTINGS, load_tiny
from tests.helpers.models import SharedTinyModels
from unraveled.analysis import attention_entropy_by_head, attention_sink_by_head
from unraveled.corpus import corpus_windows
from unraveled.engines.local import run_local
from unraveled.engines.state import AtlasSettings, RepeatMasks, head_scores_per_window
from unraveled.heads import duplicate_token_score, previous_token_score


@pytest.fixture(scope="session")
def tiny_models(
    tiny_gpt2_dir: Path, tiny_llama_dir: Path, tiny_model: SharedTinyModels
) -> dict[str, HookedTransformer]:
    return {
        "gpt2": tiny_model(tiny_gpt2_dir, "processed"),
        "llama": tiny_model(tiny_llama_dir, "processed"),
    }


def full_activations(
    model: HookedTransformer, tokens: torch.Tensor, batch: int
) -> dict[str, torch.Tensor]:
    """Every hook over all windows, in the same batches the engine uses, concatenated."""
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(tokens), batch):
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens[start : start + batch])
        parts.append({name: value for name, value in cache.items()})
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_local_engine_matches_direct_computation(
    kind: str, tiny_models: dict[str, HookedTransformer], corpus_file: Path
) -> None:
    model = tiny_models[kind]
    bos = bool(model.cfg.default_prepend_bos)
    settings = AtlasSettings(**{**SETTINGS.__dict__, "prepend_bos": bos})
    windows = corpus_windows(model.tokenizer, [str(corpus_file)], CONTEXT, None, seed=0)
    state = run_local(model, windows.tokens, settings, progress=False)

    tokens = torch.as_tensor(windows.tokens)
    if bos:
        tokens = torch.cat(
            [torch.full((len(tokens), 1), model.tokenizer.bos_token_id), tokens], dim=1
        )
    acts = full_activations(model, tokens, settings.batch_windows)
    first = 1 if bos else 0
    seq = tokens.shape[1]
    for layer in range(model.cfg.n_layers):
        post = acts[f"blocks.{layer}.mlp.hook_post"][:, first:].double()
        pre = acts[f"blocks.{layer}.mlp.hook_pre"][:, first:]
        flat = post.reshape(-1, post.shape[-1])
        neurons = state.neurons[layer]
        assert neurons.count == len(flat)
        np.testing.assert_allclose(neurons.mean, flat.mean(dim=0).numpy(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(
            neurons.std, flat.std(dim=0, unbiased=False).numpy(), rtol=1e-6, atol=1e-9
        )
        np.testing.assert_allclose(neurons.maximum, flat.max(dim=0).values.numpy(), rtol=1e-6)
        np.testing.assert_allclose(
            neurons.positive_fraction,
            (pre > 0).double().reshape(-1, pre.shape[-1]).mean(dim=0).numpy(),
        )
        # Exact top-k token indices, ranked independently by (value desc, global index asc).
        global_index = (
            torch.arange(len(tokens))[:, None] * seq + torch.arange(first, seq)[None, :]
        ).reshape(-1)
        for neuron in range(0, post.shape[-1], 7):
            ranked = sorted(zip((-flat[:, neuron]).tolist(), global_index.tolist(), strict=True))[
                : settings.top_k
            ]
            assert state.neuron_top[layer].index[:, neuron].tolist() == [
                index for _, index in ranked
            ]
        magnitude = (
            acts[f"blocks.{layer}.hook_resid_post"].abs().double().reshape(-1, model.cfg.d_model)
        )
        np.testing.assert_allclose(
            state.residual[layer].mean, magnitude.mean(dim=0).numpy(), rtol=1e-6
        )
        np.testing.assert_array_equal(
            state.residual[layer].maximum, magnitude.max(dim=0).values.numpy()
        )

    patterns = torch.stack(
        [acts[f"blocks.{layer}.attn.hook_pattern"] for layer in range(model.cfg.n_layers)], dim=1
    )
    means = state.heads.means()
    assert state.heads.count == len(tokens)
    expected = {
        "entropy": torch.stack([attention_entropy_by_head(p) for p in patterns]).mean(dim=0),
        "first_token": patterns[..., 1:, 0].mean(dim=(0, -1)),  # query 0 can only attend to itself
        "previous_token": patterns.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, -1)),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(means[name], value.numpy(), rtol=1e-5, atol=1e-7)
    # head_taxonomy's own per-prompt scores, one window at a time, agree with the batched ones.
    by_window = {
        "first_token": [attention_sink_by_head(p) for p in patterns],
        "previous_token": [previous_token_score(p) for p in patterns],
        "duplicate_token": [
            duplicate_token_score(p, t) for p, t in zip(patterns, tokens, strict=True)
        ],
        "induction": [brute_force_induction(p, t) for p, t in zip(patterns, tokens, strict=True)],
    }
    for name, scores in by_window.items():
        np.testing.assert_allclose(
            means[name], torch.stack(scores).mean(dim=0).numpy(), rtol=1e-5, atol=1e-7
        )


def brute_force_induction(patterns: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Attention to the token after the latest earlier occurrence of the query's token, looped."""
    picked = []
    for query in range(len(tokens)):
        earlier = [j for j in range(query - 1) if tokens[j] == tokens[query]]
        if earlier:
            picked.append(patterns[..., query, earlier[-1] + 1])
    return torch.stack(picked, dim=-1).mean(dim=-1) if picked else torch.zeros(patterns.shape[:2])


def test_induction_and_duplicate_scores_on_a_known_pattern() -> None:
    tokens = torch.tensor([[5, 6, 7, 5, 6, 9, 6, 6]])
    # Queries whose token occurred before, with a successor that is not the query itself:
    # 3 (5 -> target 1), 4 (6 -> 2), 6 (6 -> latest 4 -> 5),
    # 7 (6 -> latest 4, as 6 is right before -> 5).
    patterns = torch.zeros(1, 1, 8, 8)
    patterns[0, 0, 3, 1] = 1.0
    patterns[0, 0, 4, 2] = 0.5
    patterns[0, 0, 6, 5] = 0.3
    patterns[0, 0, 7, 5] = 0.2
    patterns[0, 0, 7, 6] = 0.4  # attention to an earlier 6: duplicate-token mass
    scores = head_scores_per_window(patterns, RepeatMasks.of(tokens))
    assert scores["induction"].item() == pytest.approx((1.0 + 0.5 + 0.3 + 0.2) / 4)
    # Duplicate-token: queries 3, 4, 6, 7 have earlier copies; only query 7 puts mass (0.4) on one.
    assert scores["duplicate_token"].item() == pytest.approx(0.4 / 4)


def test_hand_wired_neuron_fires_only_on_its_token(
    tiny_gpt2_dir: Path, shared_weight_cache_dir: Path, corpus_file: Path
) -> None:
    model = load_tiny(
        tiny_gpt2_dir, shared_weight_cache_dir
    )  # a model of its own: this test rewires it
    (target,) = model.tokenizer.encode(" Caesar", add_special_tokens=False)
    layer, neuron, dim = 0, 11, 5
    with torch.no_grad():
        # Only the target token's embedding has anything on `dim`, and nothing else writes to it,
        # so after layer 0's attention the residual's `dim` is large exactly at the target token.
        model.embed.W_E[:, dim] = 0.0
        model.embed.W_E[target, dim] = 1000.0
        model.pos_embed.W_pos[:, dim] = 0.0
        model.blocks[0].attn.W_O[:, :, dim] = 0.0
        model.blocks[0].attn.b_O[dim] = 0.0
        # The neuron reads `dim` after LayerNorm (about sqrt(d_model) = 8 at the target, near 0
        # elsewhere) and needs more than 4 to fire.
        model.blocks[layer].mlp.W_in[:, neuron] = 0.0
        model.blocks[layer].mlp.W_in[dim, neuron] = 1.0
        model.blocks[layer].mlp.b_in[neuron] = -4.0
    windows = corpus_windows(model.tokenizer, [str(corpus_file)], CONTEXT, None, seed=0)
    settings = AtlasSettings(**{**SETTINGS.__dict__, "prepend_bos": True, "top_k": 30})
    state = run_local(model, windows.tokens, settings, progress=False)

    occurrences = int((windows.tokens == target).sum())
    assert occurrences >= 10
    top = state.neuron_top[layer]
    assert state.neurons[layer].positive[neuron] == occurrences
    assert (top.values[:occurrences, neuron] > 0).all() and (
        top.values[occurrences:, neuron] <= 0
    ).all()
    # The top token of every firing entry, at the centre of its context, is the target token.
    assert (top.context_ids[:occurrences, neuron, settings.context_before] == target).all()


def test_each_layers_old_statistics_are_freed_as_soon_as_they_are_merged(
    tiny_models: dict[str, HookedTransformer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state is updated in place: while a batch is folded in, the previous statistics of the
    layers already done are gone, rather than the whole previous state kept beside the new one."""
    import weakref

    from unraveled.experiments.corpus_atlas import CorpusAtlasParams, atlas_settings

    from unraveled.engines.state import AtlasState, update
    from unraveled.running_stats import TopK

    model = tiny_models["gpt2"]
    settings = atlas_settings(CorpusAtlasParams(), prepend_bos=False)
    windows = np.random.default_rng(0).integers(0, model.cfg.d_vocab, size=(4, 16))
    state = update(
        AtlasState.for_model(model, settings), model, windows[:2], np.arange(2), settings
    )
    previous = [weakref.ref(top) for top in state.neuron_top]
    alive_at_each_merge: list[int] = []
    merge = TopK.merge

    def counting_merge(self: TopK, other: TopK) -> TopK:
        alive_at_each_merge.append(sum(reference() is not None for reference in previous))
        return merge(self, other)

    monkeypatch.setattr(TopK, "merge", counting_merge)
    updated = update(state, model, windows[2:], np.arange(2, 4), settings)
    assert updated is state and updated.n_windows == 4
    # One neuron-top merge and one residual-top merge per layer, layer by layer.
    assert alive_at_each_merge[::2] == list(range(model.cfg.n_layers, 0, -1))
