"""The models the bench runs on, and functions it calls on them in processes of their own.

GPT-2's weights can't be had here: the bench saves a randomly initialised checkpoint of GPT-2
small's shape with the real GPT-2 tokenizer, loaded through the same code as any local
checkpoint (the amount of computation and memory doesn't depend on the weights' values).
"""

from __future__ import annotations

import atexit
import functools
import tempfile
import time
from pathlib import Path

from tests.gpt2_tokenizer import real_gpt2_tokenizer


def save_gpt2_small_shaped(folder: Path) -> Path:
    """Save a random GPT-2-small-shaped checkpoint (12 layers, d_model 768), real tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)  # GPT2Config's defaults are GPT-2 small
    real_gpt2_tokenizer().save_pretrained(folder)
    return folder


@functools.cache
def gpt2_small_shaped_checkpoint() -> Path:
    """One checkpoint for every group that wants it, removed when the bench exits."""
    work = tempfile.TemporaryDirectory(prefix="unraveled-bench-")
    atexit.register(work.cleanup)
    return save_gpt2_small_shaped(Path(work.name) / "gpt2-small-shaped")


def known_facts_of(checkpoint: str) -> list[dict[str, str]]:
    """The bundled facts, each answer replaced by the model's own top prediction after its prompt.

    Predictions come from causal tracing's own pass over the whole set (``top_predictions``), so
    the run finds the same ones. A prediction whose text does not tokenize back to that one
    token can't be an answer: its fact keeps the bundled answer (and stays unknown). Called in
    a process of its own (``call_in_child``), with a converted-weights cache of its own.
    """
    from unraveled.experiments.causal_tracing import top_predictions

    from unraveled.datasets.facts import FACTS, tokenize_fact
    from unraveled.logits import answer_token_id
    from unraveled.models import load_model

    model = load_model(checkpoint, "raw").model
    tokenized = [tokenize_fact(model, fact, f"facts[{index}]") for index, fact in enumerate(FACTS)]
    facts = []
    for fact, prediction in zip(FACTS, top_predictions(model, tokenized), strict=True):
        text = model.tokenizer.decode([prediction])
        try:
            answer = text if answer_token_id(model, text, "answer") == prediction else fact.answer
        except ValueError:  # several tokens
            answer = fact.answer
        facts.append({"prompt": fact.prompt, "subject": fact.subject, "answer": answer})
    return facts


def load_twice(name: str) -> dict[str, float]:
    """Seconds to load ``name`` into an empty converted-weights cache, then from that cache.

    Called in a process of its own (``call_in_child``), whose ``UNRAVELED_CACHE`` is empty.
    """
    from unraveled.models import load_model

    started = time.perf_counter()
    load_model(name, "processed")
    uncached = time.perf_counter() - started
    started = time.perf_counter()
    second = load_model(name, "processed")
    cached = time.perf_counter() - started
    if not second.from_weight_cache:
        raise RuntimeError(f"the second load of {name} did not read the converted-weights cache")
    return {"uncached": uncached, "cached": cached}
