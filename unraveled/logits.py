"""From the residual stream to logits: the logit lens, answer tokens and logit differences."""

from __future__ import annotations

from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer


def residual_hook_names(n_layers: int) -> list[str]:
    """The residual stream before each block and after the last: ``n_layers + 1`` points."""
    return [
        *[f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)],
        f"blocks.{n_layers - 1}.hook_resid_post",
    ]


def logit_lens(
    model: HookedTransformer, residuals: Float[Tensor, "point pos d_model"]
) -> Float[Tensor, "point pos d_vocab"]:
    """Decode residual-stream states through the final norm and the unembedding.

    The final norm's scale is recomputed from each state itself. Reusing the scale cached at the
    final layer, as TransformerLens's ``accumulated_resid(apply_ln=True)`` did before 3.9 (its
    issue #1076), gives wrong distributions for layers whose residual norm differs; doing it here
    keeps the lens right whatever that method does.
    """
    # Norm modules act on the last dimension only, so each point gets its own scale.
    return model.unembed(model.ln_final(residuals))


def single_token_id(
    model: HookedTransformer, text: str, named: str, advice: str, pieces_note: str = ""
) -> int:
    """The token id of ``text``; a clear error when it tokenizes to several tokens.

    Args:
        model: The model whose tokenizer decides.
        text: The text, as it appears in the prompt (a name with its leading space).
        named: How the error names it, e.g. ``params.correct=' Mary'``.
        advice: What the error tells the user to do, e.g. ``use a single-token answer``.
        pieces_note: Added after the pieces the error lists, e.g. ``, with its leading space``.

    Raises:
        ValueError: ``text`` is several tokens (or none): naming it, its pieces and ``advice``.
    """
    ids = model.to_tokens(text, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise ValueError(
            f"{named} is {len(ids)} tokens for this model ({pieces}{pieces_note}); {advice}"
        )
    return int(ids[0])


def answer_token_id(model: HookedTransformer, text: str, field: str) -> int:
    """The single token id of an answer; a clear error when it tokenizes to several tokens."""
    return single_token_id(model, text, f"{field}={text!r}", "use a single-token answer")


def logit_difference(
    logits: Float[Tensor, "... d_vocab"], correct: int, incorrect: int
) -> Float[Tensor, ...]:
    """Logit of the correct answer minus that of the incorrect one."""
    return logits[..., correct] - logits[..., incorrect]


def kl_from_final(log_probs: Float[Tensor, "point d_vocab"]) -> Float[Tensor, " point"]:
    """KL(final || point) for every point, where the final distribution is the last row."""
    final = log_probs[-1]
    return (final.exp() * (final - log_probs)).sum(dim=-1)


def rank_of(logits: Float[Tensor, "point d_vocab"], token: int) -> Int[Tensor, " point"]:
    """Rank of ``token`` among the logits of every point (0 = top)."""
    return (logits > logits[:, token : token + 1]).sum(dim=-1)
