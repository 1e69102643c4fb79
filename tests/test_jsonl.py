"""The shared JSON-lines reader/writer: round trip, blank lines, and errors naming file:line."""

import gzip

import pytest

from copg_jax.jsonl import read_jsonl, read_jsonl_lines, write_jsonl


def test_round_trip_keeps_unicode_and_skips_blank_lines(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    write_jsonl(path, [{"prompt": "süß", "k": [1, 2]}])
    write_jsonl(path, [{"prompt": "b"}], append=True)
    path.write_text(path.read_text() + "\n   \n")
    assert read_jsonl(path) == [{"prompt": "süß", "k": [1, 2]}, {"prompt": "b"}]
    assert [n for n, _ in read_jsonl_lines(path)] == [1, 2]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"a": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"a": {"b": 1, "b": 2}}', "key 'b' appears twice in one object"),  # json.loads: silently b=2
        ('{"a": ["x\\udc00y"]}', r"lone UTF-16 surrogate \\udc00 in a string"),
    ],
)
def test_bad_line_is_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ok": 1}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {message}"):
        read_jsonl(path)


def test_gzip_and_skipped_lines(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"a": 1}\n\xff\xfe\n{"b": 2}\n')
    skipped = []
    assert read_jsonl_lines(path, skipped) == [(1, {"a": 1}), (3, {"b": 2})]
    assert [(e.line_no, e.reason) for e in skipped] == [(2, "bad_encoding")]
    with pytest.raises(ValueError, match=r"rows\.jsonl\.gz:2: not UTF-8 \(byte 0xff at column 0\)"):
        read_jsonl(path)


def test_escapes_that_are_text_are_kept(tmp_path):
    """A surrogate pair is one character; an escaped backslash before "ud83d" is no surrogate at all."""
    path = tmp_path / "ok.jsonl"
    path.write_text('{"a": "\\ud83d\\ude00", "b": "\\\\ud83d"}\n')
    assert read_jsonl(path) == [{"a": "\U0001f600", "b": "\\ud83d"}]


def test_written_rows_are_strict_json_and_a_row_json_cannot_hold_leaves_the_file_as_it_was(tmp_path):
    """NaN and infinite numbers were written as the bare words NaN and Infinity, which strict readers
    (pyarrow's, so HF datasets') refuse: they are null. A value JSON cannot hold at all (bytes) stops the
    write naming its row and column, before anything is written over the earlier file (it had been left
    empty)."""
    import datetime
    import json

    from copg_jax.jsonl import write_jsonl

    path = tmp_path / "out.jsonl"
    row = {
        "x": float("nan"),
        "y": [1.0, float("inf"), {"z": -float("inf")}],
        "when": datetime.date(2026, 12, 1),
    }
    write_jsonl(path, [row])
    strict = json.loads(path.read_text(), parse_constant=lambda word: pytest.fail(f"{word} written"))
    assert strict == {"x": None, "y": [1.0, None, {"z": None}], "when": "2026-12-01"}
    with pytest.raises(ValueError, match=r"out.jsonl: row 1, column 'blob' holds a value of type bytes"):
        write_jsonl(path, [{"a": 1}, {"a": 2, "blob": b"\x00"}])
    assert json.loads(path.read_text())["x"] is None  # the earlier file, whole
    with pytest.raises(ValueError, match=r"row 0, column 'd' holds a NaN or infinite number as a key"):
        write_jsonl(path, [{"d": {float("nan"): 1}}])
