"""The runner owns memory: it holds one model at a time (a model is freed before the other kind
of its weights loads) and hands freed memory back between phases; library code never does."""

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


def _record_hand_backs(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
    """Record every hand-back of freed memory, whoever makes it (``return_freed_memory`` frees
    MKL's buffers through ``unraveled.compat.mkl``)."""
    from unraveled.compat import mkl

    real_free = mkl.free_buffers

    def freeing() -> None:
        events.append("hand back")
        real_free()

    monkeypatch.setattr(mkl, "free_buffers", freeing)


def _record(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, events: list[str]) -> None:
    real = getattr(owner, name)

    def recorded(*args: object, **kwargs: object) -> object:
        events.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(
        owner, name, staticmethod(recorded) if isinstance(owner, type) else recorded
    )


def test_a_conversion_and_a_compute_outside_a_run_hand_no_memory_back(
    tiny_gpt2_dir: Path, weight_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A notebook's process is its own: library functions compute and return."""
    from unraveled.experiments.corpus_atlas import CorpusAtlasParams, compute

    from unraveled.models import load_model

    events: list[str] = []
    _record_hand_backs(monkeypatch, events)
    loaded = load_model(str(tiny_gpt2_dir), "processed")
    assert not loaded.from_weight_cache  # converted here
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("So let it be with Caesar. The noble Brutus hath told you. " * 20)
    compute(loaded.model, CorpusAtlasParams(corpus=[str(corpus)], context_tokens=16), seed=0)
    assert events == []


def test_the_runner_hands_memory_back_between_a_conversions_steps_and_a_computes_phases(
    tiny_gpt2_dir: Path, weight_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformer_lens.weight_processing import ProcessWeights
    from unraveled.experiments import corpus_atlas

    events: list[str] = []
    _record_hand_backs(monkeypatch, events)
    _record(monkeypatch, ProcessWeights, "_fold_final_rms_bias", events)
    _record(monkeypatch, ProcessWeights, "_fold_unembed_layer_norm", events)
    _record(monkeypatch, corpus_atlas, "summarise", events)
    config = load_config(
        "corpus_atlas", overrides=["params.context_tokens=16", "params.max_tokens=64"]
    )
    runner.run_configs(plan_runs([config], [str(tiny_gpt2_dir)]), tmp_path / "out")
    # The blocks folded, what they freed handed back, then the unembedding folded.
    assert events[:3] == ["_fold_final_rms_bias", "hand back", "_fold_unembed_layer_norm"]
    # The engine's batches done and handed back before the summary allocates.
    assert events[events.index("summarise") - 1] == "hand back"


def test_the_runner_hands_memory_back_after_sae_training_and_after_its_evaluation(
    tiny_gpt2_dir: Path, weight_cache: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Training's buffers, then the evaluation's vocabulary-sized logits, are freed heap that
    # the next phase's allocations would otherwise sit on top of.
    from unraveled.models import load_model
    from unraveled.sae import attribution, evaluation

    events: list[str] = []
    _record_hand_backs(monkeypatch, events)
    _record(monkeypatch, evaluation, "evaluate_sae", events)
    _record(monkeypatch, attribution, "feature_attribution", events)
    config = load_config(
        "sae_features",
        overrides=[
            f"params.corpus=['{corpus_file}']",
            *("params.width=32", "params.k=4", "params.training_tokens=256"),
            *("params.batch_tokens=64", "params.buffer_tokens=128", "params.planted_check=false"),
            *("params.context_tokens=16", "params.eval_tokens=32", "params.attribution_pairs=2"),
        ],
    )
    model = load_model(str(tiny_gpt2_dir), "processed").model
    runner.compute_run(config, model)
    # Handed back after training, then after the evaluation (and the browser), in that order.
    assert events[: events.index("feature_attribution")] == [
        "hand back",
        "evaluate_sae",
        "hand back",
    ]
