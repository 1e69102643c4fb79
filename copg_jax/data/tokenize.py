"""Validated, tokenised datasets: raw rows -> {prompt_ids, completion_ids, rewards} with every drop reported.

The work runs in `datasets.map(batched=True)`, so it scales and is cached by the `datasets` fingerprinting.
Nothing is dropped silently: invalid rows either raise (naming file, row and field) or are skipped and
counted per reason in a DataReport; truncated prompts and completions are counted too. A completion that
carries the token ids it was sampled as (`data.completion_ids_col`, written by `copg generate`) is trained on
them where they decode to its text (`_sampled_ids`), else tokenised from its text and counted.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from copg_jax.data.chat import (
    TemplateRefused,
    check_template_kwargs,
    prompt_text,
    rendered_answers,
    warn_untemplated,
)
from copg_jax.data.config import TOKENIZATION_RULES, VALIDATION_RULES, DataConfig
from copg_jax.data.fingerprint import tokenizer_fingerprint, update_with_column
from copg_jax.data.formats import (
    EXAMPLES_PER_REASON,
    GROUPED,
    GROUPED_FORMATS,
    BadRow,
    describe_reading,
    detect_format,
    group_rows,
    load_sources,
    normalize_row,
    prompt_setting,
    refuse_unread_structure,
    skip_summary,
    text_fields,
)

log = logging.getLogger(__name__)

FEATURES = datasets.Features(
    {
        "prompt_ids": datasets.List(datasets.Value("int32")),
        "completion_ids": datasets.List(datasets.List(datasets.Value("int32"))),
        "rewards": datasets.List(datasets.Value("float32")),
        "prompt_length": datasets.Value("int32"),
        "completion_lengths": datasets.List(datasets.Value("int32")),
        "source": datasets.Value("string"),
        "source_row": datasets.Value("int64"),
        "prompt_truncated": datasets.Value("bool"),
        "completions_truncated": datasets.Value("int32"),
        "sampled_ids_used": datasets.Value("int32"),
        "sampled_ids_ignored": datasets.Value("int32"),
        "other_end_tokens": datasets.Value("int32"),
        "repeats_prompt": datasets.Value("bool"),
        "templated": datasets.Value("bool"),
        "data_end_tokens": datasets.Value("int32"),
        "reason": datasets.Value("string"),
        "error": datasets.Value("string"),
    }
)


def arrow_column(rows: datasets.Dataset, column: str) -> pa.ChunkedArray:
    """Column `column` of `rows` (its selection applied: one chunk a row where it is not flattened) as Arrow,
    read whole: `rows[column]` is a `datasets` Column, which numpy and Python read a row at a time (0.1-0.4
    ms a row: minutes per start at 1M rows, on every host)."""
    return rows.with_format("arrow")[column]


def flat_lists(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """([rows] each list's length, [sum of them] the lists' values in order) of an Arrow list column."""
    return pc.list_value_length(column).to_numpy(), pc.list_flatten(column).to_numpy()


# map output columns counted into the DataReport field of that name; the truncation flags stay with the rows
REPORT_COUNTS = {
    "prompt_truncated": "prompts_truncated",
    "completions_truncated": "completions_truncated",
    "sampled_ids_used": "sampled_ids_used",
    "sampled_ids_ignored": "sampled_ids_ignored",
    "repeats_prompt": "repeats_prompt",
    "other_end_tokens": "other_end_tokens",
    "templated": "templated_prompts",
    "data_end_tokens": "data_end_tokens",
}
# A token covers at most this many characters (a generous bound for BPE / SentencePiece vocabularies), so a
# text cut to `limit * MAX_CHARS_PER_TOKEN` characters on its truncation side still tokenises past `limit`:
# a 100 MB prompt is cut before the tokenizer sees it, and memory stays bounded by the row limits.
MAX_CHARS_PER_TOKEN = 64


@dataclasses.dataclass
class DataReport:
    """What happened to a dataset's rows: kept, skipped (per reason, with the first row ids), truncated."""

    rows_read: int = 0
    rows_kept: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    prompts_truncated: int = 0
    completions_truncated: int = 0
    completions: int = 0
    grouped_from: int = 0  # one-completion rows (GROUPED_FORMATS) among those read, before grouping
    sampled_ids_used: int = 0  # completions trained on the token ids they were sampled as
    sampled_ids_ignored: int = 0  # completions whose recorded ids do not decode to their text
    repeats_prompt: int = 0  # rows whose text completions all begin with their text prompt
    other_end_tokens: int = 0  # completions ending on an end token they were sampled with, not the data's
    templated_prompts: int = 0  # rows whose prompt went through the chat template
    data_end_tokens: int = 0  # finished completions ending with data.eos_token / the tokenizer's EOS

    def summary(self) -> str:
        text = f"{self.rows_kept}/{self.rows_read} rows kept"
        if self.grouped_from:
            text += f" (grouped by prompt from {self.grouped_from} one-completion rows)"
        text += f", {self.completions} completions"
        if self.skipped:
            text += "; " + skip_summary(self.skipped, self.skipped_examples)
        text += f"; truncated {self.prompts_truncated} prompts, {self.completions_truncated} completions"
        if self.sampled_ids_used or self.sampled_ids_ignored:
            text += f"; {self.sampled_ids_used} completions trained on their sampled token ids"
        if self.sampled_ids_ignored:
            text += (
                f", {self.sampled_ids_ignored} tokenised from their text instead (their recorded ids do not "
                "decode to it: edited since sampling, another tokenizer's, or ending on a token that is no "
                "end token of this model)"
            )
        if self.other_end_tokens:
            text += (
                f"; {self.other_end_tokens} finished completions end with the end token they were sampled "
                "ending on (in their recorded ids), not data.eos_token / the tokenizer's EOS"
            )
        if self.repeats_prompt:
            text += (
                f"; {self.repeats_prompt} rows' completions all begin with their prompt, which is then "
                "trained again inside each (texts decoded whole from generate()? keep only the new text)"
            )
        return text


