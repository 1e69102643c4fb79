"""Careless or hostile input never lost silently, never fatal by traceback (issue 14): data folders, bytes,
nesting, sizes, hub names, YAML and overrides. Each case is read, or is a one-line error naming the
file / line / key, or (data.on_bad_row=skip) a counted skip."""

import decimal
import gzip
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from copg_jax import cli
from copg_jax.config import ConfigError
from copg_jax.data import formats
from copg_jax.data.config import DataConfig
from copg_jax.data.formats import distinct_prompts, load_sources
from copg_jax.data.testing import kway_rows, make_tiny_tokenizer, write_jsonl
from copg_jax.data.tokenize import MAX_CHARS_PER_TOKEN, tokenize_dataset
from copg_jax.generate import read_prompts
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


def test_a_folder_named_by_split_reads_the_split_it_is_asked_for(tok, tmp_path, caplog):
    """A hub snapshot holds every split (hh-rlhf's train.jsonl.gz beside test.jsonl.gz; ultrafeedback's
    data/train_prefs-*.parquet beside test_prefs and train_sft): data.split picks the files, never all of them
    (test rows were trained on, and an SFT split's rows trained twice)."""
    hh = tmp_path / "helpful-base"
    hh.mkdir()
    for name, seed in (("train", 1), ("test", 2)):
        with gzip.open(hh / f"{name}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in kway_rows(3 if name == "train" else 2, seed=seed))
    with caplog.at_level(logging.WARNING, logger="copg_jax.data.formats"):
        train = tokenize_dataset(_cfg(hh, tmp_path), tok)  # data.split: train
    assert [Path(s).name for s in train.sources] == ["train.jsonl.gz"] and len(train) == 3
    assert "the files of split 'train' (1 of 2); left out: test.jsonl.gz" in caplog.text
    test = tokenize_dataset(_cfg(hh, tmp_path, split="test"), tok)
    assert [Path(s).name for s in test.sources] == ["test.jsonl.gz"] and len(test) == 2
    glob = tokenize_dataset(_cfg(hh / "*.jsonl.gz", tmp_path), tok)  # a glob reads what it matches
    assert [Path(s).name for s in glob.sources] == ["test.jsonl.gz", "train.jsonl.gz"]
    # shards and the words `datasets` reads as a split, in any case: train_0, Training-1, dev for validation
    shards = tmp_path / "shards-by-split"
    shards.mkdir()
    for name in ("train_0", "Training-1", "train.2", "dev", "test-00000-of-00002", "test-00001-of-00002"):
        write_jsonl(kway_rows(1, seed=20), str(shards / f"{name}.jsonl"))
    for split, want in (("train", 3), ("validation", 1), ("test", 2), ("eval", 2)):
        assert len(tokenize_dataset(_cfg(shards, tmp_path, split=split), tok)) == want
    prefixed = tmp_path / "prefixed"  # a split's word after other words, as datasets reads hh_train too
    prefixed.mkdir()
    for name in ("hh_train", "hh_test"):
        write_jsonl(kway_rows(1, seed=21), str(prefixed / f"{name}.jsonl"))
    assert [Path(s).name for s in tokenize_dataset(_cfg(prefixed, tmp_path), tok).sources] == [
        "hh_train.jsonl"
    ]

    uf = tmp_path / "ultrafeedback"
    (uf / "data").mkdir(parents=True)
    for split, seed in (("train_prefs", 3), ("test_prefs", 4), ("train_sft", 5)):
        datasets.Dataset.from_list(kway_rows(2, seed=seed)).to_parquet(
            str(uf / "data" / f"{split}-00000-of-00001.parquet")
        )
    for name in ("README.md", "LICENSE", "dataset_infos.json", "ultrafeedback.py"):  # a snapshot's others
        (uf / name).write_text("{}" if name.endswith(".json") else "# not data")
    prefs = tokenize_dataset(_cfg(uf, tmp_path, split="train_prefs"), tok)
    assert [Path(s).name for s in prefs.sources] == ["train_prefs-00000-of-00001.parquet"]
    with pytest.raises(
        ValueError,
        match=r"folder .* named by split \(test_prefs-00000-of-00001, train_prefs-00000-of-00001, "
        r"train_sft-00000-of-00001\), none by 'train'",
    ):
        tokenize_dataset(_cfg(uf, tmp_path), tok)
    # prompts of online rollouts: the same choice (GSM8K's main/train-*.parquet beside main/test-*.parquet)
    gsm = tmp_path / "gsm8k" / "main"
    gsm.mkdir(parents=True)
    for split in ("train", "test"):
        datasets.Dataset.from_list([{"question": f"{split} q", "answer": "4"}]).to_parquet(
            str(gsm / f"{split}-00000-of-00001.parquet")
        )
    assert [r["prompt"] for r in read_prompts(str(gsm.parent), "question", "test", str(tmp_path))] == [
        "test q"
    ]
    # a snapshot of several subsets, as its dataset card declares them: GSM8K's main and socratic hold the
    # same questions (read together, each trained twice, half with the other kind of answer); one subset's
    # folder reads, a glob reads what it matches, a card of one subset is the dataset
    socratic = tmp_path / "gsm8k" / "socratic"
    socratic.mkdir()
    datasets.Dataset.from_list([{"question": "train q", "answer": "w1 #### 4"}]).to_parquet(
        str(socratic / "train-00000-of-00001.parquet")
    )
    card = "---\nlicense: mit\nconfigs:\n- config_name: main\n  data_files:\n"
    card += "  - split: train\n    path: main/train-*\n  - split: test\n    path: main/test-*\n"
    card += "- config_name: socratic\n  data_files: socratic/*\n---\n# GSM8K\n"
    (tmp_path / "gsm8k" / "README.md").write_text(card)
    with pytest.raises(
        ValueError,
        match=r"gsm8k' is a dataset of 2 subsets \(main: main/train-\*, main/test-\*; socratic: "
        r"socratic/\*\).*give one subset's folder or a glob",
    ):
        read_prompts(str(gsm.parent), "question", "train", str(tmp_path))
    assert len(read_prompts(str(gsm.parent), "question", "test", str(tmp_path))) == 1  # main's alone
    assert len(read_prompts(str(gsm), "question", "train", str(tmp_path))) == 1
    assert len(read_prompts(str(gsm.parent / "*" / "train-*"), "question", "train", str(tmp_path))) == 2
    (tmp_path / "gsm8k" / "README.md").write_text(card.split("- config_name: socratic")[0] + "---\n")
    assert len(read_prompts(str(gsm.parent), "question", "train", str(tmp_path))) == 2
    # subsets named by data_dir alone, or by patterns with ** (which also match no folder, as in datasets)
    by_dir = "---\nconfigs:\n- config_name: main\n  data_dir: main\n"
    by_dir += "- config_name: socratic\n  data_dir: socratic\n"
    deep = "---\nconfigs:\n- config_name: main\n  data_files: main/**/*.parquet\n- config_name: socratic\n"
    deep += "  data_files: socratic/**/*.parquet\n"
    for text in (by_dir, deep):
        (tmp_path / "gsm8k" / "README.md").write_text("\ufeff" + text + "---\n")
        assert len(read_prompts(str(gsm.parent), "question", "test", str(tmp_path))) == 1  # main's alone
        with pytest.raises(ValueError, match="is a dataset of 2 subsets"):
            read_prompts(str(gsm.parent), "question", "train", str(tmp_path))
    # `*` stays within a folder, as datasets globs: data/*.jsonl is not data/v2/*.jsonl's subset
    nested = tmp_path / "nested"
    (nested / "data" / "v2").mkdir(parents=True)
    for name in ("data/train.jsonl", "data/v2/train.jsonl"):
        (nested / name).write_text('{"question": "w1"}\n')
    (nested / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files: ./data/*.jsonl\n- config_name: v2\n"
        "  data_files: data/v2/*.jsonl\n---\n"
    )
    with pytest.raises(ValueError, match="is a dataset of 2 subsets"):
        read_prompts(str(nested), "question", "train", str(tmp_path))
    assert len(read_prompts(str(nested / "data" / "v2"), "question", "train", str(tmp_path))) == 1
    (tmp_path / "gsm8k" / "README.md").write_text("---\nconfigs: [1, 2]\n---\n")  # a card not read: warned
    with caplog.at_level(logging.WARNING, logger="copg_jax.data.formats"):
        assert len(read_prompts(str(gsm.parent), "question", "train", str(tmp_path))) == 2
    assert "a `configs` entry of a shape not read" in caplog.text
    # without a card to read, sibling folders of one split are warned of (they may be a dataset's subsets)
    assert "split 'train' is read from 2 folders together (main, socratic)" in caplog.text
    # files not named by split are all read
    plain = tmp_path / "shards"
    plain.mkdir()
    for i in range(2):
        write_jsonl(kway_rows(2, seed=10 + i), str(plain / f"part-{i}.jsonl"))
    assert len(tokenize_dataset(_cfg(plain, tmp_path), tok)) == 4


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


def test_a_path_with_brackets_is_that_file_not_a_glob(tok, tmp_path):
    literal, sibling = {**GOOD, "rewards": [1.0, 2.0]}, {**GOOD, "rewards": [5.0, -5.0]}
    write_jsonl([literal], str(tmp_path / "scores[1].jsonl"))
    write_jsonl([sibling] * 3, str(tmp_path / "scores1.jsonl"))  # what the glob scores[1].jsonl matches
    data = tokenize_dataset(_cfg(tmp_path / "scores[1].jsonl", tmp_path), tok)
    assert data.sources == [str(tmp_path / "scores[1].jsonl")] and data.rows["rewards"][:] == [[1.0, 2.0]]
    row = {"prompt": "w1", "chosen": "w2", "rejected": "w3"}
    write_jsonl([row], str(tmp_path / "run[v2].jsonl"))
    datasets.Dataset.from_list([row]).to_parquet(str(tmp_path / "run[v2].parquet"))
    datasets.Dataset.from_list([row]).to_csv(str(tmp_path / "run[v2].csv"), index=False)
    for ext in ("jsonl", "parquet", "csv"):  # no file matches the glob run[v2]: the name is the file's own
        path = str(tmp_path / f"run[v2].{ext}")
        assert load_sources(path, "train", str(tmp_path / "c"))[0].rows.to_list() == [row]
    globbed = tokenize_dataset(_cfg(tmp_path / "scores*.jsonl", tmp_path), tok)  # a glob is still a glob
    assert len(globbed.sources) == 2 and len(globbed) == 4


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
        (  # half of a UTF-16 pair (a JavaScript slice through an emoji): not text
            b'{"prompt": "w1", "completions": ["w3 \\ud83d", "w4"], "rewards": [1, 2]}',
            "bad_unicode",
            r"lone UTF-16 surrogate \\ud83d",
        ),
        (
            b'{"prompt": "w1", "prompt": "w2", "completions": ["w3", "w4"], "rewards": [1, 2]}',
            "duplicate_key",
            "key 'prompt' appears twice in one object",
        ),
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


def test_a_json_file_is_parsed_once_and_again_when_its_content_changes(tmp_path, monkeypatch):
    path = _lines(tmp_path / "rows.jsonl", [json.dumps(GOOD).encode(), b"{oops"])
    [first] = load_sources(str(path), "train", str(tmp_path / "c"), "skip")
    assert first.rows.to_list() == [GOOD] and [(e.line_no, e.reason) for e in first.skipped] == [
        (2, "bad_json")
    ]
    with monkeypatch.context() as m:  # the second read comes from the cache, bad lines and all
        m.setattr(formats, "parse_lines", lambda *a: pytest.fail("parsed again"))
        [again] = load_sources(str(path), "train", str(tmp_path / "c"), "skip")
        assert again.rows.to_list() == [GOOD] and [str(e) for e in again.skipped] == [str(first.skipped[0])]
        with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
            load_sources(str(path), "train", str(tmp_path / "c"), "error")
    edited = {**GOOD, "prompt": "w9 w8"}  # as many bytes as before: only the content tells them apart
    _lines(path, [json.dumps(edited).encode(), b"{oops"])
    assert load_sources(str(path), "train", str(tmp_path / "c"), "skip")[0].rows.to_list() == [edited]


def test_bad_lines_in_later_chunks_are_named_and_counted_as_in_one(tmp_path, monkeypatch):
    """Read two lines a chunk, bad lines (and blank ones) in any chunk keep their file line numbers; with
    on_bad_row=error the first raises before anything is kept in the cache."""
    monkeypatch.setattr(formats, "JSON_CHUNK_LINES", 2)
    good = [json.dumps({**GOOD, "prompt": f"w{i}"}).encode() for i in range(1, 6)]
    path = _lines(
        tmp_path / "rows.jsonl", [good[0], good[1], b"", good[2], b"{oops", good[3], b"[1]", good[4]]
    )
    [source] = load_sources(str(path), "train", str(tmp_path / "c"), "skip")
    assert [row["prompt"] for row in source.rows] == ["w1", "w2", "w3", "w4", "w5"]
    assert [(e.line_no, e.reason) for e in source.skipped] == [(5, "bad_json"), (7, "not_object")]
    with pytest.raises(ValueError, match=rf"^could not read data file '{path}': {path}:5: not valid JSON"):
        load_sources(str(path), "train", str(tmp_path / "fresh"), "error")
    assert not list((tmp_path / "fresh").rglob("*.arrow"))


def test_a_one_line_file_with_a_duplicate_key_is_named_not_read_by_columns(tok, tmp_path):
    """pandas, the fallback of the `datasets` reader, read such a line as columns: one row became several."""
    columns = {
        "prompt": ["w1", "w2"],
        "completions": [["w3", "w4"], ["w5", "w6"]],
        "rewards": [[1, 0], [0, 1]],
    }
    path = _lines(tmp_path / "one.jsonl", [(json.dumps(columns)[:-1] + ', "x": 1, "x": 2}').encode()])
    with pytest.raises(ValueError, match=rf"{path}:1: key 'x' appears twice in one object"):
        tokenize_dataset(_cfg(path, tmp_path), tok)


def test_csv_text_cells_are_read_as_written(tok, tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(
        "prompt,completion_a,reward_a,completion_b,reward_b\n"
        "w1 w2,NA,1.0,None,0\n"
        "007,42,1,17,0.5\n"
        "w3,w4,NA,w5,0\n"
    )
    [source] = load_sources(str(path), "train", str(tmp_path / "c"))
    got = source.rows.to_list()
    assert [(r["prompt"], r["completion_a"], r["completion_b"]) for r in got] == [
        ("w1 w2", "NA", "None"),
        ("007", "42", "17"),
        ("w3", "w4", "w5"),
    ]
    assert [r["reward_a"] for r in got] == [1.0, 1.0, None]  # a number column's "NA" is missing
    assert [r["reward_b"] for r in got] == [0.0, 0.5, 0.0]
    data = tokenize_dataset(_cfg(path, tmp_path, on_bad_row="skip"), tok)
    assert len(data) == 2 and data.report.skipped == {"missing_field": 1}
    # renamed text columns (data.prompt_col, ...) are text too, through the data pipeline
    renamed = tmp_path / "renamed.csv"
    renamed.write_text("question,a,reward_a,b,reward_b\n007,NA,1.0,None,0\n")
    cfg = _cfg(renamed, tmp_path, prompt_col="question", completion_a_col="a", completion_b_col="b")
    (row,) = tokenize_dataset(cfg, tok).rows
    assert row["prompt_ids"] == tok("007")["input_ids"]
    assert [c[:-1] for c in row["completion_ids"]] == [tok("NA", add_special_tokens=False)["input_ids"],
        tok("None", add_special_tokens=False)["input_ids"]]  # fmt: skip


def test_distinct_prompts_skip_and_count_like_the_data_pipeline(tmp_path, caplog):
    path = _lines(
        tmp_path / "prompts.jsonl",
        [
            json.dumps({**GOOD, "prompt": "w1"}).encode(),
            b"{not json",
            json.dumps({**GOOD, "prompt": "w2", "rewards": [None, 0]}).encode(),  # row 1
            json.dumps({**GOOD, "prompt": "w3", "completions": ["w3"], "rewards": [1]}).encode(),  # row 2
            json.dumps({**GOOD, "prompt": "w1"}).encode(),  # a repeat: not a skip
            json.dumps({**GOOD, "prompt": "w4"}).encode(),
        ],
    )
    cfg = _cfg(path, tmp_path, on_bad_row="skip")
    with caplog.at_level("WARNING", logger="copg_jax.data.formats"):
        rows = distinct_prompts(cfg, str(path), "train")
    assert [r["prompt"] for r in rows] == ["w1", "w4"]
    assert caplog.messages == [
        f"prompts {path}: 2 distinct prompts from 6 rows; skipped 3 rows: bad_json: 1 (e.g. {path} line 2); "
        f"missing_field: 1 (e.g. {path} row 1); too_few_completions: 1 (e.g. {path} row 2)"
    ]
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON"):
        distinct_prompts(_cfg(path, tmp_path), str(path), "train")
    path.write_text("\n".join(path.read_text().splitlines()[2:]) + "\n")  # without the line not JSON
    with pytest.raises(ValueError, match=rf"^{path} row 0: field 'rewards\[0\]': missing \(null\) reward"):
        distinct_prompts(_cfg(path, tmp_path), str(path), "train")


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
    assert max(longest) <= (8 + 8) * MAX_CHARS_PER_TOKEN  # a completion is tokenised after its (cut) prompt
    ids = tok.convert_tokens_to_ids
    # the same cut as without the pre-cut: BOS, then the prompt's end
    assert data.rows[0]["prompt_ids"] == [tok.bos_token_id, *ids(["w1"] * 5 + ["w2", "w3"])]
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


def test_a_key_given_twice_in_a_config_is_named_not_replaced(tmp_path):
    """YAML lets the last of two equal keys win: a second `train:` block would silently replace the first."""
    text = (REPO / "configs" / "tiny_cpu.yaml").read_text()
    config = tmp_path / "twice.yaml"
    config.write_text(text + "\ntrain:\n  steps: 7\n")
    first = 1 + text.splitlines().index("train:")
    with pytest.raises(
        ConfigError, match=rf"twice.yaml.*key 'train' given twice in one mapping \(lines {first} and"
    ):
        load_config(config)
    with pytest.raises(ConfigError, match=r"key 'lr' given twice in one mapping \(lines 1 and 1\)"):
        load_config(REPO / "configs" / "tiny_cpu.yaml", ["optim={lr: 1.0, lr: 2.0}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.buckets=[1, 2", "override data.buckets is not valid YAML at line 1, column"),
        ("train.output_dir=runs/a #1", "'#1' is a YAML comment that would cut the value to 'runs/a'; quote"),
        ("optim.lr=" + "1" * 400, "optim.lr: expected a finite number, got 1111"),
        ("model.tokenizer=!!python/object/apply:os.system [echo hi]", "tags are not allowed"),
        ("model.config=!!binary aGk=", "tags are not allowed"),
        ("model.config={a: &x 1, b: *x}", "aliases are not allowed"),
        ("model.config=" + "[" * 40 + "]" * 40, "nested more than 32 levels deep"),
        ("model.tokenizer=" + "x" * 20_000_000, "override model.tokenizer: a value of 20000000 characters"),
        ("optim.lr=" + "'" + "x" * 4000 + "'", "optim.lr: expected a number, got 'xxxxx"),
        ("train.seed=" + str(2**64), "train.seed: must be in [0, 2^32)"),  # jax.random's OverflowError
        ("train.seed=" + str(2**32), "train.seed: must be in [0, 2^32)"),  # jax.random.key(0)'s draws
        ("rollout.seed=-1", "rollout.seed: must be in [0, 2^32)"),  # numpy's 'expected non-negative integer'
        ("eval_generation.seed=" + str(2**70), "eval_generation.seed: must be in [0, 2^32)"),  # OverflowError
        ("data.seed=-1", "data.seed=-1 must be in [0, 2^63)"),  # numpy's 'expected non-negative integer'
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


# ------------------------------------------------------------------------------------- found by fuzzing


def test_broken_gzip_files_and_a_missing_split_are_one_line_naming_the_file(tmp_path):
    good = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in kway_rows(40, seed=1)))
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "plain.jsonl.gz").write_text(json.dumps(GOOD) + "\n")
    for name, reason in (
        ("cut.jsonl.gz", "EOFError: Compressed file ended"),
        ("plain.jsonl.gz", "Not a gzipped"),
    ):
        with pytest.raises(ValueError, match=f"could not read data file '.*{name}': .*{reason}"):
            load_sources(str(tmp_path / name), "train")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"has splits \['train'\], not 'validation' \(data.split"):
        load_sources(str(tmp_path / "dd"), "validation")


def test_csv_files_the_reader_refuses_say_why_and_a_repeated_column_is_refused(tmp_path):
    bad = tmp_path / "extra.csv"
    bad.write_text("prompt,chosen,rejected\nw1,w2,w3\nw1,w2,w3,w4\n")
    with pytest.raises(
        ValueError, match=r"could not read data file '.*extra.csv': .*Expected 3 fields in line 3"
    ):
        load_sources(str(bad), "train", cache_dir=str(tmp_path / "c"))
    twice = tmp_path / "twice.csv"  # pandas would read the second reward_b as "reward_b.1", left unread
    twice.write_text("prompt,completion_a,reward_a,completion_b,reward_b,reward_b\nw1,w2,1,w3,0,5\n")
    with pytest.raises(
        ValueError, match=r"column\(s\) \['reward_b'\] appear more than once in the CSV header"
    ):
        load_sources(str(twice), "train", cache_dir=str(tmp_path / "c"))


def test_a_prompt_of_whitespace_is_an_empty_prompt(tok, tmp_path):
    path = _lines(
        tmp_path / "d.jsonl", [json.dumps(GOOD).encode(), json.dumps({**GOOD, "prompt": "   "}).encode()]
    )
    with pytest.raises(ValueError, match=r"row 1: field 'prompt': prompt of whitespace only"):
        tokenize_dataset(_cfg(path, tmp_path), tok)  # it trained as the BOS token alone


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.config.hidden_size=-5", "llama: sizes must be >= 1, got hidden_size=-5"),
        ("model.config.vocab_size=10", "reach 206, past the model's vocab_size 10: the tokenizer"),
        ("checkpoint.dir=NOTADIR", "checkpoint folder '.*NOTADIR' is a file, not a folder"),
    ],
)
def test_sizes_a_tokenizer_past_the_vocabulary_and_a_checkpoint_file_are_one_line(
    tmp_path, capsys, monkeypatch, override, message
):
    """A negative size failed by traceback in JAX; a tokenizer past the model's vocabulary as a non-finite
    loss blamed on the first batch; a checkpoint "folder" that is a file hung the process after its error."""
    monkeypatch.chdir(REPO)
    (tmp_path / "NOTADIR").write_text("a file")
    override = override.replace("NOTADIR", str(tmp_path / "NOTADIR"))
    argv = [
        "train",
        "--config",
        str(REPO / "configs" / "tiny_cpu.yaml"),
        f"train.output_dir={tmp_path}/run",
        "data.eval_path=",
        f"data.ref_cache={tmp_path}/ref.parquet",
        "checkpoint.async_save=false",
        override,
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, err[-1]), err[-5:]


def test_an_integer_past_64_bits_is_its_float_not_a_failed_file(tok, tmp_path):
    """Arrow holds no such integer, and the Json column's decoder refused it: one value failed the whole file,
    naming neither row nor field. It reads as its float (a reward that large is a bad row of its own: past
    1e12, or inf past float64's range)."""
    rows = [GOOD, {**GOOD, "id": 2**64}, {**GOOD, "rewards": [10**29, 1]}, {**GOOD, "rewards": [10**400, 1]}]
    path = _lines(tmp_path / "d.jsonl", [json.dumps(r).encode() for r in rows])
    data = tokenize_dataset(_cfg(path, tmp_path, on_bad_row="skip"), tok)
    assert data.report.skipped == {"reward_out_of_range": 1, "non_finite_reward": 1}
    assert [r["rewards"] for r in data.rows] == [[1.0, 2.0], [1.0, 2.0]]


def test_one_cell_that_is_no_number_is_one_bad_row_of_a_csv_file(tok, tmp_path):
    """pandas types a CSV column as a whole: one cell that is no number made every reward of the column a
    string, every row a bad row (under skip: no valid rows). Such columns are read cell by cell."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "prompt,completion_a,reward_a,completion_b,reward_b\nw1,w2,1,w3,0\nw1,w4,0.5,w5,-1\nw1,w6,oops,w7,2\n"
    )
    data = tokenize_dataset(_cfg(pairs, tmp_path, on_bad_row="skip"), tok)
    assert data.report.skipped == {"wrong_type": 1} and [r["rewards"] for r in data.rows] == [
        [1, 0],
        [0.5, -1],
    ]
    with pytest.raises(ValueError, match=r"row 2: field 'reward_a': expected a number, got str 'oops'"):
        tokenize_dataset(_cfg(pairs, tmp_path), tok)
    labels = tmp_path / "labels.csv"
    labels.write_text("prompt,completion,label\nw1,w2,true\nw1,w3,FALSE\nw1,w4,yes\n")
    data = tokenize_dataset(_cfg(labels, tmp_path, on_bad_row="skip"), tok)
    assert data.report.skipped == {"wrong_type": 1} and len(data) == 1
    assert sorted(data.rows[0]["rewards"]) == [-0.25, 0.25]


def test_shapes_hub_files_come_in_are_read_as_written(tok, tmp_path):
    """JSON lines named .json (SHP's hub files), a Parquet decimal reward column, and a config naming one
    column for both sides of a pair."""
    rows = kway_rows(3, seed=4)
    named_json = tmp_path / "train.json"
    named_json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tokenize_dataset(_cfg(named_json, tmp_path), tok)
    assert len(data) == 3
    for got, row in zip(data.rows["rewards"], rows, strict=True):  # K varies by row
        np.testing.assert_allclose(got, row["rewards"], rtol=1e-6)
    blank_first = tmp_path / "blank_first.json"
    blank_first.write_text("\n\n" + named_json.read_text())
    assert len(tokenize_dataset(_cfg(blank_first, tmp_path), tok)) == 3
    with_bad_line = tmp_path / "bad_line.json"  # read line by line, as a .jsonl file: one line skipped
    with_bad_line.write_bytes(named_json.read_bytes() + b'{"prompt": "\xff"}\n')
    data = tokenize_dataset(_cfg(with_bad_line, tmp_path, on_bad_row="skip"), tok)
    assert len(data) == 3 and data.report.skipped == {"bad_encoding": 1}
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "w1"},\n{"prompt": "w2"}] x\n')
    with pytest.raises(ValueError, match=r"broken.json:2: not valid JSON: Extra data"):
        tokenize_dataset(_cfg(broken, tmp_path), tok)
    table = pa.table(
        {
            "prompt": ["w1 w2", "w3"],
            "completion_a": ["w4", "w5"],
            "completion_b": ["w6", "w7"],
            "reward_a": pa.array([decimal.Decimal("1.25"), decimal.Decimal("-2.5")], pa.decimal128(5, 2)),
            "reward_b": pa.array([decimal.Decimal("0.5"), decimal.Decimal("3")], pa.decimal128(5, 2)),
        }
    )
    pq.write_table(table, tmp_path / "decimal.parquet")
    data = tokenize_dataset(_cfg(tmp_path / "decimal.parquet", tmp_path), tok)
    assert data.rows["rewards"] == [[1.25, 0.5], [-2.5, 3.0]]
    for first, second in (("reward_a_col", "reward_b_col"), ("chosen_col", "rejected_col")):
        with pytest.raises(ValueError, match=rf"data.{first} and data.{second} name the same column 'x'"):
            DataConfig(**{first: "x", second: "x"})


def test_hub_datasets_take_a_subset_folder_and_revision(tmp_path, monkeypatch):
    """GSM8K needs its subset ("main"), hh-rlhf a folder of its repository: hf://datasets/ORG/NAME?name=...
    passes them to datasets.load_dataset (no download here: its call is recorded)."""
    calls = []

    def hub(path, split, cache_dir=None, **options):  # datasets.load_dataset(path, name=None, ...)
        calls.append((path, split, options))
        return datasets.Dataset.from_list([{"question": "w1", "answer": "4"}])

    monkeypatch.setattr(formats.datasets, "load_dataset", hub)
    sources = load_sources("hf://datasets/openai/gsm8k?name=main&revision=e53f048", "test")
    assert calls == [("openai/gsm8k", "test", {"name": "main", "revision": "e53f048"})]
    assert sources[0].name == "openai/gsm8k[name=main][revision=e53f048][test]"
    prompts = read_prompts("hf://datasets/Anthropic/hh-rlhf?data_dir=helpful-base", "question")
    assert calls[-1] == ("Anthropic/hh-rlhf", "train", {"data_dir": "helpful-base"}) and len(prompts) == 1
    for bad in ("?config=main", "?name=", "?name=a&name=b"):
        with pytest.raises(
            ValueError, match=r"is not one of name, data_dir, revision, given once with a value"
        ):
            load_sources(f"hf://datasets/openai/gsm8k{bad}", "train")
