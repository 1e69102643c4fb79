"""Data shapes users arrive with (README's format table gives TRL's names): implicit-prompt preference rows,
text and conversational; conversations that repeat the prompt's turns; scored pairs (UltraFeedback-binarized);
K-way rows of chat completions. Token ids are checked against hand-written ones of the tiny word-level
tokenizer and its chat template, the implicit prompt against TRL's own `extract_prompt`, and every bad variant
by its one-line error naming file, row and field."""

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from trl.data_utils import extract_prompt, maybe_extract_prompt

from copg_jax.data import formats
from copg_jax.data.config import DataConfig
from copg_jax.data.formats import BadRow, detect_format, distinct_prompts, load_sources, normalize_row
from copg_jax.data.testing import make_tiny_tokenizer, write_jsonl
from copg_jax.data.tokenize import tokenize_dataset
from copg_jax.generate import tokenize_prompts
from copg_jax.jsonl import parse_lines
from copg_jax.run_config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


def ids(tok, tokens: str) -> list[int]:
    """Independent reference: the vocabulary lookup of whitespace-separated tokens."""
    return tok.convert_tokens_to_ids(tokens.split())


def load(tok, tmp_path, rows, ext="parquet", **settings):
    path = str(tmp_path / f"rows.{ext}")
    if ext == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(path)
    else:
        write_jsonl(rows, path)
    return path, tokenize_dataset(DataConfig(path=path, cache_dir=str(tmp_path / "cache"), **settings), tok)


def fixed_preference_rewards() -> list[float]:
    """The rewards the preference format gives (chosen, rejected): whatever explicit-prompt rows get."""
    return normalize_row({"prompt": "p", "chosen": "c", "rejected": "r"}, "preference", DataConfig())[
        "rewards"
    ]


def assert_rows(tok, data, expected):
    """expected: per row (prompt tokens, [completion tokens], rewards); EOS ends every completion."""
    assert len(data) == len(expected) and not data.report.skipped
    for got, (prompt, completions, rewards) in zip(data.rows, expected, strict=True):
        assert got["prompt_ids"] == ids(tok, prompt)
        assert got["completion_ids"] == [ids(tok, c) + [tok.eos_token_id] for c in completions]
        np.testing.assert_allclose(got["rewards"], rewards, rtol=1e-7)


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_implicit_prompt_text_rows_split_at_a_word_start(tok, tmp_path, ext):
    rows = [
        {"chosen": "w1 w2 w3 w4", "rejected": "w1 w2 w5"},  # they part at a word start: TRL's cut
        {"chosen": "w1\nw2 w13 w7", "rejected": "w1\nw2 w14"},  # inside a word ("w1" + "3" / "4"): moved back
        {"chosen": "w9 w8 w7", "rejected": "w9 w8 w7 w6"},  # one is the other's beginning
    ]
    path, data = load(tok, tmp_path, rows, ext)
    assert detect_format(["chosen", "rejected"], DataConfig()) == "preference"
    fixed = fixed_preference_rewards()
    assert_rows(
        tok,
        data,
        [
            ("[BOS] w1 w2", ["w3 w4", "w5"], fixed),
            ("[BOS] w1 w2", ["w13 w7", "w14"], fixed),
            ("[BOS] w9 w8", ["w7", "w7 w6"], fixed),
        ],
    )
    # the texts themselves: the space before the cut goes to the completions, as in TRL
    normal = normalize_row(rows[1], "preference", DataConfig())
    assert (normal["prompt"], normal["completions"]) == ("w1\nw2", [" w13 w7", " w14"])


def test_implicit_prompt_conversations_split_at_whole_turns(tok, tmp_path):
    rows = [
        {"chosen": [s("w1"), u("w2 w3"), a("w4")], "rejected": [s("w1"), u("w2 w3"), a("w5 w6")]},
        {"chosen": [u("w7"), a("w8"), u("w9"), a("w10")], "rejected": [u("w7"), a("w8"), u("w9"), a("w11")]},
    ]
    fixed = fixed_preference_rewards()
    assert_rows(
        tok,
        load(tok, tmp_path, rows)[1],
        [  # the chat template's rendering, written out: <|role|> content ... <|assistant|>
            ("<|system|> w1 <|user|> w2 w3 <|assistant|>", ["w4", "w5 w6"], fixed),
            ("<|user|> w7 <|assistant|> w8 <|user|> w9 <|assistant|>", ["w10", "w11"], fixed),
        ],
    )


def test_conversations_repeating_the_prompt_carry_it_once(tok, tmp_path):
    rows = [
        {"prompt": [u("w2 w3")], "chosen": [u("w2 w3"), a("w4")], "rejected": [u("w2 w3"), a("w5")]},
        {"prompt": [u("w2 w3")], "chosen": [a("w4")], "rejected": [u("w2 w3"), a("w5")]},  # one repeats it
    ]
    fixed = fixed_preference_rewards()
    assert_rows(
        tok, load(tok, tmp_path, rows)[1], [("<|user|> w2 w3 <|assistant|>", ["w4", "w5"], fixed)] * 2
    )
    # a text prompt beside conversations (UltraFeedback-binarized): the turns they share are the prompt
    text_prompt = [
        {"prompt": "w2 w3", "chosen": [u("w2 w3"), a("w4")], "rejected": [u("w2 w3"), a("w5")]},
        {
            "prompt": "w2 w3",
            "chosen": [s("w1"), u("w2 w3"), a("w4")],
            "rejected": [s("w1"), u("w2 w3"), a("w5")],
        },
    ]
    assert_rows(
        tok,
        load(tok, tmp_path / "text", text_prompt)[1],
        [
            ("<|user|> w2 w3 <|assistant|>", ["w4", "w5"], fixed),
            ("<|system|> w1 <|user|> w2 w3 <|assistant|>", ["w4", "w5"], fixed),
        ],
    )


def ultrafeedback_row(prompt, chosen, rejected, score_chosen, score_rejected):
    """A row shaped as HuggingFaceH4/ultrafeedback_binarized's (its columns, its repeated user turn)."""
    return {
        "prompt": prompt,
        "prompt_id": f"id-{prompt}",
        "chosen": [u(prompt), a(chosen)],
        "rejected": [u(prompt), a(rejected)],
        "messages": [u(prompt), a(chosen)],
        "score_chosen": score_chosen,
        "score_rejected": score_rejected,
    }


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_scored_pairs_keep_their_scores_as_rewards(tok, tmp_path, ext):
    rows = [
        ultrafeedback_row("w1 w2", "w3", "w4 w5", 8.5, 3.0),
        ultrafeedback_row("w6", "w7", "w8", 4.75, 4.75),
    ]
    path, data = load(tok, tmp_path, rows, ext)
    assert detect_format(list(rows[0]), DataConfig()) == "scored_preference"
    assert_rows(
        tok,
        data,
        [
            ("<|user|> w1 w2 <|assistant|>", ["w3", "w4 w5"], [8.5, 3.0]),
            ("<|user|> w6 <|assistant|>", ["w7", "w8"], [4.75, 4.75]),
        ],
    )
    # data.format=preference reads the same file with the fixed rewards instead
    fixed = tokenize_dataset(DataConfig(path=path, cache_dir=str(tmp_path / "c2"), format="preference"), tok)
    assert fixed.rows["completion_ids"] == data.rows["completion_ids"]
    np.testing.assert_allclose(fixed.rows["rewards"], [fixed_preference_rewards()] * 2)


def test_scored_pairs_without_prompt_and_with_renamed_score_columns(tok, tmp_path):
    rows = [  # trl-lib/ultrafeedback_binarized's shape: implicit prompt; score columns renamed
        {"chosen": [u("w1"), a("w2")], "rejected": [u("w1"), a("w3")], "rating_a": 2.0, "rating_b": -1.5},
    ]
    settings = {"score_chosen_col": "rating_a", "score_rejected_col": "rating_b"}
    assert detect_format(list(rows[0]), DataConfig(**settings)) == "scored_preference"
    assert detect_format(list(rows[0]), DataConfig()) == "preference"  # other score names: not score columns
    data = load(tok, tmp_path, rows, **settings)[1]
    assert_rows(tok, data, [("<|user|> w1 <|assistant|>", ["w2", "w3"], [2.0, -1.5])])
    assert data.settings["score_chosen_col"] == "rating_a"  # in the reference-cache fingerprint
    assert DataConfig(**settings).tokenization_settings() != DataConfig().tokenization_settings()


@pytest.mark.parametrize(
    "prompt, completions",
    [
        ([u("w1")], [[a("w2")], [a("w3 w4")], [a("w5")]]),  # assistant-message lists
        ([u("w1")], [a("w2"), a("w3 w4"), a("w5")]),  # {role, content} messages
        ([u("w1")], [[u("w1"), a("w2")], [u("w1"), a("w3 w4")], [u("w1"), a("w5")]]),  # repeating the prompt
        ("w1", [[u("w1"), a("w2")], [u("w1"), a("w3 w4")], [u("w1"), a("w5")]]),  # ... of text
    ],
    ids=["message_lists", "messages", "repeated_turns", "repeated_text"],
)
def test_kway_chat_completions(tok, tmp_path, prompt, completions):
    rows = [{"prompt": prompt, "completions": completions, "rewards": [1.0, -0.5, 0.25]}]
    data = load(tok, tmp_path, rows)[1]
    assert_rows(tok, data, [("<|user|> w1 <|assistant|>", ["w2", "w3 w4", "w5"], [1.0, -0.5, 0.25])])


def ultrafeedback_raw_row(instruction: str, responses: list[str], scores: list[float], mixed: bool) -> dict:
    """openbmb/UltraFeedback's raw shape: K scored completions per prompt as records, with per-aspect
    annotations whose ratings are strings (some "N/A"); `mixed`: a fine-grained score that is text in one
    record and a number in the others (JSON lines may mix types; Parquet cannot)."""
    return {
        "source": "evol_instruct",
        "instruction": instruction,
        "models": [f"model-{k}" for k in range(len(responses))],
        "completions": [
            {
                "model": f"model-{k}",
                "response": text,
                "overall_score": score,
                "fine-grained_score": score / 2 if k or not mixed else "N/A",
                "annotations": {"helpfulness": {"Rating": "N/A" if k else "4", "Rationale": "..."}},
            }
            for k, (text, score) in enumerate(zip(responses, scores, strict=True))
        ],
    }


