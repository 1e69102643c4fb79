"""Truncation: a cut completion never ends with EOS, and every cut (a character pre-cut too) is counted."""

import pytest

from copg_jax.data import tokenize
from copg_jax.data.config import DataConfig
from copg_jax.data.testing import make_tiny_tokenizer, write_jsonl
from copg_jax.data.tokenize import MAX_CHARS_PER_TOKEN, tokenize_dataset


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


def word_ids(tok, text):
    """Independent reference: the vocabulary lookup of whitespace-separated words ([UNK] for others)."""
    return [tok.convert_tokens_to_ids(w) if w in tok.get_vocab() else tok.unk_token_id for w in text.split()]


def tokenized(tok, tmp_path, rows, **kw):
    path = write_jsonl(rows, str(tmp_path / "d.jsonl"))
    return tokenize_dataset(DataConfig(path=path, cache_dir=str(tmp_path / "cache"), **kw), tok)


@pytest.mark.parametrize(
    ("side", "kept"), [("left", "w6 w7 w8"), ("right", "w5 w6 w7")], ids=["left", "right"]
)
@pytest.mark.parametrize("extra", [{}, {"finished": [True, True]}], ids=["add_eos", "finished"])
def test_cut_completion_has_no_eos_on_either_side(tok, tmp_path, side, kept, extra):
    rows = [{"prompt": "w1", "completions": ["w5 w6 w7 w8", "w10"], "rewards": [0.0, 1.0], **extra}]
    data = tokenized(tok, tmp_path, rows, max_completion_length=3, completion_side=side)
    eos = tok.eos_token_id
    # the cut completion keeps its `side` words and no EOS; the short one finished and ends with EOS
    assert data.rows[0]["completion_ids"] == [word_ids(tok, kept), word_ids(tok, "w10") + [eos]]
    assert data.report.completions_truncated == 1


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "w1", "chosen": "w5", "rejected": "w6"},
        {"prompt": "w1", "completion_a": "w5", "completion_b": "w6", "reward_a": 1.0, "reward_b": 0.0},
    ],
    ids=["preference", "pairwise"],
)
def test_two_completion_rows_take_finished_in_their_completion_order(tok, tmp_path, row):
    """`finished` on a preference or pairwise row decides the EOS per completion, as on K-way rows (it was
    ignored: both got EOS by data.add_eos, a cut completion trained as finished)."""
    data = tokenized(tok, tmp_path, [{**row, "finished": [False, True]}])
    assert data.rows[0]["completion_ids"] == [word_ids(tok, "w5"), word_ids(tok, "w6") + [tok.eos_token_id]]
    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError, match="row 0: field 'finished': 3 flags for 2 completions"):
        tokenized(tok, tmp_path / "bad", [{**row, "finished": [True, True, False]}], on_bad_row="error")


@pytest.mark.parametrize("side", ["left", "right"])
def test_completion_that_fits_only_without_eos_is_cut(tok, tmp_path, side):
    # 3 words + EOS exceed 3 tokens: the completion is cut (counted), its words kept without EOS; the text's
    # own trailing EOS is not kept by a left cut either
    rows = [{"prompt": "w1", "completions": ["w5 w6 w7", "w5 w6 w7 [EOS]"], "rewards": [0.0, 1.0]}]
    data = tokenized(tok, tmp_path, rows, max_completion_length=3, completion_side=side)
    assert data.rows[0]["completion_ids"] == [word_ids(tok, "w5 w6 w7")] * 2
    assert data.report.completions_truncated == 2


