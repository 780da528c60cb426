"""The Ray engine: shards of windows on Ray actors, merged with the same exact merge.

Without ``RAY_ADDRESS`` (and without a Ray already initialised by the caller) Ray starts on this
machine and is shut down afterwards; with ``RAY_ADDRESS`` set it joins that cluster. Each actor
loads the model once from the converted-weights cache (``UNRAVELED_CACHE``, which on a cluster
must be storage every node can read), under a key derived from the model's config and weights,
so a worker can't load a different model than the one the run was given. Shards are runs of
whole batches, cut as the local engine cuts them, so each window is computed in the same batch
as locally.

The workers are as many as the cluster can place when the run starts (``params.ray_workers``
caps them; fewer is said in a warning), reserved together in a placement group so none waits
for room that never comes. Each worker is given one shard at a time; a shard whose worker dies
is computed again on a surviving worker, and the run says so. That bookkeeping and its limits
(``WorkerLosses``) and the fault injection (``die_if_told``) serve the SAE activation stream on
Ray too (``unraveled.sae.ray``).

Fault injection, for tests of that retry through the CLI: with ``UNRAVELED_RAY_KILL_WORKER``
set to a path that does not exist yet, the first worker given a second shard (an SAE activation
worker: a second batch) creates the file and kills its own process with SIGKILL (as the kernel's
out-of-memory killer would), once per run; a later run with the file still there kills nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import signal
from collections import Counter, deque
from typing import Any

import numpy as np
import ray
import torch
from jaxtyping import Int
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from unraveled.engines.local import run_windows
from unraveled.engines.ray_cluster import RayEngineError, local_ray, ray_address
from unraveled.engines.state import AtlasSettings, AtlasState
from unraveled.models import weight_cache
from unraveled.models.loading import checkpoint_parameters, prepare_for_experiments

logger = logging.getLogger(__name__)

SHARDS_PER_WORKER = 4
PLACEMENT_TIMEOUT_S = 30
MAX_SHARD_ATTEMPTS = 3
KILL_WORKER_ENV = "UNRAVELED_RAY_KILL_WORKER"


def model_cache_key(model: HookedTransformer) -> str:
    """A converted-weights cache key that names exactly these weights and this config."""
    digest = hashlib.sha256()
    config = {key: str(value) for key, value in model.cfg.to_dict().items() if key != "device"}
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.cfg.model_name)[:40]
    return weight_cache.cache_key(f"{slug}-atlas", "content", {"sha256": digest.hexdigest()})


def publish_model(model: HookedTransformer) -> str:
    """Put ``model`` into the converted-weights cache (once) for the workers; returns its key."""
    key = model_cache_key(model)
    if not weight_cache.has_entry(key):
        n_parameters = checkpoint_parameters(model)
        weight_cache.store_entry(
            key,
            model,
            n_parameters
            if n_parameters is not None
            else sum(p.numel() for p in model.parameters()),
        )
    return key


def shard_ranges(n_windows: int, batch_windows: int, n_shards: int) -> list[range]:
    """Contiguous window ranges made of whole batches, as even as the batches allow."""
    n_batches = math.ceil(n_windows / batch_windows)
    cuts = np.linspace(0, n_batches, min(n_shards, n_batches) + 1).round().astype(int)
    return [
        range(a * batch_windows, min(b * batch_windows, n_windows))
        for a, b in itertools.pairwise(cuts)
        if b > a
    ]


def die_if_told(kill_marker: str | None, begun: int) -> None:
    """The fault injection (see the module docstring), in a worker beginning its ``begun``-th task.

    Kills this process with SIGKILL when ``kill_marker`` is set, this is the worker's second task,
    and no worker of the run has created the marker yet (this one creates it).
    """
    if kill_marker is None or begun != 2:
        return
    try:
        os.close(os.open(kill_marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


class AtlasWorker:
    """Holds one copy of the model, loaded once from the converted-weights cache."""

    def __init__(
        self, cache_root: str, key: str, device: str, kill_marker: str | None = None
    ) -> None:
        """Load the model.

        Args:
            cache_root: The converted-weights cache the driver stored the model in.
            key: The model's entry there (see ``model_cache_key``).
            device: Where to compute.
            kill_marker: The fault injection's file (see the module docstring), or None.

        Raises:
            RuntimeError: The entry is not in the cache on this node.
        """
        self._kill_marker = kill_marker
        self._shards_begun = 0
        os.environ["UNRAVELED_CACHE"] = cache_root
        entry = weight_cache.load_entry(key)
        if entry is None:
            raise RuntimeError(
                f"converted-weights entry {key} is not in {cache_root} on this node: on a cluster, "
                "point UNRAVELED_CACHE at storage every node can read"
            )
        self.model = prepare_for_experiments(entry[0], device)

    def run(
        self, windows: Int[np.ndarray, "window pos"], numbers: range, settings: AtlasSettings
    ) -> AtlasState:
        """The statistics of windows ``numbers`` (one shard)."""
        self._shards_begun += 1
        die_if_told(self._kill_marker, self._shards_begun)
        return run_windows(self.model, windows, numbers, settings, progress=False)


# Applied here rather than as a decorator, so that jaxtyping's import hook (in the tests) checks
# the plain class.
RemoteAtlasWorker = ray.remote(num_cpus=1)(AtlasWorker)


def placeable_workers(workers: int | None, on_gpu: bool) -> int:
    """How many workers the cluster can place now: ``workers`` (default: all it can), or fewer.

    Fewer is said in a warning.

    Raises:
        RayEngineError: Not even one.
    """
    free = ray.available_resources()
    placeable = int(free.get("CPU", 0))
    if on_gpu:
        placeable = min(placeable, int(free.get("GPU", 0)))
    where = ray.get_runtime_context().gcs_address
    needs = "1 CPU and 1 GPU" if on_gpu else "1 CPU"
    if placeable == 0:
        raise RayEngineError(
            f"the Ray cluster at {where} has no room for a worker ({needs} each) now: "
            f"{free.get('CPU', 0):g} CPU(s) and {free.get('GPU', 0):g} GPU(s) free"
        )
    if workers is not None and workers > placeable:
        logger.warning(
            "ray: params.ray_workers=%d, but the cluster at %s can place %d worker(s) now "
            "(%s each): running %d",
            workers,
            where,
            placeable,
            needs,
            placeable,
        )
    return min(workers or placeable, placeable)


def reserve_workers(n_workers: int, on_gpu: bool) -> PlacementGroup:
    """A placement group with one bundle per worker, reserved within ``PLACEMENT_TIMEOUT_S``.

    Raises:
        RayEngineError: The cluster could not reserve them in time (others took the room).
    """
    group = placement_group(
        [{"CPU": 1, **({"GPU": 1} if on_gpu else {})} for _ in range(n_workers)]
    )
    if not group.wait(timeout_seconds=PLACEMENT_TIMEOUT_S):
        remove_placement_group(group)
        raise RayEngineError(
            f"the Ray cluster could not place {n_workers} worker(s) within "
            f"{PLACEMENT_TIMEOUT_S} s (other jobs took the room?); set params.ray_workers lower"
        )
    return group


def first_line(error: BaseException) -> str:
    """``ErrorType: first line of its message``, for one-line messages."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def windows_text(shards: list[range]) -> str:
    """``3..5, 8..9``: the windows of ``shards``, for messages."""
    return ", ".join(f"{shard.start}..{shard.stop - 1}" for shard in shards)


