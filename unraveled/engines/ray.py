"""The Ray engine: shards of windows on Ray actors, merged with the same exact merge.

Without ``RAY_ADDRESS`` (and without a Ray already initialised by the caller) Ray starts on this
machine and is shut down afterwards; with ``RAY_ADDRESS`` set it joins that cluster. Each actor
loads the model once from the converted-weights cache (``UNRAVELED_CACHE``, which on a cluster
must be storage every node can read), under a key derived from the model's config and weights,
so a worker can't load a different model than the one the run was given. Shards are runs of
whole batches, cut as the local engine cuts them, so each window is computed in the same batch
as locally.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Any

import numpy as np
import ray
import torch
from jaxtyping import Int
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from unraveled.engines.local import run_windows
from unraveled.engines.state import AtlasSettings, AtlasState
from unraveled.models import weight_cache
from unraveled.models.loading import checkpoint_parameters, prepare_for_experiments

logger = logging.getLogger(__name__)

SHARDS_PER_WORKER = 4


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
        weight_cache.store_entry(key, model, n_parameters if n_parameters is not None else sum(p.numel() for p in model.parameters()))
    return key


def shard_ranges(n_windows: int, batch_windows: int, n_shards: int) -> list[range]:
    """Contiguous window ranges made of whole batches, as even as the batches allow."""
    n_batches = math.ceil(n_windows / batch_windows)
    cuts = np.linspace(0, n_batches, min(n_shards, n_batches) + 1).round().astype(int)
    return [range(a * batch_windows, min(b * batch_windows, n_windows)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


class AtlasWorker:
    """Holds one copy of the model, loaded once from the converted-weights cache."""

    def __init__(self, cache_root: str, key: str, device: str) -> None:
        os.environ["UNRAVELED_CACHE"] = cache_root
        entry = weight_cache.load_entry(key)
        if entry is None:
            raise RuntimeError(
                f"converted-weights entry {key} is not in {cache_root} on this node: on a cluster, "
                "point UNRAVELED_CACHE at storage every node can read"
            )
        self.model = prepare_for_experiments(entry[0], device)

    def run(self, windows: Int[np.ndarray, "window pos"], numbers: range, settings: AtlasSettings) -> AtlasState:
        return run_windows(self.model, windows, numbers, settings, progress=False)


# Applied here rather than as a decorator, so that jaxtyping's import hook (in the tests) checks
# the plain class.
RemoteAtlasWorker = ray.remote(num_cpus=1)(AtlasWorker)


def _start_ray(workers: int | None) -> bool:
    """Join ``RAY_ADDRESS`` or start Ray locally, unless the caller already did; True if we did."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address is None and workers is not None:
        options["num_cpus"] = workers
    ray.init(address=address, **options)
    return True


def run_ray(
    model: HookedTransformer,
    windows: Int[np.ndarray, "window pos"],
    settings: AtlasSettings,
    workers: int | None = None,
    progress: bool = True,
) -> AtlasState:
    """Every window, sharded over ``workers`` Ray actors (default: every CPU Ray has), merged.

    Shards are merged as they finish; the merge is exact, so the order changes nothing beyond
    float rounding of the moments.
    """
    started_here = _start_ray(workers)
    actors: list[Any] = []
    try:
        key = publish_model(model)
        n_workers = workers or max(1, int(ray.available_resources().get("CPU", 1)))
        shards = shard_ranges(len(windows), settings.batch_windows, n_workers * SHARDS_PER_WORKER)
        n_workers = min(n_workers, len(shards))
        logger.info("ray: %d shards on %d workers (%s)", len(shards), n_workers, ray.get_runtime_context().gcs_address)
        device = str(model.cfg.device)
        # One GPU per worker when the run is on CUDA (--device cuda), so Ray places them on GPU nodes.
        worker = RemoteAtlasWorker.options(num_gpus=1 if device.startswith("cuda") else 0)
        actors = [worker.remote(str(weight_cache.cache_root()), key, device) for _ in range(n_workers)]
        windows_ref = ray.put(windows)
        pending = {actors[i % n_workers].run.remote(windows_ref, shard, settings): shard for i, shard in enumerate(shards)}
        state = AtlasState.for_model(model, settings)
        with tqdm(total=windows.size, unit="tok", unit_scale=True, desc=f"corpus atlas (ray, {n_workers} workers)", disable=not progress) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                shard = pending.pop(done[0])
                state = state.merge(ray.get(done[0]))
                bar.update(len(shard) * windows.shape[1])
        return state
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()