def _repeats_prompt(row: dict) -> bool:
    """Whether every completion of a normalised row with a text prompt begins with that prompt."""
    prompt = row["prompt"]
    return (
        isinstance(prompt, str)
        and bool(prompt.strip())
        and all(c.startswith(prompt) for c in row["completions"])
    )


@dataclasses.dataclass
class TokenizedData:
    """A tokenised dataset and its report.

    Attributes:
      rows: `datasets.Dataset` with columns prompt_ids, completion_ids, rewards, prompt_length,
        completion_lengths, source, source_row (row index inside its source).
      report: what was kept, skipped and truncated.
      num_completions: K, the completion slots per prompt (data.max_completions or the data's largest count).
      sources: names of the files (or hub dataset) read, in order.
      revisions: name -> revision of each hub dataset source (its content is not a local file to hash).
      settings: the tokenisation settings used (DataConfig.tokenization_settings(), and the end tokens
        recorded ids may end with and whether a finished completion keeps the one it ends with).
      tokenizer_hash: fingerprint of the tokenizer used.
    """

    rows: datasets.Dataset
    report: DataReport
    num_completions: int
    sources: list[str]
    settings: dict
    tokenizer_hash: str
    revisions: dict[str, str] = dataclasses.field(default_factory=dict)
    _digest: bytes | None = dataclasses.field(default=None, init=False, repr=False, compare=False)
    _token_digest: bytes | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.rows)

    def max_token_id(self, batch_rows: int = 65536) -> int:
        """The largest token id of any prompt or completion (-1: none)."""
        top = -1
        for table in self.rows.with_format("arrow").iter(batch_size=batch_rows):
            for name in ("prompt_ids", "completion_ids"):
                column = table[name].combine_chunks()
                while pa.types.is_list(column.type):
                    column = pc.list_flatten(column)
                top = max(top, pc.max(column).as_py() if len(column) else -1)
        return top

    def digest(self) -> bytes:
        """16 bytes (xxh3-128) of the rows as they train: each row's source row, rewards and token ids, and
        how its ids split into completions. Equal wherever the same data was read with the same tokenizer
        and settings; not of the files' names. Computed once, with `token_digest` (`_hash_rows`)."""
        if self._digest is None:
            self._hash_rows()
        return self._digest

    def token_digest(self) -> bytes:
        """16 bytes (xxh3-128) of what a reference's log-probs depend on: each row's source row and token ids
        (`digest` without the rewards). Computed once, with `digest`."""
        if self._token_digest is None:
            self._hash_rows()
        return self._token_digest

    def _hash_rows(self) -> None:
        """`digest` and `token_digest`, in one pass over every token id."""
        rows, tokens = xxhash.xxh3_128(), xxhash.xxh3_128(b"tokens")
        for table in self.rows.with_format("arrow").iter(batch_size=65536):
            for name in ("source_row", "rewards", "prompt_ids", "completion_ids"):
                update_with_column(rows, table[name])
                if name != "rewards":
                    update_with_column(tokens, table[name])
        self._digest, self._token_digest = rows.digest(), tokens.digest()


