"""Logit lens, direct logit attribution and activation patching, checked against transformers'
own forward pass and against naive patching, one hook at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from unraveled.experiments import activation_patching, logit_attribution, logit_lens

from tests.helpers.models import SharedTinyModels
from unraveled.activations import collect_activations
from unraveled.errors import ParamError
from unraveled.logits import answer_token_id, residual_hook_names
from unraveled.logits import logit_lens as decode
from unraveled.models import load_model

PROMPT = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(params=["tiny_gpt2_dir", "tiny_llama_dir"])
def checkpoint(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture
def model(checkpoint: Path, tiny_model: SharedTinyModels):  # type: ignore[no-untyped-def]
    return tiny_model(checkpoint, "processed")


class HfRun:
    """One forward pass of the transformers model: logits, hidden states, and what each block's
    attention and MLP wrote, captured with forward hooks."""

    def __init__(self, folder: Path, tokens: torch.Tensor) -> None:
        self.hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.is_gpt2 = hasattr(self.hf, "transformer")
        blocks = self.hf.transformer.h if self.is_gpt2 else self.hf.model.layers
        self.final_norm = self.hf.transformer.ln_f if self.is_gpt2 else self.hf.model.norm
        captured: dict[str, torch.Tensor] = {}

        def keep(name: str):  # type: ignore[no-untyped-def]
            return lambda _module, inputs, output: captured.__setitem__(
                name, (output[0] if isinstance(output, tuple) else output).detach()
            )

        def keep_input(name: str):  # type: ignore[no-untyped-def]
            return lambda _module, inputs: captured.__setitem__(name, inputs[0].detach())

        handles = [
            self.final_norm.register_forward_hook(
                lambda _m, inputs, _o: captured.__setitem__("final_residual", inputs[0].detach())
            )
        ]
        self.out_projections = []
        for layer, block in enumerate(blocks):
            attention = block.attn if self.is_gpt2 else block.self_attn
            handles.append(attention.register_forward_hook(keep(f"attn{layer}")))
            # The heads' outputs side by side, before the output projection mixes them.
            projection = attention.c_proj if self.is_gpt2 else attention.o_proj
            self.out_projections.append(projection)
            handles.append(projection.register_forward_pre_hook(keep_input(f"heads{layer}")))
            handles.append(block.mlp.register_forward_hook(keep(f"mlp{layer}")))
        with torch.no_grad():
            output = self.hf(tokens, output_hidden_states=True)
        for handle in handles:
            handle.remove()
        self.logits = output.logits[0]
        self.hidden_states = [h[0] for h in output.hidden_states]
        self.captured = {name: value[0] for name, value in captured.items()}

    def head_output(self, layer: int, head: int, d_head: int) -> torch.Tensor:
        """What one head writes to the residual stream at every position: its slice of the
        attention output before the output projection, times that projection's slice for it
        (without the projection's bias, which belongs to no head)."""
        z = self.captured[f"heads{layer}"][:, head * d_head : (head + 1) * d_head]
        weight = self.out_projections[
            layer
        ].weight.detach()  # GPT-2's Conv1D: [in, out]; Linear: [out, in]
        rows = slice(head * d_head, (head + 1) * d_head)
        return z @ (weight[rows] if self.is_gpt2 else weight[:, rows].T)

    def value_bias_output(self, layer: int, head: int, d_head: int) -> torch.Tensor:
        """The part of a head's output that does not depend on where it attends: its values'
        constant part (GPT-2: the value of an input equal to the norm's bias), which a head's
        attention weights, summing to 1, pass on unchanged. Zero without biases (Llama)."""
        if not self.is_gpt2:
            return torch.zeros(self.hf.config.hidden_size)
        block = self.hf.transformer.h[layer]
        d_model = self.hf.config.hidden_size
        with torch.no_grad():
            values = block.attn.c_attn(block.ln_1.bias)[2 * d_model :]
        rows = slice(head * d_head, (head + 1) * d_head)
        return values[rows] @ block.attn.c_proj.weight.detach()[rows]

    def decode(self, residual: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.hf.lm_head(self.final_norm(residual))

    def direct_effect(self, component: torch.Tensor, direction: torch.Tensor) -> float:
        """What ``component`` (at the last position) adds to the logits along ``direction``, through
        the final norm with the scale the model applied there."""
        final = self.captured["final_residual"][-1]
        eps = self.final_norm.eps if self.is_gpt2 else self.final_norm.variance_epsilon
        if self.is_gpt2:
            scale = (final.var(unbiased=False) + eps).sqrt()
            component = component - component.mean()
        else:
            scale = (final.pow(2).mean() + eps).sqrt()
        return float((component / scale * self.final_norm.weight.detach()) @ direction)


def test_logit_lens_matches_transformers_hidden_states_decoded(model, checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    result = logit_lens.compute(model, logit_lens.LogitLensParams(prompt=PROMPT), seed=0)
    run = HfRun(checkpoint, model.to_tokens(PROMPT))
    n_layers = model.cfg.n_layers
    # State i is hidden_states[i] for i < n_layers; transformers' last hidden state is already
    # normed.
    log_probs = torch.stack(
        [*[run.decode(run.hidden_states[i][-1]) for i in range(n_layers)], run.logits[-1]]
    ).log_softmax(-1)
    final = int(run.logits[-1].argmax())
    assert result.final_prediction == model.tokenizer.decode([final])
    np.testing.assert_allclose(result.final_prediction_prob, log_probs[:, final].exp(), atol=1e-5)
    expected_kl = (log_probs[-1].exp() * (log_probs[-1] - log_probs)).sum(-1)
    np.testing.assert_allclose(result.kl_from_final, expected_kl, atol=1e-4)
    np.testing.assert_array_equal(
        result.final_prediction_rank, (log_probs > log_probs[:, final : final + 1]).sum(-1)
    )
    assert [entry["token"] for entry in result.top5_last[0]] == [
        model.tokenizer.decode([i]) for i in log_probs[0].topk(5).indices
    ]


def test_logit_lens_gives_the_values_of_decoding_every_point_at_once(model) -> None:  # type: ignore[no-untyped-def]
    import unraveled.logits

    result = logit_lens.compute(model, logit_lens.LogitLensParams(prompt=PROMPT), seed=0)
    # Every point decoded in one tensor (the experiment decodes one point at a time).
    acts = collect_activations(model, [PROMPT], residual_hook_names(model.cfg.n_layers))
    with torch.inference_mode():
        log_probs = unraveled.logits.logit_lens(
            model,
            torch.stack([acts.cache[hook][0] for hook in residual_hook_names(model.cfg.n_layers)]),
        ).log_softmax(-1)
    top1_prob, top1_id = log_probs.exp().max(dim=-1)
    last = log_probs[:, -1]
    np.testing.assert_array_equal(result.top1_prob, top1_prob.numpy())
    assert result.top1_token == [
        [model.tokenizer.decode([token]) for token in row] for row in top1_id.tolist()
    ]
    final = int(last[-1].argmax())
    np.testing.assert_array_equal(result.final_prediction_prob, last[:, final].exp().numpy())
    np.testing.assert_array_equal(
        result.final_prediction_rank, (last > last[:, final : final + 1]).sum(-1).numpy()
    )
    np.testing.assert_array_equal(
        result.kl_from_final, (last[-1].exp() * (last[-1] - last)).sum(-1).numpy()
    )
    top_probs, top_ids = last.exp().topk(5, dim=-1)
    assert result.top5_last == [
        [
            {"token": model.tokenizer.decode([token]), "probability": float(p)}
            for token, p in zip(ids, ps, strict=True)
        ]
        for ids, ps in zip(top_ids.tolist(), top_probs.tolist(), strict=True)
    ]


def test_logit_lens_recomputes_the_norm_scale_per_layer(
    tiny_gpt2_dir: Path, warm_weight_cache: Path
) -> None:
    model = load_model(
        str(tiny_gpt2_dir), "processed"
    ).model  # a model of its own: this test changes a bias
    # Make the last block write a huge vector, so residual norms differ a lot between layers.
    with torch.no_grad():
        model.blocks[1].mlp.b_out += 50.0 * torch.randn(
            model.cfg.d_model, generator=torch.Generator().manual_seed(0)
        )
    acts = collect_activations(model, [PROMPT], [*residual_hook_names(2), "ln_final.hook_scale"])
    embeddings = acts.cache["blocks.0.hook_resid_pre"][0]
    ours = decode(model, embeddings[None])[0]
    centred = embeddings - embeddings.mean(dim=-1, keepdim=True)
    expected = model.unembed(
        (centred / centred.pow(2).mean(-1, keepdim=True).add(model.cfg.eps).sqrt())[None]
    )[0]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    stack = torch.stack(
        [acts.cache[h] for h in residual_hook_names(2)]
    )  # [point, batch, pos, d_model]
    # TransformerLens 3.9's accumulated_resid recomputes the statistics at the final layer, as we
    # do.
    corrected = acts.cache.accumulated_resid(layer=None, apply_ln=True)
    torch.testing.assert_close(
        decode(model, stack[:, 0]), model.unembed(corrected[:, 0]), atol=1e-4, rtol=1e-4
    )
    # Reusing the final layer's cached scale for every layer (TransformerLens issue #1076) is far
    # off.
    reused = acts.cache.apply_ln_to_stack(stack, layer=None, recompute_ln=False)
    reused_log_probs = model.unembed(reused[0])[0].log_softmax(-1)
    assert (reused_log_probs - ours.log_softmax(-1)).abs().max() > 1.0


def test_attribution_matches_what_transformers_blocks_write(model, checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    params = logit_attribution.LogitAttributionParams(prompt=PROMPT)
    result = logit_attribution.compute(model, params, seed=0)
    run = HfRun(checkpoint, model.to_tokens(PROMPT))
    correct, incorrect = (
        answer_token_id(model, " Mary", "correct"),
        answer_token_id(model, " John", "incorrect"),
    )
    assert result.logit_difference == pytest.approx(
        float(run.logits[-1, correct] - run.logits[-1, incorrect]), abs=1e-4
    )
    assert result.total() == pytest.approx(result.logit_difference, abs=1e-4)
    direction = (run.hf.lm_head.weight[correct] - run.hf.lm_head.weight[incorrect]).detach()
    for layer in range(model.cfg.n_layers):
        assert result.mlp[layer] == pytest.approx(
            run.direct_effect(run.captured[f"mlp{layer}"][-1], direction), abs=1e-4
        )
        assert result.attention_per_layer[layer] == pytest.approx(
            run.direct_effect(run.captured[f"attn{layer}"][-1], direction), abs=1e-4
        )


def test_attribution_per_head_matches_transformers_heads_via_their_slice_of_the_output_projection(
    model, checkpoint: Path
) -> None:  # type: ignore[no-untyped-def]
    """Each head's own share, not only the layer's sum: a head order swapped within a layer
    adds up to the same layer total and is caught only here.

    The processed weights fold each head's value bias (what it writes wherever it attends) into
    the layer's attention output bias (TransformerLens's ``fold_value_biases``): a head is
    credited with what depends on its attention, the bias term with the rest."""
    result = logit_attribution.compute(
        model, logit_attribution.LogitAttributionParams(prompt=PROMPT), seed=0
    )
    run = HfRun(checkpoint, model.to_tokens(PROMPT))
    correct, incorrect = (
        answer_token_id(model, " Mary", "correct"),
        answer_token_id(model, " John", "incorrect"),
    )
    direction = (run.hf.lm_head.weight[correct] - run.hf.lm_head.weight[incorrect]).detach()
    n_layers, n_heads, d_head = model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head
    expected = np.array(
        [
            [
                run.direct_effect(
                    run.head_output(layer, head, d_head)[-1]
                    - run.value_bias_output(layer, head, d_head),
                    direction,
                )
                for head in range(n_heads)
            ]
            for layer in range(n_layers)
        ]
    )
    np.testing.assert_allclose(result.heads, expected, atol=1e-4)
    for layer in range(n_layers):
        bias = run.out_projections[layer].bias
        constant = sum(run.value_bias_output(layer, head, d_head) for head in range(n_heads)) + (
            0 if bias is None else bias.detach()
        )
        assert result.attention_bias[layer] == pytest.approx(
            run.direct_effect(constant, direction), abs=1e-4
        )
    # The heads' outputs and the projection's bias rebuild what transformers' attention wrote.
    for layer in range(n_layers):
        bias = run.out_projections[layer].bias
        written = sum(run.head_output(layer, head, d_head) for head in range(n_heads)) + (
            0 if bias is None else bias.detach()
        )
        torch.testing.assert_close(written, run.captured[f"attn{layer}"], atol=1e-5, rtol=1e-4)
    # Heads that differ from one another, so an order swapped within a layer can't pass.
    assert np.abs(np.diff(expected, axis=1)).min() > 1e-3


def test_multi_token_answer_is_refused(model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=r"params\.correct=' Maryanne-Louise' is .* tokens"):
        answer_token_id(model, " Maryanne-Louise", "params.correct")


def test_patching_equals_naive_patching_one_hook_at_a_time(model) -> None:  # type: ignore[no-untyped-def]
    params = activation_patching.ActivationPatchingParams(clean=PROMPT, corrupted=CORRUPTED)
    result = activation_patching.compute(model, params, seed=0)
    clean_tokens, corrupted_tokens = model.to_tokens(PROMPT), model.to_tokens(CORRUPTED)
    answers = answer_token_id(model, " Mary", "a"), answer_token_id(model, " John", "b")
    n_layers, n_heads, n_pos = model.cfg.n_layers, model.cfg.n_heads, clean_tokens.shape[1]
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_tokens)

        def difference(hook_name: str, patch) -> float:  # type: ignore[no-untyped-def]
            logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(hook_name, patch)])
            return float(logits[0, -1, answers[0]] - logits[0, -1, answers[1]])

        clean = float(
            model(clean_tokens)[0, -1, answers[0]] - model(clean_tokens)[0, -1, answers[1]]
        )
        corrupted = float(
            model(corrupted_tokens)[0, -1, answers[0]] - model(corrupted_tokens)[0, -1, answers[1]]
        )
        assert result.clean_difference == pytest.approx(
            clean, abs=1e-4
        ) and result.corrupted_difference == pytest.approx(corrupted, abs=1e-4)
        heads = np.empty((n_layers, n_heads))
        for layer in range(n_layers):
            name = f"blocks.{layer}.attn.hook_z"
            for head in range(n_heads):

                def patch_head(z, hook, head=head, name=name):  # type: ignore[no-untyped-def]
                    z[:, :, head] = clean_cache[name][:, :, head]
                    return z

                heads[layer, head] = (difference(name, patch_head) - corrupted) / (
                    clean - corrupted
                )
        residual = np.empty((n_layers + 1, n_pos))
        for state, name in enumerate(residual_hook_names(n_layers)):
            for pos in range(n_pos):

                def patch_position(resid, hook, pos=pos, name=name):  # type: ignore[no-untyped-def]
                    resid[:, pos] = clean_cache[name][:, pos]
                    return resid

                residual[state, pos] = (difference(name, patch_position) - corrupted) / (
                    clean - corrupted
                )
    np.testing.assert_allclose(result.heads, heads, atol=1e-4)
    np.testing.assert_allclose(result.residual, residual, atol=1e-4)
    assert np.abs(heads).max() > 1e-3  # the test would notice patching that did nothing


def test_patching_refuses_prompts_of_different_lengths(model) -> None:  # type: ignore[no-untyped-def]
    params = activation_patching.ActivationPatchingParams(
        clean=PROMPT, corrupted="When Mary went to the store, Mary gave a drink to"
    )
    with pytest.raises(ParamError, match="same token length"):
        activation_patching.check(model, params)
