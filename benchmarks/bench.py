"""``make bench``: seconds and peak memory, measured in one run, printed as a table.

Every ratio divides two numbers this run measured on the same machine and the same weights; none
divides by a constant remembered from elsewhere (the original scripts can't run inside the
project, so the bench reports its own seconds only). Memory budgets are checked where they
apply: ``unraveled run`` on a GPT-2-small-shaped checkpoint within 1.5 GB (``make all`` on GPT-2
small), on the bundled SmolLM2 within 2 GB; the table says pass or FAIL, and the bench exits 1
when a peak is over its budget.

Row groups, each a function decorated with ``@bench_group``:

- ``seed_parity``: the five configs that reproduce the original analysis (embeddings, layernorm,
  attention, mlp, token_journey), run as a user would (``unraveled run``, one process, an empty
  converted-weights cache) on a randomly initialised checkpoint of GPT-2 small's shape
  (:mod:`benchmarks.models`). Per config: compute + render seconds and the peak RSS from its
  manifest; for the invocation: wall seconds and the process's peak RSS.
- ``activation_patching``: its config on the same GPT-2-small-shaped checkpoint.
- ``all_configs_bundled``: every config on the bundled SmolLM2 (``make all``'s job), the same way.
- ``all_configs_gpt2_small_shaped``: every config on the GPT-2-small-shaped checkpoint (memory
  as ``make all`` on GPT-2 small would use it), twice: converting into an empty cache, then from
  that cache. Random weights know no facts, so there causal tracing gets ``params.facts``
  (through a ``--config-dir`` copy of its config): the bundled facts, each answer replaced by
  the random model's own top prediction after its prompt (``known_facts_of``). They count as
  known, and the run traces as many facts, of the same prompts, with the same default sizes as
  on GPT-2 small: the same work and memory.
- ``causal_tracing``: its default compute on the bundled SmolLM2, and one fact's batched
  restorations against one forward pass per restoration (:mod:`benchmarks.causal_tracing`).
- ``corpus_atlas``: engine throughput and memory against corpus size
  (:mod:`benchmarks.corpus_atlas`).
- ``sae``: ``sae_features``'s activation generation against a plain forward pass stopped at the
  hook, and its memory at 1x and 2x the training tokens (:mod:`benchmarks.sae`).
- ``causal``: the causal experiments' computes (:mod:`benchmarks.causal`).
- ``generation``: tokens/s under a steering hook against unhooked (:mod:`benchmarks.generation`).
- ``path_patching``: path patching's cost per sender against exact activation patching's per
  head, same weights, one run (:mod:`benchmarks.path_patching`).
- ``model_load``: the bundled SmolLM2 loaded into an empty cache, then from the cache.

Add a group by writing a function that returns ``Row``s and decorating it with ``@bench_group``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks.causal import causal_rows
from benchmarks.causal_tracing import causal_tracing_rows
from benchmarks.corpus_atlas import corpus_atlas_rows
from benchmarks.generation import generation_rows
from benchmarks.models import gpt2_small_shaped_checkpoint, known_facts_of, load_twice
from benchmarks.path_patching import path_patching_rows
from benchmarks.processes import call_in_child, run_cli
from benchmarks.sae import sae_rows
from benchmarks.table import Row, format_table
from unraveled.manifest import read_manifest
from unraveled.models import BUNDLED_SMOLLM2

SEED_PARITY_CONFIGS = ("embeddings", "layernorm", "attention", "mlp", "token_journey")
# Peak resident memory of `unraveled run` (every config at once, as `make all`), in MiB.
GPT2_SMALL_BUDGET_MB = 1.5 * 1024
BUNDLED_BUDGET_MB = 2 * 1024

BenchGroup = Callable[[], list[Row]]
GROUPS: list[BenchGroup] = []


def bench_group(function: BenchGroup) -> BenchGroup:
    """Register a row group; groups run in the order they are defined."""
    GROUPS.append(function)
    return function


def _config_rows(
    group: str, args: list[str], budget_mb: float, again_from_cache: bool = False
) -> list[Row]:
    """Run configs in one ``unraveled run`` and read back each config's time and peak memory.

    Every peak is checked against ``budget_mb``. With ``again_from_cache``, the same invocation
    runs a second time on the converted-weights cache the first one filled (as a second
    ``make all`` does), and its whole-invocation row follows.
    """
    with tempfile.TemporaryDirectory() as work:
        out, cache = Path(work) / "out", Path(work) / "cache"
        first = run_cli(["run", *args, "--out", str(out)], cache)
        manifests = []
        for path in sorted(out.glob("*/*/manifest.json")):
            manifest, problem = read_manifest(path.parent)
            if manifest is None:
                raise RuntimeError(f"the run wrote a manifest the toolkit can't read: {problem}")
            manifests.append(manifest)
        again = (
            run_cli(["run", *args, "--out", str(Path(work) / "again")], cache)
            if again_from_cache
            else None
        )
    rows = [
        Row(
            group,
            manifest.config,
            manifest.timings_seconds["total"],
            manifest.peak_rss_mb,
            manifest.timings_seconds["total"] / first.seconds,
            "share of the invocation's wall time",
            budget_mb,
        )
        for manifest in manifests
    ]
    rows.append(
        Row(
            group,
            "whole invocation (process start, model loads, index)",
            first.seconds,
            first.peak_mb,
            budget_mb=budget_mb,
        )
    )
    if again is not None:
        rows.append(
            Row(
                group,
                "whole invocation again, models from the converted-weights cache",
                again.seconds,
                again.peak_mb,
                ratio=again.peak_mb / first.peak_mb,
                ratio_meaning="peak over the first invocation's",
                budget_mb=budget_mb,
            )
        )
    return rows


@bench_group
def seed_parity() -> list[Row]:
    """The five configs of the original analysis on the GPT-2-small-shaped checkpoint."""
    return _config_rows(
        "seed parity, GPT-2-small-shaped random weights",
        [*SEED_PARITY_CONFIGS, "--model", str(gpt2_small_shaped_checkpoint())],
        GPT2_SMALL_BUDGET_MB,
    )


@bench_group
def activation_patching() -> list[Row]:
    """activation_patching's config on the GPT-2-small-shaped checkpoint."""
    return _config_rows(
        "activation_patching, GPT-2-small-shaped random weights",
        ["activation_patching", "--model", str(gpt2_small_shaped_checkpoint())],
        GPT2_SMALL_BUDGET_MB,
    )


