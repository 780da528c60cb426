"""The fenced uses of dependencies' internals (``unraveled.compat``): they work on the versions
they were checked on, and stop with a clear error on any other version or a missing name, before
computing anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unraveled import compat
from unraveled.compat import IncompatibleDependencyError, mkl
from unraveled.compat import transformer_lens as tl_compat
from unraveled.compat import umap as umap_compat
from unraveled.models.convert import hooked_from_hf
from unraveled.phases import handing_back


def _convert(folder: Path) -> object:
    return hooked_from_hf(
        lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
        AutoTokenizer.from_pretrained(folder),
        "processed",
        model_name="tiny",
    )


def _version(monkeypatch: pytest.MonkeyPatch, distribution: str, version: str) -> None:
    real = compat.installed_version
    monkeypatch.setattr(
        compat,
        "installed_version",
        lambda name: version if name == distribution else real(name),
    )


@pytest.mark.parametrize("version", ["3.10.0", "3.8.2", "4.0.0"])
def test_conversion_refuses_a_transformer_lens_it_was_not_checked_on(
    tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    _version(monkeypatch, "transformer-lens", version)
    with pytest.raises(IncompatibleDependencyError, match=rf"transformer-lens {version} is") as e:
        _convert(tiny_gpt2_dir)
    assert "transformer-lens>=3.9,<3.10" in str(e.value)


def test_conversion_refuses_a_transformer_lens_without_the_fold_steps(
    tiny_gpt2_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformer_lens.weight_processing import ProcessWeights

    monkeypatch.delattr(ProcessWeights, "_fold_unembed_layer_norm")
    with pytest.raises(IncompatibleDependencyError, match="_fold_unembed_layer_norm"):
        _convert(tiny_gpt2_dir)


def test_layer_norm_folded_step_by_step_is_transformer_lens_fold_and_hands_back_once(
    tiny_gpt2_dir: Path, tiny_llama_dir: Path
) -> None:
    from transformer_lens import HookedTransformer
    from transformer_lens.weight_processing import ProcessWeights

    for folder, layer_norm in ((tiny_gpt2_dir, True), (tiny_llama_dir, False)):
        model, _ = _convert(folder)
        assert isinstance(model, HookedTransformer)
        # A state dict with norms to fold: the converted model's weights, norms put back.
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for key in [k for k in state if k.endswith(("ln1.w", "ln2.w", "ln_final.w"))]:
            state[key] = torch.rand_like(state[key]) + 0.5
        expected = ProcessWeights.fold_layer_norm(
            {k: v.clone() for k, v in state.items()},
            model.cfg,
            fold_biases=layer_norm,
            center_weights=layer_norm,
        )
        handed_back: list[int] = []
        folded = tl_compat.fold_layer_norm(
            state, model.cfg, layer_norm, layer_norm, lambda seen=handed_back: seen.append(1)
        )
        assert handed_back == [1]
        assert folded.keys() == expected.keys()
        for key, tensor in expected.items():
            assert torch.equal(folded[key], tensor), key


def test_model_names_are_transformer_lens_alias_map(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    tl_compat.model_names.cache_clear()
    expected = {alias.lower(): official for alias, official in make_model_alias_map().items()}
    assert tl_compat.model_names() == expected
    assert tl_compat.model_names()["gpt2-small"] == "gpt2"


def test_model_names_refuse_another_transformer_lens_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tl_compat.model_names.cache_clear()
    _version(monkeypatch, "transformer-lens", "3.10.1")
    try:
        with pytest.raises(IncompatibleDependencyError, match=r"transformer-lens 3\.10\.1"):
            tl_compat.model_names()
    finally:
        tl_compat.model_names.cache_clear()


def test_model_names_refuse_a_table_that_is_no_longer_literal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.machinery
    import importlib.util

    package = tmp_path / "transformer_lens"
    package.mkdir()
    (package / "supported_models.py").write_text(
        "OFFICIAL_MODEL_NAMES = sorted(['gpt2'])\nMODEL_ALIASES = {'gpt2': ['gpt2-small']}\n"
    )
    spec = importlib.machinery.ModuleSpec("transformer_lens", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    tl_compat.model_names.cache_clear()
    try:
        with pytest.raises(IncompatibleDependencyError, match="OFFICIAL_MODEL_NAMES"):
            tl_compat.model_names()
    finally:
        tl_compat.model_names.cache_clear()


@pytest.mark.umap
@pytest.mark.parametrize("version", ["0.6.0", "0.5.6"])
def test_umap_refuses_a_version_it_was_not_checked_on(
    monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    from unraveled.umap_fit import umap_3d

    _version(monkeypatch, "umap-learn", version)
    points = np.random.default_rng(0).standard_normal((40, 4))
    with pytest.raises(IncompatibleDependencyError, match=rf"umap-learn {version} is"):
        umap_3d(points, points[:2], neighbours=5, seed=0)


@pytest.mark.umap
def test_umap_refuses_a_version_without_the_layout_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from umap import layouts

    from unraveled.umap_fit import umap_3d

    monkeypatch.delattr(layouts, umap_compat.LAYOUT_KERNEL)
    points = np.random.default_rng(0).standard_normal((40, 4))
    with pytest.raises(IncompatibleDependencyError, match=umap_compat.LAYOUT_KERNEL):
        umap_3d(points, points[:2], neighbours=5, seed=0)


def test_mkl_buffers_refuse_a_torch_without_the_symbol(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch does not link MKL")
    monkeypatch.setattr(mkl, "SYMBOL", "mkl_serv_no_such_function")
    mkl._mkl_free_buffers.cache_clear()
    try:
        with pytest.raises(IncompatibleDependencyError, match="mkl_serv_no_such_function"):
            mkl.free_buffers()
    finally:
        mkl._mkl_free_buffers.cache_clear()


def test_mkl_buffers_are_left_alone_where_torch_has_no_mkl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: False)
    monkeypatch.setattr(mkl, "_mkl_free_buffers", lambda torch_file: pytest.fail("called MKL"))
    mkl.free_buffers()


def test_hand_back_runs_only_inside_handing_back() -> None:
    from unraveled.phases import phase_done

    calls: list[str] = []
    phase_done()
    with handing_back(lambda: calls.append("outer")):
        phase_done()
        with handing_back(lambda: calls.append("inner")):
            phase_done()
        phase_done()
    phase_done()
    assert calls == ["outer", "inner", "outer"]
