"""SAEs with SAELens: the planted-features known answer, save and reload, activations stopped at
the hook, the fixed-size buffer, the local and Ray engines' activations, and bad input."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from sae_lens import SAE

from tests.helpers.corpus import load_tiny
from tests.helpers.sae import PLANTED_SETTINGS, planted_directions, planted_stream
from unraveled.sae.activations import (
    activation_chunks,
    default_hook,
    hook_activations,
    run_to_hook,
)
from unraveled.sae.loading import hook_dimension
from unraveled.sae.training import TrainSettings, train_sae, training_batches


@pytest.fixture(scope="module")
def planted_sae() -> tuple[torch.Tensor, SAE]:
    directions = planted_directions(0)
    sae = train_sae(planted_stream(directions, 1), 16, PLANTED_SETTINGS, {"hook_name": "toy"}, 0)
    return directions, sae


def test_trained_sae_recovers_90_percent_of_planted_features(
    planted_sae: tuple[torch.Tensor, SAE],
) -> None:
    directions, sae = planted_sae
    decoder = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    best = (directions @ decoder.T).max(dim=1).values
    assert (best > 0.9).float().mean() >= 0.9, best


def test_saved_and_reloaded_sae_gives_identical_encodings(
    planted_sae: tuple[torch.Tensor, SAE], tmp_path: Path
) -> None:
    directions, sae = planted_sae
    sae.save_model(tmp_path / "sae")
    again = SAE.load_from_disk(tmp_path / "sae")
    samples = next(planted_stream(directions, 7))
    assert torch.equal(sae.encode(samples), again.encode(samples))
    assert again.cfg.metadata.hook_name == "toy"


def test_activations_stop_at_the_hook_and_equal_the_full_pass_cache(
    tiny_gpt2_or_llama: object,
) -> None:
    model = tiny_gpt2_or_llama
    windows = torch.randint(0, 1000, (3, 10))
    for hook in (default_hook(model), "blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"):
        bos = torch.full((3, 1), model.tokenizer.bos_token_id)
        _, cache = model.run_with_cache(torch.cat([bos, windows], dim=1), names_filter=hook)
        expected = cache[hook][:, 1:].reshape(30, -1)
        got = hook_activations(model, hook, windows, prepend_bos=True)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert default_hook(model) == "blocks.1.hook_resid_pre"


def test_run_to_hook_runs_no_block_past_the_hook(tiny_gpt2_or_llama: object) -> None:
    """Every hook point records that it ran: nothing after the hook's block (nor the final norm
    and unembedding) runs, and the activation is the full pass's."""
    model = tiny_gpt2_or_llama
    tokens = torch.randint(0, 1000, (2, 6))
    _, cache = model.run_with_cache(tokens)
    for hook in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.mlp.hook_post"):
        block = int(hook.split(".")[1])
        ran: list[str] = []
        everything = [
            (name, lambda a, hook, ran=ran: ran.append(hook.name)) for name in model.hook_dict
        ]
        with model.hooks(fwd_hooks=everything):
            got = run_to_hook(model, hook, tokens)
        after = [
            name
            for name in ran
            if name.startswith("ln_final.")
            or (name.startswith("blocks.") and int(name.split(".")[1]) > block)
        ]
        assert ran and not after, (hook, after)
        torch.testing.assert_close(got, cache[hook])
        assert hook_dimension(model, hook) == cache[hook].shape[-1]
    got = run_to_hook(model, "ln_final.hook_normalized", tokens)  # outside the blocks: all of them
    torch.testing.assert_close(got, cache["ln_final.hook_normalized"])


def test_buffer_holds_a_fixed_number_of_tokens_and_loses_none() -> None:
    settings = TrainSettings("topk", 8, 2, 1.0, 10_000, 32, 256, 1e-3)
    chunks = (torch.arange(i * 50, (i + 1) * 50, dtype=torch.float32)[:, None] for i in range(40))
    torch.manual_seed(0)
    served = torch.cat(list(training_batches(chunks, settings)))
    # Every token once (the last partial batch excepted), in a shuffled order.
    assert len(served) == 2000 // 32 * 32
    assert len(set(served[:, 0].tolist())) == len(served)
    assert not torch.equal(served[:, 0], torch.arange(len(served), dtype=torch.float32))


