"""Every experiment through the Python route on a HookedTransformer the user loaded: the CLI's
checks run, and the result is the experiment's own (the numbers themselves are tested against
independent computations in each experiment's tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import unraveled as ur
from tests.helpers.tiny_params import TINY_PARAMS
from unraveled.experiment import available_experiments, load_experiment
from unraveled.outputs import to_jsonable

LONG_PROMPT = " ".join(["word"] * 201)
# Refused on the tiny random model whatever the params, so not run here: it doesn't do IOI
# (tests/test_path_patching.py runs it on a copy made to, and checks the refusal).
NOT_ON_THE_TINY_MODEL = {"path_patching"}
# A param each experiment refuses for this model, and the field the error names.
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "attention": ({"head": 4}, "head"),
    "layernorm": ({"prompts": ["fine", LONG_PROMPT]}, "prompts"),
    "mlp": ({"prompts": [LONG_PROMPT]}, "prompts"),
    "token_journey": ({"sentence": LONG_PROMPT}, "sentence"),
    "logit_lens": ({"prompt": LONG_PROMPT}, "prompt"),
    "head_taxonomy": ({"prompts": [LONG_PROMPT]}, "prompts"),
    "logit_attribution": ({"correct": " Mary Ann"}, "correct"),
    "activation_patching": ({"corrupted_answer": " Mary Ann"}, "corrupted_answer"),
    "attribution_patching": ({"clean": LONG_PROMPT}, "clean"),
    "ioi_circuit": ({"ioi": {"names": [" Mary Ann", " John", " Tom"]}}, "ioi"),
    "causal_tracing": (
        {"facts": [{"prompt": LONG_PROMPT, "subject": "word", "answer": " x"}]},
        "facts",
    ),
    "corpus_atlas": ({"corpus": ["/no/such/file.txt"]}, "corpus"),
    "embeddings": ({"local_subsets": 0}, "local_subsets"),
    "steering": ({"layer": 9}, "layer"),
    "sae_features": ({"k": 9}, "k"),
}


def test_every_experiment_is_covered() -> None:
    assert set(BAD) | NOT_ON_THE_TINY_MODEL == set(available_experiments())
    assert not set(BAD) & NOT_ON_THE_TINY_MODEL


@pytest.fixture(scope="module")
def users_models(tiny_gpt2_dir: Path, shared_weight_cache_dir: Path) -> dict[str, Any]:
    """The tiny GPT-2 in each kind of weights, as HookedTransformers ur never saw."""
    from unraveled.models.loading import load_model

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNRAVELED_CACHE", str(shared_weight_cache_dir))
        return {kind: load_model(str(tiny_gpt2_dir), kind).model for kind in ("processed", "raw")}


@pytest.mark.parametrize(
    "name",
    # UMAP's first fit in a process compiles its kernels: in the umap group, as elsewhere.
    [
        pytest.param(name, marks=pytest.mark.umap) if name == "token_journey" else name
        for name in sorted(BAD)
    ],
)
def test_every_experiment_from_python_with_the_cli_checks(
    name: str, users_models: dict[str, Any], corpus_file: Path
) -> None:
    experiment = load_experiment(name)
    model = users_models[experiment.weights]
    small = dict(TINY_PARAMS.get(name, {}))
    if name in ("corpus_atlas", "sae_features"):
        small["corpus"] = [str(corpus_file)]
    if name == "causal_tracing":  # a fact the tiny model gets right: it knows none of the set's
        from tests.test_causal_tracing import _known_fact

        small["facts"] = [_known_fact(model).model_dump()]
    bad, field = BAD[name]
    with pytest.raises(ValueError, match=rf"^params\.{field}"):
        ur.run(name, model, **{**small, **bad})
    result = ur.run(name, model, **small)
    direct = experiment.compute(model, result.params, 0)
    assert to_jsonable(_without_timings(result.metrics())) == to_jsonable(
        _without_timings(direct.metrics())
    )
    assert result.figures or result.views
    assert result.model["loaded_from"].startswith("loaded by the user")


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _without_timings(v)
            for k, v in value.items()
            if "seconds" not in k and "per_second" not in k
        }
    return value