def _cut(ids: list[int] | str, limit: int, side: str) -> list[int] | str:
    return ids[-limit:] if side == "left" else ids[:limit]


def cut_prompt(ids, limit: int, side: str, bos: int | None) -> list[int]:
    """A prompt's token ids cut to `limit` on `side` (data.prompt_side). A cut from the left keeps a first
    `bos` (the tokenizer's BOS) before the prompt's end: models are trained with it first (a Llama or Gemma
    prompt without it reads as another text), and sampling sees the same cut."""
    ids = list(ids)
    if len(ids) <= limit:
        return ids
    if side == "left" and bos is not None and limit > 1 and ids[0] == bos:
        return [bos, *ids[len(ids) - limit + 1 :]]
    return _cut(ids, limit, side)


def _precut(text: str, tokens: int, side: str) -> tuple[str, bool]:
    """(`text` cut on `side` to what `tokens` tokens can cover at most (MAX_CHARS_PER_TOKEN each), whether it
    was cut). A cut text counts as truncated even when it then tokenises to fewer than `tokens` tokens."""
    chars = tokens * MAX_CHARS_PER_TOKEN
    return (_cut(text, chars, side), True) if len(text) > chars else (text, False)


def _too_long(tokens: int, limit: int, name: str) -> str:
    """Why a text of `tokens` tokens (after any pre-cut) is over `limit`: its token count, or, when only its
    pre-cut showed it (`tokens` <= `limit`), its length in characters."""
    if tokens > limit:
        return f"{tokens} tokens > {name}={limit}"
    return f"more than {limit * MAX_CHARS_PER_TOKEN} characters (> {name}={limit} tokens)"


def _strip_eos(ids: list[int], eos: int | None) -> list[int]:
    """`ids` without trailing EOS tokens."""
    end = len(ids)
    while end and ids[end - 1] == eos:
        end -= 1
    return ids[:end]


def _cut_unfinished(ids: list[int], limit: int, side: str, eos: int | None) -> list[int]:
    """A cut completion: `ids` cut on `side` to at most `limit` tokens, never ending with EOS (the text went
    on past the cut, so the completion did not finish there; a left cut keeps the tail, where EOS sits)."""
    return _strip_eos(_cut(_strip_eos(ids, eos), limit, side), eos)


def end_token_id(tokenizer, eos_token: str = "") -> int | None:
    """The id of the token that ends a finished completion: `eos_token` (data.eos_token), or the tokenizer's
    EOS when it is "" (None: the tokenizer has none).

    Raises:
      ValueError: `eos_token` is not one token of the tokenizer's vocabulary.
    """
    if not eos_token:
        return tokenizer.eos_token_id
    token_id = tokenizer.convert_tokens_to_ids(eos_token)
    if (
        token_id is None
        or token_id == tokenizer.unk_token_id
        or tokenizer.convert_ids_to_tokens(token_id) != eos_token
    ):
        raise ValueError(f"data.eos_token={eos_token!r} is not a token of the tokenizer")
    return int(token_id)


