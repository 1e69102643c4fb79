"""Careless or hostile input never lost silently, never fatal by traceback (issue 14): data folders, bytes,
nesting, sizes, hub names, YAML and overrides. Each case is read, or is a one-line error naming the
file / line / key, or (data.on_bad_row=skip) a counted skip."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from copg_jax import cli
from copg_jax.config import ConfigError
from copg_jax.data.config import DataConfig
from copg_jax.data.testing import kway_rows, make_tiny_tokenizer, write_jsonl
from copg_jax.data.tokenize import MAX_CHARS_PER_TOKEN, tokenize_dataset
from copg_jax.jsonl import read_jsonl_lines
from copg_jax.run_config import load_config

REPO = Path(__file__).resolve().parents[1]
GOOD = {"prompt": "w1 w2", "completions": ["w3", "w4"], "rewards": [1.0, 2.0]}
DEEP = '{"a": ' * 100_000 + "1" + "}" * 100_000


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


def _cfg(path, tmp_path, **kw) -> DataConfig:
    return DataConfig(path=str(path), cache_dir=str(tmp_path / ".cache"), **kw)


def _lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------------ data folders


def test_a_mixed_folder_reads_every_supported_file_and_names_the_rest(tok, tmp_path):
    folder = tmp_path / "data"
    (folder / "sub" / "deeper").mkdir(parents=True)
    rows = kway_rows(14, seed=2)
    write_jsonl(rows[:3], str(folder / "a.jsonl"))
    datasets.Dataset.from_list(rows[3:6]).to_parquet(str(folder / "b.parquet"))
    (folder / "c.csv").write_text("prompt,chosen,rejected\nw1,w2,w3\nw4 w5,w6,w7\n")
    with gzip.open(folder / "d.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[6:10])
    write_jsonl(rows[10:12], str(folder / "sub" / "e.jsonl"))
    (folder / "sub" / "deeper" / "f.json").write_text(json.dumps(rows[12:]))
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "notes.txt").write_text("hidden entries are not data")
    data = tokenize_dataset(_cfg(folder, tmp_path), tok)
    assert data.report.rows_read == len(data) == 3 + 3 + 2 + 4 + 2 + 2
    names = [str(Path(s).relative_to(folder)) for s in data.sources]  # sorted, depth first
    assert names == ["a.jsonl", "b.parquet", "c.csv", "d.jsonl.gz", "sub/deeper/f.json", "sub/e.jsonl"]
    (folder / "sub" / "notes.txt").write_text("not data")
    (folder / "g.tsv").write_text("prompt\tchosen\n")
    with pytest.raises(ValueError, match=r"holds 2 file\(s\) of no supported format \(.*g\.tsv.*notes\.txt"):
        tokenize_dataset(_cfg(folder, tmp_path), tok)


def test_symlinks_in_a_data_folder_loop_neither_forever_nor_by_traceback(tok, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl([GOOD], str(folder / "a.jsonl"))
    (folder / "again").symlink_to(folder)  # a link back up the tree: read once
    assert len(tokenize_dataset(_cfg(folder, tmp_path), tok)) == 1
    (folder / "loop.jsonl").symlink_to(folder / "loop.jsonl")
    with pytest.raises(
        ValueError, match=r"loop\.jsonl' cannot be read \(Too many levels of symbolic links\)"
    ):
        tokenize_dataset(_cfg(folder, tmp_path), tok)


def test_a_missing_local_path_is_never_tried_on_the_hub(tok, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: calls.append(a) or datasets.Dataset.from_list([GOOD])
    )
    with pytest.raises(
        FileNotFoundError, match=r"'org/name' does not exist \(a hub dataset is written hf://"
    ):
        tokenize_dataset(_cfg("org/name", tmp_path), tok)
    assert calls == []
    assert len(tokenize_dataset(_cfg("hf://datasets/org/name", tmp_path), tok)) == 1  # said so: the hub
    assert calls == [("org/name",)]


# ------------------------------------------------------------------------------------------ bytes and rows


@pytest.mark.parametrize(
    ("line", "reason", "message"),
    [
        (
            b'{"prompt": "caf\xe9", "completions": ["w3", "w4"], "rewards": [1, 2]}',
            "bad_encoding",
            "not UTF-8",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "too_deep", "nested more than 100 levels deep"),  # see below
        (b'{"prompt": "w1", oops', "bad_json", "not valid JSON"),
    ],
)
def test_unreadable_lines_are_named_or_skipped_and_counted(tok, tmp_path, line, reason, message):
    good = json.dumps(GOOD).encode()
    path = _lines(tmp_path / "rows.jsonl", [good, good, line, good])
    with pytest.raises(ValueError, match=rf"{path}:3: {message}.*on_bad_row=skip"):
        tokenize_dataset(_cfg(path, tmp_path), tok)
    data = tokenize_dataset(_cfg(path, tmp_path, on_bad_row="skip"), tok)
    assert len(data) == 3 and data.report.rows_read == 4
    assert data.report.skipped == {reason: 1} and data.report.skipped_examples == {reason: [f"{path} line 3"]}
    with pytest.raises(ValueError, match=rf"{path}:3: {message}"):
        read_jsonl_lines(path)  # the reader `copg score` / `copg generate` use


def test_a_100k_deep_row_does_not_reach_the_json_reader_that_segfaults(tmp_path):
    """In a subprocess: the `datasets` JSON reader segfaults on it, which would take the test run down."""
    path = _lines(tmp_path / "deep.jsonl", [json.dumps(GOOD).encode(), ("[" + DEEP + "]").encode()])
    code = (
        "import sys\nfrom copg_jax.data.formats import load_sources\n"
        "try:\n    load_sources(sys.argv[1], 'train', sys.argv[2])\nexcept ValueError as e:\n    print(e)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "c")], capture_output=True, env=env
    )
    assert out.returncode == 0 and f"{path}:2: nested more than 100 levels deep" in out.stdout.decode()


def test_an_oversized_row_is_cut_before_the_tokenizer_sees_it(tok, tmp_path, monkeypatch):
    longest = []
    real = type(tok).__call__
    monkeypatch.setattr(
        type(tok),
        "__call__",
        lambda self, texts, **kw: longest.append(max(map(len, texts))) or real(self, texts, **kw),
    )
    huge = "w1 " * 2_000_000 + "w2 w3"  # 6 MB of prompt, 4 MB of completion
    path = _lines(
        tmp_path / "big.jsonl",
        [json.dumps({**GOOD, "prompt": huge, "completions": [huge[:4_000_000], "w4"]}).encode()],
    )
    data = tokenize_dataset(_cfg(path, tmp_path, max_prompt_length=8, max_completion_length=8), tok)
    assert max(longest) <= 8 * MAX_CHARS_PER_TOKEN
    ids = tok.convert_tokens_to_ids
    assert data.rows[0]["prompt_ids"] == ids(["w1"] * 6 + ["w2", "w3"])  # the same cut as without the pre-cut
    assert data.rows[0]["completion_ids"][0] == ids(["w1"] * 8) and data.report.completions_truncated == 1
    with pytest.raises(ValueError, match="row 0: field 'prompt': .* tokens > max_prompt_length=8"):
        tokenize_dataset(
            _cfg(path, tmp_path, max_prompt_length=8, max_completion_length=8, truncation="error"), tok
        )


# ------------------------------------------------------------------------------------------ YAML, overrides


def test_yaml_aliases_are_refused_before_anything_expands_them(tmp_path):
    laughs = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    laughs += [
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]"
        for i in range(9)
    ]
    body = "\n".join("    " + line for line in laughs)
    config = tmp_path / "laughs.yaml"
    config.write_text(f"model:\n  tokenizer: t\n  config:\n    model_type: llama\n{body}\n")
    with pytest.raises(
        ConfigError, match=r"laughs.yaml'.*YAML alias \*a \(line 6\): aliases are not allowed"
    ):
        load_config(config)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.buckets=[1, 2", "override data.buckets is not valid YAML at line 1, column"),
        ("model.tokenizer=!!python/object/apply:os.system [echo hi]", "tags are not allowed"),
        ("model.config=!!binary aGk=", "tags are not allowed"),
        ("model.config={a: &x 1, b: *x}", "aliases are not allowed"),
        ("model.config=" + "[" * 40 + "]" * 40, "nested more than 32 levels deep"),
        ("model.tokenizer=" + "x" * 20_000_000, "override model.tokenizer: a value of 20000000 characters"),
        ("optim.lr=" + "'" + "x" * 4000 + "'", "optim.lr: expected a number, got 'xxxxx"),
    ],
)
def test_bad_overrides_are_one_short_line(capsys, override, message):
    assert cli.main(["train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and len(err) < 600, err[:600]


def test_oversized_config_files_and_values_are_refused_unechoed(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("model:\n  path: " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="is over 1048576 bytes"):
        load_config(big)
    long = tmp_path / "long.yaml"
    long.write_text("model:\n  path: " + "x" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"model.path: a value of 5000 characters") as err:
        load_config(long)
    assert len(str(err.value)) < 300
