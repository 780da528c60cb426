"""Activation generation on Ray workers; the driver receives the chunks in window order.

The cluster handling is the corpus atlas's (``unraveled.engines``): without ``RAY_ADDRESS`` a Ray
of this run's own on this machine, stopped afterwards; with it, that cluster (reached before the
model loaded). Each worker loads the model once from the converted-weights cache and computes
one batch of windows at a time, the batches cut as the local engine cuts them, so a window's
activations are those the local engine gives. A few batches per worker are in flight at once:
the driver holds only those, never the whole run's activations.
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import torch
from jaxtyping import Float, Int
from numpy.typing import NDArray
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor
from transformer_lens import HookedTransformer

from unraveled.engines.ray import placeable_workers, publish_model, reserve_workers
from unraveled.engines.ray_cluster import RayEngineError, local_ray, ray_address
from unraveled.models import weight_cache
from unraveled.models.loading import prepare_for_experiments
from unraveled.sae.activations import hook_activations, window_batches

IN_FLIGHT_PER_WORKER = 2


class ActivationWorker:
    """Holds one copy of the model, loaded once from the converted-weights cache."""

    def __init__(self, cache_root: str, key: str, device: str) -> None:
        """Load the model (see ``unraveled.engines.ray.AtlasWorker``).

        Raises:
            RuntimeError: The entry is not in the cache on this node.
        """
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
        chosen = torch.from_numpy(windows[batch.start : batch.stop].astype(np.int64))
        return hook_activations(self.model, hook_name, chosen, prepend_bos).numpy()


# Applied here rather than as a decorator, so that jaxtyping's import hook (in the tests) checks
# the plain class.
RemoteActivationWorker = ray.remote(num_cpus=1)(ActivationWorker)


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
    actors: list[Any] = []
    try:
        for number in range(n_workers):
            placed = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=number
            )
            actors.append(
                RemoteActivationWorker.options(
                    num_gpus=1 if on_gpu else 0, scheduling_strategy=placed
                ).remote(str(weight_cache.cache_root()), key, device)
            )
        windows_ref = ray.put(windows)
        order = (
            itertools.cycle(batches)
            if epochs is None
            else itertools.chain.from_iterable(itertools.repeat(batches, epochs))
        )
        pending: deque[Any] = deque()
        for number, batch in enumerate(order):
            pending.append(
                actors[number % n_workers].activations.remote(
                    windows_ref, batch, hook_name, prepend_bos
                )
            )
            if len(pending) >= IN_FLIGHT_PER_WORKER * n_workers:
                yield _received(pending.popleft())
        while pending:
            yield _received(pending.popleft())
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)


def _received(reference: Any) -> Float[Tensor, "token d_in"]:
    try:
        return torch.from_numpy(ray.get(reference))
    except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise RayEngineError(
            f"a Ray worker failed while computing activations: {type(error).__name__}: "
            f"{lines[0] if lines else ''}"
        ) from None


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
