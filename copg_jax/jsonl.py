"""JSON-lines files: one reader and one writer, with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def read_jsonl_lines(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`.

    Raises:
      ValueError: a line is not valid JSON or not a JSON object, naming `path:line`.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_no, row))
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of `path`, one a line (see `read_jsonl_lines`)."""
    return [row for _, row in read_jsonl_lines(path)]


def write_jsonl(path: str | Path, rows: Iterable[dict], *, append: bool = False) -> None:
    """Writes `rows` one JSON object a line (UTF-8, non-ASCII kept as is), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