@pytest.mark.parametrize(
    ("side", "text", "kept"),
    [
        ("right", "w1 " + "x" * 300 + " w2 w3 w4 w5 w6", "w1 x"),  # head: w1 and the start of the x run
        ("left", "w2 w3 w4 w5 w6 " + "x" * 300 + " w7", "x w7"),  # tail: the end of the x run and w7
    ],
)
def test_character_precut_counts_as_a_cut(tok, tmp_path, side, text, kept):
    limit = 4
    assert len(text) > limit * MAX_CHARS_PER_TOKEN and len(word_ids(tok, kept)) < limit
    rows = [{"prompt": "w1", "completions": [text, "w10"], "rewards": [0.0, 1.0]}]
    data = tokenized(tok, tmp_path, rows, max_completion_length=limit, completion_side=side)
    # the pre-cut text tokenises to fewer than `limit` tokens, but its other words were cut: no EOS, counted
    assert data.rows[0]["completion_ids"][0] == word_ids(tok, kept)
    assert data.report.completions_truncated == 1


def test_character_precut_prompt_counts_as_a_cut(tok, tmp_path):
    prompt = "w2 w3 w4 w5 w6 " + "x" * 300 + " w7"  # left side: the tail "xxx… w7" is 2 words
    rows = [
        {"prompt": prompt, "completions": ["w5", "w10"], "rewards": [0.0, 1.0]},
        {"prompt": "w1", "completions": ["w5", "w10"], "rewards": [0.0, 1.0]},
    ]
    data = tokenized(tok, tmp_path, rows, max_prompt_length=4)
    assert data.rows[0]["prompt_ids"] == [tok.bos_token_id] + word_ids(tok, "x w7")
    assert data.rows["prompt_truncated"] == [True, False]
    assert data.report.prompts_truncated == 1


@pytest.mark.parametrize(
    ("field", "change", "setting"),
    [("completion 1", "completions", "max_completion_length"), ("prompt", "prompt", "max_prompt_length")],
)
def test_character_precut_is_an_error_when_truncation_is(tok, tmp_path, field, change, setting):
    long = "w2 " + "x" * 300  # 2 tokens, but more than 4 * MAX_CHARS_PER_TOKEN characters
    row = {"prompt": "w1", "completions": ["w5", "w10"], "rewards": [0.0, 1.0]}
    row[change] = ["w5", long] if change == "completions" else long
    with pytest.raises(
        ValueError, match=rf"field '{field}': more than 256 characters \(> {setting}=4 tokens\)"
    ):
        tokenized(tok, tmp_path, [row], **{setting: 4}, truncation="error")


def test_data_eos_token_ends_finished_completions_in_its_place(tok, tmp_path):
    """data.eos_token (a chat model's turn end): appended after finished completions instead of the
    tokenizer's EOS, stripped from a cut one like EOS; a token the tokenizer lacks is named."""
    end = tok.convert_tokens_to_ids("<|system|>")
    rows = [{"prompt": "w1", "completions": ["w5 w6 w7 w8 <|system|>", "w10"], "rewards": [0.0, 1.0]}]
    data = tokenized(
        tok, tmp_path, rows, max_completion_length=3, completion_side="left", eos_token="<|system|>"
    )
    assert data.rows[0]["completion_ids"] == [word_ids(tok, "w6 w7 w8"), word_ids(tok, "w10") + [end]]
    assert data.settings["eos_token"] == "<|system|>"  # in the reference-cache fingerprint
    with pytest.raises(ValueError, match=r"data.eos_token='<\|end\|>' is not a token of the tokenizer"):
        tokenized(tok, tmp_path, rows, eos_token="<|end|>")


@pytest.mark.parametrize("recorded", [False, True], ids=["text", "sampled_ids"])
def test_a_completion_marked_unfinished_that_ends_with_eos_is_a_named_bad_row(tok, tmp_path, recorded):
    """Trained as cut it would still end with the end token, whose probability is the one thing a cut
    completion must not teach: the row contradicts itself and is refused (it was trained with the token)."""
    eos = tok.eos_token_id
    row = {"prompt": "w1", "completions": ["w5 [EOS]", "w6"], "rewards": [0.0, 1.0]}
    row["finished"] = [False, True]
    if recorded:  # the ids it was sampled as, which decode to its text
        row["completion_token_ids"] = [word_ids(tok, "w5") + [eos], word_ids(tok, "w6")]
        assert tok.decode(row["completion_token_ids"][0], skip_special_tokens=False) == "w5 [EOS]"
    (tmp_path / "error").mkdir(), (tmp_path / "skip").mkdir()
    message = (
        r"row 0: field 'finished': completion 0 is marked unfinished but ends with the end token '\[EOS\]'"
    )
    with pytest.raises(ValueError, match=message):
        tokenized(tok, tmp_path / "error", [row])
    data = tokenized(tok, tmp_path / "skip", [row, {**row, "finished": [True, True]}], on_bad_row="skip")
    assert data.report.skipped == {"unfinished_ends_with_eos": 1}
    assert data.rows[0]["completion_ids"] == [word_ids(tok, "w5") + [eos], word_ids(tok, "w6") + [eos]]