@bench_group
def all_configs_bundled() -> list[Row]:
    """Every config on the bundled SmolLM2."""
    return _config_rows(
        f"all configs, bundled {BUNDLED_SMOLLM2}",
        ["--all", "--model", BUNDLED_SMOLLM2],
        BUNDLED_BUDGET_MB,
    )


@bench_group
def all_configs_gpt2_small_shaped() -> list[Row]:
    """Every config on the GPT-2-small-shaped checkpoint, into an empty cache, then from it."""
    import yaml

    from unraveled.config import config_names, load_config

    checkpoint = gpt2_small_shaped_checkpoint()
    with tempfile.TemporaryDirectory() as configs, tempfile.TemporaryDirectory() as cache:
        config = yaml.safe_load(load_config("causal_tracing").path.read_text(encoding="utf-8"))
        config["params"]["facts"] = call_in_child(
            known_facts_of, str(checkpoint), environment={"UNRAVELED_CACHE": cache}
        ).value
        (Path(configs) / "causal_tracing.yaml").write_text(
            yaml.safe_dump(config, allow_unicode=True), encoding="utf-8"
        )
        return _config_rows(
            "all configs, GPT-2-small-shaped random weights (causal tracing: facts it knows)",
            [*config_names(), "--model", str(checkpoint), "--config-dir", configs],
            GPT2_SMALL_BUDGET_MB,
            again_from_cache=True,
        )


@bench_group
def causal_tracing() -> list[Row]:
    """causal_tracing's compute and its batched restorations, on the bundled SmolLM2."""
    return causal_tracing_rows(BUNDLED_SMOLLM2)


@bench_group
def corpus_atlas() -> list[Row]:
    """The corpus engines' throughput and the atlas's memory, on the bundled SmolLM2."""
    return corpus_atlas_rows(BUNDLED_SMOLLM2)


@bench_group
def sae() -> list[Row]:
    """SAE activation generation against a plain stopped pass, and memory against tokens."""
    return sae_rows(BUNDLED_SMOLLM2)


@bench_group
def causal() -> list[Row]:
    """The causal experiments' computes at their defaults, on the bundled SmolLM2."""
    return causal_rows(BUNDLED_SMOLLM2)


@bench_group
def generation() -> list[Row]:
    """Generation under a steering hook against unhooked generation, on the bundled SmolLM2."""
    return generation_rows(BUNDLED_SMOLLM2)


@bench_group
def path_patching() -> list[Row]:
    """Path patching's cost per sender against activation patching's per head, bundled SmolLM2."""
    return path_patching_rows(BUNDLED_SMOLLM2)


@bench_group
def model_load() -> list[Row]:
    """The bundled SmolLM2 loaded into an empty converted-weights cache, then from it."""
    with tempfile.TemporaryDirectory() as cache:
        seconds = call_in_child(
            load_twice, BUNDLED_SMOLLM2, environment={"UNRAVELED_CACHE": cache}
        ).value
    group = f"model load, {BUNDLED_SMOLLM2}"
    return [
        Row(
            group,
            "into an empty converted-weights cache (GGUF dequantized, converted)",
            seconds["uncached"],
        ),
        Row(
            group,
            "from the converted-weights cache",
            seconds["cached"],
            ratio=seconds["uncached"] / seconds["cached"],
            ratio_meaning="speed-up over the uncached load",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run the row groups (all, or ``--only`` some), printing each group's table as it ends.

    Returns:
        0, or 1 when a peak is over its memory budget.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__.splitlines()[0]
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
        measured = group()
        rows += measured
        print(format_table(measured), flush=True)
    if args.json:
        args.json.write_text(json.dumps([row.as_json() for row in rows], indent=2) + "\n")
    over = [row for row in rows if row.within_budget is False]
    checked = [row for row in rows if row.within_budget is not None]
    if over:
        print(f"\nover the memory budget: {len(over)} of {len(checked)} rows", flush=True)
        for row in over:
            print(f"  {row.group}: {row.name}: {row.peak_mb:.0f} MiB > {row.budget_mb:.0f} MiB")
        return 1
    if checked:
        print(f"\nmemory budgets: all {len(checked)} checked rows within budget", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
