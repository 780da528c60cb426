"""Fast paths stay fast: help, listing and config validation import neither torch nor
TransformerLens (nor the other slow libraries), and deferring those imports does not switch off
the test suite's jaxtyping/beartype checks."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

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


def _imported_modules(path: Path) -> Iterator[str]:
    """Every module ``path`` imports: import statements, and import_module/__import__ of a name."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value


def test_the_package_imports_nothing_from_tests_or_benchmarks() -> None:
    # What ships in the wheel (unraveled/, and experiments/ as unraveled.experiments) stands alone.
    shipped = sorted(
        [*(REPO_ROOT / "unraveled").rglob("*.py"), *(REPO_ROOT / "experiments").rglob("*.py")]
    )
    assert len(shipped) > 30
    found = [
        f"{path.relative_to(REPO_ROOT)}: {module}"
        for path in shipped
        for module in _imported_modules(path)
        if module.split(".")[0] in {"tests", "benchmarks"}
    ]
    assert found == []
    assert not list((REPO_ROOT / "unraveled").glob("bench*.py"))
