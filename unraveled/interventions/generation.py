"""Generation with interventions active for every token, with or without a key-value cache.

The loop is TransformerLens's own forward pass (``model(tokens, past_kv_cache=...)``), one step
per new token, so that the position every step starts at is known: position-dependent
interventions (``from_position``) then act on the same sequence positions with the cache as
without it. Sampling is TransformerLens's ``sample_logits``, seeded inside a forked random
state: the same seed and sampling give the same tokens on every call, and the caller's random
state is left as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jaxtyping import Int

from unraveled.errors import ParamError
from unraveled.experiment import RESOLVE_ANNOTATIONS
from unraveled.interventions.base import Intervention, intervening
from unraveled.interventions.sampling import Sampling

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:
    from torch import Tensor
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class Generation:
    """Generated sequences: one row per sample, prompt first.

    Attributes:
        tokens: The prompt's tokens followed by the generated ones, one row per sample.
        prompt_length: How many of each row's tokens are the prompt's.
        texts: Each sample's generated text (prompt left out).
    """

    tokens: Int[Tensor, "sample pos"]
    prompt_length: int
    texts: list[str]

    @property
    def new_tokens(self) -> Int[Tensor, "sample new"]:
        """The generated tokens alone."""
        return self.tokens[:, self.prompt_length :]


def _sampling(method: str, temperature: float, top_k: int | None, top_p: float | None) -> Sampling:
    from pydantic import ValidationError

    try:
        return Sampling(method=method, temperature=temperature, top_k=top_k, top_p=top_p)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "sampling"
        raise ParamError(field, first["msg"]) from None


def prompt_tokens(
    model: HookedTransformer, prompt: str | Int[Tensor, " pos"], prepend_bos: bool | None = None
) -> Int[Tensor, " pos"]:
    """The prompt as the 1-D token tensor generation starts from (BOS as the model's default)."""
    if isinstance(prompt, str):
        return model.to_tokens(prompt, prepend_bos=prepend_bos)[0]
    if prompt.ndim != 1 or prompt.numel() == 0:
        raise ParamError("prompt", f"expected a non-empty 1-D token tensor, got {prompt.shape}")
    return prompt


def check_generation_length(n_ctx: int, n_prompt: int, max_new_tokens: int) -> None:
    """Raise ``ParamError('max_new_tokens')`` unless 1 <= it and prompt + it fit the context.

    Args:
        n_ctx: The model's context length.
        n_prompt: The prompt's tokens (before loading, the fewest it can take: BOS not counted).
        max_new_tokens: The tokens to generate after it.
    """
    if max_new_tokens < 1:
        raise ParamError("max_new_tokens", f"{max_new_tokens}: expected at least 1")
    if n_prompt + max_new_tokens > n_ctx:
        raise ParamError(
            "max_new_tokens",
            f"{max_new_tokens} new tokens after a {n_prompt}-token prompt make "
            f"{n_prompt + max_new_tokens}, beyond the model's context of {n_ctx} tokens; "
            f"use at most {max(n_ctx - n_prompt, 0)}",
        )


def generate(
    model: HookedTransformer,
    prompt: str | Int[Tensor, " pos"],
    max_new_tokens: int,
    interventions: Sequence[Intervention] = (),
    *,
    seed: int | None = None,
    method: str = "greedy",
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    n_samples: int = 1,
    use_past_kv_cache: bool = True,
    prepend_bos: bool | None = None,
) -> Generation:
    """Generate ``max_new_tokens`` tokens after ``prompt`` with ``interventions`` on every step.

    Exactly ``max_new_tokens`` tokens per sample (no stop at end-of-text), so that generations
    under different interventions line up token for token.

    Args:
        model: The model.
        prompt: Text (tokenized with BOS as ``prepend_bos`` or the model's default) or tokens.
        max_new_tokens: How many tokens to generate; prompt plus these must fit the context.
        interventions: Active for the prompt's forward pass and for every generated token.
        seed: Seeds the sampling (required when ``method='sample'``).
        method: ``greedy`` or ``sample``.
        temperature: Sampling temperature (``sample`` only).
        top_k: Sample among the k most likely tokens (``sample`` only).
        top_p: Nucleus sampling's probability mass (``sample`` only).
        n_samples: Samples of the same prompt, generated as one batch.
        use_past_kv_cache: Keep keys and values between steps (the same tokens, faster).
        prepend_bos: Overrides the model's default for a text prompt.

    Returns:
        The tokens (prompt then generated) and the generated texts, one per sample.

    Raises:
        ParamError: ``max_new_tokens`` out of bounds, bad sampling, a missing seed, or an
            intervention the model can't take (each naming its field).
    """
    import torch
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.utils import sample_logits

    sampling = _sampling(method, temperature, top_k, top_p)
    if sampling.method == "sample" and seed is None:
        raise ParamError("seed", "sampling needs a seed (the same seed gives the same tokens)")
    if n_samples < 1:
        raise ParamError("n_samples", f"{n_samples}: expected at least 1")
    prompt_row = prompt_tokens(model, prompt, prepend_bos)
    check_generation_length(model.cfg.n_ctx, len(prompt_row), max_new_tokens)
    device = torch.device(model.cfg.device)
    tokens = prompt_row.to(device).expand(n_samples, -1)
    n_prompt = tokens.shape[1]
    fork_devices = [] if device.type == "cpu" else [device]
    with (
        torch.inference_mode(),
        torch.random.fork_rng(devices=fork_devices),
        intervening(model, *interventions) as positions,
    ):
        positions.tracked = True
        if seed is not None:
            torch.manual_seed(seed)
        cache = (
            TransformerLensKeyValueCache.init_cache(model.cfg, device, n_samples)
            if use_past_kv_cache
            else None
        )
        step_input = tokens
        for _ in range(max_new_tokens):
            # With the cache a step's forward pass holds only the tokens not yet cached, and its
            # first activation is at sequence position len(tokens) - len(step_input).
            positions.offset = tokens.shape[1] - step_input.shape[1]
            # An explicit all-ones mask: without one, TransformerLens guesses padding from pad
            # token ids, which GPT-2 shares with end-of-text, a token generation may produce.
            logits = model(
                step_input,
                past_kv_cache=cache,
                attention_mask=torch.ones_like(step_input),
            )
            last = logits[:, -1, :]
            if sampling.method == "greedy":
                chosen = last.argmax(dim=-1)
            else:
                chosen = sample_logits(
                    last,
                    top_k=sampling.top_k,
                    top_p=sampling.top_p,
                    temperature=sampling.temperature,
                )
            tokens = torch.cat([tokens, chosen[:, None].to(device)], dim=1)
            step_input = tokens if cache is None else tokens[:, -1:]
    texts = [model.tokenizer.decode(row[n_prompt:]) for row in tokens.tolist()]
    return Generation(tokens=tokens.cpu(), prompt_length=n_prompt, texts=texts)
