"""Formats, validation, tokenisation and truncation of scored-completion datasets (tiny tokenizer)."""

import json
import math

import datasets
import numpy as np
import pytest

from copg_jax.data.config import DataConfig
from copg_jax.data.formats import detect_format
from copg_jax.data.testing import kway_rows, make_tiny_tokenizer, write_jsonl
from copg_jax.data.tokenize import tokenize_dataset


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


def word_ids(tok, text):
    """Independent reference: the vocabulary lookup of whitespace-separated words."""
    return tok.convert_tokens_to_ids(text.split())


def write(rows, path):
    if str(path).endswith(".parquet"):
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        write_jsonl(rows, str(path))
    return str(path)


def cfg_for(path, tmp_path, **kw):
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def to_kway(row, fmt):
    if fmt == "pairwise":
        return row["prompt"], [row["completion_a"], row["completion_b"]], [row["reward_a"], row["reward_b"]]
    if fmt == "preference":
        return row["prompt"], [row["chosen"], row["rejected"]], [0.25, -0.25]  # the paper's (Property 3)
    return row["prompt"], row["completions"], row["rewards"]


def make_rows(fmt, n=6):
    rows = kway_rows(n, seed=3)
    if fmt == "pairwise":
        return [
            {
                "prompt": r["prompt"],
                "completion_a": r["completions"][0],
                "reward_a": r["rewards"][0],
                "completion_b": r["completions"][1],
                "reward_b": r["rewards"][1],
            }
            for r in rows
        ]
    if fmt == "preference":
        return [
            {"prompt": r["prompt"], "chosen": r["completions"][0], "rejected": r["completions"][1]}
            for r in rows
        ]
    return rows


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
@pytest.mark.parametrize("fmt", ["kway", "pairwise", "preference"])
def test_formats_round_trip(tok, tmp_path, fmt, ext):
    rows = make_rows(fmt)
    path = write(rows, tmp_path / f"d.{ext}")
    data = tokenize_dataset(cfg_for(path, tmp_path), tok)
    assert len(data) == len(rows) and data.report.rows_kept == len(rows) and not data.report.skipped
    assert data.num_completions == max(len(to_kway(r, fmt)[1]) for r in rows)
    for i, row in enumerate(rows):
        prompt, completions, rewards = to_kway(row, fmt)
        got = data.rows[i]
        assert got["source"] == path and got["source_row"] == i
        assert got["prompt_ids"] == [tok.bos_token_id] + word_ids(tok, prompt)
        assert got["completion_ids"] == [word_ids(tok, c) + [tok.eos_token_id] for c in completions]
        np.testing.assert_allclose(got["rewards"], rewards, rtol=1e-6)
        assert got["completion_lengths"] == [len(c) for c in got["completion_ids"]]


def test_preference_rewards_are_configurable_and_ordered(tok, tmp_path):
    path = write(make_rows("preference", 2), tmp_path / "p.jsonl")
    data = tokenize_dataset(cfg_for(path, tmp_path, preference_rewards=(1.0, 0.0)), tok)
    assert data.rows["rewards"] == [[1.0, 0.0], [1.0, 0.0]]
    with pytest.raises(ValueError, match=r"data.preference_rewards=\(0.0, 0.5\): the chosen reward must"):
        DataConfig(preference_rewards=(0.0, 0.5))


def test_folder_glob_and_save_to_disk(tok, tmp_path):
    rows = kway_rows(8, seed=1)
    (tmp_path / "folder").mkdir()
    write(rows[:5], tmp_path / "folder" / "a.jsonl")
    write(rows[5:], tmp_path / "folder" / "b.parquet")
    from_folder = tokenize_dataset(cfg_for(tmp_path / "folder", tmp_path), tok)
    assert len(from_folder) == 8 and from_folder.sources[1].endswith("b.parquet")
    assert from_folder.rows[6]["source_row"] == 1
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "arrow"))
    from_arrow = tokenize_dataset(cfg_for(tmp_path / "arrow", tmp_path), tok)
    assert from_arrow.rows["prompt_ids"] == from_folder.rows["prompt_ids"]
    glob = tokenize_dataset(cfg_for(tmp_path / "folder" / "*.jsonl", tmp_path), tok)
    assert len(glob) == 5
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        tokenize_dataset(cfg_for(tmp_path / "missing.jsonl", tmp_path), tok)


