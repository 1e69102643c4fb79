"""JSON-lines files (plain or .gz): one reader and one writer, with errors that name the file and line.

A line that is not a UTF-8 JSON object nested at most MAX_DEPTH deep, with each key once per object and
no lone UTF-16 surrogate, is a `BadLine` (its `reason` counts skipped lines): raised, or collected when the
caller skips bad lines. `too_deep` finds deep nesting from the bytes alone, before any JSON parser (some
segfault on it) sees the line; `loads` is the JSON parser, refusing what `json.loads` would resolve silently.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from copg_jax import paths

MAX_DEPTH = 100
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # strings (skipped) and brackets
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \uD800-\uDFFF: half of a UTF-16 pair


class BadLine(ValueError):
    """A line of a JSONL file that is not a JSON object; the message names `path:line`."""

    def __init__(self, path, line_no: int, reason: str, detail: str):
        super().__init__(f"{path}:{line_no}: {detail}")
        self.path, self.line_no, self.reason, self.detail = str(path), line_no, reason, detail


class DuplicateKey(ValueError):
    """A JSON object with a key given twice (`json.loads` would keep the last one silently)."""

    def __init__(self, key: str):
        super().__init__(f"key {key!r} appears twice in one object")
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """`object_pairs_hook` for `json.loads`: the object as a dict, or DuplicateKey."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


# one decoder for every line (`json.loads` makes one a call)
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def loads(text: str):
    """JSON text -> its value, like `json.loads` but raising DuplicateKey for a key given twice in an object.

    Raises:
      json.JSONDecodeError: not JSON (a UTF-8 byte order mark in front too, as `json.loads` has it).
      DuplicateKey: an object repeats a key.
    """
    if text.startswith("\ufeff"):
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _DECODER.decode(text)


def lone_surrogate(raw: bytes, value) -> str | None:
    """The first lone UTF-16 surrogate (half a character, e.g. text cut inside an emoji by a UTF-16 slicer)
    among the strings of `value`, parsed from the JSON text `raw`, as "\\udXXX"; None when there is none.
    Only a \\u escape makes one (UTF-8 cannot encode it), so texts without such an escape are not walked."""
    if not _SURROGATE_ESCAPE.search(raw):
        return None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"\\u{ord(e.object[e.start]):04x}"
    return None


def too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON text `raw` nests arrays/objects more than `limit` deep (brackets inside strings do not
    count). Counting brackets first keeps the common case at C speed."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for token in _TOKENS.finditer(raw):
        bracket = token.group()
        if bracket in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        elif bracket in (b"]", b"}"):
            depth -= 1
    return False


def parse_line(raw: bytes, path, line_no: int) -> dict:
    """One line -> its JSON object.

    Raises:
      BadLine: not UTF-8 (`bad_encoding`), nested too deeply (`too_deep`), not JSON (`bad_json`), a key given
        twice in one object (`duplicate_key`), not an object (`not_object`), or a lone UTF-16 surrogate in a
        string (`bad_unicode`: not text, no tokenizer or UTF-8 writer takes it).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadLine(
            path, line_no, "bad_encoding", f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start})"
        ) from None
    if too_deep(raw):
        raise BadLine(path, line_no, "too_deep", f"nested more than {MAX_DEPTH} levels deep")
    try:
        row = loads(text)
    except json.JSONDecodeError as e:
        raise BadLine(path, line_no, "bad_json", f"not valid JSON: {e}") from None
    except DuplicateKey as e:
        raise BadLine(path, line_no, "duplicate_key", str(e)) from None
    if not isinstance(row, dict):
        raise BadLine(path, line_no, "not_object", f"expected a JSON object, got {type(row).__name__}")
    surrogate = lone_surrogate(raw, row)
    if surrogate:
        raise BadLine(
            path, line_no, "bad_unicode", f"lone UTF-16 surrogate {surrogate} in a string (half a character)"
        )
    return row


def open_bytes(path: str | Path) -> IO[bytes]:
    """`path` (a local path or a URL) opened for reading bytes, decompressed when it ends in .gz."""
    return paths.open(path, "rb", compression="gzip" if str(path).endswith(".gz") else None)


def raw_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of every non-blank line of `path` (.gz decompressed)."""
    with open_bytes(path) as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.isspace():  # what raw.strip() tells, without copying the line (never empty)
                yield line_no, raw


