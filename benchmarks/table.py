"""The bench's rows, and the table they are printed as."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    """One line of the table: what was timed, its seconds and peak memory, a ratio and a budget.

    Attributes:
        group: The row group (``@bench_group`` function) it belongs to, as a heading.
        name: What was measured.
        seconds: Wall seconds.
        peak_mb: Peak resident memory (MiB), where measured.
        ratio: A ratio of two numbers measured in this run, and ``ratio_meaning`` what it is.
        ratio_meaning: What ``ratio`` divides by what.
        budget_mb: The most ``peak_mb`` may be (MiB); None where no budget applies.
    """

    group: str
    name: str
    seconds: float
    peak_mb: float | None = None
    ratio: float | None = None
    ratio_meaning: str = ""
    budget_mb: float | None = None

    @property
    def within_budget(self) -> bool | None:
        """Whether the peak is within the budget; None where there is no budget or no peak."""
        if self.budget_mb is None or self.peak_mb is None:
            return None
        return self.peak_mb <= self.budget_mb

    def as_json(self) -> dict[str, Any]:
        """The row as JSON, with whether it is within its budget."""
        return {**asdict(self), "within_budget": self.within_budget}


_VERDICT = {None: "", True: "pass", False: "FAIL"}


def format_table(rows: list[Row]) -> str:
    """Rows as a fixed-width text table, grouped, readable in a log file."""
    lines = []
    width = max(len(row.name) for row in rows)
    for group in dict.fromkeys(row.group for row in rows):
        lines += [
            "",
            group,
            f"  {'measured':<{width}}  {'seconds':>8}  {'peak MiB':>8}  {'budget':>6}  "
            f"{'memory':>6}  {'ratio':>6}  ratio is",
        ]
        for row in (row for row in rows if row.group == group):
            peak = f"{row.peak_mb:8.0f}" if row.peak_mb is not None else f"{'':8}"
            budget = f"{row.budget_mb:6.0f}" if row.budget_mb is not None else f"{'':6}"
            ratio = f"{row.ratio:6.2f}" if row.ratio is not None else f"{'':6}"
            lines.append(
                f"  {row.name:<{width}}  {row.seconds:8.1f}  {peak}  {budget}  "
                f"{_VERDICT[row.within_budget]:>6}  {ratio}  {row.ratio_meaning}"
            )
    return "\n".join(lines)
