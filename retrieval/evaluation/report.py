"""An immutable evaluation result: metrics per label level, their mean over levels, and a printable table.

Training logs it, the CLI prints it, benchmarks compare it; one value type keeps the metric names
("R@1", "R@5", ..., "mAP") and the layout identical everywhere. Values are stored as fractions in
[0, 1]; only :meth:`EvaluationReport.format_table` shows percentages.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EvaluationReport", "format_side_by_side"]


@dataclass(frozen=True)
class EvaluationReport:
    """Retrieval metrics per label level plus their mean over levels.

    Attributes:
        per_level: ``{level: {metric: value}}`` with metrics ``"R@K"`` (hit rate, one per requested
            K) and ``"mAP"`` (all positives), values in [0, 1]; NaN where no query of that level had
            a relevant item.
        mean: ``{metric: value}``, the unweighted mean over levels (levels with NaN are skipped).
        num_queries: number of queries evaluated.
        counted: ``{level: n}``, how many queries had at least one relevant item at that level and
            therefore entered its means (the others have undefined R@K/AP).
    """

    per_level: dict[str, dict[str, float]]
    mean: dict[str, float]
    num_queries: int
    counted: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Defensive copies: the dataclass is frozen, and callers must not be able to edit it through their dicts.
        object.__setattr__(self, "per_level", copy.deepcopy(dict(self.per_level)))
        object.__setattr__(self, "mean", dict(self.mean))
        object.__setattr__(self, "counted", {str(k): int(v) for k, v in self.counted.items()})
        names = self.metric_names
        for level, metrics in self.per_level.items():
            if list(metrics) != names:
                raise ValueError(f"level {level!r} has metrics {list(metrics)}, expected {names}")
        if self.per_level and list(self.mean) != names:
            raise ValueError(f"mean has metrics {list(self.mean)}, expected {names}")
        unknown = set(self.counted) - set(self.per_level)
        if unknown:
            raise ValueError(f"counted names unknown levels {sorted(unknown)}")

    @classmethod
    def from_levels(
        cls,
        per_level: Mapping[str, Mapping[str, float]],
        num_queries: int,
        counted: Mapping[str, int] | None = None,
    ) -> EvaluationReport:
        """Build a report whose ``mean`` is the unweighted mean of each metric over levels.

        Levels where a metric is NaN (no query had a relevant item) are skipped in that mean, so one
        empty level does not wipe out the summary; the mean is NaN only when every level is.
        """
        table = {level: {name: float(value) for name, value in metrics.items()} for level, metrics in per_level.items()}
        names = list(next(iter(table.values()))) if table else []
        mean: dict[str, float] = {}
        for name in names:
            values = [m[name] for m in table.values() if not math.isnan(m[name])]
            mean[name] = sum(values) / len(values) if values else float("nan")
        return cls(per_level=table, mean=mean, num_queries=int(num_queries), counted=dict(counted or {}))

    @property
    def levels(self) -> list[str]:
        """Level names in report order (finest first when built by the protocols)."""
        return list(self.per_level)

    @property
    def metric_names(self) -> list[str]:
        """Metric names in column order, e.g. ``["R@1", "R@5", "R@10", "mAP"]``."""
        return list(next(iter(self.per_level.values()))) if self.per_level else list(self.mean)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (plain floats/ints; NaN becomes ``None`` because JSON has no NaN)."""
        return {
            "per_level": {level: _json_floats(metrics) for level, metrics in self.per_level.items()},
            "mean": _json_floats(self.mean),
            "num_queries": self.num_queries,
            "counted": dict(self.counted),
        }

    def format_table(self) -> str:
        """Plain-text aligned table: one row per level, one column per metric, a last ``mean`` row.

        Values are percentages with two decimals (stated in the title line); ``n/a`` marks a metric
        with no counted query. The ``queries`` column shows how many queries entered each level.
        """
        names = self.metric_names
        header = ["level", *names, "queries"]
        rows = [
            [level, *(_percent(metrics[n]) for n in names), str(self.counted.get(level, ""))]
            for level, metrics in self.per_level.items()
        ]
        rows.append(["mean", *(_percent(self.mean[n]) for n in names), str(self.num_queries)])
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(cells: list[str]) -> str:
            first = cells[0].ljust(widths[0])
            rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
            return "  ".join([first, *rest]).rstrip()

        title = f"Retrieval metrics in % (R@K = hit rate, mAP over all positives), {self.num_queries} queries"
        rule = "-" * len(line(header))
        return "\n".join([title, line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])])


def format_side_by_side(reports: Mapping[str, EvaluationReport], title: str | None = None) -> str:
    """One plain-text table of several reports of the same levels and metrics, one column group each.

    Comparing runs of one protocol (a student alone, the student against its teacher's gallery, the
    teacher) is the point of printing them together: reading three separate tables invites misreading
    which number belongs to which run. Values are percentages as in :meth:`EvaluationReport.format_table`;
    the last row is each report's mean over levels.

    Args:
        reports: ``{name: report}``, group headers in the given order.
        title: first line; default names the metrics and the (first report's) number of queries.

    Raises:
        ValueError: no reports, or reports whose levels or metric names differ.
    """
    if not reports:
        raise ValueError("format_side_by_side needs at least one report")
    first = next(iter(reports.values()))
    levels, names = first.levels, first.metric_names
    for name, report in reports.items():
        if report.levels != levels or report.metric_names != names:
            raise ValueError(
                f"report {name!r} has levels {report.levels} and metrics {report.metric_names}, "
                f"the first has {levels} and {names}; only reports of one protocol can be compared"
            )
    header = ["level", *(metric for _ in reports for metric in names)]
    rows = [[level, *(_percent(r.per_level[level][m]) for r in reports.values() for m in names)] for level in levels]
    rows.append(["mean", *(_percent(r.mean[m]) for r in reports.values() for m in names)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    group = len(names)

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0])]
        for g in range(len(reports)):
            cols = range(1 + g * group, 1 + (g + 1) * group)
            parts.append("  ".join(cells[i].rjust(widths[i]) for i in cols))
        return " | ".join(parts).rstrip()

    group_widths = [len(part) for part in line(header).split(" | ")]
    top = " | ".join(
        [" " * group_widths[0], *(name.ljust(w) for name, w in zip(reports, group_widths[1:], strict=True))]
    ).rstrip()
    title = title or f"Retrieval metrics in % (R@K = hit rate, mAP over all positives), {first.num_queries} queries"
    rule = "-" * len(line(header))
    return "\n".join([title, top, line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])])


def _json_floats(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {name: (None if math.isnan(value) else float(value)) for name, value in metrics.items()}


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:.2f}"
