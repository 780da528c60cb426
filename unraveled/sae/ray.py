"""Activation generation on Ray workers; the driver receives the chunks in window order.

The cluster handling is the corpus atlas's (``unraveled.engines``): without ``RAY_ADDRESS`` a Ray
of this run's own on this machine, stopped afterwards; with it, that cluster (reached before the
model loaded). Each worker loads the model once from the converted-weights cache and computes
one batch of windows at a time, the batches cut as the local engine cuts them, so a window's
activations are those the local engine gives. A few batches per worker are in flight at once:
the driver holds only those, never the whole run's activations.

A worker that dies mid-run (killed by the out-of-memory killer, its node gone) has the batches
it had not delivered computed again on the live workers, in their place in the stream, so the
stream is the one a run without the death gives; when the last worker dies a new one is started
in its reserved room. The bookkeeping, its limits and its fault injection for tests
(``UNRAVELED_RAY_KILL_WORKER``) are the atlas's (``unraveled.engines.ray``); a batch's failures
count at its place in the stream, so the same windows in another epoch start again from none.

A dead worker never makes the driver wait forever: Ray fails the tasks of a dead worker (actors
are never restarted, so none waits for a restart), and workers, the first ones and any new one,
that can't start within ``WORKER_START_TIMEOUT_S`` end the run. A known limit: a worker that
stays alive but stops making progress (hung, not dead) is not detected, and the driver waits for
its batch for as long as it hangs; a batch has no time limit, since a slow batch can't be told
from a stuck one.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from jaxtyping import Float, Int
from numpy.typing import NDArray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor
from transformer_lens import HookedTransformer

from unraveled.engines.ray import (
    KILL_WORKER_ENV,
    WorkerLosses,
    die_if_told,
    first_line,
    placeable_workers,
    publish_model,
    reserve_workers,
    windows_text,
)
from unraveled.engines.ray_cluster import RayEngineError, local_ray, ray_address
from unraveled.models import weight_cache
from unraveled.models.loading import prepare_for_experiments
from unraveled.sae.activations import hook_activations, window_batches

logger = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2
# A new worker loads the model from the converted-weights cache: minutes for a large model on
# slow shared storage, never forever (its reserved room may be gone with its node).
WORKER_START_TIMEOUT_S = 600


class ActivationWorker:
    """Holds one copy of the model, loaded once from the converted-weights cache."""

    def __init__(
        self, cache_root: str, key: str, device: str, kill_marker: str | None = None
    ) -> None:
        """Load the model (see ``unraveled.engines.ray.AtlasWorker``).

        Raises:
            RuntimeError: The entry is not in the cache on this node.
        """
        self._kill_marker = kill_marker
        self._batches_begun = 0
        os.environ["UNRAVELED_CACHE"] = cache_root
        entry = weight_cache.load_entry(key)
        if entry is None:
            raise RuntimeError(
                f"converted-weights entry {key} is not in {cache_root} on this node: on a cluster, "
                "point UNRAVELED_CACHE at storage every node can read"
            )
        self.model = prepare_for_experiments(entry[0], device)

    def activations(
        self,
        windows: Int[NDArray, "window pos"],
        batch: range,
        hook_name: str,
        prepend_bos: bool,
    ) -> Float[NDArray, "token d_in"]:
        """The hook's activations on ``windows[batch]`` (``hook_activations``)."""
        self._batches_begun += 1
        die_if_told(self._kill_marker, self._batches_begun)
        chosen = torch.from_numpy(windows[batch.start : batch.stop].astype(np.int64))
        return hook_activations(self.model, hook_name, chosen, prepend_bos).numpy()

    def ready(self) -> bool:
        """True once the model is loaded (every worker's start is waited for with a timeout)."""
        return True


# Applied here rather than as a decorator, so that jaxtyping's import hook (in the tests) checks
# the plain class.
RemoteActivationWorker = ray.remote(num_cpus=1)(ActivationWorker)


@dataclass
class _Task:
    """One batch in flight: its result's reference and the worker computing it."""

    reference: Any
    worker: int
    batch: range
    position: int  # in the stream: the same batch in another epoch is at another position