def turn_end_token(tokenizer, template_kwargs: Mapping[str, Any] | None = None) -> int | None:
    """The special token the tokenizer's chat template writes first after an assistant message's content
    (Gemma-it: <end_of_turn>, Qwen: <|im_end|>, Llama 3: <|eot_id|>), or None: no template, one that refuses
    the probe conversation, or none written."""
    marker = "copg turn-end probe"
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **(template_kwargs or {}))
    except Exception:  # no template, or one that refuses this conversation: nothing to compare
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    tail = tokenizer(text[text.rindex(marker) + len(marker) :], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    return next((int(i) for i in tail if i in special), None)


def check_turn_end(tokenizer, cfg: DataConfig, report: DataReport) -> None:
    """Warns where prompts went through the chat template but finished completions end with another token
    (data.eos_token / the tokenizer's EOS; not one they were sampled ending on) than the template ends an
    assistant turn with: the policy would be taught to end its turns with a token its chat never shows there;
    and where data.chat_template_kwargs is set but no prompt was templated."""
    if not report.templated_prompts:
        warn_untemplated(cfg.chat_template_kwargs, "data.chat_template_kwargs")
        return
    if not report.data_end_tokens:
        return
    turn_end, end = (
        turn_end_token(tokenizer, cfg.chat_template_kwargs),
        end_token_id(tokenizer, cfg.eos_token),
    )
    if turn_end is not None and turn_end != end:
        names = tokenizer.convert_ids_to_tokens([turn_end, end])
        log.warning(
            "data: the chat template ends an assistant turn with %r, but %d finished completions end with %r "
            "(%s): set data.eos_token=%s so that the policy ends its turns as its chat template does",
            names[0],
            report.data_end_tokens,
            names[1],
            "data.eos_token" if cfg.eos_token else "the tokenizer's EOS",
            names[0],
        )


def sequence_ids(
    tokenizer,
    prompt,
    completion: str,
    chat_template: bool,
    eos_token: str = "",
    literal: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """The token ids of one prompt + completion as the data pipeline lays them out, before truncation: the
    prompt as training tokenises it (data.chat_template), the completion without special tokens, then the end
    token (data.eos_token). A reward model trained on such data scores exactly these sequences.

    Args:
      literal: tokenise special-token strings in the completion (`<|im_end|>` written out) as plain text
        rather than as those tokens; the same ids when it spells none.
      template_kwargs: the chat template's variables (data.chat_template_kwargs).
    """
    text, templated = prompt_text(tokenizer, prompt, chat_template, template_kwargs)
    ids = list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
    if templated:
        completion = rendered_answers(tokenizer, prompt, [completion], template_kwargs)[0]
    if literal:  # tokenised apart: the prompt's own special tokens stay tokens
        completion_ids = list(
            tokenizer(completion, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        )
    else:
        completion_ids = answer_ids(tokenizer, [text], [completion])[0]
    return ids + completion_ids + [end_token_id(tokenizer, eos_token)]


def answer_ids(tokenizer, texts: list[str], answers: list[str]) -> list[list[int]]:
    """The token ids of each answer (a completion's text) as the tokenizer reads it after its prompt: the
    prompt's text and the answer tokenised as one text, past the prompt's own ids. Tokenised alone, an answer
    starts a text: a SentencePiece tokenizer puts a space before it (Mistral's "[/INST]Sure" trained as
    "[/INST] Sure", "Hello there" + ", how" as "Hello there , how"). Where the joint ids do not begin with
    the prompt's (a token spans the boundary: "there" + "," read as "there,"), the answer tokenised after a
    special token, where no text starts (a SentencePiece tokenizer of prepend_scheme "first" puts no space
    there; a legacy one, "always", still does), as sampling continues the prompt's ids; without special
    tokens, alone. Both are read without the special tokens the tokenizer adds to a text (BOS, an EOS some
    append), which the answer does not continue.

    Args:
      texts: per answer, its prompt's text (as rendered by the chat template, or the text itself).
    """
    out: list[list[int] | None] = [None] * len(answers)
    if answers:
        unique = list(dict.fromkeys(texts))  # a row's K answers share its prompt: tokenised once
        bare = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"], strict=True))
        joined = [t + a for t, a in zip(texts, answers, strict=True)]
        joint = tokenizer(joined, add_special_tokens=False)["input_ids"]
        for j, (text, ids) in enumerate(zip(texts, joint, strict=True)):
            p, ids = list(bare[text]), list(ids)
            # an unknown last word of the prompt may swallow the answer's first (a word-level vocabulary)
            apart = len(ids) > len(p) or not answers[j]
            if ids[: len(p)] == p and apart and p[-1:] != [tokenizer.unk_token_id]:
                out[j] = ids[len(p) :]
    alone = [j for j, ids in enumerate(out) if ids is None]
    if alone:
        anchor = tokenizer.eos_token or tokenizer.bos_token or ""
        anchor_id = tokenizer.convert_tokens_to_ids(anchor) if anchor else None
        ids = tokenizer([anchor + answers[j] for j in alone], add_special_tokens=False)["input_ids"]
        for j, x in zip(alone, ids, strict=True):
            x = list(x)
            if not anchor or not x or x[0] != anchor_id:  # not a token of its own here: alone
                x = [anchor_id, *tokenizer(answers[j], add_special_tokens=False)["input_ids"]]
            out[j] = x[1:]
    return out


def _row_list(rows: list[int], shown: int = 6) -> str:
    return ", ".join(map(str, rows[:shown])) + (f" and {len(rows) - shown} more" if len(rows) > shown else "")


def _sampled_ids(
    tokenizer, row: dict, wants_end: list[bool], ends: frozenset[int]
) -> list[tuple[list[int], int | None] | None]:
    """Per completion of a normalised row, its recorded sampled ids where the tokenizer decodes them to
    exactly its text (special tokens kept, as `copg generate` decodes), else None (its text is to be
    tokenised): the row records none, the text was edited after sampling, or the ids are another
    tokenizer's.

    Each is (ids, end): a completion that ends (`wants_end`) may record the end token it was sampled ending on
    after the ids of its text (`copg generate` does, as vLLM does), one of `ends`: returned as `end`, not in
    `ids`. `end` is None where the ids record none.
    """
    if row["token_ids"] is None:
        return [None] * len(row["completions"])
    vocab = len(tokenizer)
    used: list[tuple[list[int], int | None] | None] = []
    for text, ids, ending in zip(row["completions"], row["token_ids"], wants_end, strict=True):
        ids = list(ids)
        if not ids or max(ids) >= vocab or not isinstance(text, str):
            used.append(None)
        elif ending and ids[-1] in ends and tokenizer.decode(ids[:-1], skip_special_tokens=False) == text:
            used.append((ids[:-1], ids[-1]))
        elif tokenizer.decode(ids, skip_special_tokens=False) == text:
            used.append((ids, None))
        else:
            used.append(None)
    return used


def end_tokens(tokenizer, eos_token: str = "", model_end_tokens: Sequence[int] = ()) -> list[int]:
    """The ids a finished completion's recorded ids may end with (`_sampled_ids`), sorted: the token
    training ends completions with (`end_token_id`), the tokenizer's EOS, and the model's own end tokens
    (`ModelConfig.eos_token_ids`, where sampling also stops: Gemma-it's <end_of_turn>)."""
    ids = {end_token_id(tokenizer, eos_token), tokenizer.eos_token_id, *model_end_tokens}
    return sorted(int(i) for i in ids if i is not None)


def _encode_batch(
    batch: dict,
    indices: list[int],
    *,
    fmt: str,
    cfg: DataConfig,
    tokenizer,
    source: str,
    rules: int,
    checks: int,
    ends: tuple[int, ...],
    keep_sampled_end: bool,
) -> dict:
    """datasets.map function: validate, normalise and tokenise a batch of raw rows.

    `ends`, `keep_sampled_end`: `tokenize_dataset`'s (`ends` sorted: it is in the map's cache key).

    `rules` (TOKENIZATION_RULES) and `checks` (VALIDATION_RULES) are read by no line here: they are in the
    map's cache key, which datasets makes of the arguments and only the name of this function, so that rows
    tokenised under older rules or checks are never read back from its cache."""
    n = len(indices)
    out = {name: [None] * n for name in FEATURES}
    normal: dict[int, dict] = {}
    for i in range(n):
        try:
            normal[i] = normalize_row({k: v[i] for k, v in batch.items()}, fmt, cfg)
        except BadRow as e:
            out["reason"][i], out["error"][i] = e.reason, str(e)
    rendered = {}
    for i in sorted(normal):
        try:
            rendered[i] = prompt_text(
                tokenizer, normal[i]["prompt"], cfg.chat_template, cfg.chat_template_kwargs
            )
        except TemplateRefused as e:
            out["reason"][i], out["error"][i] = "chat_template_refused", f"field {prompt_setting(cfg)!r}: {e}"
            del normal[i]
    good = sorted(normal)
    texts, templated = [rendered[i][0] for i in good], [rendered[i][1] for i in good]
    bos = tokenizer.bos_token or ""
    precut_prompts = [_precut(t, cfg.max_prompt_length, cfg.prompt_side) for t in texts]
    precut_prompts = [  # a template writes BOS as text: it stays first, as cut_prompt keeps it
        (bos + t if cut and bos and whole.startswith(bos) and not t.startswith(bos) else t, cut)
        for whole, (t, cut) in zip(texts, precut_prompts, strict=True)
    ]
    texts, prompt_precut = [t for t, _ in precut_prompts], [cut for _, cut in precut_prompts]
    prompt_ids = [None] * len(good)
    for flag in (True, False):  # templated text carries its own special tokens
        which = [j for j, t in enumerate(templated) if t == flag]
        if which:
            ids = tokenizer([texts[j] for j in which], add_special_tokens=not flag)["input_ids"]
            for j, x in zip(which, ids, strict=True):
                prompt_ids[j] = list(x)
    # EOS where sampling ended (rows that say which completions finished), else per data.add_eos
    wants_end = {i: normal[i]["finished"] or [cfg.add_eos] * len(normal[i]["completions"]) for i in good}
    recorded_ends = frozenset(ends)
    sampled = {i: _sampled_ids(tokenizer, normal[i], wants_end[i], recorded_ends) for i in good}
    answers, owners = [], []  # the texts of the others (as the chat template writes them), their rows
    for j, i in enumerate(good):
        todo = [c for c, ids in zip(normal[i]["completions"], sampled[i], strict=True) if ids is None]
        if templated[j] and todo:
            todo = rendered_answers(tokenizer, normal[i]["prompt"], todo, cfg.chat_template_kwargs)
        answers += todo
        owners += [j] * len(todo)
    flat = [_precut(c, cfg.max_completion_length, cfg.completion_side) for c in answers]
    flat_ids = iter(  # tokenised after their prompts, in one call
        answer_ids(tokenizer, [texts[j] for j in owners], [t for t, _ in flat])
    )
    flat_precut = iter(cut for _, cut in flat)
    eos = end_token_id(tokenizer, cfg.eos_token)
    for j, i in enumerate(good):
        row = normal[i]
        raw = [  # (ids, cut before tokenising, the end token sampled or None)
            (list(next(flat_ids)), next(flat_precut), None) if got is None else (*got[:1], False, got[1])
            for got in sampled[i]
        ]
        used = sum(ids is not None for ids in sampled[i])
        out["sampled_ids_used"][i] = used
        out["repeats_prompt"][i] = _repeats_prompt(row)
        out["templated"][i] = templated[j]
        out["sampled_ids_ignored"][i] = 0 if row["token_ids"] is None else len(sampled[i]) - used
        try:
            p = prompt_ids[j]
            if not p:
                raise BadRow(
                    "empty_prompt_tokens", prompt_setting(cfg), "prompt has no tokens after tokenisation"
                )
            prompt_cut = prompt_precut[j] or len(p) > cfg.max_prompt_length
            if prompt_cut and cfg.truncation == "error":
                raise BadRow(
                    "prompt_too_long",
                    prompt_setting(cfg),
                    _too_long(len(p), cfg.max_prompt_length, "max_prompt_length"),
                )
            completions, cut, other_end, data_end = [], 0, 0, 0
            wants_eos = wants_end[i]
            for k, (c, precut, sampled_end) in enumerate(raw):
                end = eos if sampled_end is None or not keep_sampled_end else sampled_end
                # "" passed the reader only where its row marks it finished: it trains as its end token alone;
                # a text of no tokens (whitespace) never does
                if not c and not (row["completions"][k] == "" and wants_eos[k]):
                    raise BadRow("empty_completion_tokens", f"completion {k}", "no tokens after tokenisation")
                if wants_eos[k] and end is None:
                    raise BadRow("no_eos_token", cfg.finished_col, "finished, but the tokenizer has no EOS")
                if row["finished"] and not wants_eos[k] and c[-1] == eos:  # trained as cut, it would end
                    raise BadRow(
                        "unfinished_ends_with_eos",
                        cfg.finished_col,
                        f"completion {k} is marked unfinished but ends with the end token "
                        f"{tokenizer.convert_ids_to_tokens(eos)!r}: mark it finished, or drop the token",
                    )
                full = c + [end] if wants_eos[k] and (not c or c[-1] != end) else c
                if precut or len(full) > cfg.max_completion_length:
                    if cfg.truncation == "error":
                        raise BadRow(
                            "completion_too_long",
                            f"completion {k}",
                            _too_long(len(full), cfg.max_completion_length, "max_completion_length"),
                        )
                    full = _cut_unfinished(c, cfg.max_completion_length, cfg.completion_side, eos)
                    cut += 1
                    if not full:
                        raise BadRow(
                            "empty_completion_tokens", f"completion {k}", "no tokens left after truncation"
                        )
                else:
                    other_end += wants_eos[k] and end != eos
                    data_end += wants_eos[k] and end == eos
                completions.append(full)
        except BadRow as e:
            out["reason"][i], out["error"][i] = e.reason, str(e)
            continue
        out["prompt_truncated"][i] = prompt_cut
        out["prompt_ids"][i] = cut_prompt(p, cfg.max_prompt_length, cfg.prompt_side, tokenizer.bos_token_id)
        out["completion_ids"][i] = completions
        out["completions_truncated"][i] = cut
        out["other_end_tokens"][i], out["data_end_tokens"][i] = other_end, data_end
        out["rewards"][i] = row["rewards"]
    grouped = batch.get("group_rows")  # GROUPED rows: their source rows (the first names the row)
    for i in range(n):
        rows = [indices[i]] if grouped is None else list(grouped[i])
        out["source"][i], out["source_row"][i] = source, rows[0]
        if out["error"][i] is not None:
            where = f"row {rows[0]}" if len(rows) == 1 else f"rows {_row_list(rows)} (one prompt's)"
            out["error"][i] = f"{source} {where}: {out['error'][i]}"
            out["prompt_ids"][i], out["completion_ids"][i], out["rewards"][i] = [], [], []
            out["prompt_truncated"][i], out["completions_truncated"][i] = False, 0
            out["sampled_ids_used"][i] = out["sampled_ids_ignored"][i] = out["other_end_tokens"][i] = 0
            out["data_end_tokens"][i] = 0
            out["repeats_prompt"][i] = out["templated"][i] = False
        else:
            out["reason"][i] = out["error"][i] = ""
        out["prompt_length"][i] = len(out["prompt_ids"][i])
        out["completion_lengths"][i] = [len(c) for c in out["completion_ids"][i]]
    return out


def tokenize_dataset(
    cfg: DataConfig,
    tokenizer,
    path: str | None = None,
    split: str | None = None,
    model_end_tokens: Sequence[int] = (),
    keep_sampled_end: bool = True,
) -> TokenizedData:
    """Loads, validates and tokenises a scored-completion dataset.

    Args:
      cfg: data settings.
      tokenizer: a `transformers` tokenizer (EOS needed for cfg.add_eos; a chat template for message prompts).
      path, split: override cfg.path / cfg.split (e.g. with cfg.eval_path / cfg.eval_split).
      model_end_tokens: the model's own end tokens (`ModelConfig.eos_token_ids`): a finished completion's
        recorded ids may end with one of them, or with data.eos_token or the tokenizer's EOS (`end_tokens`).
      keep_sampled_end: a finished completion whose recorded ids end with an end token ends with that token
        (the one the policy stopped on); False: with data.eos_token (or EOS) whatever it stopped on, as a
        reward model scores it (`sequence_ids`).
    Returns:
      TokenizedData; its report is also logged.
    Raises:
      ValueError: invalid rows when cfg.on_bad_row == "error" (listing file, row and field of the first ones),
        or an empty result.
    """
    path = cfg.path if path is None else path
    split = cfg.split if split is None else split
    if cfg.add_eos and end_token_id(tokenizer, cfg.eos_token) is None:
        raise ValueError("data.add_eos is set but the tokenizer has no eos_token (set data.eos_token)")
    check_template_kwargs(tokenizer, cfg.chat_template_kwargs, "data.chat_template_kwargs")
    ends = end_tokens(tokenizer, cfg.eos_token, model_end_tokens)
    parts, grouped_from = [], 0
    sources = load_sources(path, split, cfg.cache_dir, cfg.on_bad_row, text_fields(cfg))
    for src in sources:
        fmt, raw = detect_format(list(src.rows.column_names), cfg, src.name), src.rows
        refuse_unread_structure(raw, cfg, src.name)
        reading = describe_reading(list(raw.column_names), fmt, cfg, detected=cfg.format == "auto")
        log.info("data %s: %s", src.name, reading)
        if fmt in GROUPED_FORMATS:  # one completion per row: the rows of a prompt become one K-way row
            fmt, raw = GROUPED, group_rows(raw, fmt, cfg)
            grouped_from += len(src.rows)
        fn = functools.partial(
            _encode_batch,
            fmt=fmt,
            cfg=cfg,
            tokenizer=tokenizer,
            source=src.name,
            rules=TOKENIZATION_RULES,
            checks=VALIDATION_RULES,
            ends=tuple(ends),
            keep_sampled_end=keep_sampled_end,
        )
        parts.append(
            raw.map(
                fn,
                batched=True,
                with_indices=True,
                remove_columns=raw.column_names,
                features=FEATURES,
                desc=f"tokenising {src.name}",
            )
        )
    rows = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    bad_lines = [line for src in sources for line in src.skipped]  # on_bad_row=skip: unreadable lines
    report = DataReport(rows_read=len(rows) + len(bad_lines), grouped_from=grouped_from)
    reasons = arrow_column(rows, "reason").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(reasons != "")
    if len(bad):
        errors = rows.select(bad[: EXAMPLES_PER_REASON * 4])["error"]
        if cfg.on_bad_row == "error":
            shown = "\n  ".join(errors[:EXAMPLES_PER_REASON])
            raise ValueError(
                f"{len(bad)} invalid row(s) in {path!r} (data.on_bad_row=skip drops and counts them):"
                f"\n  {shown}"
            )
        counts = collections.Counter(reasons[bad].tolist())
        report.skipped = dict(counts)
        bad_rows = rows.select(bad)
        for reason in counts:
            first = [i for i, r in enumerate(reasons[bad]) if r == reason][:EXAMPLES_PER_REASON]
            report.skipped_examples[reason] = [
                f"{bad_rows[i]['source']} row {bad_rows[i]['source_row']}" for i in first
            ]
        # flattened: every later read of a selection goes through its indices, a row at a time
        rows = rows.select(np.flatnonzero(reasons == "")).flatten_indices()
    for line in bad_lines:
        report.skipped[line.reason] = report.skipped.get(line.reason, 0) + 1
        examples = report.skipped_examples.setdefault(line.reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{line.path} line {line.line_no}")
    rows = rows.remove_columns(["reason", "error"])
    if len(rows) == 0:
        raise ValueError(f"no valid rows in {path!r}: {report.summary()}")
    report.rows_kept = len(rows)
    for column, field in REPORT_COUNTS.items():  # per-row counts, summed into the report
        setattr(report, field, int(pc.sum(arrow_column(rows, column)).as_py() or 0))
    rows = rows.remove_columns(
        [c for c in REPORT_COUNTS if c not in ("prompt_truncated", "completions_truncated")]
    )
    check_turn_end(tokenizer, cfg, report)
    counts = pc.list_value_length(arrow_column(rows, "completion_lengths"))
    report.completions = int(pc.sum(counts).as_py())
    k = cfg.max_completions or int(pc.max(counts).as_py())
    warn = report.skipped or report.prompts_truncated or report.completions_truncated or report.repeats_prompt
    (log.warning if warn or report.sampled_ids_ignored else log.info)("data %s: %s", path, report.summary())
    return TokenizedData(
        rows=rows,
        report=report,
        num_completions=k,
        sources=[s.name for s in sources],
        # the end tokens decide token ids too: a reference cache of other ones is stale
        settings={**cfg.tokenization_settings(), "end_tokens": ends, "keep_sampled_end": keep_sampled_end},
        tokenizer_hash=tokenizer_fingerprint(tokenizer),
        revisions={s.name: s.revision for s in sources if s.revision},
    )
