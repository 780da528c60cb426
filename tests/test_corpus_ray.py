"""The Ray engine on a local Ray with 2 workers gives the local engine's result.

Ray starts once for this module, with 2 CPUs, no dashboard, its session files in a temporary
folder, and is shut down after; the workers read the model from a temporary weights cache.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray

from tests.test_corpus_engine import CONTEXT, SETTINGS, corpus_file, load_tiny  # noqa: F401 (fixture)
from unraveled.corpus import corpus_windows
from unraveled.engines.local import run_local
from unraveled.engines.ray import run_ray, shard_ranges
from unraveled.engines.state import AtlasSettings

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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, _temp_dir=str(folder))
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


def test_ray_engine_equals_local_engine(local_ray: None, tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corpus_file: Path) -> None:
    monkeypatch.setenv("UNRAVELED_CACHE", str(tmp_path / "cache"))
    model = load_tiny(tiny_gpt2_dir, tmp_path / "cache")
    settings = AtlasSettings(**{**SETTINGS.__dict__, "prepend_bos": True})
    windows = corpus_windows(model.tokenizer, [str(corpus_file)], CONTEXT, None, seed=0).tokens
    assert len(shard_ranges(len(windows), settings.batch_windows, 2 * 4)) > 2  # really sharded

    local = run_local(model, windows, settings, progress=False)
    distributed = run_ray(model, windows, settings, workers=2, progress=False)

    assert distributed.n_windows == local.n_windows == len(windows)
    for ours, theirs in zip(local.neuron_top + local.residual_top, distributed.neuron_top + distributed.residual_top):
        np.testing.assert_array_equal(ours.index, theirs.index)
        np.testing.assert_array_equal(ours.context_ids, theirs.context_ids)
        np.testing.assert_allclose(ours.values, theirs.values, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(local.neurons + local.residual, distributed.neurons + distributed.residual):
        assert ours.count == theirs.count
        np.testing.assert_allclose(ours.mean, theirs.mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ours.m2, theirs.m2, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(ours.positive, theirs.positive)
    for name, value in local.heads.means().items():
        np.testing.assert_allclose(value, distributed.heads.means()[name], rtol=1e-5, atol=1e-7)
    # The workers loaded the model from the temporary cache, and nothing else was written there.
    assert [entry.name.split("-atlas-")[0] for entry in (tmp_path / "cache" / "weights").iterdir() if "-atlas-" in entry.name] == ["tiny-gpt2"]