def test_ids_tokenised_under_older_rules_are_not_read_back_from_the_cache(tok, tmp_path, monkeypatch):
    """datasets keys its cache of the tokenising map by the function's name, not its code: the version of
    the rules is in the key, so new rules re-tokenise (the old ids were read back, and a reference cache
    recomputed for the new rules scored them)."""
    rows = [{"prompt": "w1", "completions": ["w5 w6 w7 w8", "w10"], "rewards": [0.0, 1.0]}]
    before = tokenized(tok, tmp_path, rows, max_completion_length=3)
    assert before.rows[0]["completion_ids"][0] == word_ids(tok, "w5 w6 w7")
    monkeypatch.setattr(tokenize, "TOKENIZATION_RULES", tokenize.TOKENIZATION_RULES + 1)
    monkeypatch.setattr(tokenize, "_cut", lambda ids, limit, side: ids[:1])  # the new rules cut harder
    after = tokenized(tok, tmp_path, rows, max_completion_length=3)
    assert after.rows[0]["completion_ids"][0] == word_ids(tok, "w5")


@pytest.mark.parametrize("recorded", [False, True], ids=["text", "sampled_ids"])
def test_an_empty_completion_marked_finished_trains_as_its_end_token(tok, tmp_path, recorded):
    """`copg generate` writes a completion whose first sampled token ended it as "" (ids []) with finished
    true: the policy's own sample, trained as the end token alone (it was refused as an empty completion,
    all K samples of its prompt lost under data.on_bad_row=skip). Unmarked or unfinished, "" stays a bad
    row; so in the one-completion formats."""
    eos = tok.eos_token_id
    row = {"prompt": "w1", "completions": ["", "w6"], "rewards": [0.0, 1.0], "finished": [True, False]}
    if recorded:
        row["completion_token_ids"] = [[], word_ids(tok, "w6")]
    data = tokenized(tok, tmp_path, [row])
    assert data.rows[0]["completion_ids"] == [[eos], word_ids(tok, "w6")]
    for i, bad in enumerate(
        ({**row, "finished": [False, False]}, {k: v for k, v in row.items() if k != "finished"})
    ):
        (tmp_path / str(i)).mkdir()
        with pytest.raises(ValueError, match=r"row 0: field 'completions\[0\]': empty completion \(one the"):
            tokenized(tok, tmp_path / str(i), [bad])
    (tmp_path / "single").mkdir()
    single = [{"prompt": "w1", "completion": "", "reward": 1.0, "finished": True},
              {"prompt": "w1", "completion": "w7", "reward": 0.0, "finished": False}]  # fmt: skip
    data = tokenized(tok, tmp_path / "single", single, format="scored")
    assert sorted(data.rows[0]["completion_ids"]) == sorted([[eos], word_ids(tok, "w7")])
    (tmp_path / "blank").mkdir()  # a text of no tokens, unmarked (data.add_eos alone): still a bad row
    blank = [
        {"prompt": "w1", "completion": " ", "reward": 1.0},
        {"prompt": "w1", "completion": "w7", "reward": 0.0},
    ]
    with pytest.raises(
        ValueError, match=r"rows 0, 1 \(one prompt's\): field 'completion 0': no tokens after"
    ):
        tokenized(tok, tmp_path / "blank", blank, format="scored")
