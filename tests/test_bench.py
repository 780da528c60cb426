"""The bench's own machinery (benchmarks/, outside the package): memory budgets decide its exit
status, and a measurement runs in a process of its own with the environment it is given."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import bench
from benchmarks.processes import call_in_child, own_peak_mb, run_cli
from benchmarks.table import Row, format_table


def test_a_peak_over_its_budget_is_a_fail_row_and_exit_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        Row("all configs", "whole invocation", 10.0, peak_mb=1600.0, budget_mb=1536.0),
        Row("all configs", "embeddings", 2.0, peak_mb=900.0, budget_mb=1536.0),
        Row("model load", "from the cache", 1.0),
    ]

    def group() -> list[Row]:
        return rows

    monkeypatch.setattr(bench, "GROUPS", [group])
    assert bench.main([]) == 1
    printed = capsys.readouterr().out
    over, within, unbudgeted = (
        next(line for line in printed.splitlines() if name in line)
        for name in ("whole invocation", "embeddings", "from the cache")
    )
    assert "FAIL" in over and "1536" in over
    assert "pass" in within and "FAIL" not in within
    assert "pass" not in unbudgeted and "FAIL" not in unbudgeted
    assert "over the memory budget: 1 of 2 rows" in printed

    rows[0] = Row("all configs", "whole invocation", 10.0, peak_mb=1536.0, budget_mb=1536.0)
    assert bench.main([]) == 0
    assert "all 2 checked rows within budget" in capsys.readouterr().out


def test_the_table_lines_up_every_row_of_a_group() -> None:
    table = format_table(
        [
            Row("group", "a", 1.0, peak_mb=10.0, budget_mb=20.0),
            Row("group", "a longer name", 123.4, ratio=2.5, ratio_meaning="x over y"),
        ]
    )
    _, title, header, first, second = table.splitlines()
    assert title == "group"
    # Numbers end under the end of their column's heading, whatever the name's length.
    seconds_end = header.index("seconds") + len("seconds")
    assert first.index("1.0") + len("1.0") == second.index("123.4") + len("123.4") == seconds_end
    assert first.index("pass") + len("pass") == header.index("memory") + len("memory")


def test_a_measurement_runs_in_a_process_with_the_environment_it_is_given() -> None:
    name = "UNRAVELED_BENCH_TEST_VARIABLE"
    assert name not in os.environ
    finished = call_in_child(os.getenv, name, environment={name: "the child's own"})
    assert finished.value == "the child's own"
    assert name not in os.environ  # the bench's own environment is never changed
    assert finished.seconds > 0 and finished.peak_mb > 1
    with pytest.raises(ValueError, match="can't be imported by name"):
        call_in_child(lambda: None)


def test_a_child_s_peak_is_its_own_not_the_peak_of_the_process_that_started_it() -> None:
    # Linux carries a process's peak RSS over fork and exec into its child's ru_maxrss: after
    # the bench has held a model, every child would seem to peak at least as high.
    ballast = bytearray(512 * 2**20)
    ballast[:: 2**12] = bytes(len(ballast) // 2**12)  # touch every page
    del ballast
    assert own_peak_mb() > 512
    assert call_in_child(os.getcwd).peak_mb < 256


def test_the_cli_runs_as_a_user_runs_it_and_a_failure_stops_the_bench(tmp_path: Path) -> None:
    listed = run_cli(["list"], tmp_path / "cache")
    assert listed.value is None and 0 < listed.peak_mb < 512
    with pytest.raises(RuntimeError, match="run no_such_config exited with 2"):
        run_cli(["run", "no_such_config"], tmp_path / "cache")


def test_the_sae_group_prints_each_of_its_rows_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The children stand in for the measurements (minutes on the bundled model): what is checked
    # is the group's rows as printed, four distinct measurements, each on one line.
    from benchmarks import sae
    from benchmarks.processes import Finished

    def measured(function: object, name: str, *args: object) -> Finished:
        if function is sae.generation_seconds:
            return Finished({"tokens": 4096.0, "generation_s": 2.0, "plain_s": 2.1}, 3.0, 900.0)
        return Finished(None, 60.0, 1500.0 + int(args[0]) / 16384)

    monkeypatch.setattr(sae, "call_in_child", measured)
    assert bench.main(["--only", "sae"]) == 0
    printed = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip()]
    title, _header, *rows = printed
    assert title.startswith("sae features, ")
    assert len(rows) == len(set(rows)) == 4
    assert [row.split(",")[0] for row in rows] == [
        "plain forward pass stopped at the hook",
        "activation generation",
        "whole sae_features compute",
        "whole sae_features compute",
    ]
    assert "16384 training tokens" in rows[2] and "32768 training tokens" in rows[3]