UF_KEYS = dict(
    prompt_col="instruction", completion_text_key="response", completion_reward_key="overall_score"
)


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_kway_completions_as_records_ultrafeedback_raw(tok, tmp_path, ext):
    """K = 4 logged, scored completions per prompt (what CoPG learns from in one step), read from the
    completions' records; a text prompt with data.chat_template as for any K-way row."""
    mixed = ext == "jsonl"
    rows = [
        ultrafeedback_raw_row("w1 w2", ["w3", "w4 w5", "w6", "w7 w8 w9"], [7.5, 3.0, 9.0, 1.5], mixed),
        ultrafeedback_raw_row("w10", ["w11", "w12", "w13"], [4.0, 4.0, 6.5], mixed),
    ]
    path, data = load(tok, tmp_path, rows, ext, chat_template=True, **UF_KEYS)
    assert detect_format(list(rows[0]), DataConfig(**UF_KEYS)) == "kway"
    assert_rows(
        tok,
        data,
        [
            ("<|user|> w1 w2 <|assistant|>", ["w3", "w4 w5", "w6", "w7 w8 w9"], [7.5, 3.0, 9.0, 1.5]),
            ("<|user|> w10 <|assistant|>", ["w11", "w12", "w13"], [4.0, 4.0, 6.5]),
        ],
    )
    assert data.settings["completion_text_key"] == "response"  # in the reference-cache fingerprint


def test_kway_records_with_ranks_nectar(tok, tmp_path):
    """berkeley-nest/Nectar's shape: answers ranked 1 (best) to K; negate_rewards trains on -rank (CoPG's
    loss sees reward differences only, so any shift of the ranks is the same)."""

    def answer(text, rank):
        return {"answer": text, "model": "m", "rank": rank}

    rows = [
        {"prompt": "w1", "answers": [answer("w2", 2.0), answer("w3", 1.0)]},
        {"prompt": "w4", "answers": [answer("w5", 1), answer("w6", 3), answer("w7", 2)]},
    ]
    keys = dict(completions_col="answers", completion_text_key="answer", completion_reward_key="rank")
    data = load(tok, tmp_path, rows, negate_rewards=True, **keys)[1]
    want = [("[BOS] w1", ["w2", "w3"], [-2.0, -1.0]), ("[BOS] w4", ["w5", "w6", "w7"], [-1, -3, -2])]
    assert_rows(tok, data, want)
    # ranks read as scores trained the worst answer as the best: refused unless negate_rewards is given
    with pytest.raises(ValueError, match="data.completion_reward_key='rank' reads ranks, which are lower-is"):
        DataConfig(**keys)
    assert DataConfig(**keys, negate_rewards=False).negate_rewards is False


def test_hh_conversation_prompts_are_read_as_turns_or_refused_under_a_chat_template(tok, tmp_path):
    """Nectar's prompts are Anthropic HH conversations ("\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2
    \n\nAssistant:"): under a chat template they were rendered as one user turn holding every turn and a
    second assistant cue. data.turn_marker=hh reads them as chat turns; unset, they are refused under a
    template (a base model reads them as the text they are)."""
    hh = "\n\nHuman: w1\n\nAssistant: w2 w3\n\nHuman: w4\n\nAssistant:"
    rows = [
        {"prompt": hh, "answers": [{"answer": "w5", "rank": 1}, {"answer": "w6", "rank": 2}]},
        {
            "prompt": "\n\nHuman: w7\n\nAssistant:",
            "answers": [{"answer": "w8", "rank": 2}, {"answer": "w9", "rank": 1}],
        },
    ]
    keys = dict(completions_col="answers", completion_text_key="answer", completion_reward_key="rank")
    keys |= dict(negate_rewards=True, chat_template=True)
    with pytest.raises(
        ValueError, match=r"2 of the first 2 prompts \('prompt'\) are conversations in Anthropic HH"
    ):
        load(tok, tmp_path, rows, "jsonl", **keys)
    _, data = load(tok, tmp_path, rows, "jsonl", turn_marker="hh", **keys)
    assert data.rows["prompt_ids"] == [
        ids(tok, "<|user|> w1 <|assistant|> w2 w3 <|user|> w4 <|assistant|>"),
        ids(tok, "<|user|> w7 <|assistant|>"),
    ]
    assert formats.prompt_to_sample({"prompt": hh}, DataConfig(turn_marker="hh"), "prompt") == [
        u("w1"), a("w2 w3"), u("w4")
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"the marked turns are \['user', 'user'\]: expected"):
        formats.prompt_to_sample(
            {"prompt": "\n\nHuman: w1\n\nHuman: w2"}, DataConfig(turn_marker="hh"), "prompt"
        )


def test_negate_rewards_flips_every_read_reward_but_not_the_preference_rewards():
    cfg = DataConfig(negate_rewards=True)
    kway = {"prompt": "p", "completions": ["a", "b"], "rewards": [1.0, 3.0]}
    assert normalize_row(kway, "kway", cfg)["rewards"] == [-1.0, -3.0]
    scored = {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 2.0, "score_rejected": 5.0}
    assert normalize_row(scored, "scored_preference", cfg)["rewards"] == [-2.0, -5.0]
    pair = {"prompt": "p", "completion_a": "a", "completion_b": "b", "reward_a": 0.5, "reward_b": -1}
    assert normalize_row(pair, "pairwise", cfg)["rewards"] == [-0.5, 1.0]
    one = {"prompt": "p", "completion": "a", "reward": 2.5}
    assert formats.normalize_single(one, "scored", cfg)["reward"] == -2.5
    preference = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert normalize_row(preference, "preference", cfg)["rewards"] == fixed_preference_rewards()


@pytest.mark.parametrize(
    "completions, field, reason",
    [
        (["w3", {"response": "w4", "overall_score": 1.0}], "completions[0]", "wrong_type"),
        ([{"response": "w3"}, {"response": "w4", "overall_score": 1.0}], "completions[0].overall_score",
         "missing_field"),
        ([{"overall_score": 2.0}, {"response": "w4", "overall_score": 1.0}], "completions[0].response",
         "missing_field"),
        ([{"response": "w3", "overall_score": "N/A"}, {"response": "w4", "overall_score": 1}],
         "completions[0].overall_score", "wrong_type"),
        ([{"response": "w3", "overall_score": 2.0}], "completions", "too_few_completions"),
    ],
)  # fmt: skip
def test_bad_completion_records_are_named(completions, field, reason):
    with pytest.raises(BadRow) as err:
        normalize_row({"instruction": "w1", "completions": completions}, "kway", DataConfig(**UF_KEYS))
    assert (err.value.reason, err.value.field) == (reason, field)


def test_a_reward_key_that_is_a_path_is_named_absent():
    """UltraFeedback's per-aspect ratings sit at annotations.helpfulness.Rating: read as a key, every row was
    a "missing (null) reward"; the record has no such key, and a dotted path is not followed."""
    record = {"response": "w3", "annotations": {"helpfulness": {"Rating": "5"}}}
    cfg = DataConfig(**{**UF_KEYS, "completion_reward_key": "annotations.helpfulness.Rating"})
    with pytest.raises(
        BadRow, match=r"the record has no key 'annotations.helpfulness.Rating' \(its keys: 're"
    ):
        normalize_row({"instruction": "w1", "completions": [record, record]}, "kway", cfg)


def test_text_beside_chat_rows_in_one_file_stays_as_written(tok, tmp_path):
    """A column holding text in some rows and messages in others: text that is also valid JSON ('"w7"',
    'true', '42') is text, not decoded (the `datasets` JSON reader made '"w7"' w7 and 'true' a boolean)."""
    rows = [
        {"prompt": '"w7"', "completions": ['"w5"', "true"], "rewards": [1.0, 0.0]},
        {"prompt": [u("w1")], "completions": [a("w5"), a("w6")], "rewards": [0.0, 1.0]},
        {"prompt": "42", "completions": ["w5 w6", "null"], "rewards": [0.5, 0.25]},
    ]
    path, data = load(tok, tmp_path, rows, ext="jsonl")
    assert load_sources(path, "train", str(tmp_path / "cache"))[0].rows.to_list() == rows
    assert_rows(  # none of '"w7"', 'true', '42', 'null' is a word of the vocabulary
        tok,
        data,
        [
            ("[BOS] [UNK]", ["[UNK]", "[UNK]"], [1.0, 0.0]),
            ("<|user|> w1 <|assistant|>", ["w5", "w6"], [0.0, 1.0]),
            ("[BOS] [UNK]", ["w5 w6", "[UNK]"], [0.5, 0.25]),
        ],
    )


def test_a_column_that_changes_type_in_a_late_chunk_reads_as_the_whole_file(tmp_path, monkeypatch):
    """JSON lines are read two lines a chunk here: columns whose kind changes only in the third or fourth
    chunk (text prompts, then chat; ints, then a float and an int beyond a float's exact range; objects whose
    fields vary) hold what the whole-file reader holds, every value read back as written."""
    rows = [
        {"prompt": "w1 w2", "completions": ["w3", '"w5"'], "rewards": [1, 0], "meta": {"source": "a"},
            "lengths": [1, 2]},
        {"prompt": "w2", "completions": ["w4", "w5"], "rewards": [0.5, 0.25],
            "meta": {"source": "b", "turn": 2}, "lengths": [3]},
        {"prompt": "w3", "completions": ["w6", "w7"], "rewards": [0, 1], "meta": None, "lengths": []},
        {"prompt": "w4", "completions": ["w6", "w7"], "rewards": [1, 2], "meta": {"turn": 3, "tags": ["x"]},
            "lengths": [4]},
        {"prompt": '"w7"', "completions": ["true", "42"], "rewards": [0, 1], "meta": {"source": "c"},
            "lengths": [2**53 + 1, 0.5]},
        {"prompt": [u("w1")], "completions": [a("w5"), a("w6")], "rewards": [1.0, 0.0], "meta": {"tags": []},
            "lengths": [5]},
        {"prompt": "42", "completions": [[u("w1"), a("w2")], [u("w1"), a("w3")]], "rewards": [0, 1],
            "meta": None, "lengths": [6]},
    ]  # fmt: skip
    path = str(tmp_path / "rows.jsonl")
    write_jsonl(rows, path)
    chunks = []
    monkeypatch.setattr(formats, "JSON_CHUNK_LINES", 2)
    monkeypatch.setattr(
        formats, "parse_lines", lambda lines, *a: chunks.append(len(lines)) or parse_lines(lines, *a)
    )
    [source] = load_sources(path, "train", str(tmp_path / "cache"))
    # the types, then the rows; 2**53 + 1 beside 0.5 in the 3rd chunk makes "lengths" Json: written again
    assert chunks == [2, 2, 2, 1] + [2, 2, 2] + [2, 2, 2, 1]
    with pa.ipc.open_stream(source.rows.cache_files[0]["filename"]) as stored:
        assert [batch.num_rows for batch in stored] == [2, 2, 2, 1]
    whole = formats._rows_table(rows)
    assert source.rows.data.table.equals(whole) and source.rows.data.schema == whole.schema
    json_columns = [field.name for field in whole.schema if isinstance(field.type, pa.JsonType)]
    assert json_columns == ["prompt", "completions", "lengths"]
    assert whole.schema.field("meta").type == pa.struct(
        [("source", pa.string()), ("turn", pa.int64()), ("tags", pa.list_(pa.string()))]
    )
    got = source.rows.to_list()
    for name in ("prompt", "completions", "rewards", "lengths"):
        assert [row[name] for row in got] == [row[name] for row in rows]
    assert [type(v) for v in got[4]["lengths"]] == [int, float] and got[0]["lengths"] == [1, 2]
    fields = ("source", "turn", "tags")
    assert [row["meta"] for row in got] == [
        m and {f: m.get(f) for f in fields} for m in (r["meta"] for r in rows)
    ]


