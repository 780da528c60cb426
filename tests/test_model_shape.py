"""A model's tokenizer and context read without its weights (``unraveled.models.shape``), and the
prompt check built on them: an overlong prompt is refused, through the CLI, before any model is
loaded, converted or cached (issue 9, hard edge 3).

Each shape is checked against the model ``load_model`` gives for the same name: the same token
counts and the same context length.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import UNREACHABLE_HUB
from tests.helpers.models import SharedTinyModels
from unraveled.cli import main
from unraveled.errors import ModelUnavailableError
from unraveled.models import hub, load_model
from unraveled.models.plan import plan_model
from unraveled.models.shape import ModelShape
from unraveled.models.shape import model_shape as planned_shape

TEXTS = [
    "When Mary and John went to the store, John gave a drink to",
    "Item #1: <|endoftext|> ünïcödé   spaces\n",
    "word " * 40,
]
LONG_PROMPT = " ".join(["word"] * 100)  # 100 tokens on the GPT-2 tokenizer, 101 with BOS


def model_shape(name: str, chosen: bool = True) -> ModelShape | None:
    """The shape of the model a run would load for ``name``: named by the user, or the default."""
    return planned_shape(plan_model(name, "--model", chosen=chosen))


def _same_tokens(shape_tokenizer: object, model_tokenizer: object) -> None:
    for text in TEXTS:
        assert shape_tokenizer.encode(text, add_special_tokens=False) == model_tokenizer.encode(
            text, add_special_tokens=False
        )  # type: ignore[attr-defined]


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every model load the runner asks for, refused: a test using it proves none was needed."""
    asked: list[str] = []

    def refused(planned: object, *args: object, **kwargs: object) -> object:
        asked.append(str(planned))
        raise AssertionError(f"loaded {planned} although the prompt check needs no weights")

    monkeypatch.setattr("unraveled.runner.load_planned", refused)
    return asked


