"""Every experiment on a tiny TransformerBridge: it runs and gives the HookedTransformer's numbers,
or it is refused before computing, with a ParamError naming what the bridge lacks."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jaxtyping
import numpy as np
import pytest

from tests.helpers.cli import REPO_ROOT
from tests.helpers.corpus import TEXT
from tests.helpers.models import SharedTinyModels
from tests.helpers.tiny_params import TINY_PARAMS
from unraveled.compat.bridge import check_bridge
from unraveled.datasets.ioi import IOIParams
from unraveled.errors import ParamError
from unraveled.experiment import available_experiments, load_experiment

VOLATILE = re.compile(r"second")  # timings (corpus_atlas's tokens_per_second)


@pytest.fixture(scope="module")
def bridges(tiny_gpt2_dir: Path) -> dict[str, Any]:
    """The tiny GPT-2 as a TransformerBridge in compatibility mode, weights processed and raw.

    Its weights don't require gradients, as a model unraveled loads.
    """
    from transformer_lens.model_bridge import TransformerBridge

    booted = {}
    for weights in ("processed", "raw"):
        bridge = TransformerBridge.boot_transformers(str(tiny_gpt2_dir), device="cpu")
        bridge.enable_compatibility_mode(disable_warnings=True, no_processing=weights == "raw")
        bridge.requires_grad_(False)
        booted[weights] = bridge
    return booted


@contextlib.contextmanager
def duck_typed() -> Iterator[None]:
    """The suite's run-time type checks off: experiments are annotated with HookedTransformer,
    which a bridge stands in for without being one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jaxtyping.config, "jaxtyping_disable", True)
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text for the experiments that read a corpus (sae_features): the test helpers' speech."""
    path = tmp_path_factory.mktemp("corpus") / "speech.txt"
    path.write_text(TEXT * 4)
    return path


def _params(name: str, corpus: Path) -> Any:
    experiment = load_experiment(name)
    small = dict(TINY_PARAMS.get(name, {}))
    if name == "sae_features":
        small["corpus"] = [str(corpus)]
    if "ioi" in experiment.params.model_fields:
        small["ioi"] = IOIParams(n_pairs=2)
    return experiment.params(**small)


def _assert_same(ours: Any, theirs: Any, where: str = "metrics") -> None:
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and ours.keys() == theirs.keys(), where
        for key in theirs:
            if not VOLATILE.search(key):
                _assert_same(ours[key], theirs[key], f"{where}.{key}")
        return
    try:
        expected = np.asarray(theirs, dtype=float)
    except (TypeError, ValueError):  # text, or ragged lists
        if isinstance(theirs, (list, tuple)):
            assert len(ours) == len(theirs), where
            for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                _assert_same(a, b, f"{where}[{index}]")
        else:
            assert ours == theirs, where
        return
    np.testing.assert_allclose(
        np.asarray(ours, dtype=float), expected, rtol=1e-3, atol=1e-4, err_msg=where
    )


def _outcome(bridge: Any, name: str) -> str | None:
    """None when the bridge is to run ``name``, else the refusal's message."""
    try:
        check_bridge(bridge, name, load_experiment(name))
    except ParamError as error:
        assert error.field == "model"
        return str(error)
    return None


@pytest.mark.parametrize(
    "name",
    [
        # UMAP's first fit in a process compiles its kernels: in the umap group, as elsewhere.
        pytest.param(name, marks=pytest.mark.umap) if name == "token_journey" else name
        for name in available_experiments()
    ],
)
def test_each_experiment_runs_on_a_bridge_as_on_a_hooked_transformer_or_is_refused(
    name: str,
    bridges: dict[str, Any],
    tiny_model: SharedTinyModels,
    tiny_gpt2_dir: Path,
    corpus: Path,
) -> None:
    experiment = load_experiment(name)
    bridge = bridges[experiment.weights]
    params = _params(name, corpus)
    refusal = _outcome(bridge, name)
    if refusal is not None:
        assert "lacks" in refusal and "HookedTransformer" in refusal
        # A need declared but not real would refuse what runs: computing anyway fails.
        with pytest.raises(Exception), duck_typed():  # noqa: B017 - whatever the bridge raises
            experiment.compute(bridge, params, 0)
        return
    with duck_typed():
        ours = experiment.compute(bridge, params, 0).metrics()
    hooked = tiny_model(tiny_gpt2_dir, experiment.weights)
    _assert_same(ours, experiment.compute(hooked, params, 0).metrics())


def test_the_bridge_needs_the_weights_the_experiment_reads(bridges: dict[str, Any]) -> None:
    with pytest.raises(ParamError, match=r"raw weights.*no_processing=True"):
        check_bridge(bridges["processed"], "embeddings", load_experiment("embeddings"))
    with pytest.raises(ParamError, match=r"processed weights.*enable_compatibility_mode\(\)"):
        check_bridge(bridges["raw"], "logit_lens", load_experiment("logit_lens"))


def test_a_bridge_out_of_compatibility_mode_is_refused(tiny_gpt2_dir: Path) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(tiny_gpt2_dir), device="cpu")
    with pytest.raises(ParamError, match=r"compatibility mode only"):
        check_bridge(bridge, "logit_lens", load_experiment("logit_lens"))


def test_check_bridge_passes_a_hooked_transformer(
    tiny_model: SharedTinyModels, tiny_gpt2_dir: Path
) -> None:
    for weights in ("processed", "raw"):
        model = tiny_model(tiny_gpt2_dir, weights)
        for name in available_experiments():
            check_bridge(model, name, load_experiment(name))


def test_docs_list_what_runs_on_a_bridge(bridges: dict[str, Any]) -> None:
    """docs/models.md's table says which experiments run, as check_bridge decides."""
    text = (REPO_ROOT / "docs" / "models.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (runs|refused)[^|]*\|", text, flags=re.MULTILINE))
    decided = {
        name: "runs"
        if _outcome(bridges[load_experiment(name).weights], name) is None
        else "refused"
        for name in available_experiments()
    }
    assert rows == decided
