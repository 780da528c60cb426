"""The bundled SmolLM2-135M (a real pretrained Llama-architecture model) through our GGUF loader."""

from __future__ import annotations

from pathlib import Path

import pytest

from unraveled.models import load_model


@pytest.mark.heavy
def test_smollm2_predicts_paris(smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNRAVELED_CACHE", str(smollm2_cache))
    # The session's one conversion from GGUF, as cached (raw weights, as the fallback tests read;
    # the prediction doesn't depend on the weight processing).
    loaded = load_model("smollm2-135m", "raw")
    assert loaded.from_weight_cache
    model = loaded.model
    cfg = model.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model) == (30, 9, 3, 576)
    assert cfg.positional_embedding_type == "rotary" and cfg.gated_mlp
    logits = model("The capital of France is")
    assert model.to_string(logits[0, -1].argmax()) == " Paris"
