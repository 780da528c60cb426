"""The Python API (``import unraveled as ur``): one call per experiment on the user's model, the
CLI's checks, the raw-weights policy, results that save exactly the CLI's run folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import unraveled as ur
from unraveled.api import SAME_ON_RAW_WEIGHTS
from unraveled.cli import main
from unraveled.errors import ParamError
from unraveled.experiment import load_experiment
from unraveled.outputs import to_jsonable

# Manifest entries that differ between two runs of the same thing (the baseline's compare.py
# ignores the same ones), and the model's load record (a second load comes from the cache).
VOLATILE = {"created", "timings_seconds", "peak_rss_mb", "git_commit"}
VOLATILE_MODEL = {"load_seconds", "from_weight_cache", "loaded_from"}
LONG_PROMPT = " ".join(["word"] * 201)  # 202 tokens with BOS for the GPT-2 tokenizer


@pytest.fixture(scope="module")
def loaded(tiny_gpt2_dir: Path, shared_weight_cache_dir: Path) -> Any:
    """The tiny GPT-2 from ``ur.load_model`` (processed weights), shared by the module's tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNRAVELED_CACHE", str(shared_weight_cache_dir))
        yield ur.load_model(str(tiny_gpt2_dir))


def _from_pretrained(hf_home: Path, raw: bool) -> Any:
    """The tiny GPT-2 as a user loads it, with TransformerLens's own ``from_pretrained``."""
    import warnings

    from transformer_lens import HookedTransformer
    from transformers import AutoTokenizer

    from unraveled.models import hub

    hub_cache = hf_home / "hub"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(hub_cache))
        snapshot = hub.cached_snapshot("gpt2")
    load = (
        HookedTransformer.from_pretrained_no_processing
        if raw
        else HookedTransformer.from_pretrained
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return load(
            "gpt2",
            tokenizer=AutoTokenizer.from_pretrained(snapshot),
            cache_dir=str(hub_cache),
            local_files_only=True,
        ).eval()


@pytest.fixture(scope="module")
def users_model(hf_home_with_gpt2: Path) -> Any:
    """The tiny GPT-2 (filed as ``gpt2``) from ``HookedTransformer.from_pretrained``: processed."""
    return _from_pretrained(hf_home_with_gpt2, raw=False)


@pytest.fixture(scope="module")
def users_raw_model(hf_home_with_gpt2: Path) -> Any:
    """The same from ``HookedTransformer.from_pretrained_no_processing``: the checkpoint's own."""
    return _from_pretrained(hf_home_with_gpt2, raw=True)


def test_api_import_is_lazy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, unraveled\n"
        "assert 'unraveled.api' not in sys.modules and 'torch' not in sys.modules\n"
        "unraveled.run\n"
        "assert 'unraveled.api' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_exported_name_is_the_module_it_comes_from() -> None:
    from unraveled import api, errors, interventions

    for name in ur.__all__:
        home = interventions if name in ur._INTERVENTIONS else api
        expected = errors.ParamError if name == "ParamError" else getattr(home, name)
        assert getattr(ur, name) is expected, name
    assert ur.steer is interventions.steer and ur.generate is interventions.generate


def test_param_error_is_a_value_error_naming_the_field(loaded: Any) -> None:
    with pytest.raises(ValueError, match=r"^params\.head: .*valid integer.*3\.5"):
        ur.run("attention", loaded, head=3.5)
    with pytest.raises(ParamError, match=r"^params\.head: .*valid integer"):
        ur.run("attention", loaded, head=np.float64(3.0))
    with pytest.raises(ParamError, match=r"^params\.haed: unknown param; did you mean 'head'"):
        ur.run("attention", loaded, haed=3)
    with pytest.raises(ParamError, match=r"^seed: "):
        ur.run("logit_lens", loaded, seed=-1)
    with pytest.raises(ValueError, match=r"no config named 'logit_lense'.*did you mean"):
        ur.run("logit_lense", loaded)
    with pytest.raises(TypeError):  # under the suite's beartype checks, beartype's TypeError
        ur.run("logit_lens", "gpt2")


@pytest.mark.parametrize("head", [np.int64(3), torch.tensor(3), torch.tensor([1, 3]).max()])
def test_numpy_and_torch_integer_scalars_are_ints(loaded: Any, head: Any) -> None:
    result = ur.run("attention", loaded, head=head)
    assert result.params.head == 3 and type(result.params.head) is int


def test_scalars_inside_lists_and_mappings_are_coerced() -> None:
    from unraveled.api import _config

    config = _config(
        "activation_patching",
        np.uint32(1),
        {"ioi": {"n_pairs": np.int64(2)}, "prompts": np.str_("ioi")},
    )
    assert config.params.ioi.n_pairs == 2 and type(config.params.ioi.n_pairs) is int
    assert config.run.seed == 1 and type(config.run.seed) is int
    assert config.overrides() == {"params.ioi.n_pairs": 2, "params.prompts": "ioi", "seed": 1}
    config = _config("layernorm", 0, {"prompts": [np.str_("a b"), "c d"]})
    assert config.params.prompts == ["a b", "c d"]
    assert all(type(prompt) is str for prompt in config.params.prompts)


def test_the_cli_checks_run_before_computing(loaded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from unraveled import runner

    def never(*args: object) -> None:
        raise AssertionError("computed despite a bad param")

    monkeypatch.setattr(runner, "compute_run", never)
    with pytest.raises(ParamError, match=r"^params\.prompt: 202 tokens .* 64 allowed"):
        ur.run("logit_lens", loaded, prompt=LONG_PROMPT)
    with pytest.raises(ParamError, match=r"^params\.head: 4 is out of range.* 4 heads"):
        ur.run("attention", loaded, head=4)
    with pytest.raises(ParamError, match=r"^params\.clean_answer: ' Mary Ann' is 2 tokens"):
        ur.run("activation_patching", loaded, clean_answer=" Mary Ann")


def test_overlong_prompt_refused_by_max_prompt_tokens(
    users_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tiny model's context is 64; a model with a larger one is capped by the experiment.
    monkeypatch.setattr(users_model.cfg, "n_ctx", 1024)
    cap = load_experiment("logit_lens").max_prompt_tokens
    with pytest.raises(ParamError, match=rf"^params\.prompt: 202 tokens .* {cap} allowed"):
        ur.run("logit_lens", users_model, prompt=LONG_PROMPT)


def test_model_held_once_for_many_runs(
    tiny_gpt2_dir: Path, warm_weight_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from unraveled.models import loading

    loads: list[str] = []
    real = loading.load_planned

    def counting(planned: Any, weights: str, *args: Any) -> Any:
        loads.append(weights)
        return real(planned, weights, *args)

    monkeypatch.setattr(loading, "load_planned", counting)
    model = ur.load_model(str(tiny_gpt2_dir))
    first = ur.run("logit_lens", model, prompt="The capital of France is")
    second = ur.run("logit_lens", model, prompt="The Eiffel Tower is in")
    assert loads == ["processed"]
    assert first.metrics()["tokens"] != second.metrics()["tokens"]


def _tree(run_dir: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(run_dir)): path.read_bytes()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file()
    }


def _manifest(run_dir: Path) -> dict[str, Any]:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for key in VOLATILE:
        manifest.pop(key)
    for key in VOLATILE_MODEL:
        manifest["model"].pop(key)
    return manifest


@pytest.mark.parametrize(
    ("name", "kwargs", "sets"),
    [
        (
            "logit_lens",
            {"prompt": "The capital of France is"},
            ["params.prompt=The capital of France is"],
        ),
        ("attention", {"head": np.int64(2)}, ["params.head=2"]),  # raw weights, views
    ],
)
def test_save_writes_the_cli_run_folder(
    loaded: Any,
    tiny_gpt2_dir: Path,
    shared_weight_cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    kwargs: dict[str, Any],
    sets: list[str],
) -> None:
    monkeypatch.setenv("UNRAVELED_CACHE", str(shared_weight_cache_dir))
    by_cli, by_api = tmp_path / "cli", tmp_path / "api"
    args = ["run", name, "--model", str(tiny_gpt2_dir), "--out", str(by_cli)]
    assert main([*args, *(arg for key in sets for arg in ("--set", key))]) == 0
    result = ur.run(name, loaded, **kwargs)
    target = result.save(by_api)
    assert target == by_api / "tiny-gpt2" / name
    cli_run = by_cli / "tiny-gpt2" / name
    cli_files, api_files = _tree(cli_run), _tree(target)
    assert set(cli_files) == set(api_files)
    for file, content in cli_files.items():
        if file not in {"manifest.json", "index.html"}:
            assert api_files[file] == content, file
    api_manifest, cli_manifest = _manifest(target), _manifest(cli_run)
    if load_experiment(name).weights == "raw":  # the processed model passed: raw ones re-read
        assert "raw weights re-read" in api_manifest["model"].pop("weights_note")
        cli_manifest["model"].pop("weights_note")
    assert api_manifest == cli_manifest
    assert json.loads(cli_files["metrics.json"]) == to_jsonable(result.metrics())
    assert {path.name for path in by_api.iterdir()} == {path.name for path in by_cli.iterdir()}
    assert (by_api / "index.html").is_file() and (
        by_api / "tiny-gpt2" / name / "index.html"
    ).is_file()


def test_users_own_model_is_described_from_its_config(users_model: Any, tmp_path: Path) -> None:
    result = ur.run("logit_lens", users_model, prompt="The capital of France is", seed=3)
    assert result.model["used"] == "gpt2" and "loaded by the user" in result.model["loaded_from"]
    assert (result.model["n_layers"], result.model["d_model"]) == (2, 64)
    assert result.model["weights"] == "processed"
    assert ur.provenance(users_model) == result.model
    target = result.save(tmp_path / "out")
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["model"] == result.model
    assert manifest["overrides"] == {"params.prompt": "The capital of France is", "seed": 3}
    assert manifest["seed"] == 3 and manifest["resolved_config"]["seed"] == 3


def test_provenance_of_a_loaded_model(loaded: Any, tiny_gpt2_dir: Path) -> None:
    record = ur.provenance(loaded)
    assert record["requested"] == str(tiny_gpt2_dir) and record["weights"] == "processed"
    assert record["used"] == "tiny-gpt2"


def test_raw_weight_experiment_never_gets_processed_numbers(
    loaded: Any, users_model: Any, users_raw_model: Any, tiny_gpt2_dir: Path, tiny_model: Any
) -> None:
    experiment = load_experiment("embeddings")
    params = experiment.params(chunk_tokens=50, local_subsets=2, local_neighbours=100)
    small = params.model_dump()
    raw_model = tiny_model(tiny_gpt2_dir, "raw")
    raw_numbers = experiment.compute(raw_model, params, 0).metrics()
    processed_numbers = experiment.compute(tiny_model(tiny_gpt2_dir, "processed"), params, 0)
    assert to_jsonable(processed_numbers.metrics()) != to_jsonable(raw_numbers)
    # ur.load_model's processed model: the raw weights are read again, and the run says so.
    result = ur.run("embeddings", loaded, **small)
    assert to_jsonable(result.metrics()) == to_jsonable(raw_numbers)
    assert result.model["weights"] == "raw" and "re-read" in result.model["weights_note"]
    # A user's processed model: refused, saying how to load raw weights.
    with pytest.raises(ParamError, match=r"^model: .*from_pretrained_no_processing"):
        ur.run("embeddings", users_model, **small)
    # A user's raw model is computed on as it is.
    by_users_raw = ur.run("embeddings", users_raw_model, **small)
    assert by_users_raw.model["weights"] == "raw"
    # parameter_count is the checkpoint's, known only for a model loaded through unraveled.
    assert to_jsonable(by_users_raw.metrics()) == {
        **to_jsonable(raw_numbers),
        "parameter_count": None,
    }


def test_result_repr_is_short_and_html_shows_figures(loaded: Any) -> None:
    result = ur.run("logit_lens", loaded)
    assert len(repr(result)) < 300 and "logit_lens" in repr(result)
    assert len(result.figures) == 2 and result.figures is not result.figures
    assert result.figures[0].figure is result.figures[0].figure  # drawn once
    assert "model: tiny-gpt2" in result.figures[0].figure.get_suptitle()
    assert "final_prediction" in result._repr_html_()


def test_report_rebuilds_pages(loaded: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ur.run("logit_lens", loaded).save(out)
    (out / "index.html").unlink()
    (out / "tiny-gpt2" / "logit_lens" / "index.html").unlink()
    assert ur.report(out) == out / "index.html"
    assert "logit_lens" in (out / "index.html").read_text()
    assert (out / "tiny-gpt2" / "logit_lens" / "index.html").is_file()
    (out / "index.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "index.html").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2


def _numbers(value: Any) -> list[float]:
    """Every number in a metrics tree, in order; names, labels and timings left out."""
    if isinstance(value, dict):
        return [
            number
            for key, item in value.items()
            if "seconds" not in key
            for number in _numbers(item)
        ]
    if isinstance(value, list):
        return [number for item in value for number in _numbers(item)]
    if value is None:
        return [float("nan")]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    return []


@pytest.mark.parametrize("name", sorted(SAME_ON_RAW_WEIGHTS))
def test_processed_experiments_that_raw_weights_serve_give_the_same_numbers(
    name: str, users_raw_model: Any, tiny_gpt2_dir: Path, tiny_model: Any
) -> None:
    small = {"head_taxonomy": {"repeat_batch": 2, "repeat_length": 8}}.get(name, {})
    experiment = load_experiment(name)
    processed = experiment.compute(
        tiny_model(tiny_gpt2_dir, "processed"), experiment.params(**small), 0
    ).metrics()
    on_raw = ur.run(name, users_raw_model, **small)
    assert on_raw.model["weights"] == "raw"
    expected, got = _numbers(to_jsonable(processed)), _numbers(to_jsonable(on_raw.metrics()))
    assert len(expected) > 3
    # Shares recovered divide by the tiny model's clean-minus-corrupted difference (0.003):
    # float32 rounding of the logits becomes about 2e-5 there.
    # Ranked lists (largest errors, top heads) may order two near-equal entries either way.
    np.testing.assert_allclose(np.sort(got), np.sort(expected), rtol=1e-3, atol=1e-4)


def test_a_processed_experiment_raw_weights_change_is_refused(users_raw_model: Any) -> None:
    with pytest.raises(ParamError, match=r"^model: .*HookedTransformer.from_pretrained\('gpt2'\)"):
        ur.run("logit_attribution", users_raw_model)


def test_a_transformer_bridge_runs_what_it_can_and_is_refused_the_rest(
    tiny_gpt2_dir: Path,
) -> None:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(tiny_gpt2_dir), device="cpu")
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.requires_grad_(False)
    from tests.test_bridge import duck_typed  # experiments are annotated HookedTransformer

    with duck_typed():
        result = ur.run("logit_lens", bridge, prompt="The capital of France is")
    assert result.model["loaded_from"].startswith("loaded by the user (a TransformerBridge")
    assert result.model["weights"] == "processed"
    with pytest.raises(ParamError, match=r"^model: activation_patching can't run on a Transf"):
        ur.run("activation_patching", bridge)