class _Workers:
    """The activation workers, one per bundle of the run's placement group, by number.

    A dead worker's number is not used again: a new worker in its room gets the next number.
    """

    def __init__(
        self, group: PlacementGroup, n_workers: int, on_gpu: bool, key: str, device: str
    ) -> None:
        self._group = group
        self._on_gpu = on_gpu
        self._load = (str(weight_cache.cache_root()), key, device, os.environ.get(KILL_WORKER_ENV))
        self.losses = WorkerLosses(n_workers)
        self.actors: dict[int, tuple[Any, int]] = {}
        for number in range(n_workers):
            self._start(number, number)
        self._turns = itertools.count()
        self._numbers = itertools.count(n_workers)
        self._wait_started()

    def _wait_started(self) -> None:
        """Wait for the first workers to load the model, within ``WORKER_START_TIMEOUT_S``.

        Raises:
            RayEngineError: Some did not start in time (named), or one could not start.
        """
        starts = {number: actor.ready.remote() for number, (actor, _) in self.actors.items()}
        try:
            ray.get(list(starts.values()), timeout=WORKER_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            late = [number for number, start in starts.items() if not _delivered(start)]
            raise RayEngineError(
                f"Ray worker(s) {', '.join(map(str, late))} of {len(starts)} did not start "
                f"within {WORKER_START_TIMEOUT_S} s (loading the model from the converted-weights "
                f"cache {self._load[0]})"
            ) from None
        except ray.exceptions.RayActorError as error:
            raise RayEngineError(f"a Ray worker could not start: {first_line(error)}") from None

    def _start(self, number: int, bundle: int) -> Any:
        placed = PlacementGroupSchedulingStrategy(
            placement_group=self._group, placement_group_bundle_index=bundle
        )
        actor = RemoteActivationWorker.options(
            num_gpus=1 if self._on_gpu else 0, scheduling_strategy=placed, max_restarts=0
        ).remote(*self._load)
        self.actors[number] = (actor, bundle)
        return actor

    def submit(
        self, windows_ref: Any, batch: range, position: int, hook_name: str, prepend_bos: bool
    ) -> _Task:
        """``batch``, at ``position`` in the stream, given to the live workers in turn."""
        live = sorted(self.actors)
        number = live[next(self._turns) % len(live)]
        reference = self.actors[number][0].activations.remote(
            windows_ref, batch, hook_name, prepend_bos
        )
        return _Task(reference, number, batch, position)

    def died(self, number: int, lost: list[_Task], error: ray.exceptions.RayActorError) -> None:
        """Worker ``number`` died with ``lost`` undelivered; a new one if it was the last.

        ``lost[0]`` is the batch it was computing; the others waited behind it.

        Raises:
            RayEngineError: As ``WorkerLosses.worker_died`` says, or no new worker could start.
        """
        batches = [task.batch for task in lost]
        self.losses.worker_died(
            number, batches, error, last_may_die=True, occurrence=lost[0].position
        )
        _, bundle = self.actors.pop(number)
        if self.actors:
            return
        new = next(self._numbers)
        logger.warning("ray: no worker left: starting worker %d in worker %d's place", new, number)
        actor = self._start(new, bundle)
        try:
            ray.get(actor.ready.remote(), timeout=WORKER_START_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RayEngineError(
                f"every Ray worker died (the last on windows {windows_text(batches[:1])}), and a "
                f"new one did not start within {WORKER_START_TIMEOUT_S} s"
            ) from None
        except ray.exceptions.RayActorError as error:
            raise RayEngineError(
                f"every Ray worker died (the last on windows {windows_text(batches[:1])}), and a "
                f"new one could not start: {type(error).__name__}"
            ) from None
        self.losses.alive.add(new)

    def stop(self) -> None:
        """Stop every worker (their results are not wanted any more)."""
        for actor, _ in self.actors.values():
            ray.kill(actor)


def _chunks_on_ray(
    model: HookedTransformer,
    hook_name: str,
    windows: Int[NDArray, "window pos"],
    batch_windows: int,
    prepend_bos: bool,
    workers: int | None,
    epochs: int | None,
) -> Iterator[Float[Tensor, "token d_in"]]:
    """``ray_activation_chunks`` on the Ray this process is connected to."""
    key = publish_model(model)
    device = str(model.cfg.device)
    on_gpu = device.startswith("cuda")
    batches = window_batches(len(windows), batch_windows)
    n_workers = min(placeable_workers(workers, on_gpu), len(batches))
    group = reserve_workers(n_workers, on_gpu)
    pool: _Workers | None = None
    try:
        pool = _Workers(group, n_workers, on_gpu, key, device)
        windows_ref = ray.put(windows)
        order = (
            itertools.cycle(batches)
            if epochs is None
            else itertools.chain.from_iterable(itertools.repeat(batches, epochs))
        )
        yield from _stream(
            pool, windows_ref, order, IN_FLIGHT_PER_WORKER * n_workers, hook_name, prepend_bos
        )
    finally:
        if pool is not None:
            pool.stop()
        remove_placement_group(group)


def _stream(
    pool: _Workers,
    windows_ref: Any,
    order: Iterator[range],
    in_flight: int,
    hook_name: str,
    prepend_bos: bool,
) -> Iterator[Float[Tensor, "token d_in"]]:
    """The activations of the batches of ``order`` in turn, ``in_flight`` of them asked for."""
    pending: deque[_Task] = deque()
    for position, batch in enumerate(order):
        pending.append(pool.submit(windows_ref, batch, position, hook_name, prepend_bos))
        if len(pending) >= in_flight:
            yield _received(pending, pool, windows_ref, hook_name, prepend_bos)
    while pending:
        yield _received(pending, pool, windows_ref, hook_name, prepend_bos)


def _delivered(reference: Any) -> bool:
    """Whether the result of ``reference`` is there to read now (of a worker that died since)."""
    try:
        ray.get(reference, timeout=0)
    except (
        ray.exceptions.GetTimeoutError,
        ray.exceptions.RayActorError,
        ray.exceptions.ObjectLostError,
    ):
        return False
    return True


def _received(
    pending: deque[_Task], pool: _Workers, windows_ref: Any, hook_name: str, prepend_bos: bool
) -> Float[Tensor, "token d_in"]:
    """The first pending batch's activations, computed again as often as its workers die.

    A dead worker's other undelivered batches are given to live workers at once, each keeping
    its place in ``pending``, so the stream's order never changes.
    """
    while True:
        task = pending[0]
        try:
            chunk = ray.get(task.reference)
        except ray.exceptions.RayActorError as error:
            if task.worker in pool.actors:
                lost = [
                    place
                    for place, other in enumerate(pending)
                    if other.worker == task.worker
                    and (place == 0 or not _delivered(other.reference))
                ]
                pool.died(task.worker, [pending[place] for place in lost], error)
            else:  # a result that looked delivered when its worker's death was handled
                lost = [0]
            for place in lost:
                again = pending[place]
                pending[place] = pool.submit(
                    windows_ref, again.batch, again.position, hook_name, prepend_bos
                )
            logger.warning(
                "ray: windows %s computed again on worker(s) %s, in their place in the stream",
                windows_text([pending[place].batch for place in lost]),
                ", ".join(str(number) for number in sorted({pending[p].worker for p in lost})),
            )
            continue
        except ray.exceptions.ObjectLostError as error:  # also OwnerDiedError
            pool.losses.result_lost(task.batch, error, occurrence=task.position)
            pending[0] = pool.submit(windows_ref, task.batch, task.position, hook_name, prepend_bos)
            continue
        pending.popleft()
        # A copy: the object store's array is read-only, and the consumer may write to it.
        return torch.from_numpy(np.array(chunk))


def ray_activation_chunks(
    model: HookedTransformer,
    hook_name: str,
    windows: Int[NDArray, "window pos"],
    batch_windows: int,
    prepend_bos: bool,
    workers: int | None = None,
    epochs: int | None = 1,
) -> Iterator[Float[Tensor, "token d_in"]]:
    """``activation_chunks`` computed on Ray workers, received in window order.

    On the Ray the caller initialised, else on the cluster at ``RAY_ADDRESS``, else on a Ray
    started here and stopped when the iterator is closed or exhausted.
    """
    args = (model, hook_name, windows, batch_windows, prepend_bos, workers, epochs)
    if ray.is_initialized():
        yield from _chunks_on_ray(*args)
        return
    address = ray_address()
    if address is None:
        with local_ray(workers):
            yield from _chunks_on_ray(*args)
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield from _chunks_on_ray(*args)
    finally:
        ray.shutdown()
