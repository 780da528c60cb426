"""The Ray engine on a local Ray with 2 workers gives the local engine's result, also when a
worker dies in the middle of the run; a lost result is computed again and merged once.

Ray starts once for this module, with 2 CPUs, no dashboard, its session files in a temporary
folder, and is shut down after; the workers read the model from a temporary weights cache.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
from tqdm.auto import tqdm

from tests.helpers.corpus import CONTEXT, SETTINGS, load_tiny
from unraveled.corpus import corpus_windows
from unraveled.engines import ray as ray_engine
from unraveled.engines.local import run_local
from unraveled.engines.ray import AtlasWorker, run_ray, shard_ranges
from unraveled.engines.ray_cluster import RayEngineError
from unraveled.engines.state import AtlasSettings, AtlasState

RAY_START_BUDGET_S = 120


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # Token authentication would write ~/.ray/auth_token; a test writes only in temporary folders.
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_AUTH_MODE", "disabled")
    # A short path: Ray's Unix sockets live under it, and socket paths are limited to ~107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="unraveled-test-ray-", dir="/tmp"))
    started = time.perf_counter()
    patch.setenv("RAY_TMPDIR", str(folder))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _temp_dir=str(folder),
    )
    assert time.perf_counter() - started < RAY_START_BUDGET_S
    try:
        yield
    finally:
        ray.shutdown()
        patch.undo()
        shutil.rmtree(folder, ignore_errors=True)


def test_shards_are_whole_batches_covering_every_window() -> None:
    shards = shard_ranges(23, 4, 5)
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 8), (8, 16), (16, 20), (20, 23)]
    assert shard_ranges(3, 4, 8) == [range(0, 3)]


@pytest.fixture(scope="module")
def weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converted-weights cache for the module: the tiny model is converted once."""
    return tmp_path_factory.mktemp("ray_weights")


