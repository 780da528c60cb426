"""Which fixtures decide a test's tier and its xdist group (applied in tests/conftest.py).

``make test`` runs every test but the ``heavy`` ones (the bundled SmolLM2, converted from its GGUF
file once a session: CI runs them in ``make test-heavy``); ``make test-fast`` also leaves out the
``slow`` ones (GPT-2 small, downloaded on first use), the ``browser`` ones (a headless Chromium),
the ``process`` ones (they start the CLI, Ray or another process, or run whole configs) and the
``umap`` ones (numba compiles UMAP's kernels). A test that uses one of these fixtures, directly or
through another fixture, is given the fixture's mark.
"""

from __future__ import annotations

from types import CodeType

TIER_OF_FIXTURE = {
    # The bundled SmolLM2 at its full cost (a conversion from GGUF, forwards of a 135M model):
    # CI runs these tests in `make test-heavy`, after `make test`.
    "smollm2_cache": "heavy",
    "gpt2": "slow",
    "gpt2_raw": "slow",
    "browser": "browser",
    # Fixtures that start processes (the CLI, a local Ray, a filesystem) or run whole configs.
    "smollm2_fallback_run": "process",
    "two_model_report": "process",
    "atlas_runs": "process",
    "published": "process",
    "local_ray": "process",
    "one_cpu_cluster": "process",
    "tiny_filesystem": "process",
    # A cache of the test's own: the test converts a model into it (the shared tiny models are
    # converted once a session, and every fast test may use them).
    "weight_cache": "conversion",
}

# A test whose own code loads a model itself converts it.
NAMES_THAT_CONVERT = frozenset({"load_model", "hooked_from_hf", "load_planned", "load_tiny"})

# A test whose own code names one of these starts a process (the CLI as a user runs it, a build,
# a child measuring memory) or runs whole configs (the CLI's ``main``, the runner's
# ``run_configs``): it is marked ``process`` too.
NAMES_THAT_START_PROCESSES = frozenset(
    {"run_cli", "subprocess", "_peak_rss_mb", "pytester", "main", "run_configs", "ray"}
)


def names_in(code: CodeType) -> set[str]:
    """The global and attribute names a function's code uses, its nested functions' and
    comprehensions' included."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, CodeType):
            names |= names_in(constant)
    return names


# `make test` runs the tests on two pytest-xdist workers (--dist loadgroup). A session- or
# module-scoped fixture is set up once per worker that needs it, so the tests sharing an expensive
# one are sent to the same worker: the bundled SmolLM2 is converted once per run, the two-model
# report and the atlas runs are made once, and one Ray starts. Tests marked ``umap`` share a worker
# too, as numba compiles UMAP's kernels in each process that first fits one (10-20 s).
SHARED_EXPENSIVE_FIXTURES = ("smollm2_cache", "two_model_report", "atlas_runs", "local_ray")