# JSON scalars that pyarrow types in every way: ints beyond int64 and a float's exact range, strings that are
# JSON, booleans beside numbers
JSON_SCALARS = [None, True, 7, -(2**63), 2**53 + 1, 2**63, 1.5, '"w7"']
JSON_SHAPES = st.recursive(
    st.none(),
    lambda inner: st.lists(inner, min_size=1, max_size=2) | st.dictionaries(st.sampled_from("abc"), inner),
    max_leaves=4,
)


def like(draw, shape, leaves: list):
    """A value of `shape` (lists and objects around leaves): shorter lists, fewer keys, each leaf one of
    `leaves` -- rows of one column alike, as real data is, so that their types merge rather than clash."""
    if isinstance(shape, list):
        return [like(draw, item, leaves) for item in shape[: draw(st.integers(0, len(shape)))]]
    if isinstance(shape, dict):
        keys = draw(st.lists(st.sampled_from(sorted(shape)), unique=True)) if shape else []
        return {key: like(draw, shape[key], leaves) for key in keys}
    return draw(st.sampled_from(leaves))


@st.composite
def json_rows(draw) -> list[dict]:
    """Rows of columns p, q, r: each of one shape, its leaves of a few kinds, now and then any value."""
    shapes = {name: (draw(JSON_SHAPES), draw(st.lists(st.sampled_from(JSON_SCALARS), min_size=1, max_size=3)))
        for name in "pqr"}  # fmt: skip
    odd = st.sampled_from(JSON_SCALARS) | JSON_SHAPES
    return [
        {name: draw(odd) if draw(st.integers(0, 9)) == 0 else like(draw, *shapes[name])
            for name in draw(st.lists(st.sampled_from("pqr"), unique=True))}
        for _ in range(draw(st.integers(1, 10)))
    ]  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(rows=json_rows(), chunk=st.integers(1, 3))
@example(rows=[{"p": [True]}, {"p": [1.5]}], chunk=1)  # booleans in a list beside floats: Json
@example(rows=[{"p": [1.5]}, {"p": [True]}], chunk=1)  # a float first: Json too (pyarrow's floats take True)
@example(rows=[{"p": True}, {"p": 1.5}], chunk=1)  # a boolean first: booleans, and 1.5 is not one
@example(rows=[{"p": 1}, {"p": 1.5}], chunk=1)  # ints, then a float: floats
@example(rows=[{"p": {"a": 1}}, {"p": None}, {"p": {"b": "x", "a": 1.5}}], chunk=1)  # fields united
@example(rows=[{"p": [1]}, {"p": [2**53 + 1, 0.5]}], chunk=1)  # no exact float: Json, written again
@example(rows=[{"p": "a"}, {"p": [1]}, {"q": 2**63}], chunk=1)  # text, then a list; beyond int64
def test_json_lines_read_a_chunk_at_a_time_are_typed_as_the_whole_file(rows, chunk):
    """The chunked reader's column types follow pyarrow's inference over all rows at once (`_rows_table`)."""
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as m:
        m.setattr(formats, "JSON_CHUNK_LINES", chunk)
        path = os.path.join(folder, "rows.jsonl")
        write_jsonl(rows, path)
        types, count = formats._json_lines_types(formats._json_line_chunks(path, None))
        formats._write_json_lines(path, types, Path(folder) / "rows.arrow")
        with pa.ipc.open_stream(os.path.join(folder, "rows.arrow")) as stored:
            got = stored.read_all()
    whole = formats._rows_table(rows)
    assert count == len(rows) and got.schema == whole.schema
    assert got.to_pylist() == whole.to_pylist() if whole.num_columns else got.num_columns == 0


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("first", [True, False], ids=["bool_first", "float_first"])
def test_a_boolean_among_numbers_is_never_read_as_a_number(tok, tmp_path, monkeypatch, suffix, first):
    """pyarrow reads a column of floats with a later true as 1.0, and refuses a true before a float: the
    same boolean reward was refused or trained as 1.0 by the rows around it. It is refused either way."""
    monkeypatch.setattr(formats, "JSON_CHUNK_LINES", 1)  # JSON lines: the type is settled in the first chunk
    good, bad = (
        {"prompt": "w1", "completions": ["w2", "w3"], "rewards": rewards}
        for rewards in ([1.5, 0.0], [True, 0.0])
    )
    rows = [bad, good] if first else [good, bad]
    path = str(tmp_path / f"rows{suffix}")
    if suffix == ".json":
        Path(path).write_text(json.dumps(rows))
    else:
        write_jsonl(rows, path)
    where = f"row {rows.index(bad)}: field 'rewards[0]': expected a number, got bool"
    with pytest.raises(ValueError, match=re.escape(where)):
        tokenize_dataset(DataConfig(path=path, cache_dir=str(tmp_path / "cache")), tok)


def test_detection_of_the_new_shapes():
    cfg = DataConfig()
    assert detect_format(["chosen", "rejected", "score_chosen", "score_rejected"], cfg) == "scored_preference"
    with pytest.raises(ValueError, match=r"cannot detect.*\[prompt\]: optional"):
        detect_format(["completions", "rewards"], cfg)  # K-way rows need their prompt
    with pytest.raises(ValueError, match=r"missing column\(s\) \['score_rejected'\]"):
        detect_format(
            ["prompt", "chosen", "rejected", "score_chosen"], DataConfig(format="scored_preference")
        )
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt \(or messages\)'\]"):
        detect_format(["completions", "rewards"], DataConfig(format="kway"))
    pairs = ["completion_a", "completion_b", "reward_a", "reward_b"]  # the prompt they share (Chatbot Arena)
    assert detect_format(pairs, DataConfig(format="pairwise")) == detect_format(pairs, cfg) == "pairwise"
    scored_kway = ["prompt", "chosen", "rejected", "score_chosen", "score_rejected", "completions", "rewards"]
    with pytest.raises(ValueError, match=r"match \['kway', 'scored_preference'\]"):  # neither holds the other
        detect_format(scored_kway, cfg)
    assert detect_format(scored_kway[1:], cfg) == "scored_preference"  # K-way rows need their prompt
    assert detect_format(["messages", "completion", "reward"], cfg) == "scored"
    with pytest.raises(ValueError, match="cannot detect"):  # one-completion rows need their prompt
        detect_format(["completion", "label"], cfg)


def test_auto_detection_refuses_to_leave_a_prompt_or_scores_unread():
    """Format auto would read these rows as preference with an implicit prompt, or with the fixed preference
    rewards, silently leaving their real prompt or scores unread: it refuses, naming the setting to give."""
    cfg = DataConfig()
    orca = ["system", "question", "chosen", "rejected"]  # Intel/orca_dpo_pairs
    with pytest.raises(
        ValueError, match=r"column 'question' looks like the prompt; set data.prompt_col=question"
    ):
        detect_format(orca, cfg)
    assert detect_format(orca, DataConfig(prompt_col="question")) == "preference"
    # a prompt column named but absent (a config reused from orca on tldr-preference) is never read as the
    # implicit prompt, which would be the summaries' first words and leave the post unread
    for fmt in ("auto", "preference"):
        with pytest.raises(ValueError, match=r"data.prompt_col='question': no such column.*'prompt'"):
            detect_format(["prompt", "chosen", "rejected"], DataConfig(prompt_col="question", format=fmt))
    assert (
        detect_format(orca, DataConfig(format="preference")) == "preference"
    )  # the implicit prompt, asked for
    rlhflow = ["chosen", "rejected", "chosen_score", "rejected_score"]
    with pytest.raises(
        ValueError, match=r"set data.score_chosen_col=chosen_score data.score_rejected_col=rejected_score"
    ):
        detect_format(rlhflow, cfg)
    with pytest.raises(ValueError, match=r"'chosen-rating' and 'rejected-rating' look like the scores"):
        detect_format(["prompt", "chosen", "rejected", "chosen-rating", "rejected-rating"], cfg)
    named = DataConfig(score_chosen_col="chosen_score", score_rejected_col="rejected_score")
    assert detect_format(rlhflow, named) == "scored_preference"
    assert detect_format(rlhflow, DataConfig(format="preference")) == "preference"
    assert detect_format(["chosen", "rejected", "chosen_model"], cfg) == "preference"  # not a score
    judged = ["prompt", "chosen", "rejected", "chosen_reward_model", "rejected_reward_model"]  # names a model
    assert detect_format(judged, cfg) == "preference"


