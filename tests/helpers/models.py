"""Tiny checkpoints saved as Hugging Face folders, and their models loaded once a session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2TokenizerFast

# The commit hash the tiny ``gpt2`` is filed under in a test's Hugging Face cache.
FAKE_SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Make every LayerNorm/RMSNorm weight and bias non-trivial: folding them is then tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "ln" in name or "norm" in name:
                noise = torch.randn(parameter.shape, generator=generator) * 0.3
                parameter.copy_((1.0 + noise) if name.endswith("weight") else noise)


def save_checkpoint(
    model: torch.nn.Module, tokenizer: GPT2TokenizerFast, folder: Path, norm_seed: int
) -> Path:
    """Perturb the norms, then save model and tokenizer as a Hugging Face checkpoint folder."""
    _perturb_norms(model.eval(), seed=norm_seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class SharedTinyModels:
    """The tiny checkpoints' HookedTransformers, each loaded through ``load_model`` once per session
    (into the shared converted-weights cache) and handed to every test that asks.

    For tests of what is computed from a model. Tests of loading itself load their own, and so do
    tests that change a model (hand-wired weights, permanent hooks): after each test that used a
    shared model, ``check_unchanged`` fails it if it left the model otherwise than it found it.
    """

    def __init__(self, cache: Path) -> None:
        self._cache = cache
        self._loaded: dict[
            tuple[Path, str], tuple[Any, dict[str, Any], dict[str, torch.Tensor]]
        ] = {}

    def __call__(self, folder: Path, weights: str) -> Any:
        """The model of the checkpoint ``folder`` with ``weights``, loaded on first use."""
        from unraveled.models import load_model

        if (folder, weights) not in self._loaded:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("UNRAVELED_CACHE", str(self._cache))
                model = load_model(str(folder), weights).model  # type: ignore[arg-type]
            weights_copy = {
                name: value.detach().clone() for name, value in model.state_dict().items()
            }
            self._loaded[folder, weights] = (model, model.cfg.to_dict(), weights_copy)
        return self._loaded[folder, weights][0]

    def check_unchanged(self) -> None:
        """Fail if a loaded model's config, hooks, gradients or weights are not as loaded."""
        for (folder, weights), (model, cfg, weights_copy) in self._loaded.items():
            what = f"the shared {folder.name} ({weights} weights)"
            assert model.cfg.to_dict() == cfg, f"a test changed the config of {what}"
            hooked = [
                name
                for name, point in model.hook_dict.items()
                if point.fwd_hooks or point.bwd_hooks
            ]
            assert not hooked, f"a test left hooks on {what}: {hooked}"
            assert not any(p.requires_grad for p in model.parameters()), (
                f"a test made {what} require gradients"
            )
            changed = [
                name
                for name, value in model.state_dict().items()
                if not torch.equal(value, weights_copy[name])
            ]
            assert not changed, f"a test changed the weights of {what}: {changed}"