def test_chat_prompts(tok, tmp_path):
    rows = [
        {
            "prompt": [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2 w3"}],
            "completions": [
                [{"role": "assistant", "content": "w4"}],
                {"role": "assistant", "content": "w5 w6"},
            ],
            "rewards": [1.0, 0.0],
        }
    ]
    data = tokenize_dataset(cfg_for(write(rows, tmp_path / "c.jsonl"), tmp_path), tok)
    expected = tok.convert_tokens_to_ids("<|system|> w1 <|user|> w2 w3 <|assistant|>".split())
    assert data.rows[0]["prompt_ids"] == expected  # the template's text only: no BOS added on top
    assert data.rows[0]["completion_ids"] == [word_ids(tok, "w4") + [3], word_ids(tok, "w5 w6") + [3]]
    plain = tokenize_dataset(
        cfg_for(write(kway_rows(2), tmp_path / "p.jsonl"), tmp_path, chat_template=True), tok
    )
    prompt = kway_rows(2)[0]["prompt"]
    assert plain.rows[0]["prompt_ids"] == tok.convert_tokens_to_ids(
        f"<|user|> {prompt} <|assistant|>".split()
    )


def test_detect_format():
    cfg = DataConfig()
    assert detect_format(["prompt", "completions", "rewards"], cfg) == "kway"
    assert detect_format(["messages", "chosen", "rejected"], cfg) == "preference"
    with pytest.raises(ValueError, match="ambiguous.*x.jsonl"):
        detect_format(["prompt", "completions", "rewards", "chosen", "rejected"], cfg, "x.jsonl")
    with pytest.raises(ValueError, match="cannot detect"):
        detect_format(["prompt", "text"], cfg)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['reward_b'\]"):
        detect_format(["prompt", "completion_a", "completion_b", "reward_a"], DataConfig(format="pairwise"))
    renamed = DataConfig(prompt_col="q", completions_col="ys", rewards_col="rs")
    assert detect_format(["q", "ys", "rs"], renamed) == "kway"


GOOD = {"prompt": "w1 w2", "completions": ["w3", "w4"], "rewards": [1.0, 2.0]}
BAD_ROWS = [  # (row, reason, text the error must contain)
    ({**GOOD, "prompt": None}, "missing_field", "field 'prompt': missing"),
    (
        {**GOOD, "rewards": [1.0, float("nan")]},
        "non_finite_reward",
        "field 'rewards[1]': non-finite reward nan",
    ),
    (
        {**GOOD, "rewards": [float("inf"), 1.0]},
        "non_finite_reward",
        "field 'rewards[0]': non-finite reward inf",
    ),
    (  # float32 would hold it as inf
        {**GOOD, "rewards": [1e39, 1.0]},
        "reward_out_of_range",
        "field 'rewards[0]': reward 1e+39 is beyond ±1e12",
    ),
    (  # finite in float32, but its squared differences overflow the loss
        {**GOOD, "rewards": [1.0, -1e20]},
        "reward_out_of_range",
        "field 'rewards[1]': reward -1e+20 is beyond ±1e12: CoPG squares reward differences in float32",
    ),
    ({**GOOD, "completions": ["w3"], "rewards": [1.0]}, "too_few_completions", "1 completion(s); need >= 2"),
    ({**GOOD, "completions": ["w3", ""]}, "empty_completion", "field 'completions[1]': empty completion"),
    ({**GOOD, "rewards": [1.0, 2.0, 3.0]}, "length_mismatch", "3 rewards for 2 completions"),
    ({**GOOD, "completions": ["w3", "   "]}, "empty_completion_tokens", "no tokens after tokenisation"),
]


@pytest.mark.parametrize("bad, reason, text", BAD_ROWS, ids=[b[1] + str(i) for i, b in enumerate(BAD_ROWS)])
def test_bad_row_errors_name_file_row_field(tok, tmp_path, bad, reason, text):
    path = write([GOOD, GOOD, bad, GOOD], tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="1 invalid row") as err:
        tokenize_dataset(cfg_for(path, tmp_path), tok)
    assert f"{path} row 2: " in str(err.value) and text in str(err.value)
    data = tokenize_dataset(cfg_for(path, tmp_path, on_bad_row="skip"), tok)
    assert len(data) == 3 and data.report.skipped == {reason: 1}
    assert data.report.skipped_examples == {reason: [f"{path} row 2"]}
    assert reason in data.report.summary() and data.rows["source_row"] == [0, 1, 3]


def test_wrong_types_in_jsonl(tok, tmp_path):
    rows = [GOOD, {**GOOD, "rewards": ["high", 1.0]}, {**GOOD, "completions": "w3"}, {**GOOD, "prompt": 7}]
    path = write(rows, tmp_path / "types.jsonl")
    with pytest.raises(ValueError, match="3 invalid row") as err:
        tokenize_dataset(cfg_for(path, tmp_path), tok)
    assert f"{path} row 1: field 'rewards[0]': expected a number, got str" in str(err.value)
    assert f"{path} row 2: field 'completions': expected a list, got str" in str(err.value)
    assert f"{path} row 3: field 'prompt': expected a string or a non-empty message list" in str(err.value)
    data = tokenize_dataset(cfg_for(path, tmp_path, on_bad_row="skip"), tok)
    assert data.report.skipped == {"wrong_type": 3} and len(data) == 1


def test_too_many_completions(tok, tmp_path):
    path = write([GOOD, {**GOOD, "completions": ["w1"] * 3, "rewards": [0.0] * 3}], tmp_path / "k.jsonl")
    with pytest.raises(
        ValueError, match="row 1: field 'completions': 3 completions > data.max_completions=2"
    ):
        tokenize_dataset(cfg_for(path, tmp_path, max_completions=2), tok)


def test_truncation_counted_and_sides(tok, tmp_path):
    rows = [
        {"prompt": "w1 w2 w3 w4 w5", "completions": ["w6 w7 w8 w9", "w10"], "rewards": [0.0, 1.0]},
        {"prompt": "w1", "completions": ["w6 w7", "w10 [EOS]"], "rewards": [0.0, 1.0]},
    ]
    path = write(rows, tmp_path / "t.jsonl")
    data = tokenize_dataset(cfg_for(path, tmp_path, max_prompt_length=3, max_completion_length=3), tok)
    assert data.report.prompts_truncated == 1 and data.report.completions_truncated == 1
    # left side cut: w1 w2 w3 dropped, BOS kept first (a model reads a prompt without it as another text)
    assert data.rows[0]["prompt_ids"] == [tok.bos_token_id] + word_ids(tok, "w4 w5")
    assert data.rows[0]["completion_ids"] == [word_ids(tok, "w6 w7 w8"), word_ids(tok, "w10") + [3]]
    assert data.rows[1]["completion_ids"][1] == word_ids(tok, "w10") + [3]  # EOS already there: not doubled
    right = tokenize_dataset(
        cfg_for(path, tmp_path, max_prompt_length=3, prompt_side="right", completion_side="left"), tok
    )
    assert right.rows[0]["prompt_ids"] == [tok.bos_token_id] + word_ids(tok, "w1 w2")
    with pytest.raises(ValueError, match="row 0: field 'completion 0': 5 tokens > max_completion_length=3"):
        tokenize_dataset(
            cfg_for(path, tmp_path, max_prompt_length=8, max_completion_length=3, truncation="error"), tok
        )
    with pytest.raises(ValueError, match="row 0: field 'prompt': 6 tokens > max_prompt_length=3"):
        tokenize_dataset(cfg_for(path, tmp_path, max_prompt_length=3, truncation="error"), tok)


def test_no_eos(tok, tmp_path):
    path = write([GOOD], tmp_path / "e.jsonl")
    data = tokenize_dataset(cfg_for(path, tmp_path, add_eos=False), tok)
    assert data.rows[0]["completion_ids"] == [word_ids(tok, "w3"), word_ids(tok, "w4")]


def test_config_validation():
    with pytest.raises(ValueError, match="data.layout='pad'"):
        DataConfig(layout="pad")
    with pytest.raises(ValueError, match="largest bucket"):
        DataConfig(buckets=(64, 128), max_prompt_length=100, max_completion_length=100)
    with pytest.raises(ValueError, match="max_completions"):
        DataConfig(max_completions=1)
    assert DataConfig(buckets=[512, 1024, 256]).buckets == (256, 512, 1024)


def test_example_file_is_valid(tok, tmp_path):
    from pathlib import Path

    path = Path(__file__).parent / "data" / "kway_example.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 10 and all(len(r["completions"]) == len(r["rewards"]) >= 2 for r in rows)
    assert all(math.isfinite(x) for r in rows for x in r["rewards"])
    data = tokenize_dataset(cfg_for(path, tmp_path), tok)
    assert len(data) == 10 and not data.report.skipped


def test_unreadable_jsonl_names_file_and_line(tok, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + '\n{"prompt": "w1", oops\n')
    with pytest.raises(ValueError, match=f"{path}:3: not valid JSON"):
        tokenize_dataset(cfg_for(path, tmp_path), tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"data file '{empty}' is empty"):
        tokenize_dataset(cfg_for(empty, tmp_path), tok)


def test_rows_cached_under_older_checks_are_checked_again(tok, tmp_path, monkeypatch):
    """A check added to the loader (rewards past 1e12) must reach data tokenised or grouped before it: the
    datasets cache of tokenised rows is keyed by VALIDATION_RULES, the grouped rows' by GROUPING_VERSION, and
    rows from either cache made under the older checks loaded rewards of 1e20 the new check refuses."""
    from copg_jax.data import formats
    from copg_jax.data import tokenize as tokenize_module

    kway = write([GOOD, {**GOOD, "rewards": [5.0, 1.0]}], tmp_path / "k.jsonl")
    scored = write(
        [{"prompt": "w1", "completion": c, "reward": r} for c, r in (("w2", 1.0), ("w3", 5.0), ("w4", 0.0))],
        tmp_path / "s.jsonl",
    )
    for path in (kway, scored):  # tokenised and grouped under the old checks
        tokenize_dataset(cfg_for(path, tmp_path, on_bad_row="skip"), tok)
    monkeypatch.setattr(formats, "REWARD_MAX", 4.0)  # a check that refuses rows read before
    monkeypatch.setattr(tokenize_module, "VALIDATION_RULES", tokenize_module.VALIDATION_RULES + 1)
    monkeypatch.setattr(formats, "GROUPING_VERSION", formats.GROUPING_VERSION + 1)
    for path in (kway, scored):
        data = tokenize_dataset(cfg_for(path, tmp_path, on_bad_row="skip"), tok)
        assert data.report.skipped == {"reward_out_of_range": 1}, path