def test_pairwise_rows_labelled_by_a_winner_column(tok, tmp_path, caplog):
    chosen, rejected = fixed_preference_rewards()
    pku = [  # PKU-SafeRLHF: better_response_id 0 / 1 picks response_0 / response_1
        {
            "prompt": "w1",
            "response_0": "w2",
            "response_1": "w3",
            "better_response_id": b,
            "safer_response_id": 0,
        }
        for b in (1, 0)
    ]
    settings = dict(
        completion_a_col="response_0", completion_b_col="response_1", winner_col="better_response_id"
    )
    # which value means which completion won is the dataset's: SHP's labels=1 is A, PKU's 1 is response_1,
    # so a winner column without winner_values is refused (a default trained SHP's preferences reversed)
    with pytest.raises(
        ValueError, match=r"set data.winner_values=\[A, B\] to the values meaning response_0 won"
    ):
        load(tok, tmp_path, pku, **settings)
    settings["winner_values"] = (0, 1)
    with caplog.at_level("INFO", logger="copg_jax.data.tokenize"):
        path, data = load(tok, tmp_path, pku, **settings)
    expected = [
        ("[BOS] w1", ["w2", "w3"], [rejected, chosen]),
        ("[BOS] w1", ["w2", "w3"], [chosen, rejected]),
    ]
    assert_rows(tok, data, expected)
    assert (
        f"data {path}: format pairwise (detected); prompt from column 'prompt'; rewards from "
        "data.preference_rewards by column 'better_response_id' (0: response_0 won, 1: response_1 won); "
        "columns not read: ['safer_response_id']"
    ) in caplog.messages
    shp = [
        {"history": "w1", "human_ref_A": "w2", "human_ref_B": "w3", "labels": x} for x in (1, 0)
    ]  # 1: A won
    shp_settings = dict(prompt_col="history", completion_a_col="human_ref_A", completion_b_col="human_ref_B")
    _, data = load(tok, tmp_path, shp, "jsonl", winner_col="labels", winner_values=(1, 0), **shp_settings)
    assert_rows(tok, data, expected[::-1])
    arena = [
        {"prompt": "w1", "completion_a": "w2", "completion_b": "w3", "winner": w}
        for w in ("model_b", "tie", "model_a", "tie (bothbad)")
    ]
    arena_settings = dict(winner_col="winner", winner_values=("model_a", "model_b"))
    with pytest.raises(
        ValueError,
        match=r"(?s)2 invalid row.*row 1: field 'winner': 'tie' is neither 'model_a' \(completion_a won\) "
        r"nor 'model_b' \(completion_b won\): no preference to train on",
    ):
        load(tok, tmp_path, arena, **arena_settings)
    _, data = load(tok, tmp_path, arena, on_bad_row="skip", **arena_settings)
    assert data.report.skipped == {"no_winner": 2} and [r["source_row"] for r in data.rows] == [0, 2]
    np.testing.assert_allclose([r["rewards"] for r in data.rows], [[rejected, chosen], [chosen, rejected]])


def test_a_system_column_is_the_prompts_first_turn(tok, tmp_path):
    """Intel/orca_dpo_pairs: system, question, chosen, rejected. The system text is a system turn before the
    question's user turn, rendered by the tokenizer's own chat template; an empty one adds no turn."""
    rows = [
        {"system": "w5 w6", "question": "w1", "chosen": "w2", "rejected": "w3"},
        {"system": "", "question": "w1", "chosen": "w2", "rejected": "w3"},
    ]
    _, data = load(tok, tmp_path, rows, "jsonl", prompt_col="question", system_col="system")
    turns = [[s("w5 w6"), u("w1")], [u("w1")]]
    for row, messages in zip(data.rows, turns, strict=True):
        want = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        assert row["prompt_ids"] == list(getattr(want, "input_ids", want))
    bad = [{**rows[0], "question": [s("w4"), u("w1")]}]
    with pytest.raises(ValueError, match="field 'system': the prompt already starts with a system turn"):
        load(tok, tmp_path, bad, "jsonl", prompt_col="question", system_col="system")
    with pytest.raises(
        ValueError, match=r"data.system_col='sytem': no such column"
    ):  # trained without, unsaid
        load(tok, tmp_path, rows, "jsonl", prompt_col="question", system_col="sytem")


def test_winner_values_compare_by_kind_and_kway_winners_are_indices():
    row = {"prompt": "p", "completion_a": "a", "completion_b": "b"}
    chosen, rejected = fixed_preference_rewards()
    labels = DataConfig(winner_col="w", winner_values=(True, False))
    assert normalize_row({**row, "w": False}, "pairwise", labels)["rewards"] == [rejected, chosen]
    indices = DataConfig(winner_col="w", winner_values=(0, 1))
    with pytest.raises(BadRow, match="True is neither 0"):  # the label true is not the index 1
        normalize_row({**row, "w": True}, "pairwise", indices)
    assert normalize_row({**row, "w": 1.0}, "pairwise", indices)["rewards"] == [
        rejected,
        chosen,
    ]
    kway = {"prompt": "p", "completions": ["a", "b", "c"], "choice": 2}  # summarize_from_feedback's choice
    cfg = DataConfig(winner_col="choice")
    assert detect_format(list(kway), cfg) == "kway"
    assert normalize_row(kway, "kway", cfg)["rewards"] == [rejected, rejected, chosen]
    floats = {**kway, "choice": 1.0}  # a float column's (pandas, a missing label beside)
    assert normalize_row(floats, "kway", cfg)["rewards"] == [rejected, chosen, rejected]
    with pytest.raises(BadRow, match="field 'choice': index 3 is not one of the row's 3 completions"):
        normalize_row({**kway, "choice": 3}, "kway", cfg)
    with pytest.raises(BadRow, match="field 'choice': expected the index of the preferred completion"):
        normalize_row({**kway, "choice": True}, "kway", cfg)
    with pytest.raises(ValueError, match="labels pairwise or kway rows; the rows are 'preference'"):
        detect_format(["prompt", "chosen", "rejected", "choice"], DataConfig(winner_col="choice"))
    with pytest.raises(ValueError, match="the values of A won and of B won must differ"):
        DataConfig(winner_col="w", winner_values=(1, 1.0))
    with pytest.raises(ValueError, match="the values of A won and of B won must differ"):
        DataConfig(winner_col="w", winner_values=([1, 2], [3, 2]))
    with pytest.raises(ValueError, match="winner_col and data.completion_reward_key both give the rewards"):
        DataConfig(winner_col="w", completion_reward_key="score")


def test_completions_that_repeat_their_prompt_are_reported(tok, tmp_path, caplog):
    """Texts decoded whole from generate() carry the prompt: it is trained again inside every completion,
    which the data report says (a completion may well start like its prompt: counted only when all do)."""
    rows = [
        {"prompt": "w1 w2", "completions": ["w1 w2 w3", "w1 w2 w4"], "rewards": [1.0, 0.0]},
        {"prompt": "w1 w2", "completions": ["w1 w2 w3", "w4"], "rewards": [1.0, 0.0]},
    ]
    with caplog.at_level("WARNING", logger="copg_jax.data.tokenize"):
        _, data = load(tok, tmp_path, rows)
    assert data.report.repeats_prompt == 1
    assert "1 rows' completions all begin with their prompt" in caplog.text


def test_one_completion_rows_of_a_prompt_become_one_kway_row(tok, tmp_path):
    """Logged scores, one completion per row (TRL's prompt-completion shape with a reward), prompts
    interleaved, text and chat: the rows of a prompt form one K-way row in file order, as the hand-grouped
    K-way file reads; groups come in the order of their first rows."""
    rows = [
        {"prompt": [u("w1")], "completion": [a("w2")], "reward": 1.0},
        {"prompt": "w5", "completion": "w6", "reward": 0.5},
        {"prompt": [u("w1")], "completion": [u("w1"), a("w3 w4")], "reward": -1.0},  # repeats the prompt
        {"prompt": "w5", "completion": "w7 w8", "reward": 2.0},
        {"prompt": [u("w1")], "completion": [a("w9")], "reward": 0.0},
    ]
    assert detect_format(list(rows[0]), DataConfig()) == "scored"
    data = load(tok, tmp_path, rows, "jsonl")[1]
    kway = [
        {"prompt": [u("w1")], "completions": ["w2", "w3 w4", "w9"], "rewards": [1.0, -1.0, 0.0]},
        {"prompt": "w5", "completions": ["w6", "w7 w8"], "rewards": [0.5, 2.0]},
    ]
    (tmp_path / "kway").mkdir()
    expected = load(tok, tmp_path / "kway", kway, "jsonl")[1]
    for field in ("prompt_ids", "completion_ids", "rewards"):
        assert data.rows[field] == expected.rows[field], field
    assert data.rows[0]["prompt_ids"] == ids(tok, "<|user|> w1 <|assistant|>")
    assert data.rows["source_row"] == [0, 1]  # a group is named by its first row
    assert (
        data.report.grouped_from == 5
        and "grouped by prompt from 5 one-completion rows" in data.report.summary()
    )
    prompts = formats.distinct_prompts(
        DataConfig(cache_dir=str(tmp_path / "c3")), str(tmp_path / "rows.jsonl"), ""
    )
    assert [r["prompt"] for r in prompts] == [[u("w1")], "w5"]


def test_groups_split_at_max_completions_and_bad_rows_are_named(tok, tmp_path):
    rows = [{"prompt": "w1", "completion": f"w{10 + i}", "reward": float(i)} for i in range(5)]
    rows += [{"prompt": "w2", "completion": "w3", "reward": 1.0}]  # the only completion of its prompt
    rows += [
        {"prompt": "w4", "completion": "w5", "reward": None},
        {"prompt": "w4", "completion": "w6", "reward": 0.0, "finished": False},  # cut where sampling stopped
        {"prompt": "w4", "completion": "w7", "reward": 1.0, "finished": True},
    ]
    data = load(tok, tmp_path, rows, "jsonl", max_completions=3, on_bad_row="skip")[1]
    # 5 completions of w1, at most 3 a group: groups of 3 and 2, in file order
    assert data.rows["rewards"] == [[0.0, 1.0, 2.0], [3.0, 4.0], [0.0, 1.0]]
    assert data.rows["source_row"] == [0, 3, 7]
    eos = tok.eos_token_id
    assert data.rows[1]["completion_ids"] == [ids(tok, "w13") + [eos], ids(tok, "w14") + [eos]]
    assert data.rows[2]["completion_ids"] == [ids(tok, "w6"), ids(tok, "w7") + [eos]]  # `finished` per row
    assert data.report.skipped == {"missing_field": 1, "too_few_completions": 1}
    assert data.report.skipped_examples["too_few_completions"] == [f"{tmp_path / 'rows.jsonl'} row 5"]
    (tmp_path / "strict").mkdir()
    with pytest.raises(ValueError, match=r"rows.jsonl row 5: field 'completion': the only completion of its"):
        load(tok, tmp_path / "strict", rows, "jsonl", max_completions=3)