def line_chunks(path: str | Path, count: int, size: int) -> Iterator[list[tuple[int, bytes]]]:
    """`raw_lines` of `path` in chunks of `count` lines, or fewer where they reach `size` bytes: a file
    read a chunk at a time, in bounded memory however large it is."""
    chunk, held = [], 0
    for line_no, raw in raw_lines(path):
        chunk.append((line_no, raw))
        held += len(raw)
        if len(chunk) >= count or held >= size:
            yield chunk
            chunk, held = [], 0
    if chunk:
        yield chunk


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector: parsed JSON holds no reference cycles, and the collector,
    run every few hundred new dicts and lists, walks every object still held -- on a large chunk of rows
    most of the time parsing takes."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def parse_lines(
    lines: Iterable[tuple[int, bytes]], path, skipped: list[BadLine] | None = None
) -> list[tuple[int, dict]]:
    """(line number, object) for each (line number, bytes) of `lines`, read from `path`.

    Args:
      skipped: when given, bad lines are appended to it and left out instead of raised.
    Raises:
      BadLine: (without `skipped`) the first line that is not a UTF-8 JSON object, naming `path:line`.
    """
    rows = []
    with _cyclic_gc_paused():
        for line_no, raw in lines:
            try:
                rows.append((line_no, parse_line(raw, path, line_no)))
            except BadLine as e:
                if skipped is None:
                    raise
                skipped.append(e)
    return rows


def read_jsonl_lines(path: str | Path, skipped: list[BadLine] | None = None) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path` (.gz decompressed); `skipped` and errors as
    in `parse_lines`."""
    return parse_lines(raw_lines(path), path, skipped)


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of `path`, one a line (see `read_jsonl_lines`)."""
    return [row for _, row in read_jsonl_lines(path)]


def _plain(value):
    """`json.dumps`' `default`: a date or time (a Parquet or Arrow timestamp column) as ISO 8601 text."""
    if isinstance(value, datetime.date | datetime.time):  # a datetime is a date
        return value.isoformat()
    raise TypeError(f"a value of type {type(value).__name__}")


def _finite(value):
    """`value` with each NaN or infinite float in it (in lists, tuples and dict values) None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps_row(row: dict, where: str) -> str:
    """`row` as one line of strict JSON (non-ASCII kept as is; dates and times as ISO 8601 text; NaN and
    infinite numbers, which JSON has no words for and strict readers refuse (pyarrow, HF datasets), as null).

    Raises:
      ValueError: a column holds what JSON cannot (bytes, an image): naming it and `where` (the row).
    """
    try:
        try:
            return json.dumps(row, ensure_ascii=False, default=_plain, allow_nan=False)
        except ValueError as e:
            if "Out of range float" not in str(e):
                raise
            return json.dumps(_finite(row), ensure_ascii=False, default=_plain, allow_nan=False)  # once
    except (TypeError, ValueError) as e:  # a value JSON cannot hold (a NaN dict key too): its column
        reason = str(e)
    for key, value in row.items():  # the column
        try:
            json.dumps(_finite(value), default=_plain, allow_nan=False)
        except (TypeError, ValueError) as e:
            reason, where = str(e), f"{where}, column {key!r}"
            break
    if "Out of range float" in reason:  # left by `_finite`, which replaces values, not keys
        reason = "a NaN or infinite number as a key"
    raise ValueError(f"{where} holds {reason}, which JSON lines cannot hold: drop or convert it")


def write_jsonl(path: str | Path, rows: Iterable[dict], *, append: bool = False) -> None:
    """Writes `rows` one JSON object a line (`dumps_row`), creating parent folders; a local `path` is appended
    to when `append`, else replaced whole once every row is written (an earlier file stays as it was when a
    row cannot be written); a URL is written whole (object stores cannot append).

    Raises:
      ValueError: `append` to a URL; a row that JSON cannot hold (naming it, from 0, and its column).
    """
    if append and paths.is_url(path):
        raise ValueError(f"cannot append to {path}: an object store writes whole objects")
    lines = [dumps_row(row, f"{path}: row {i}") + "\n" for i, row in enumerate(rows)]  # before any write
    if not append:  # a link's file is replaced, the link kept
        with paths.atomic_writer(path if paths.is_url(path) else os.path.realpath(path)) as f:
            f.writelines(line.encode("utf-8") for line in lines)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(lines)