class WorkerLosses:
    """Which workers have died and how often each run of windows has failed; when to give up.

    Shared by the corpus atlas's shards and the SAE activation stream's batches
    (``unraveled.sae.ray``): the windows of a worker that died, or of a result that was lost, are
    computed again elsewhere until one run of them has failed ``MAX_SHARD_ATTEMPTS`` times (a
    window that kills every worker it is given, say by running out of memory, must end the run).
    A failure counts against the windows being computed or read when it happened, at their
    ``occurrence`` (the SAE stream repeats its batches every epoch: the same windows in another
    epoch are another occurrence, with failures of their own; the atlas's shards occur once).
    """

    def __init__(self, n_workers: int) -> None:
        """Workers ``0 .. n_workers - 1``, all alive."""
        self.n_workers = n_workers
        self.alive = set(range(n_workers))
        self.failures: Counter[tuple[int, range]] = Counter()

    def worker_died(
        self,
        number: int,
        shards: list[range],
        error: ray.exceptions.RayActorError,
        last_may_die: bool = False,
        occurrence: int = 0,
    ) -> None:
        """Worker ``number`` died while computing ``shards[0]``, the one waited for.

        Only ``shards[0]`` counts as failed: a worker computes one task at a time, and the rest
        of ``shards`` were waiting behind it, lost only because the worker was.

        Args:
            number: The worker.
            shards: Its windows not received, all to be computed again; the first was running.
            error: What Ray said.
            last_may_die: The caller starts a new worker when none is left (else the run stops).
            occurrence: Which occurrence of ``shards[0]`` in the run this was.

        Raises:
            RayEngineError: The worker could not even start, every worker has died (unless
                ``last_may_die``), or ``shards[0]`` (at ``occurrence``) has now failed
                ``MAX_SHARD_ATTEMPTS`` times.
        """
        if error.actor_init_failed:
            raise RayEngineError(f"a Ray worker could not start: {first_line(error)}") from None
        self.alive.discard(number)
        failed = (occurrence, shards[0])
        self.failures[failed] += 1
        logger.warning(
            "ray: worker %d died while computing windows %s (%s); %d of %d workers left",
            number,
            windows_text(shards),
            first_line(error),
            len(self.alive),
            self.n_workers,
        )
        if not self.alive and not last_may_die:
            raise RayEngineError(
                f"every Ray worker died (the last on windows {windows_text(shards[:1])}: "
                f"{first_line(error)})"
            ) from None
        if self.failures[failed] >= MAX_SHARD_ATTEMPTS:
            raise RayEngineError(
                f"windows {windows_text(shards[:1])} failed {self.failures[failed]} times, "
                f"their workers dying (out of memory?); last: {first_line(error)}"
            ) from None

    def result_lost(
        self, shard: range, error: ray.exceptions.ObjectLostError, occurrence: int = 0
    ) -> None:
        """The result of ``shard`` (at ``occurrence``) was lost before it was read.

        Its node or owner is gone.

        Raises:
            RayEngineError: ``shard`` at ``occurrence`` has now failed ``MAX_SHARD_ATTEMPTS``
                times.
        """
        failed = (occurrence, shard)
        self.failures[failed] += 1
        logger.warning(
            "ray: the result of windows %s was lost (%s); computing them again",
            windows_text([shard]),
            first_line(error),
        )
        if self.failures[failed] >= MAX_SHARD_ATTEMPTS:
            raise RayEngineError(
                f"windows {windows_text([shard])} failed {self.failures[failed]} times; "
                f"last: {first_line(error)}"
            ) from None


