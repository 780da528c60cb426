"""The exact-neighbour UMAP: quiet, it places new points where they belong, and after
``make setup`` compiled its kernels a run compiles none."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from unraveled.umap_fit import umap_3d

pytestmark = pytest.mark.umap


def test_umap_places_points_by_cluster_without_warnings() -> None:
    rng = np.random.default_rng(0)
    centres = np.zeros((2, 16))
    centres[1, 0] = 40.0
    fit_on = np.concatenate([centre + rng.standard_normal((150, 16)) for centre in centres])
    place = np.concatenate([centre + rng.standard_normal((5, 16)) for centre in centres])
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", UserWarning
        )  # UMAP's precomputed_knn warning would fail here
        placed = umap_3d(fit_on, place, neighbours=10, seed=0)
    assert placed.shape == (10, 3)
    distances = np.linalg.norm(placed[:, None] - placed[None], axis=-1)
    within = max(distances[:5, :5].max(), distances[5:, 5:].max())
    assert distances[:5, 5:].min() > within


def test_umap_kernels_compiled_by_a_fit_are_kept_on_disk() -> None:
    from umap import layouts, umap_

    rng = np.random.default_rng(1)
    umap_3d(rng.standard_normal((120, 8)), rng.standard_normal((3, 8)), neighbours=5, seed=0)
    for kernel in (
        umap_.smooth_knn_dist,
        umap_.compute_membership_strengths,
        layouts._nb_optimize_layout_euclidean_single_epoch,
    ):
        folder = Path(kernel.stats.cache_path)
        name = f"{kernel.py_func.__module__.rsplit('.', 1)[-1]}.{kernel.py_func.__name__}-"
        kept = [path.suffix for path in folder.glob(f"{name}*")]
        assert ".nbi" in kept and ".nbc" in kept, (
            f"{kernel.py_func.__name__}: no compiled code kept in {folder}"
        )
    # The parallel layout kernel shares the serial one's Python function and cache key: it must
    # stay uncached.
    assert layouts._nb_optimize_layout_euclidean_single_epoch_parallel.stats.cache_path is None


# Which numba functions compile (numba's own compile events, never fired by a load from disk)
# while umap is imported, while a fit of another size than compile_kernels' runs, and, to show
# the events are seen, while a new function compiles.
COMPILES_IN_A_NEW_PROCESS = """
import json
import numpy as np
from numba import njit
from numba.core import event

def compiled(run):
    with event.install_recorder("numba:compile") as recorder:
        run()
    starts = [e for _, e in recorder.buffer if e.is_start]
    return sorted({e.data["dispatcher"].py_func.__module__ for e in starts})

at_import = compiled(lambda: __import__("umap"))
from unraveled.umap_fit import umap_3d
rng = np.random.default_rng(1)
points = rng.standard_normal((500, 40)).astype(np.float32)
in_fit = compiled(lambda: umap_3d(points, rng.standard_normal((4, 40)), 10, 3))
probe = compiled(lambda: njit(lambda x: x + 1)(1))
print(json.dumps({"at_import": at_import, "in_fit": in_fit, "probe": probe}))
"""


# Every kernel compiled from nothing, in a process of its own, as `make setup` does: a full-cost
# check, in `make test-heavy`.
@pytest.mark.heavy
def test_after_compile_kernels_a_run_compiles_no_kernel(tmp_path: Path) -> None:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    subprocess.run([sys.executable, "-m", "unraveled.umap_fit"], env=env, check=True, timeout=600)
    done = subprocess.run(
        [sys.executable, "-c", COMPILES_IN_A_NEW_PROCESS],
        env=env,
        check=True,
        timeout=600,
        capture_output=True,
        text=True,
    )
    compiled = json.loads(done.stdout.splitlines()[-1])
    assert compiled["probe"] == ["__main__"], "numba's compile events were not seen"
    assert compiled["in_fit"] == []
    # umap.utils' two random-number kernels have explicit signatures and no cache: numba compiles
    # them at every import. pynndescent's, compiled at its import too, are kept on disk.
    assert set(compiled["at_import"]) <= {"umap.utils"}, compiled["at_import"]
