"""The test suite's own set-up (tests/conftest.py): a test's tier follows from the fixtures it
uses, so ``make test-fast`` leaves out every test needing a real model or a browser; and under
``make test`` (two pytest-xdist workers, ``--dist loadgroup``), the tests sharing an expensive
fixture really are sent to one worker, so it is set up once per run."""

from __future__ import annotations

import pytest

from tests.helpers.tiers import SHARED_EXPENSIVE_FIXTURES

# Tests of a made-up module, collected (never run) by a pytest inside this one with the project's
# fixtures and hooks. ``smollm2_fallback_run`` needs ``smollm2_cache``: a fixture used through
# another one counts too.
TIERED = """
import pytest

def test_plain(tiny_gpt2_dir): pass
def test_on_smollm2(smollm2_cache): pass
def test_on_the_fallback(smollm2_fallback_run): pass
def test_on_gpt2_small(gpt2): pass
def test_on_raw_gpt2_small(gpt2_raw): pass
def test_in_a_browser(browser, two_model_report): pass
def test_on_a_local_ray(local_ray): pass
def test_through_the_cli():
    run_cli(["list"], {})
def test_converts(weight_cache): pass
def test_loads_its_own(tiny_gpt2_dir):
    load_model(str(tiny_gpt2_dir), "raw")
def test_two_runs_at_once():
    return [subprocess.Popen(["true"]) for _ in range(2)]
@pytest.mark.umap
def test_a_umap_fit(): pass
@pytest.mark.heavy
def test_heavy(): pass
"""
# make test-fast
FAST = "not heavy and not slow and not browser and not process and not conversion and not umap"


def _selected(pytester: pytest.Pytester, marks: str) -> list[str]:
    done = pytester.runpytest("-p", "tests.conftest", "--collect-only", "-q", "-m", marks)
    return [line.split("::")[-1] for line in done.outlines if "::" in line]


def test_a_tests_tier_follows_from_the_fixtures_it_uses(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_tiered=TIERED)
    assert _selected(pytester, FAST) == ["test_plain"]
    assert _selected(pytester, "slow") == ["test_on_gpt2_small", "test_on_raw_gpt2_small"]
    # The bundled SmolLM2 is converted and run in `make test-heavy` only.
    assert _selected(pytester, "heavy") == ["test_on_smollm2", "test_on_the_fallback", "test_heavy"]
    assert _selected(pytester, "browser") == ["test_in_a_browser"]
    assert _selected(pytester, "conversion") == ["test_converts", "test_loads_its_own"]
    assert _selected(pytester, "process") == [
        "test_on_the_fallback",
        "test_in_a_browser",
        "test_on_a_local_ray",
        "test_through_the_cli",
        "test_two_runs_at_once",
    ]
    # `make test` still runs every one but the heavy ones.
    assert len(_selected(pytester, "not heavy")) == 10


def test_tests_sharing_an_expensive_fixture_are_grouped_for_one_worker(
    request: pytest.FixtureRequest,
) -> None:
    if not getattr(request.config.option, "loadgroup", False):  # set on xdist's workers only
        pytest.skip("checks xdist's grouping: run with -n 2, as make test does")
    # Every worker collects every test; xdist's scheduler sees a test's group only as the "@group"
    # suffix xdist gives its id (pytest 9.2 drops it: pytest-xdist#1386).
    items = request.session.items
    groups = {
        fixture: [item.nodeid for item in items if fixture in getattr(item, "fixturenames", ())]
        for fixture in SHARED_EXPENSIVE_FIXTURES
    }
    groups["umap"] = [item.nodeid for item in items if item.get_closest_marker("umap") is not None]
    if not any(groups.values()):
        pytest.skip("no test of this run shares an expensive fixture")
    for group, nodeids in groups.items():
        assert all(nodeid.endswith(f"@{group}") for nodeid in nodeids), (
            f"not grouped on one worker: {nodeids}"
        )
