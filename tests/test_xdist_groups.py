"""Under ``make test`` (two pytest-xdist workers, ``--dist loadgroup``), the tests sharing an
expensive fixture really are sent to one worker, so it is set up once per run."""

from __future__ import annotations

import pytest

from tests.helpers.tiers import SHARED_EXPENSIVE_FIXTURES


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
