"""Which fixtures decide a test's tier and its xdist group (applied in tests/conftest.py).

``make test`` runs every test but the ``heavy`` ones; ``make test-fast`` also leaves out the
``slow`` ones (a real model: the bundled SmolLM2, converted from its GGUF file once a session, or
GPT-2 small, downloaded on first use) and the ``browser`` ones (a headless Chromium). A test that
uses one of these fixtures, directly or through another fixture, is given the fixture's mark.
"""

from __future__ import annotations

TIER_OF_FIXTURE = {
    "smollm2_cache": "slow",
    "gpt2": "slow",
    "gpt2_raw": "slow",
    "browser": "browser",
}

# `make test` runs the tests on two pytest-xdist workers (--dist loadgroup). A session- or
# module-scoped fixture is set up once per worker that needs it, so the tests sharing an expensive
# one are sent to the same worker: the bundled SmolLM2 is converted once per run, the two-model
# report and the atlas runs are made once, and one Ray starts. Tests marked ``umap`` share a worker
# too, as numba compiles UMAP's kernels in each process that first fits one (10-20 s).
SHARED_EXPENSIVE_FIXTURES = ("smollm2_cache", "two_model_report", "atlas_runs", "local_ray")