def assert_same_state(local: AtlasState, distributed: AtlasState, n_windows: int) -> None:
    """Top-k sets, contexts and counts exactly; moments up to the float rounding of the merge
    order."""
    assert distributed.n_windows == local.n_windows == n_windows
    for ours, theirs in zip(
        local.neuron_top + local.residual_top,
        distributed.neuron_top + distributed.residual_top,
        strict=True,
    ):
        np.testing.assert_array_equal(ours.index, theirs.index)
        np.testing.assert_array_equal(ours.context_ids, theirs.context_ids)
        np.testing.assert_allclose(ours.values, theirs.values, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(
        local.neurons + local.residual, distributed.neurons + distributed.residual, strict=True
    ):
        assert ours.count == theirs.count
        np.testing.assert_allclose(ours.mean, theirs.mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ours.m2, theirs.m2, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(ours.positive, theirs.positive)
    for name, value in local.heads.means().items():
        np.testing.assert_allclose(value, distributed.heads.means()[name], rtol=1e-5, atol=1e-7)


DOOMED_WINDOW = 5


def _dying_workers(monkeypatch: pytest.MonkeyPatch, die_once: Path | None) -> None:
    """Workers whose process is killed (SIGKILL, as the OOM killer would) when given the shard
    holding window ``DOOMED_WINDOW``: only the first such worker when ``die_once`` names a file
    that doesn't exist yet (it creates it), every time when None.

    The class is made here, so Ray ships it to the workers by value with ``die_once`` in it (no
    runtime_env, which would start each worker through Ray's runtime-env agent)."""

    class DyingWorker(AtlasWorker):
        def run(self, windows: np.ndarray, numbers: range, settings: AtlasSettings) -> AtlasState:
            if DOOMED_WINDOW in numbers:
                try:
                    if die_once is not None:
                        os.close(os.open(die_once, os.O_CREAT | os.O_EXCL))
                    os.kill(os.getpid(), signal.SIGKILL)
                except FileExistsError:
                    pass
            return super().run(windows, numbers, settings)

    monkeypatch.setattr(ray_engine, "RemoteAtlasWorker", ray.remote(num_cpus=1)(DyingWorker))


def _wait_for_free_cpus(n_cpus: int, budget_s: float = 30) -> None:
    """An earlier test's workers give their CPUs back a moment after it ends; this test wants
    them all."""
    started = time.perf_counter()
    while (
        ray.available_resources().get("CPU", 0) < n_cpus
        and time.perf_counter() - started < budget_s
    ):
        time.sleep(0.2)


@pytest.fixture
def tiny_run(
    tiny_gpt2_dir: Path, weights_cache: Path, monkeypatch: pytest.MonkeyPatch, corpus_file: Path
) -> tuple[object, np.ndarray, AtlasSettings]:
    monkeypatch.setenv("UNRAVELED_CACHE", str(weights_cache))
    model = load_tiny(tiny_gpt2_dir, weights_cache)
    windows = corpus_windows(model.tokenizer, [str(corpus_file)], CONTEXT, None, seed=0).tokens
    _wait_for_free_cpus(2)
    return model, windows, SETTINGS


def test_ray_engine_equals_local_engine_also_when_a_worker_is_killed(
    local_ray: None,
    tiny_run: tuple,
    weights_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One run on 2 workers proves both: the result equals the local engine's, and the shard of a
    worker killed mid-run is computed again on the other (one run, as each worker's start is
    slow)."""
    model, windows, _ = tiny_run
    settings = AtlasSettings(**{**SETTINGS.__dict__, "prepend_bos": True})
    shards = shard_ranges(len(windows), settings.batch_windows, 2 * ray_engine.SHARDS_PER_WORKER)
    assert len(shards) > 2 and len(windows) > DOOMED_WINDOW  # really sharded
    _dying_workers(monkeypatch, tmp_path / "died")
    local = run_local(model, windows, settings, progress=False)
    with caplog.at_level(logging.WARNING, logger="unraveled.engines.ray"):
        distributed = run_ray(model, windows, settings, workers=2, progress=False)

    assert (tmp_path / "died").exists()  # a worker really was killed
    assert_same_state(local, distributed, len(windows))
    said = caplog.text
    shard = next(s for s in shards if DOOMED_WINDOW in s)
    assert (
        f"died while computing windows {shard.start}..{shard.stop - 1}" in said
        and "1 of 2 workers left" in said
    )
    assert (
        "1 of 2 workers died; 1 shard(s) were computed again, so every window is in the result once"
        in said
    )
    # The workers loaded the model from the temporary cache, and nothing else was written there.
    assert [
        entry.name.split("-atlas-")[0]
        for entry in (weights_cache / "weights").iterdir()
        if "-atlas-" in entry.name
    ] == ["tiny-gpt2"]


def test_when_every_worker_dies_the_run_stops_saying_so(
    local_ray: None, tiny_run: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, windows, settings = tiny_run
    _dying_workers(monkeypatch, None)
    started = time.perf_counter()
    with pytest.raises(
        RayEngineError,
        match=r"every Ray worker died \(the last on windows \d+\.\.\d+: ActorDiedError",
    ):
        run_ray(model, windows, settings, workers=1, progress=False)
    assert time.perf_counter() - started < RAY_START_BUDGET_S


class _Part(AtlasState):
    """A shard's result that records the windows it holds, merged as ``AtlasState.merge`` would."""

    def __init__(self, windows: tuple[int, ...] = ()) -> None:
        object.__setattr__(self, "windows", windows)

    def merge(self, other: _Part) -> _Part:
        return _Part(self.windows + other.windows)


def test_a_lost_result_is_computed_again_and_merged_exactly_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ray's ObjectLostError (here OwnerDiedError, its subclass) for one shard's result: the shard
    goes back on the queue, its worker stays in use, and every window is merged once."""
    shards = shard_ranges(20, 2, 6)
    lost = shards[2]
    failed: list[range] = []

    class Task:
        def __init__(self, shard: range) -> None:
            self.shard = shard

    class Actor:
        class run:
            @staticmethod
            def remote(windows: object, shard: range, settings: object) -> Task:
                return Task(shard)

    def get(task: Task) -> _Part:
        if task.shard == lost and not failed:
            failed.append(task.shard)
            raise ray.exceptions.OwnerDiedError("ab" * 14, None, "")
        return _Part(tuple(task.shard))

    monkeypatch.setattr(ray, "wait", lambda refs, num_returns: (refs[:1], refs[1:]))
    monkeypatch.setattr(ray, "get", get)

    with caplog.at_level(logging.WARNING, logger="unraveled.engines.ray"):
        merged = ray_engine._run_shards(
            [Actor(), Actor()], None, shards, SETTINGS, _Part(), tqdm(disable=True), 1
        )

    assert failed == [lost]
    assert sorted(merged.windows) == list(range(20))  # each window once: the lost shard merged once
    assert (
        f"the result of windows {lost.start}..{lost.stop - 1} was lost (OwnerDiedError"
        in caplog.text
    )
    assert "0 of 2 workers died; 1 shard(s) were computed again" in caplog.text
