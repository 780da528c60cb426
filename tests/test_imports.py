"""Fast paths stay fast: help, listing and config validation import neither torch nor
TransformerLens (nor the other slow libraries), and deferring those imports does not switch off
the test suite's jaxtyping/beartype checks."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import typing

import jaxtyping
import pytest

from tests.helpers.cli import REPO_ROOT
from unraveled.experiment import available_experiments

SLOW_TO_IMPORT = ("torch", "transformer_lens", "matplotlib", "umap", "circuitsvis", "sklearn")

PROBE = """
import json, sys
from unraveled.cli import main
from unraveled.config import config_names, load_config
statuses = [
    main(["--help"]),
    main(["list"]),
    main(["run", "embeddings", "--set", "params.chunk_tokens=-1"]),
]
configs = [load_config(name).name for name in config_names()]
loaded = [m for m in %r if m in sys.modules]
print(json.dumps({"statuses": statuses, "configs": configs, "loaded": loaded}))
"""


def test_help_list_and_validation_import_no_slow_library() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE % (SLOW_TO_IMPORT,)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["statuses"] == [0, 0, 2] and "embeddings" in report["configs"]
    assert report["loaded"] == [], f"imported while validating: {report['loaded']}"


@pytest.mark.parametrize("name", available_experiments())
def test_every_experiment_annotation_resolves_under_the_test_run(name: str) -> None:
    # jaxtyping's import hook reads annotations as modules load and checks nothing for a name it
    # can't resolve; a type-only import missing under RESOLVE_ANNOTATIONS would go unnoticed.
    module = __import__(f"unraveled.experiments.{name}", fromlist=["EXPERIMENT"])
    defined = [
        obj
        for obj in vars(module).values()
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__
    ]
    assert defined
    for obj in defined:
        typing.get_type_hints(obj, include_extras=True)
        for method in vars(obj).values() if inspect.isclass(obj) else []:
            if inspect.isfunction(method):
                typing.get_type_hints(method, include_extras=True)


def test_runtime_checks_see_deferred_types() -> None:
    from unraveled.experiments import head_taxonomy

    # The annotation names HookedTransformer, imported only for annotations: a wrong argument is
    # a type-check error here, not an AttributeError from inside the function.
    with pytest.raises(jaxtyping.TypeCheckError, match="HookedTransformer"):
        head_taxonomy.repeated_random_tokens("not a model", 1, 2, 0)  # type: ignore[arg-type]