def _run_shards(
    actors: list[Any],
    windows_ref: Any,
    shards: list[range],
    settings: AtlasSettings,
    state: AtlasState,
    bar: tqdm,
    sequence_length: int,
) -> AtlasState:
    """Give each worker one shard at a time and merge the results into ``state``.

    A shard whose worker dies, or whose result is lost before it is read (its node or owner
    gone), is given to a worker again; a shard is merged only from the one result that was read,
    so exactly once. The run fails when every worker has died, a shard has failed
    ``MAX_SHARD_ATTEMPTS`` times, or a worker could not even start (``WorkerLosses``).
    """
    queue = deque(shards)
    idle = list(range(len(actors)))
    losses = WorkerLosses(len(actors))
    running: dict[Any, tuple[int, range]] = {}
    while queue or running:
        while queue and idle:
            number, shard = idle.pop(), queue.popleft()
            running[actors[number].run.remote(windows_ref, shard, settings)] = (number, shard)
        done, _ = ray.wait(list(running), num_returns=1)
        number, shard = running.pop(done[0])
        try:
            part = ray.get(done[0])
        except ray.exceptions.RayActorError as error:
            losses.worker_died(number, [shard], error)
            queue.appendleft(shard)
            continue
        except (
            ray.exceptions.ObjectLostError
        ) as error:  # also OwnerDiedError; the worker may live on
            losses.result_lost(shard, error)
            queue.appendleft(shard)
            idle.append(number)
            continue
        idle.append(number)
        state = state.merge(part)
        bar.update(len(shard) * sequence_length)
    if losses.failures:
        logger.warning(
            "ray: %d of %d workers died; %d shard(s) were computed again, so every window is "
            "in the result once",
            len(actors) - len(losses.alive),
            len(actors),
            sum(losses.failures.values()),
        )
    return state