@pytest.fixture
def unreachable_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gpt2 in no Hugging Face cache, a hub that refuses at once: the bundled model stands in."""
    monkeypatch.setattr(hub.hf_constants, "ENDPOINT", UNREACHABLE_HUB)
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


@pytest.mark.parametrize("folder", ["tiny_gpt2_dir", "tiny_llama_dir"])
def test_checkpoint_folder_shape_matches_the_loaded_model(
    folder: str, request: pytest.FixtureRequest, tiny_model: SharedTinyModels, weight_cache: Path
) -> None:
    checkpoint: Path = request.getfixturevalue(folder)
    shape = model_shape(str(checkpoint))  # an empty converted-weights cache: read from the folder
    assert shape is not None and not weight_cache.exists()
    model = tiny_model(checkpoint, "processed")
    assert shape.n_ctx == model.cfg.n_ctx == 64 and shape.label == checkpoint.name
    _same_tokens(shape.tokenizer, model.tokenizer)


def test_cache_entry_shape_and_a_damaged_entry(tiny_gpt2_dir: Path, weight_cache: Path) -> None:
    loaded = load_model(str(tiny_gpt2_dir), "raw").model  # writes the entry
    (entry,) = (weight_cache / "weights").iterdir()
    shape = model_shape(str(tiny_gpt2_dir))
    assert shape is not None and shape.n_ctx == loaded.cfg.n_ctx == 64
    _same_tokens(shape.tokenizer, loaded.tokenizer)
    # A damaged entry is loading's to remove and replace; the check reads the folder meanwhile.
    (entry / "hooked_config.json").write_text("{not json")
    shape = model_shape(str(tiny_gpt2_dir))
    assert shape is not None and shape.n_ctx == 64
    _same_tokens(shape.tokenizer, loaded.tokenizer)


def test_hugging_face_snapshot_shape_matches_the_loaded_model(
    hf_home_with_gpt2: Path, weight_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub.hf_constants, "HF_HUB_CACHE", str(hf_home_with_gpt2 / "hub"))
    shape = model_shape("gpt2")
    assert shape is not None and shape.label == "gpt2" and not weight_cache.exists()
    model = load_model("gpt2", "raw").model
    assert shape.n_ctx == model.cfg.n_ctx == 64
    _same_tokens(shape.tokenizer, model.tokenizer)


@pytest.mark.heavy
def test_bundled_shape_from_the_gguf_and_from_the_cache_entry(
    smollm2_cache: Path, weight_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_gguf = model_shape("smollm2-135m")  # an empty cache: the GGUF file's tokenizer, no context
    assert from_gguf is not None and from_gguf.n_ctx is None and not weight_cache.exists()
    monkeypatch.setenv("UNRAVELED_CACHE", str(smollm2_cache))
    from_entry = model_shape("smollm2-135m")
    model = load_model("smollm2-135m", "raw")
    assert model.from_weight_cache
    assert from_entry is not None and from_entry.n_ctx == model.model.cfg.n_ctx == 8192
    _same_tokens(from_gguf.tokenizer, model.model.tokenizer)
    _same_tokens(from_entry.tokenizer, model.model.tokenizer)


def test_unavailable_hub_model_is_refused_or_takes_the_fallbacks_shape(
    unreachable_hub: None, weight_cache: Path
) -> None:
    named = plan_model("gpt2", "--model", chosen=True)  # named by the user: never replaced
    with pytest.raises(ModelUnavailableError, match="not in the Hugging Face cache"):
        named.require_loadable()
    shape = model_shape("gpt2", chosen=False)  # the default: the bundled model stands in
    assert shape is not None and shape.label == "smollm2-135m (fallback: gpt2 unavailable)"
    assert not weight_cache.exists()


# Through the CLI: refused before any load, nothing written, no converted-weights cache entry.
@pytest.mark.parametrize("origin", ["--set", "file"])
def test_overlong_prompt_is_refused_before_any_model_loads(
    origin: str,
    tiny_gpt2_dir: Path,
    tmp_path: Path,
    weight_cache: Path,
    no_loading: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    if origin == "--set":
        source, args = (
            "configs/attention.yaml: params.prompt (from --set):",
            ["attention", "--set", f"params.prompt={LONG_PROMPT}"],
        )
    else:
        config = tmp_path / "long_prompt.yaml"
        config.write_text(
            f"experiment: attention\ndescription: d\nparams:\n  prompt: {LONG_PROMPT}\n",
            encoding="utf-8",
        )
        source, args = f"{config}: params.prompt:", [str(config)]
    status = main(["run", *args, "--model", str(tiny_gpt2_dir), "--out", str(out)])
    message = " ".join(capsys.readouterr().err.split())
    assert status == 2, message
    # attention allows 128 tokens; the tiny model's context, 64, is the tighter limit.
    assert (
        f"{source} 101 tokens (BOS included), more than the 64 allowed by the model's context; "
        "shorten the prompt (tiny-gpt2)" in message
    )
    assert no_loading == [] and not out.exists() and not weight_cache.exists()


@pytest.mark.slow
def test_overlong_prompt_on_the_fallback_is_refused_before_the_bundled_model_converts(
    unreachable_hub: None,
    tmp_path: Path,
    weight_cache: Path,
    no_loading: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `model: gpt2`, which falls back to the bundled SmolLM2: counted with its tokenizer, read from
    # the GGUF file, against logit_lens's own cap (SmolLM2's context, 8192, is far above it).
    out = tmp_path / "out"
    status = main(
        [
            "run",
            "logit_lens",
            "--set",
            f"params.prompt={' '.join(['word'] * 700)}",
            "--out",
            str(out),
        ]
    )
    message = " ".join(capsys.readouterr().err.split())
    assert status == 2, message
    assert (
        "configs/logit_lens.yaml: params.prompt (from --set): 701 tokens (BOS included), more "
        "than the 64 allowed by this experiment's max_prompt_tokens" in message
    )
    assert "(smollm2-135m (fallback: gpt2 unavailable))" in message
    assert no_loading == [] and not out.exists() and not weight_cache.exists()


def test_answer_of_several_tokens_is_refused_before_any_model_loads(
    tiny_gpt2_dir: Path,
    tmp_path: Path,
    weight_cache: Path,
    no_loading: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    status = main(
        [
            "run",
            "logit_attribution",
            "--set",
            "params.correct= Marylebone",
            "--model",
            str(tiny_gpt2_dir),
            "--out",
            str(out),
        ]
    )
    message = " ".join(capsys.readouterr().err.split())
    assert status == 2, message
    # GPT-2's tokenizer splits " Marylebone" in three: " Mary", "le", "bone".
    assert (
        "configs/logit_attribution.yaml: params.correct (from --set): ' Marylebone' is 3 tokens "
        "for this model ([' Mary', 'le', 'bone']); expected one token" in message
    )
    assert no_loading == [] and not out.exists() and not weight_cache.exists()
