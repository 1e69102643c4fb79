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