def _run_on_ray(
    model: HookedTransformer,
    windows: Int[np.ndarray, "window pos"],
    settings: AtlasSettings,
    workers: int | None,
    progress: bool,
) -> AtlasState:
    """``run_ray`` on the Ray this process is connected to."""
    key = publish_model(model)
    device = str(model.cfg.device)
    # One GPU per worker when the run is on CUDA (--device cuda), so Ray places them on GPU nodes.
    on_gpu = device.startswith("cuda")
    n_workers = placeable_workers(workers, on_gpu)
    shards = shard_ranges(len(windows), settings.batch_windows, n_workers * SHARDS_PER_WORKER)
    n_workers = min(n_workers, len(shards))
    logger.info(
        "ray: %d shards on %d workers (%s)",
        len(shards),
        n_workers,
        ray.get_runtime_context().gcs_address,
    )
    group = reserve_workers(n_workers, on_gpu)
    actors: list[Any] = []
    try:
        for number in range(n_workers):
            placed = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=number
            )
            worker = RemoteAtlasWorker.options(
                num_gpus=1 if on_gpu else 0, scheduling_strategy=placed
            )
            actors.append(
                worker.remote(
                    str(weight_cache.cache_root()), key, device, os.environ.get(KILL_WORKER_ENV)
                )
            )
        windows_ref = ray.put(windows)
        state = AtlasState.for_model(model, settings)
        with tqdm(
            total=windows.size,
            unit="tok",
            unit_scale=True,
            desc=f"corpus atlas (ray, {n_workers} workers)",
            disable=not progress,
        ) as bar:
            return _run_shards(actors, windows_ref, shards, settings, state, bar, windows.shape[1])
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)


def run_ray(
    model: HookedTransformer,
    windows: Int[np.ndarray, "window pos"],
    settings: AtlasSettings,
    workers: int | None = None,
    progress: bool = True,
) -> AtlasState:
    """Every window, sharded over ``workers`` Ray actors (default: every CPU Ray can place), merged.

    On the Ray the caller initialised, else on the cluster at ``RAY_ADDRESS`` (which
    ``unraveled.engines.ray_cluster.check_ray`` reached before the model loaded), else on a Ray
    started here for this run and stopped afterwards. Shards are merged as they finish; the
    merge is exact, so the order changes nothing beyond float rounding of the moments.
    """
    if ray.is_initialized():
        return _run_on_ray(model, windows, settings, workers, progress)
    address = ray_address()
    if address is None:
        with local_ray(workers):
            return _run_on_ray(model, windows, settings, workers, progress)
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        return _run_on_ray(model, windows, settings, workers, progress)
    finally:
        ray.shutdown()