def test_passes_reuse_each_token_a_buffer_at_a_time_and_read_no_more() -> None:
    settings = TrainSettings("topk", 8, 2, 1.0, 1024, 32, 256, 1e-3, passes=4)
    read: list[int] = []

    def chunks():  # type: ignore[no-untyped-def]
        for i in range(40):
            read.append(i)
            yield torch.arange(i * 64, (i + 1) * 64, dtype=torch.float32)[:, None]

    torch.manual_seed(0)
    batches = training_batches(chunks(), settings)
    # What training reads: the scale estimate's batches, then the steps.
    served = torch.cat([next(batches) for _ in range(settings.norm_batches + settings.steps)])
    # Only the first training_tokens were generated: 1024 tokens = 16 chunks of 64.
    assert len(read) == 1024 // 64
    assert served.max() < 1024
    counts = torch.bincount(served[:, 0].long(), minlength=1024)
    # Each token served at most `passes` times, most tokens exactly that often.
    assert counts.max() == 4 and (counts == 4).float().mean() > 0.7


@pytest.fixture(scope="module")
def saved_planted_folder(
    planted_sae: tuple[torch.Tensor, SAE], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The planted SAE (d_in 16, hook 'toy') saved: an SAE for another model and hook."""
    folder = tmp_path_factory.mktemp("other_sae") / "sae"
    planted_sae[1].save_model(folder)
    return folder


def _run(
    args: list[str], tiny_gpt2_dir: Path, cache: Path, out: Path, corpus: Path
) -> tuple[int, str]:
    from unraveled.cli import main

    with mock.patch.dict(os.environ, {"UNRAVELED_CACHE": str(cache)}):
        full = [
            "run",
            "sae_features",
            "--model",
            str(tiny_gpt2_dir),
            "--out",
            str(out),
            "--set",
            f"params.corpus=[{corpus}]",
            "--set",
            "params.context_tokens=16",
            "--set",
            "params.eval_tokens=32",
            *args,
        ]
        return main(full), ""


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (["params.source={release: no-such-release, id: x}"], "params.source.release", "not one"),
        (
            ["params.source={release: gpt2-small-res-jb, id: nope}"],
            "params.source.id",
            "not an SAE",
        ),
        (["params.source={path: NOTANSAE}"], "params.source.path", "can't load it as an SAE"),
        (["params.source={path: EMPTY}"], "params.source.path", "not an SAE in SAELens's format"),
        (["params.source={path: OTHER}"], "params.source", "trained on 'toy'"),
        (
            ["params.source={path: OTHER}", "params.hook=blocks.1.hook_resid_pre"],
            "params.hook",
            "toy",
        ),
        (["params.width=1"], "params.width", "greater than or equal"),
        (["params.width=8", "params.k=9"], "params.k", "k <= width"),
        (["params.eval_tokens=100000"], "params.eval_tokens", "too few"),
        (["params.hook=blocks.9.hook_resid_pre"], "params.hook", "not a hook"),
    ],
)
def test_bad_input_is_exit_2_naming_the_field_with_nothing_written(
    overrides: list[str],
    field: str,
    words: str,
    tiny_gpt2_dir: Path,
    shared_weight_cache_dir: Path,
    corpus_file: Path,
    saved_planted_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    not_an_sae = tmp_path / "not_an_sae"
    not_an_sae.mkdir()
    (not_an_sae / "cfg.json").write_text("{}")
    (not_an_sae / "sae_weights.safetensors").write_text("not weights")
    args = []
    for override in overrides:
        override = (
            override.replace("NOTANSAE", str(not_an_sae))
            .replace("OTHER", str(saved_planted_folder))
            .replace("EMPTY", str(tmp_path))
        )
        args += ["--set", override]
    out = tmp_path / "out"
    status, _ = _run(args, tiny_gpt2_dir, shared_weight_cache_dir, out, corpus_file)
    error = capsys.readouterr().err
    assert status == 2, error
    assert field in error and words in error, error
    assert not (out / "tiny-gpt2" / "sae_features").exists()


def test_sae_of_another_size_is_refused_naming_the_source(
    tiny_gpt2_dir: Path,
    shared_weight_cache_dir: Path,
    corpus_file: Path,
    saved_planted_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The planted SAE's hook name made the run's: only d_in (16, not 64) is wrong.
    folder = tmp_path / "relabelled"
    shutil.copytree(saved_planted_folder, folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.1.hook_resid_pre"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    status, _ = _run(
        ["--set", f"params.source={{path: {folder}}}"],
        tiny_gpt2_dir,
        shared_weight_cache_dir,
        out,
        corpus_file,
    )
    error = capsys.readouterr().err
    assert status == 2
    assert "params.source" in error and "d_in=16" in error and "has 64" in error, error
    assert not (out / "tiny-gpt2" / "sae_features").exists()


def test_pretrained_sae_with_the_hub_unreachable_fails_within_seconds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from unraveled.errors import ModelUnavailableError
    from unraveled.sae.loading import load_pretrained_sae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    started = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match=r"params\.source: can't download SAE"):
        load_pretrained_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    assert time.perf_counter() - started < 10


def test_run_saves_the_sae_in_saelens_format_and_records_the_windows(
    tiny_gpt2_dir: Path,
    shared_weight_cache_dir: Path,
    corpus_file: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    args = [
        "--set",
        "params.width=32",
        "--set",
        "params.k=4",
        "--set",
        "params.training_tokens=256",
        "--set",
        "params.batch_tokens=64",
        "--set",
        "params.buffer_tokens=128",
        "--set",
        "params.planted_check=false",
    ]
    status, _ = _run(args, tiny_gpt2_dir, shared_weight_cache_dir, out, corpus_file)
    assert status == 0
    run = out / "tiny-gpt2" / "sae_features"
    sae = SAE.load_from_disk(run / "sae")
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (64, 32)
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    manifest = json.loads((run / "manifest.json").read_text())
    assert [saved["folder"] for saved in manifest["saved"]] == ["sae"]
    windows = dict(np.load(run / "windows.npz"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert windows["held_out"].sum() == 2 == metrics["corpus"]["held_out_windows"]
    assert len(windows["start"]) == 2 + 256 // 16
    assert np.isfinite(metrics["evaluation"]["explained_variance"])
    assert (run / "views" / "feature_browser.html").exists()
    assert "SAE.load_from_disk" in metrics["saved_sae"]["load"]
    # Reused: the saved folder as the source of a later run on the same model and hook.
    again = tmp_path / "again"
    status, _ = _run(
        ["--set", f"params.source={{path: {run / 'sae'}}}"],
        tiny_gpt2_dir,
        shared_weight_cache_dir,
        again,
        corpus_file,
    )
    assert status == 0
    assert not (again / "tiny-gpt2" / "sae_features" / "sae").exists()


def test_ray_workers_give_the_local_engines_activations(
    tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from unraveled.corpus import corpus_windows

    cache = tmp_path / "cache"
    model = load_tiny(tiny_gpt2_dir, cache)
    monkeypatch.setenv("UNRAVELED_CACHE", str(cache))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    folder = Path(tempfile.mkdtemp(prefix="unraveled-test-ray-", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    windows = corpus_windows(model.tokenizer, [], 16, 16 * 7, seed=3).tokens
    hook = default_hook(model)
    local = list(activation_chunks(model, hook, windows, 3, True))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _temp_dir=str(folder),
    )
    try:
        distributed = list(activation_chunks(model, hook, windows, 3, True, engine="ray"))
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    assert [len(chunk) for chunk in distributed] == [48, 48, 16]
    for ours, theirs in zip(local, distributed, strict=True):
        assert torch.equal(ours, theirs)


DOOMED_WINDOW = 4


def _dying_activation_workers(monkeypatch: pytest.MonkeyPatch, die_once: Path | None) -> None:
    """Workers killed with SIGKILL (as the out-of-memory killer would) when given the batch holding
    window ``DOOMED_WINDOW``: the first such worker only when ``die_once`` names a file that does
    not exist yet (it creates it), every one when None. Made here, so Ray ships the class to the
    workers by value (as tests/test_corpus_ray.py's dying atlas workers)."""
    import ray

    from unraveled.sae import ray as sae_ray

    class DyingWorker(sae_ray.ActivationWorker):
        def activations(
            self, windows: np.ndarray, batch: range, hook_name: str, prepend_bos: bool
        ) -> np.ndarray:
            if DOOMED_WINDOW in batch:
                try:
                    if die_once is not None:
                        os.close(os.open(die_once, os.O_CREAT | os.O_EXCL))
                    os.kill(os.getpid(), signal.SIGKILL)
                except FileExistsError:
                    pass
            return super().activations(windows, batch, hook_name, prepend_bos)

    monkeypatch.setattr(sae_ray, "RemoteActivationWorker", ray.remote(num_cpus=1)(DyingWorker))


def test_when_the_only_ray_worker_dies_a_new_one_computes_its_batches_and_the_stream_is_unchanged(
    tiny_gpt2_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One worker, killed on the batch of windows 3..5: a new worker in its place computes that
    batch, and the chunks are the local engine's, in the same order. A batch that kills every
    worker it is given ends the run after 3 tries, saying which windows (exit status 1)."""
    import logging
    import re

    import ray

    from unraveled.corpus import corpus_windows
    from unraveled.engines.ray import MAX_SHARD_ATTEMPTS
    from unraveled.engines.ray_cluster import RayEngineError

    cache = tmp_path / "cache"
    model = load_tiny(tiny_gpt2_dir, cache)
    monkeypatch.setenv("UNRAVELED_CACHE", str(cache))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    folder = Path(tempfile.mkdtemp(prefix="unraveled-test-ray-", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    windows = corpus_windows(model.tokenizer, [], 16, 16 * 7, seed=3).tokens
    hook = default_hook(model)
    local = list(activation_chunks(model, hook, windows, 3, True))
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _temp_dir=str(folder),
    )
    try:
        _dying_activation_workers(monkeypatch, tmp_path / "died")
        with caplog.at_level(logging.WARNING, logger="unraveled"):
            distributed = list(
                activation_chunks(model, hook, windows, 3, True, engine="ray", workers=1)
            )
        assert (tmp_path / "died").exists()  # the worker really was killed
        said = caplog.text
        _dying_activation_workers(monkeypatch, None)
        # The first stream's worker and placement group are released asynchronously: on a loaded
        # machine the second stream found "0 CPU(s) free" on this one-CPU Ray. Wait for the CPU.
        deadline = time.monotonic() + 60
        while ray.available_resources().get("CPU", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        with pytest.raises(RayEngineError) as failed:
            list(activation_chunks(model, hook, windows, 3, True, engine="ray", workers=1))
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    assert [len(chunk) for chunk in distributed] == [48, 48, 16]
    for ours, theirs in zip(local, distributed, strict=True):
        assert torch.equal(ours, theirs)
    # Windows 0..2 too when the worker was killed before its result for them had left it.
    died = re.search(
        r"ray: worker 0 died while computing windows ([\d., ]+) \(ActorDiedError", said
    )
    assert died is not None and "3..5" in died[1].split(", "), said
    assert "starting worker 1 in worker 0's place" in said, said
    assert f"ray: windows {died[1]} computed again on worker(s) 1" in said, said
    assert str(failed.value).startswith(
        f"windows 3..5 failed {MAX_SHARD_ATTEMPTS} times, their workers dying (out of memory?)"
    ), failed.value
    assert failed.value.exit_code == 1


class _FakeRef:
    """A fake Ray result: a batch's activations (each row its first window), or a start."""

    def __init__(self, batch: range | None, worker: object) -> None:
        self.batch = batch
        self.worker = worker


class _FakeActor:
    """Stands for an activation worker: its calls return ``_FakeRef``s, nothing runs."""

    def __init__(self, *load: object) -> None:
        actor = self

        class activations:
            @staticmethod
            def remote(windows: object, batch: range, hook: str, bos: bool) -> _FakeRef:
                return _FakeRef(batch, actor)

        class ready:
            @staticmethod
            def remote() -> _FakeRef:
                return _FakeRef(None, actor)

        self.activations = activations
        self.ready = ready

    @classmethod
    def options(cls, **options: object) -> type[_FakeActor]:
        return cls

    @classmethod
    def remote(cls, *load: object) -> _FakeActor:
        return cls(*load)


def _fake_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, get: Callable) -> object:
    """``unraveled.sae.ray``'s worker pool on ``_FakeActor``s, with ``get`` for ``ray.get``.

    ``get`` is given one reference at a time: a list is read as Ray reads one, each of its
    references with the same timeout (any one not ready raises).
    """
    import ray

    from unraveled.sae import ray as sae_ray

    def get_each(reference: object, timeout: float | None = None) -> object:
        if isinstance(reference, list):
            return [get(one, timeout=timeout) for one in reference]
        return get(reference, timeout=timeout)

    monkeypatch.setenv("UNRAVELED_CACHE", str(tmp_path))
    monkeypatch.setattr(sae_ray, "RemoteActivationWorker", _FakeActor)
    monkeypatch.setattr(sae_ray, "PlacementGroupSchedulingStrategy", lambda **where: None)
    monkeypatch.setattr(ray, "kill", lambda actor: None)
    monkeypatch.setattr(ray, "get", get_each)
    return sae_ray


def _no_group() -> object:
    """A placement group object standing for none (the fakes never look at it)."""
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup.__new__(PlacementGroup)


def test_a_lost_activation_result_is_computed_again_in_its_place_and_a_stuck_start_ends_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without Ray (fakes for its calls): a batch whose result Ray lost (OwnerDiedError) is asked
    for again and the stream keeps the windows' order; a new worker that does not start within
    ``WORKER_START_TIMEOUT_S`` ends the run with an error, not an endless wait."""
    import logging
    from collections import deque

    import ray

    from unraveled.engines.ray_cluster import RayEngineError

    batches = [range(start, start + 2) for start in range(0, 10, 2)]
    lost = batches[2]
    failed: list[range] = []

    def get(reference: _FakeRef, timeout: float | None = None) -> np.ndarray | bool:
        if reference.batch is None:  # a worker's start
            return True
        if reference.batch == lost and not failed:
            failed.append(reference.batch)
            raise ray.exceptions.OwnerDiedError("ab" * 14, None, "")
        return np.full((len(reference.batch), 1), reference.batch.start, dtype=np.float32)

    sae_ray = _fake_workers(monkeypatch, tmp_path, get)
    pool = sae_ray._Workers(_no_group(), 2, False, "key", "cpu")
    pending = deque(
        pool.submit(None, batch, place, "hook", True) for place, batch in enumerate(batches)
    )
    with caplog.at_level(logging.WARNING, logger="unraveled"):
        chunks = [sae_ray._received(pending, pool, None, "hook", True) for _ in batches]
    assert failed == [lost]
    assert [int(chunk[0, 0]) for chunk in chunks] == [batch.start for batch in batches]
    assert "the result of windows 4..5 was lost (OwnerDiedError" in caplog.text

    timeouts: list[float | None] = []

    def dead_then_stuck(reference: _FakeRef, timeout: float | None = None) -> bool:
        if reference.batch is None:  # the first worker's start, then the new one's
            timeouts.append(timeout)
            if len(timeouts) == 1:
                return True
            raise ray.exceptions.GetTimeoutError("not ready")
        raise ray.exceptions.ActorDiedError()

    sae_ray = _fake_workers(monkeypatch, tmp_path, dead_then_stuck)
    pool = sae_ray._Workers(_no_group(), 1, False, "key", "cpu")
    pending = deque(
        pool.submit(None, batch, place, "hook", True) for place, batch in enumerate(batches[:2])
    )
    with pytest.raises(RayEngineError) as stuck:
        sae_ray._received(pending, pool, None, "hook", True)
    assert timeouts == [sae_ray.WORKER_START_TIMEOUT_S] * 2
    assert str(stuck.value) == (
        "every Ray worker died (the last on windows 0..1), and a new one did not start within "
        f"{sae_ray.WORKER_START_TIMEOUT_S} s"
    )


def test_a_first_worker_that_never_starts_ends_the_run_naming_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without Ray (fakes for its calls): the first workers' starts are waited for with
    ``WORKER_START_TIMEOUT_S`` as a new worker's is; one that is not ready by then ends the run
    with an error naming it, not an endless wait, and one that fails to start ends it too."""
    import ray

    from unraveled.engines.ray_cluster import RayEngineError

    starting: list[object] = []
    timeouts: list[float | None] = []

    def second_never_starts(reference: _FakeRef, timeout: float | None = None) -> bool:
        assert reference.batch is None  # nothing but starts is asked for
        timeouts.append(timeout)
        if reference.worker not in starting:
            starting.append(reference.worker)
        if len(starting) > 1 and reference.worker is starting[1]:
            raise ray.exceptions.GetTimeoutError("not ready")
        return True

    sae_ray = _fake_workers(monkeypatch, tmp_path, second_never_starts)
    with pytest.raises(RayEngineError) as stuck:
        sae_ray._Workers(_no_group(), 3, False, "key", "cpu")
    assert timeouts[0] == sae_ray.WORKER_START_TIMEOUT_S
    assert None not in timeouts  # no wait without a limit
    assert str(stuck.value) == (
        f"Ray worker(s) 1 of 3 did not start within {sae_ray.WORKER_START_TIMEOUT_S} s (loading "
        f"the model from the converted-weights cache {tmp_path})"
    )

    def cannot_start(reference: _FakeRef, timeout: float | None = None) -> bool:
        raise ray.exceptions.ActorDiedError()  # as Ray says of a worker whose __init__ raised

    sae_ray = _fake_workers(monkeypatch, tmp_path, cannot_start)
    with pytest.raises(RayEngineError) as failed:
        sae_ray._Workers(_no_group(), 2, False, "key", "cpu")
    assert str(failed.value).startswith("a Ray worker could not start: ActorDiedError: ")


def _dying_stream(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    order: list[range],
    dies_at: set[int],
    lost_at: frozenset[int] = frozenset(),
) -> list[int]:
    """The first windows of each chunk the stream of ``order`` gives on 1 fake worker (2 batches
    in flight), its worker dying at the ``dies_at``-th reads of a batch (counting from 1) and the
    result lost at the ``lost_at``-th."""
    import ray

    dead: set[int] = set()
    reads = itertools.count(1)

    def get(reference: _FakeRef, timeout: float | None = None) -> np.ndarray | bool:
        if reference.batch is None:  # a worker's start
            return True
        if id(reference.worker) in dead:
            raise ray.exceptions.ActorDiedError()
        read = next(reads)
        if read in dies_at:
            dead.add(id(reference.worker))
            raise ray.exceptions.ActorDiedError()
        if read in lost_at:
            raise ray.exceptions.OwnerDiedError("ab" * 14, None, "")
        return np.full((len(reference.batch), 1), reference.batch.start, dtype=np.float32)

    sae_ray = _fake_workers(monkeypatch, tmp_path, get)
    pool = sae_ray._Workers(_no_group(), 1, False, "key", "cpu")
    stream = sae_ray._stream(pool, None, iter(order), 2, "hook", True)
    return [int(chunk[0, 0]) for chunk in stream]


def test_a_batch_fails_only_when_itself_is_lost_counted_per_place_in_the_stream(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without Ray (fakes for its calls): the limit of ``MAX_SHARD_ATTEMPTS`` (3) failures counts
    the times one batch at one place in the stream was itself lost. The same windows lost once in
    each of 3 epochs, a batch that only waited behind a dying worker's batch, don't add up to it
    (the run goes on, the stream unchanged); one batch lost 3 times at one place ends the run."""
    from unraveled.engines.ray import MAX_SHARD_ATTEMPTS
    from unraveled.engines.ray_cluster import RayEngineError

    assert MAX_SHARD_ATTEMPTS == 3
    a, b, c = range(0, 2), range(2, 4), range(4, 6)
    # Epochs: the worker dies on a's read in each of 3 epochs (b waiting behind it each time), and
    # b's result is lost once in each. The reads: a dies, a, b lost, b, (next epoch) a dies, ...
    epochs = [a, b] * 3
    assert (
        _dying_stream(monkeypatch, tmp_path, epochs, {1, 5, 9}, frozenset({3, 7, 11}))
        == [
            0,
            2,
        ]
        * 3
    )
    # One epoch: a dies with b waiting behind it, then b dies twice as the one computed (c behind).
    assert _dying_stream(monkeypatch, tmp_path, [a, b, c], {1, 3, 4}) == [0, 2, 4]
    with pytest.raises(RayEngineError) as stopped:
        _dying_stream(monkeypatch, tmp_path, [a, b, c], {1, 2, 3})
    assert str(stopped.value).startswith(
        "windows 0..1 failed 3 times, their workers dying (out of memory?); last: ActorDiedError"
    )
    with pytest.raises(RayEngineError) as stopped:
        _dying_stream(monkeypatch, tmp_path, [a, b, c], {2, 4}, frozenset({3}))
    assert str(stopped.value).startswith("windows 2..3 failed 3 times")


def test_run_attributes_ioi_to_features_linked_into_the_browser(
    tiny_gpt2_dir: Path,
    shared_weight_cache_dir: Path,
    corpus_file: Path,
    tmp_path: Path,
) -> None:
    import re

    out = tmp_path / "out"
    args = [
        *("--set", "params.width=32", "--set", "params.k=4"),
        *("--set", "params.training_tokens=128", "--set", "params.batch_tokens=64"),
        *("--set", "params.buffer_tokens=128", "--set", "params.planted_check=false"),
        *("--set", "params.attribution_pairs=3", "--set", "params.attribution_top=5"),
    ]
    status, _ = _run(args, tiny_gpt2_dir, shared_weight_cache_dir, out, corpus_file)
    assert status == 0
    run = out / "tiny-gpt2" / "sae_features"
    assert list(run.glob("figures/05_sae_feature_attribution.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    attribution = metrics["feature_attribution"]
    assert attribution["pairs"] == 3 and len(attribution["top_features"]) == 5
    table = dict(np.load(run / "feature_attribution.npz"))
    assert table["feature"].tolist() == attribution["top_features"]
    page = run / "views" / "feature_browser.html"
    embedded = re.search(r'id="page-data">(.*?)</script>', page.read_text()).group(1)  # type: ignore[union-attr]
    data = json.loads(embedded.replace("<\\!", "<!"))  # the page escapes "<!" inside a script
    in_page = {feature["index"] for feature in data["features"]}
    for feature, link in zip(table["feature"], table["browser"], strict=True):
        target, anchor = link.split("#")
        assert (run / target) == page
        assert anchor == f"feature-{feature}" and int(feature) in in_page
    # The titles say it is a small demo SAE and how much trained it.
    assert "small demo SAE" in page.read_text()
    assert f"{metrics['training']['steps']} steps" in page.read_text()
