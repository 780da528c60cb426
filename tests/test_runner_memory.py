"""The runner holds one model at a time: a model is freed before the other kind of its weights loads."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from unraveled import runner
from unraveled.config import load_config
from unraveled.models import plan_runs


def test_processed_weights_are_freed_before_the_raw_weights_load(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded_models: list[tuple[str, weakref.ref]] = []
    alive_at_each_load: list[list[str]] = []
    real_load_planned = runner.load_planned

    def recording_load_planned(
        planned: object, weights: str, *args: object, **kwargs: object
    ) -> object:
        gc.collect()
        alive_at_each_load.append([kind for kind, model in loaded_models if model() is not None])
        loaded = real_load_planned(planned, weights, *args, **kwargs)
        loaded_models.append((weights, weakref.ref(loaded.model)))
        return loaded

    monkeypatch.setattr(runner, "load_planned", recording_load_planned)
    configs = [load_config("logit_lens"), load_config("layernorm")]  # processed, then raw weights
    assert [config.experiment.weights for config in configs] == ["processed", "raw"]
    runner.run_configs(plan_runs(configs, [str(tiny_gpt2_dir)]), tmp_path / "out")
    assert [kind for kind, _ in loaded_models] == ["processed", "raw"]
    assert alive_at_each_load == [[], []], "a model was still alive when the next one loaded"


def test_memory_compute_dropped_is_handed_back_before_rendering(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drawing starts from the memory the result needs, not from the heap compute left behind."""
    events: list[str] = []
    real_write_artifacts, real_seed, real_trim = (
        runner._write_artifacts,
        runner._seed_everything,
        runner.return_freed_memory,
    )

    def seeding(seed: int) -> None:
        events.append("compute")
        real_seed(seed)

    def drawing(*args: object, **kwargs: object) -> object:
        events.append("render")
        return real_write_artifacts(*args, **kwargs)

    def trimming() -> None:
        events.append("hand back")
        real_trim()

    monkeypatch.setattr(runner, "_seed_everything", seeding)
    monkeypatch.setattr(runner, "_write_artifacts", drawing)
    monkeypatch.setattr(runner, "return_freed_memory", trimming)
    runner.run_configs(
        plan_runs([load_config("layernorm")], [str(tiny_gpt2_dir)]), tmp_path / "out"
    )
    drawn = events.index("render")
    assert events.index("compute") < drawn and events[drawn - 1] == "hand back"


def test_freeing_memory_frees_the_buffers_mkl_keeps() -> None:
    import ctypes

    import torch

    from unraveled.memory import return_freed_memory

    try:
        mem_stat = ctypes.CDLL(
            str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")
        ).mkl_serv_mem_stat
    except (OSError, AttributeError):
        pytest.skip("this torch does not link MKL")
    mem_stat.restype = ctypes.c_int64
    buffers = ctypes.c_int()
    matrix = torch.randn(256, 256)
    matrix @ matrix
    assert mem_stat(ctypes.byref(buffers)) > 0, (
        "MKL kept no buffer after a product: nothing left to test"
    )
    return_freed_memory()
    # MKL's own count of the bytes its allocator holds, not the function's return value.
    assert mem_stat(ctypes.byref(buffers)) == 0
    assert buffers.value == 0
