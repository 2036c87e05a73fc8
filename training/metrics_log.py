"""Append-only JSONL log of training metrics, one JSON object per line.

JSONL survives a crash (every line is flushed as it is written) and is trivially parsed by plots,
dashboards and tests; a resumed run first drops lines from steps it is about to redo.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "read_metrics"]


class MetricsLog:
    """Writes ``{"step": ..., "time": ..., **fields}`` lines to ``path``.

    Args:
        path: the ``.jsonl`` file.
        keep_until_step: keep existing lines whose step is at most this (resume); ``None`` starts a new file.
    """

    def __init__(self, path: str | Path, keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_until_step is not None and self.path.is_file():
            kept = [rec for rec in read_metrics(self.path) if rec.get("step", 0) <= keep_until_step]
        self.path.write_text("".join(json.dumps(rec) + "\n" for rec in kept))

    def write(self, step: int, **fields: Any) -> None:
        record = {"step": int(step), "time": round(time.time(), 3), **{k: _clean(v) for k, v in fields.items()}}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse a metrics file, skipping a torn last line left by a crash."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf; write null so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value