@pytest.mark.parametrize("seed", range(4))
def test_group_plan_equals_grouping_the_rows_one_by_one(seed):
    """The numpy plan `group_rows` streams by (prompt keys only, in bounded memory) against the plain
    reading: a dict of each prompt's rows in file order, split at the cap, entries ordered by first row."""
    rng = np.random.default_rng(seed)
    n, cap = 200, int(rng.integers(0, 5))
    keys = np.asarray([b"k%d" % rng.integers(0, 30) for _ in range(n)], "S16")
    bad = rng.random(n) < 0.1
    members: dict[bytes, list[int]] = {}
    entries = [[i] for i in np.flatnonzero(bad)]
    for i in np.flatnonzero(~bad):
        members.setdefault(keys[i], []).append(int(i))
    for rows in members.values():
        count = -(-len(rows) // cap) if cap else 1
        size, extra = divmod(len(rows), count)
        for g in range(count):
            entries.append(rows[: size + (g < extra)])
            rows = rows[size + (g < extra) :]
    entries.sort(key=lambda e: e[0])
    stream, sizes = formats._group_plan(keys, bad, cap)
    assert sizes.tolist() == [len(e) for e in entries]
    assert stream.tolist() == [i for e in entries for i in e]


def test_grouped_rows_are_cached_by_content_and_settings(tmp_path):
    rows = datasets.Dataset.from_list(
        [{"prompt": "p", "completion": f"c{i}", "reward": float(i)} for i in range(5)]
    )
    cfg = DataConfig(cache_dir=str(tmp_path))
    first, again = (formats.group_rows(rows, "scored", cfg) for _ in range(2))
    assert first.cache_files == again.cache_files and len(first) == 1
    split = formats.group_rows(rows, "scored", DataConfig(cache_dir=str(tmp_path), max_completions=2))
    assert split.cache_files != first.cache_files and [len(r) for r in split["group_rows"]] == [2, 2, 1]
    # the one completion a split leaves alone says why: the prompt has 5, not one (the data looked corrupt)
    assert split["group_detail"][2].startswith(
        "the one completion data.max_completions=2 left alone splitting its prompt's 5 completions"
    )
    negated = formats.group_rows(rows, "scored", DataConfig(cache_dir=str(tmp_path), negate_rewards=True))
    assert negated["group_rewards"] == [[-0.0, -1.0, -2.0, -3.0, -4.0]]  # not the cached positive ones
    # rows that record how they were sampled are checked against data.chat_template as they are grouped: the
    # groups of a run with the template are not those of a run without it
    sampled = datasets.Dataset.from_list(
        [{"prompt": "p", "completion": f"c{i}", "reward": float(i), "chat_template": True} for i in range(2)]
    )
    templated = formats.group_rows(sampled, "scored", DataConfig(cache_dir=str(tmp_path), chat_template=True))
    assert templated["group_reason"] == [""]
    plain = formats.group_rows(sampled, "scored", DataConfig(cache_dir=str(tmp_path)))
    assert plain["group_reason"] == ["chat_template_mismatch"] * 2
    # every setting keys the cache but those grouping is known not to read
    keyed = [f.name for f in dataclasses.fields(DataConfig) if f.name not in formats.NOT_GROUPING]
    assert {"chat_template", "format", "completion_text_key", "completion_reward_key"} <= set(keyed)


def test_unpaired_preference_rows_take_the_preference_rewards_by_label(tok, tmp_path):
    """TRL's unpaired preference shape (KTO's data): desirable and undesirable completions of a prompt,
    grouped; a label true / false gets the chosen / rejected reward of data.preference_rewards."""
    rows = [
        {"prompt": [u("w1")], "completion": [a("w2")], "label": True},
        {"prompt": [u("w1")], "completion": [a("w3")], "label": False},
        {"prompt": [u("w1")], "completion": [a("w4")], "label": False},
    ]
    assert detect_format(list(rows[0]), DataConfig()) == "unpaired_preference"
    chosen, rejected = fixed_preference_rewards()
    assert_rows(
        tok,
        load(tok, tmp_path, rows)[1],
        [("<|user|> w1 <|assistant|>", ["w2", "w3", "w4"], [chosen, rejected, rejected])],
    )
    with pytest.raises(BadRow, match="field 'label': expected true or false, got 1"):
        formats.normalize_single({**rows[0], "label": 1}, "unpaired_preference", DataConfig())


TEXT = {"chosen": "w1 w2", "rejected": "w1 w3"}
CHAT = {"chosen": [u("w1"), a("w2")], "rejected": [u("w1"), a("w3")]}
SCORED = {"prompt": "w1", **CHAT, "score_chosen": 1.0, "score_rejected": 0.0}
KWAY = {"prompt": [u("w1")], "completions": [[a("w2")], [a("w3")]], "rewards": [1.0, 0.0]}
BAD = [  # (good row, bad row, reason, text of the error)
    (
        TEXT,
        {"chosen": "w1 w2", "rejected": "w3 w2"},
        "no_shared_prompt",
        "field 'chosen': shares no beginning",
    ),
    (TEXT, {"chosen": "w12 w2", "rejected": "w13 w2"}, "no_shared_prompt", "(a whole word at least)"),
    (
        TEXT,
        {"chosen": "w1 ", "rejected": "w1 w3"},  # a text that is the other's shared beginning
        "empty_completion",
        "field 'chosen': nothing left after",
    ),
    (
        CHAT,
        {"chosen": [u("w1"), a("w2")], "rejected": [u("w4"), a("w3")]},
        "no_shared_prompt",
        "field 'chosen': shares no first turn with 'rejected': nothing to use as the prompt",
    ),
    (
        CHAT,
        {"chosen": [u("w1"), a("w2"), u("w4"), a("w5")], "rejected": [u("w1"), a("w3")]},
        "not_assistant_turn",
        "field 'chosen': expected one assistant message after the prompt's turns, found roles "
        "['assistant', 'user', 'assistant']",
    ),
    (
        CHAT,
        {"chosen": [u("w1"), u("w2")], "rejected": [u("w1"), a("w3")]},
        "not_assistant_turn",
        "field 'chosen': expected one assistant message after the prompt's turns, found roles ['user']",
    ),
    (
        CHAT,
        {"chosen": [u("w1"), a("w2")], "rejected": [u("w1"), a("w2")]},
        "identical_completions",
        "field 'chosen': 'chosen' and 'rejected' are the same completion: no preference to train on",
    ),
    (TEXT, {"chosen": "w1 w2", "rejected": "w1 w2"}, "identical_completions", "are the same completion"),
    (  # a tool call or reasoning the template would render, which the text trained on would lack
        CHAT,
        {"chosen": [u("w1"), {**a(""), "tool_calls": [{"name": "f"}]}], "rejected": [u("w1"), a("w3")]},
        "unread_message_field",
        "field 'chosen': message 1 (assistant) sets 'tool_calls', which is not trained",
    ),
    (
        CHAT,
        {"chosen": [u("w1"), {**a("w2"), "reasoning_content": "w4"}], "rejected": [u("w1"), a("w3")]},
        "unread_message_field",
        "message 1 (assistant) sets 'reasoning_content'",
    ),
    (
        {"messages": [u("w1")], **CHAT},  # an SFT column of the whole chosen conversation, no prompt column
        {"messages": [u("w1"), a("w2")], **CHAT},
        "empty_completion",
        "field 'chosen': the conversation has nothing after the 2 turn(s) of the prompt ('messages')",
    ),
    (  # a column of the whole chosen conversation beside text answers: the answer would be in the prompt
        {"messages": [u("w1")], "chosen": "w2", "rejected": "w3"},
        {"messages": [u("w1"), a("w2")], "chosen": "w2", "rejected": "w3"},
        "prompt_ends_with_answer",
        "field 'messages': the prompt's last turn is the assistant's",
    ),
    (
        {"prompt": "w1", "chosen": "w2", "rejected": "w3"},
        {"prompt": "w1", "chosen": [a("w2")], "rejected": [a("w3")]},
        "text_prompt_chat_completion",
        "field 'prompt': a text prompt beside chat-message completions would be trained without the chat "
        "template; set data.chat_template=true",
    ),
    (
        {"prompt": [u("w1")], **CHAT},
        {"prompt": [u("w1")], "chosen": [u("w9"), a("w2")], "rejected": [u("w1"), a("w3")]},
        "not_assistant_turn",
        "field 'chosen': expected one assistant message after the prompt's turns, found roles "
        "['user', 'assistant']",
    ),
    (
        SCORED,
        {**SCORED, "prompt": "w7"},
        "prompt_mismatch",
        "field 'prompt': the text is none of the 1 turn(s) that 'chosen', 'rejected' start with",
    ),
    (
        SCORED,
        {**SCORED, "score_chosen": "high"},
        "wrong_type",
        "field 'score_chosen': expected a number, got str",
    ),
    (SCORED, {**SCORED, "score_rejected": float("nan")}, "non_finite_reward", "'score_rejected': non-finite"),
    (
        SCORED,
        {**SCORED, "score_chosen": None},
        "missing_field",
        "field 'score_chosen': missing (null) reward",
    ),
    (
        KWAY,
        {**KWAY, "completions": [[a("w2")], [a("w3")], [a("w4")]]},
        "length_mismatch",
        "field 'rewards': 2 rewards for 3 completions",
    ),
    (
        KWAY,
        {**KWAY, "completions": [[a("w2")], [u("w3")]]},
        "not_assistant_turn",
        "field 'completions[1]': expected one assistant message",
    ),
]


@pytest.mark.parametrize("good, bad, reason, text", BAD, ids=[f"{b[2]}{i}" for i, b in enumerate(BAD)])
def test_bad_shapes_name_file_row_and_field(tok, tmp_path, good, bad, reason, text):
    path = str(tmp_path / "bad.jsonl")
    write_jsonl([good, good, bad, good], path)
    with pytest.raises(ValueError, match="1 invalid row") as err:
        tokenize_dataset(DataConfig(path=path, cache_dir=str(tmp_path / "cache")), tok)
    assert f"{path} row 2: " in str(err.value) and text in str(err.value)
    data = tokenize_dataset(DataConfig(path=path, cache_dir=str(tmp_path / "cache"), on_bad_row="skip"), tok)
    assert data.report.skipped == {reason: 1} and data.rows["source_row"] == [0, 1, 3]


GEMMA_LIKE_TEMPLATE = (  # Gemma's templates refuse a system turn (and turns that do not alternate)
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_prompt_the_chat_template_refuses_is_a_bad_row_named_with_its_message(tmp_path):
    """Not a traceback from inside jinja: the row, the field and the template's own message; `copg generate`
    names the prompt."""
    tok = make_tiny_tokenizer(str(tmp_path / "tokenizer"))
    tok.chat_template = GEMMA_LIKE_TEMPLATE
    good = {"prompt": [u("w1")], "chosen": "w2", "rejected": "w3"}
    bad = {"prompt": [s("w9"), u("w1")], "chosen": "w2", "rejected": "w3"}
    path = str(tmp_path / "rows.jsonl")
    write_jsonl([good, bad, good], path)
    with pytest.raises(ValueError, match="1 invalid row") as err:
        tokenize_dataset(DataConfig(path=path, cache_dir=str(tmp_path / "cache")), tok)
    assert (
        f"{path} row 1: field 'prompt': the tokenizer's chat template refuses the prompt: System role not "
        "supported" in str(err.value)
    )
    cfg = DataConfig(path=path, cache_dir=str(tmp_path / "cache"), on_bad_row="skip")
    data = tokenize_dataset(cfg, tok)
    assert data.report.skipped == {"chat_template_refused": 1} and data.rows["source_row"] == [0, 2]
    assert data.rows["prompt_ids"][0] == ids(tok, "<|user|> w1 <|assistant|>")
    with pytest.raises(
        ValueError, match="prompt 1: the tokenizer's chat template refuses the prompt: System"
    ):
        tokenize_prompts(tok, [[u("w1")], [s("w9"), u("w1")]])


def test_text_mixed_with_messages_is_named():
    with pytest.raises(BadRow, match=r"text and chat messages mixed \(chosen: text, rejected: messages\)"):
        normalize_row({"chosen": "w1 w2", "rejected": [u("w1"), a("w2")]}, "preference", DataConfig())


def random_text_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """(chosen, rejected) texts that share a beginning of words and part somewhere after it: at a word start,
    or inside a word (w1 / w12 / w123 share letters), never one being the other's beginning."""
    rng = np.random.default_rng(seed)
    words = ["w1", "w12", "w123", "w2", "w21", "w3", "[EOS]"]

    def text(n):
        return "".join(str(rng.choice(words)) + str(rng.choice([" ", " ", "\n", "  "])) for _ in range(n))

    pairs = []
    while len(pairs) < count:
        prompt = text(int(rng.integers(1, 4)))
        chosen, rejected = (prompt + text(int(rng.integers(1, 3))).rstrip() for _ in range(2))
        if not (chosen.startswith(rejected) or rejected.startswith(chosen)):
            pairs.append((chosen, rejected))
    return pairs


def test_implicit_text_prompt_is_trls_extract_prompt_at_word_starts():
    """Where TRL's cut falls at a word boundary ours is TRL's; inside a word, ours is TRL's with the cut word
    handed back to the completions (and one space before it, TRL's own rule)."""
    exact = moved = 0
    for chosen, rejected in random_text_pairs(400):
        trl = extract_prompt({"chosen": chosen, "rejected": rejected})
        cut = trl["prompt"]
        inside_a_word = (
            cut and not cut[-1].isspace() and not (trl["chosen"][:1] + trl["rejected"][:1]).isspace()
        )
        if inside_a_word:
            cut = cut[: len(cut) - len(cut.split()[-1])]
            cut = cut[:-1] if cut.endswith(" ") else cut
        try:
            ours = normalize_row({"chosen": chosen, "rejected": rejected}, "preference", DataConfig())
        except BadRow as e:  # nothing left as a prompt once the word is handed back
            assert e.reason == "no_shared_prompt" and not cut.strip(), (chosen, rejected, cut)
            continue
        assert ours["prompt"] == cut and ours["completions"] == [chosen[len(cut) :], rejected[len(cut) :]]
        if inside_a_word:
            moved += 1
        else:
            exact += 1
            assert ours["completions"] == [trl["chosen"], trl["rejected"]]
    assert exact > 100 and moved > 50  # both cases were met


def test_implicit_conversation_prompt_is_trls_extract_prompt():
    rng = np.random.default_rng(1)
    for _ in range(100):
        shared = [s("w1")] if rng.random() < 0.3 else []
        for t in range(int(rng.integers(0, 3))):
            shared += [u(f"w{10 + t}"), a(f"w{20 + t}")]
        shared.append(u(f"w{int(rng.integers(30, 40))}"))
        chosen = shared + [a(f"w{int(rng.integers(40, 50))}")]
        rejected = shared + [a(f"w{int(rng.integers(50, 60))} w7")]
        trl = extract_prompt({"chosen": chosen, "rejected": rejected})
        ours = normalize_row({"chosen": chosen, "rejected": rejected}, "preference", DataConfig())
        assert ours["prompt"] == trl["prompt"] == shared
        assert ours["completions"] == [trl["chosen"][0]["content"], trl["rejected"][0]["content"]]
        # TRL with a text prompt beside the conversations (UltraFeedback) also takes the shared turns
        example = {"prompt": shared[-1]["content"], "chosen": chosen, "rejected": rejected}
        with_text = normalize_row(example, "preference", DataConfig())
        assert with_text["prompt"] == maybe_extract_prompt(example)["prompt"] == shared


def test_a_prompt_template_builds_the_prompt_of_nested_and_several_columns(tok, tmp_path, caplog):
    """openai/summarize_from_feedback's comparisons (the paper's TL;DR data): the post is nested in a record
    (info.title, info.post), the two summaries are records {text, policy} and `choice` is the preferred one's
    index. A template builds the prompt text from the record; a row lacking a field is a bad row naming it."""
    chosen, rejected = fixed_preference_rewards()
    rows = [
        {
            "info": {"id": f"t{i}", "title": title, "post": post, "subreddit": "w9"},
            "summaries": [{"text": "w5 w6", "policy": "sup"}, {"text": "w7", "policy": "ppo"}],
            "choice": choice,
            "worker": "x",
        }
        for i, (title, post, choice) in enumerate([("w1", "w2 w3", 1), ("w4", "w2", 0)])
    ]
    settings = dict(
        prompt_template="w8 {info.subreddit} w10 {info[title]} w11 {info.post} w12",
        completions_col="summaries",
        completion_text_key="text",
        winner_col="choice",
    )
    with caplog.at_level("INFO", logger="copg_jax.data.tokenize"):
        path, data = load(tok, tmp_path, rows, **settings)
    assert_rows(
        tok,
        data,
        [
            ("[BOS] w8 w9 w10 w1 w11 w2 w3 w12", ["w5 w6", "w7"], [rejected, chosen]),
            ("[BOS] w8 w9 w10 w4 w11 w2 w12", ["w5 w6", "w7"], [chosen, rejected]),
        ],
    )
    assert (
        f"data {path}: format kway (detected); prompt from data.prompt_template over column(s) ['info']; "
        "rewards from data.preference_rewards by column 'choice'; columns not read: ['worker']"
    ) in caplog.messages
    cfg = DataConfig(path=path, cache_dir=str(tmp_path / "cache"), **settings)
    prompts = [r["prompt"] for r in distinct_prompts(cfg, path, "train")]  # those of online rollouts
    assert prompts == ["w8 w9 w10 w1 w11 w2 w3 w12", "w8 w9 w10 w4 w11 w2 w12"]
    # a comparison of a summary with itself (the data repeats some): no preference, a bad row as pairs are
    same = {**rows[0], "summaries": [{"text": "w5 w6", "policy": "sup"}, {"text": "w5 w6", "policy": "ppo"}]}
    with pytest.raises(ValueError, match=r"completions 1 \(the winner\) and 0 are the same completion"):
        load(tok, tmp_path, [same, rows[1]], **settings)
    two_columns = [{"instruction": "w1", "input": "w2", "chosen": "w3", "rejected": "w4"}]  # alpaca's
    _, data = load(tok, tmp_path, two_columns, prompt_template="{instruction} w5 {input}")
    assert data.rows[0]["prompt_ids"] == ids(tok, "[BOS] w1 w5 w2")
    gone = [{**rows[0], "info": {"title": "w1", "subreddit": "w9"}}, {**rows[1], "info": None}]
    with pytest.raises(
        ValueError, match=r"(?s)row 0: field 'info.post': missing \(null\).*row 1: field 'info'"
    ):
        load(tok, tmp_path, gone, "jsonl", **settings)
    blank = [{**rows[0], "info": {**rows[0]["info"], "subreddit": " ", "title": ""}}]
    with pytest.raises(ValueError, match=r"field 'data.prompt_template': filled from the row, it is empty"):
        load(tok, tmp_path, blank, "jsonl", **{**settings, "prompt_template": "{info.title}{info.subreddit}"})
    listed = [{**rows[0], "info": {**rows[0]["info"], "post": ["w2"]}}]
    with pytest.raises(ValueError, match=r"field 'info.post': expected text or a number, got list"):
        load(tok, tmp_path, listed, "jsonl", **settings)
    with pytest.raises(ValueError, match=r"prompt_template reads column\(s\) \['info'\], which the rows"):
        load(tok, tmp_path, two_columns, **settings)
    for template, error in [
        ("{info!r}", r"field \{info!r\} is not \{column\}"),
        ("{info:>9}", r"field \{info:>9\} is not"),
        ("{}", r"field \{\} is not"),
        ("no fields", "names no column"),
        ("{info", "expected '}'"),
    ]:
        with pytest.raises(ValueError, match=error):
            DataConfig(prompt_template=template)
    with pytest.raises(ValueError, match=r"expected a string, got .*: quote the text"):  # unquoted YAML
        load_config(str(REPO / "configs" / "tiny_cpu.yaml"), ["data.prompt_template={info.post}"])
    with pytest.raises(ValueError, match="prompt_template and data.prompt_col both give the prompt"):
        DataConfig(prompt_template="{info.post}", prompt_col="question")
    # in the reference cache's fingerprint only when set: caches made without it stay valid
    assert "prompt_template" not in DataConfig().tokenization_settings()
    assert DataConfig(prompt_template="{a}").tokenization_settings()["prompt_template"] == "{a}"


def test_template_keys_left_unset_are_read_as_plain_messages():
    """A Parquet column of messages has every key on every message: a null tool_calls is no tool call."""
    row = {
        "chosen": [u("w1"), {**a("w2"), "tool_calls": None, "reasoning_content": ""}],
        "rejected": [u("w1"), a("w3")],
    }
    assert normalize_row(row, "preference", DataConfig())["completions"] == ["w2", "w3"]


def test_chatbot_arena_conversations_read_as_pairs_with_their_shared_turns_as_the_prompt(tok, tmp_path):
    """lmsys/chatbot_arena_conversations: two whole conversations and the winner's name. Their shared first
    turn is the prompt, each answer a completion; ties, and conversations whose user turns part ways, are bad
    rows (skipped and counted)."""
    chosen, rejected = fixed_preference_rewards()

    def row(winner, a_turns, b_turns):
        return {
            "question_id": "q",
            "model_a": "x",
            "model_b": "y",
            "winner": winner,
            "conversation_a": a_turns,
            "conversation_b": b_turns,
            "turn": 1,
        }

    rows = [
        row("model_b", [u("w1"), a("w2")], [u("w1"), a("w3 w4")]),
        row("tie", [u("w1"), a("w2")], [u("w1"), a("w3")]),
        row("model_a", [u("w5"), a("w6"), u("w7"), a("w8")], [u("w5"), a("w9"), u("w10"), a("w11")]),
        row("model_a", [u("w5"), a("w6")], [u("w5"), a("w9")]),
    ]
    settings = dict(
        completion_a_col="conversation_a",
        completion_b_col="conversation_b",
        winner_col="winner",
        winner_values=("model_a", "model_b"),
        on_bad_row="skip",
    )
    same = row("model_a", [u("w1"), a("w2")], [u("w1"), a("w2")])
    text = {**row("model_a", "w1 w2", "w1 w3"), "turn": 1}  # text pairs: the prompt is in a column of its own
    _, data = load(tok, tmp_path, [*rows, same, text], "jsonl", **settings)
    assert data.report.skipped == {
        "no_winner": 1,
        "not_assistant_turn": 1,
        "identical_completions": 1,
        "missing_field": 1,
    }
    assert data.rows["source_row"] == [0, 3]
    with pytest.raises(ValueError, match=r"field 'winner': expected a label of data.winner_values, got list"):
        load(
            tok,
            tmp_path,
            [{**rows[0], "winner": ["model_a"]}],
            "jsonl",
            **{**settings, "on_bad_row": "error"},
        )
    assert data.rows["prompt_ids"] == [
        ids(tok, "<|user|> w1 <|assistant|>"),
        ids(tok, "<|user|> w5 <|assistant|>"),
    ]
    assert data.rows["completion_ids"][0] == [
        ids(tok, "w2") + [tok.eos_token_id],
        ids(tok, "w3 w4") + [tok.eos_token_id],
    ]
    np.testing.assert_allclose(data.rows["rewards"], [[rejected, chosen], [chosen, rejected]])


def test_helpsteer3_signed_preferences_name_each_sides_values(tok, tmp_path):
    """nvidia/HelpSteer3 (preference): a multi-turn context, two responses and overall_preference from -3
    (response1 much better) to 3; 0 is a tie. Each side of data.winner_values is a list of values."""
    chosen, rejected = fixed_preference_rewards()
    context = [u("w1"), a("w2"), u("w3")]
    rows = [
        {
            "domain": "general",
            "context": context,
            "response1": "w4",
            "response2": "w5",
            "overall_preference": p,
        }
        for p in (-3, 0, 2, -1)
    ]
    settings = dict(
        prompt_col="context",
        completion_a_col="response1",
        completion_b_col="response2",
        winner_col="overall_preference",
        winner_values=([-3, -2, -1], [1, 2, 3]),
        on_bad_row="skip",
    )
    _, data = load(tok, tmp_path, rows, "jsonl", **settings)
    assert data.report.skipped == {"no_winner": 1} and data.rows["source_row"] == [0, 2, 3]
    np.testing.assert_allclose(
        data.rows["rewards"], [[chosen, rejected], [rejected, chosen], [chosen, rejected]]
    )
    assert data.rows["prompt_ids"][0] == ids(tok, "<|user|> w1 <|assistant|> w2 <|user|> w3 <|assistant|>")


ARENA_COLUMNS = (
    "id model_a model_b prompt response_a response_b winner_model_a winner_model_b winner_tie".split()
)
ARENA_SETTINGS = dict(
    completion_a_col="response_a",
    completion_b_col="response_b",
    winner_cols=("winner_model_a", "winner_model_b"),
    json_cols=("prompt", "response_a", "response_b"),
)


def write_arena_csv(path, rows) -> str:
    """lmsys/lmsys-arena-human-preference-55k's train.csv: JSON lists of turns as text, a one-hot winner."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ARENA_COLUMNS)
        for i, (turns, a_answers, b_answers, winner) in enumerate(rows):
            onehot = [int(winner == w) for w in ("a", "b", "tie")]
            texts = [t if isinstance(t, str) else json.dumps(t) for t in (turns, a_answers, b_answers)]
            writer.writerow([i, "m1", "m2", *texts, *onehot])
    return str(path)


def test_arena_human_preference_55k_reads_json_turns_and_one_hot_winners(tok, tmp_path):
    """The 55k arena CSV: each turn list is JSON text, the winner three 0/1 columns. One-turn rows are pairs
    of answers to the user's turn; a multi-turn row whose answers part before the last turn, a tie, a null
    answer, identical answers and a cell of broken JSON are bad rows. Read without the settings, its JSON text
    would be trained as text: refused, naming the setting."""
    chosen, rejected = fixed_preference_rewards()
    rows = [
        (["w1"], ["w2\nw3"], ["w4"], "a"),
        (["w5 w6"], ["w7"], ["w8\tw9"], "b"),
        (["w1"], ["w2"], ["w4"], "tie"),
        (["w1", "w5"], ["w2", "w3"], ["w4", "w6"], "a"),  # the conversations part at the first answer
        (["w1", "w5"], ["w2", "w3"], ["w2", "w6"], "b"),  # the same first answer: the second turn is a pair
        (["w1"], ["w2"], [None], "a"),
        (["w1"], ["w2"], ["w2"], "a"),
        (["w1"], ["w2"], '["w4"', "b"),
        (["w1"], ["w2", "w3"], ["w4"], "b"),
    ]
    path = write_arena_csv(tmp_path / "train.csv", rows)
    cfg = dict(path=path, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"\['prompt', 'response_a', 'response_b'\] hold JSON text of lists"):
        tokenize_dataset(DataConfig(**cfg, **{**ARENA_SETTINGS, "json_cols": None}), tok)
    data = tokenize_dataset(DataConfig(**cfg, **ARENA_SETTINGS, on_bad_row="skip"), tok)
    assert data.report.skipped == {
        "no_winner": 1,
        "not_assistant_turn": 1,
        "missing_field": 1,
        "identical_completions": 1,
        "bad_json": 1,
        "length_mismatch": 1,
    }
    assert data.rows["source_row"] == [0, 1, 4]
    assert data.rows["prompt_ids"] == [
        ids(tok, "<|user|> w1 <|assistant|>"),
        ids(tok, "<|user|> w5 w6 <|assistant|>"),
        ids(tok, "<|user|> w1 <|assistant|> w2 <|user|> w5 <|assistant|>"),
    ]
    eos = [tok.eos_token_id]
    assert data.rows["completion_ids"][0] == [ids(tok, "w2 w3") + eos, ids(tok, "w4") + eos]
    assert data.rows["completion_ids"][1][1] == ids(tok, "w8 w9") + eos
    np.testing.assert_allclose(
        data.rows["rewards"], [[chosen, rejected], [rejected, chosen], [rejected, chosen]]
    )
    errors = {
        5: r"field 'response_b\[0\]': missing \(null\)",
        7: r"field 'response_b': not JSON text \(data.json_cols\): Expecting ',' delimiter",
        8: r"field 'response_a': 'prompt' is a list of 1 user turn\(s\): expected a list of one answer "
        r"\(text\) per turn, got 2 answers",
    }
    bad = {**cfg, "path": str(tmp_path / "bad.csv")}
    for row, error in errors.items():
        write_arena_csv(tmp_path / "bad.csv", [rows[0], rows[row]])
        with pytest.raises(ValueError, match=r"bad\.csv row 1: " + error):
            tokenize_dataset(DataConfig(**bad, **ARENA_SETTINGS), tok)
    # json_cols=[]: the JSON text is trained as the text it is, on purpose
    write_arena_csv(tmp_path / "train.csv", rows[:1])
    text = tokenize_dataset(DataConfig(**cfg, **{**ARENA_SETTINGS, "json_cols": ()}), tok)
    assert text.rows["prompt_ids"] == [[tok.bos_token_id, tok.unk_token_id]]  # '["w1"]': one unknown word
    # the prompts to sample (online rollouts) read the turn lists too; a prompts file of its own keeps its
    # text and message prompts
    assert [r["prompt"] for r in distinct_prompts(DataConfig(**cfg, **ARENA_SETTINGS), path, "train")] == [
        [u("w1")]
    ]
    arena = DataConfig(**ARENA_SETTINGS)
    for written, read in [("w1 w2", "w1 w2"), ([u("w3")], [u("w3")]), ('["w4"]', [u("w4")])]:
        assert formats.prompt_to_sample({"prompt": written}, arena, "prompt") == read
    # completions alone holding JSON lists are structured output (an extraction task's), not arena turns
    extraction = [{"prompt": "w1", "chosen": '["w2", "w3"]', "rejected": '["w4"]'}] * 2
    _, structured = load(tok, tmp_path, extraction, "jsonl")
    assert len(structured.rows["prompt_ids"]) == 2


def test_winner_cols_and_reward_weights_are_refused_where_they_read_nothing(tok, tmp_path):
    """Each replaces a setting and reads one format's rows: set beside what it replaces, or over rows of
    another format, it is refused when the config or the file loads."""
    for keys, error in [
        (dict(winner_cols=("a",)), r"winner_cols=\['a'\]: expected two columns"),
        (dict(winner_cols=("a", "a")), "expected two columns"),
        (dict(winner_cols=("a", "b"), winner_col="w"), "winner_cols and data.winner_col both label"),
        (dict(winner_cols=("a", "b"), winner_values=(0, 1)), "winner_cols and data.winner_values both"),
        (dict(reward_weights={"x": float("nan")}), r"reward_weights.x: expected a finite number, got nan"),
        (dict(reward_weights={"x": True}), "expected a finite number, got True"),
        (dict(reward_weights={"x": 1.0}, reward_col="y"), "reward_weights and data.reward_col both"),
        (dict(json_cols=("p", "p")), "names a column twice"),
    ]:
        with pytest.raises(ValueError, match=error):
            DataConfig(**keys)
    kway = [{"prompt": "w1", "completions": ["w2", "w3"], "rewards": [1.0, 0.0], "a": 1, "b": 0}]
    with pytest.raises(
        ValueError, match=r"winner_cols=\['a', 'b'\] labels pairwise rows; the rows .* 'kway'"
    ):
        load(tok, tmp_path, kway, winner_cols=("a", "b"))
    with pytest.raises(ValueError, match="reward_weights weighs the columns of scored rows; .* 'kway'"):
        load(tok, tmp_path, kway, reward_weights={"a": 1.0})
    with pytest.raises(ValueError, match=r"json_cols names column\(s\) \['turns'\], which the rows .* lack"):
        load(tok, tmp_path, kway, json_cols=("turns",))


def test_helpsteer2_attributes_weighted_into_one_reward(tok, tmp_path):
    """nvidia/HelpSteer2: one row per response, rated 0-4 on five attributes, two responses per prompt. The
    reward is the weighted sum of the columns data.reward_weights names (float64 sum of the float ratings);
    each column is checked as a reward is, and negate_rewards applies to the sum."""
    weights = {
        "helpfulness": 0.65,
        "correctness": 0.8,
        "coherence": 0.45,
        "complexity": 0.55,
        "verbosity": -0.4,
    }
    rng = np.random.default_rng(0)
    rows = [
        {
            "prompt": f"w{p}",
            "response": f"w{10 + 2 * p + k}",
            **dict(zip(weights, rng.integers(0, 5, 5).tolist(), strict=True)),
        }
        for p in range(3)
        for k in range(2)
    ]
    expected = [
        [sum(w * r[c] for c, w in weights.items()) for r in rows[2 * p : 2 * p + 2]] for p in range(3)
    ]
    settings = dict(completion_col="response", reward_weights=weights)
    _, data = load(tok, tmp_path, rows, "jsonl", **settings)
    np.testing.assert_allclose(data.rows["rewards"], expected, rtol=1e-6)
    _, negated = load(tok, tmp_path, rows, "jsonl", negate_rewards=True, **settings)
    np.testing.assert_allclose(negated.rows["rewards"], -np.array(expected), rtol=1e-6)
    assert formats.describe_reading(list(rows[0]), "scored", DataConfig(**settings), True).endswith(
        "rewards from 0.65 * 'helpfulness' + 0.8 * 'correctness' + 0.45 * 'coherence' + 0.55 * 'complexity' "
        "+ -0.4 * 'verbosity'"
    )
    bad = [{**rows[0], "coherence": "high"}, *rows[1:]]
    with pytest.raises(ValueError, match=r"row 0: field 'coherence': expected a number, got str 'high'"):
        load(tok, tmp_path, bad, "jsonl", **settings)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['verbosity'\]"):
        load(
            tok,
            tmp_path,
            [{k: v for k, v in r.items() if k != "verbosity"} for r in rows],
            "jsonl",
            format="scored",
            **settings,
        )


def test_helpsteer2_multi_turn_prompts_are_read_as_chat_turns(tok, tmp_path):
    """HelpSteer2 writes a multi-turn prompt as one text in NeMo's turn lines ("q1\\n<extra_id_1>Assistant\\n
    a1\\n<extra_id_1>User\\nq2"). With data.turn_marker each is read as the chat turns it holds, every prompt
    through the chat template; unset, such prompts are refused naming the setting (they would be trained as
    one user message holding NeMo's markers); '' trains the text as it is."""
    nemo = "w1\n<extra_id_1>Assistant\nw2 w3\n<extra_id_1>User\nw4"
    rows = (
        [{"prompt": nemo, "response": f"w{5 + k}", "helpfulness": k} for k in range(2)]
        + [{"prompt": "w9", "response": f"w{10 + k}", "helpfulness": k} for k in range(2)]
        + [
            {"prompt": "w1\n<extra_id_1>Critic\nw2", "response": "w12", "helpfulness": 1},
            {"prompt": "w1\n<extra_id_1>Critic\nw2", "response": "w13", "helpfulness": 2},
            {"prompt": "w1\n<extra_id_1>Assistant\nw2", "response": "w12", "helpfulness": 1},
            {"prompt": "w1\n<extra_id_1>Assistant\nw2", "response": "w13", "helpfulness": 2},
        ]
    )
    settings = dict(completion_col="response", reward_col="helpfulness", on_bad_row="skip")
    with pytest.raises(
        ValueError,
        match=r"4 of the first 8 prompts \('prompt'\) hold earlier turns .* set "
        r"data.turn_marker='<extra_id_1>'",
    ):
        load(tok, tmp_path, rows, "jsonl", **settings)
    _, data = load(tok, tmp_path, rows, "jsonl", turn_marker="<extra_id_1>", **settings)
    assert data.report.skipped == {"bad_turns": 4}
    assert data.rows["prompt_ids"] == [
        ids(tok, "<|user|> w1 <|assistant|> w2 w3 <|user|> w4 <|assistant|>"),
        ids(tok, "<|user|> w9 <|assistant|>"),
    ]
    with pytest.raises(
        ValueError,
        match=r"field 'prompt': turn 1 \(after marker '<extra_id_1>'\) starts with "
        r"'Critic', not a role's name",
    ):
        load(
            tok,
            tmp_path,
            rows[4:6],
            "jsonl",
            turn_marker="<extra_id_1>",
            completion_col="response",
            reward_col="helpfulness",
        )
    with pytest.raises(
        ValueError, match=r"the marked turns are \['user', 'assistant'\]: expected the user's"
    ):
        load(
            tok,
            tmp_path,
            rows[6:],
            "jsonl",
            turn_marker="<extra_id_1>",
            completion_col="response",
            reward_col="helpfulness",
        )
    _, text = load(tok, tmp_path, rows[:4], "jsonl", turn_marker="", **settings)
    assert text.rows["prompt_ids"][1] == [tok.bos_token_id, *ids(tok, "w9")]
    # prompts to sample read the turns too
    cfg = DataConfig(turn_marker="<extra_id_1>")
    assert formats.prompt_to_sample({"prompt": nemo}, cfg, "prompt") == [u("w1"), a("w2 w3"), u("w4")]


def test_hh_rows_that_part_before_their_last_answer_are_bad_rows(tok, tmp_path):
    """Anthropic HH's text conversations: where chosen and rejected part at an earlier answer, the implicit
    prompt ends there and each completion holds the later human turn and its answer, which were trained as
    the completion (TRL's extract_prompt reads them so). They are bad rows; rows parting at the last answer
    read as before."""
    chosen, rejected = fixed_preference_rewards()
    turns = "\n\nHuman: w1\n\nAssistant: {a}\n\nHuman: w4\n\nAssistant: {b}"
    rows = [
        {"chosen": turns.format(a="w2", b="w5"), "rejected": turns.format(a="w2", b="w6")},
        {"chosen": turns.format(a="w2", b="w5"), "rejected": turns.format(a="w3", b="w5")},
    ]
    assert "\n\nHuman: w4" in maybe_extract_prompt(rows[1])["chosen"]  # TRL's reading
    _, data = load(tok, tmp_path, rows, "jsonl", on_bad_row="skip")
    assert data.report.skipped == {"not_assistant_turn": 1} and data.rows["source_row"] == [0]
    assert data.rows["completion_ids"][0] == [
        ids(tok, "w5") + [tok.eos_token_id],
        ids(tok, "w6") + [tok.eos_token_id],
    ]
    np.testing.assert_allclose(data.rows["rewards"], [[chosen, rejected]])
    with pytest.raises(
        ValueError,
        match=r"row 1: field 'chosen': goes on past its answer into a later human turn "
        r"\('Human:' at character 3\)",
    ):
        load(tok, tmp_path, rows, "jsonl")


def test_sharegpt_messages_are_read_as_chat_turns(tok, tmp_path):
    """ShareGPT's {from, value} messages (openbmb/UltraInteract_pair's `trajectory`; LLaMA-Factory's and
    axolotl's sharegpt data) were bad rows naming the conversion; they are the chat turns they write, a
    tool turn (function_call, observation) still a bad row."""
    chosen, rejected = fixed_preference_rewards()
    rows = [
        {"trajectory": [{"from": "user", "value": "w1"}], "chosen": "w2", "rejected": "w3"},
        {
            "trajectory": [{"from": "system", "value": "w4"}, {"from": "human", "value": "w5"}],
            "chosen": [{"from": "gpt", "value": "w6"}],
            "rejected": [{"from": "gpt", "value": "w7"}],
        },
        {"trajectory": [{"from": "observation", "value": "w1"}], "chosen": "w2", "rejected": "w3"},
    ]
    _, data = load(tok, tmp_path, rows, "jsonl", prompt_col="trajectory", on_bad_row="skip")
    assert data.report.skipped == {"wrong_type": 1}
    assert data.rows["prompt_ids"] == [
        ids(tok, "<|user|> w1 <|assistant|>"),
        ids(tok, "<|system|> w4 <|user|> w5 <|assistant|>"),
    ]
    assert data.rows["completion_ids"][1] == [
        ids(tok, "w6") + [tok.eos_token_id],
        ids(tok, "w7") + [tok.eos_token_id],
    ]
    np.testing.assert_allclose(data.rows["rewards"], [[chosen, rejected]] * 2)
