"""Typed settings of the data pipeline (the `data:` section of the top-level config)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import string
from typing import Any

from copg_jax.batch import REWARD_MAX, REWARD_RANGE
from copg_jax.data.chat import refuse_reserved

# a reward key or column named as a rank: lower is better (`DataConfig.negate_rewards`)
RANK_NAME = re.compile(r"(?<![a-z])(rank|ranks|ranking|position)(?![a-z])", re.IGNORECASE)

# a value of a winner column: an index, a name or a label; or a list of such values (winner_values)
WinnerLabel = int | str | bool | list[int | str | bool]
FORMATS = ("auto", "kway", "pairwise", "preference", "scored_preference", "scored", "unpaired_preference")
LAYOUTS = ("padded", "packed", "shared_prefix")
# The version of the rules that turn rows into token ids at fixed settings; raised when they change, so a
# reference cache computed under the old rules is refused, not read. 2: a cut completion never ends with
# EOS (left cuts, text cut before tokenising, an EOS without room), and a text cut before tokenising counts
# as truncated. 3: completions carrying the token ids they were sampled as (`completion_ids_col`) are
# trained on them. 4: a completion marked unfinished that ends with the end token is a bad row, not trained
# with that token; tokenised ids are never read back from datasets' cache across versions of these rules.
# 5: preference rows whose chosen and rejected are one completion, and text prompts beside chat-message
# completions without data.chat_template, are bad rows; rows whose completions repeat their prompt counted.
# 6: an empty completion marked finished (the policy sampled its end token first) trains as that token.
# 7: a finished completion whose recorded ids end with an end token after its text's ids ends with that
# token (the one sampling stopped on), not data.eos_token. 8: completions tokenised after their prompts (one
# text, split past the prompt's ids: no space a SentencePiece tokenizer puts before a text), as the chat
# template writes them where it trims them (Llama 3, Gemma); a prompt cut from the left keeps its BOS.
TOKENIZATION_RULES = 8
# The version of the checks that refuse rows without changing the ids of the rows kept; raised when one is
# added, so that rows tokenised under older checks are never read back from datasets' cache (it is in the
# map's cache key, not in the reference cache's fingerprint: a row now refused makes that cache stale by its
# rows alone). 1: rewards past +-1e12 (batch.REWARD_MAX); recorded chat template variables compared as JSON.
# 2: decimal rewards (a Parquet decimal column) are read as numbers; messages setting tool_calls,
# reasoning_content, ... are bad rows. 3: message prompts ending with an assistant turn, identical completions
# of pairwise rows without a prompt column and templates filled to whitespace are bad rows. 4: prompts given
# as lists of the user's turns (texts) are read with their answers as conversations (bad rows before);
# winner-labelled pairs of one completion, and Anthropic HH text rows whose completions go on into a later
# human turn, are bad rows; ShareGPT's {from, value} messages are read as chat turns (bad rows before).
VALIDATION_RULES = 4


@dataclasses.dataclass
class DataConfig:
    """Where scored completions come from, how they are tokenised, and how batches are laid out."""

    path: str = ""
    """Training data: a JSONL/JSON/CSV (each also .gz)/Parquet/Arrow file, a glob, a folder of such files
    (recursively), a `save_to_disk` folder, or (online only) a hub dataset written hf://datasets/ORG/NAME
    (?name=SUBSET&data_dir=DIR&revision=REV: `formats.hub_dataset`)."""
    split: str = "train"
    """Split to read from a `save_to_disk` DatasetDict or a hub dataset (ignored for plain files)."""
    eval_path: str = ""
    """Optional evaluation data, same forms as `path`."""
    eval_split: str = "test"
    """Split of `eval_path` (ignored for plain files)."""
    cache_dir: str = ""
    """Hugging Face `datasets` cache folder for loaded and tokenised data ("" = the library default)."""

    format: str = "auto"
    """Row format: "kway" {prompt, completions, rewards}, "pairwise" {prompt, completion_a, reward_a,
    completion_b, reward_b}, "preference" {prompt, chosen, rejected} (rewards `preference_rewards`),
    "scored_preference" {prompt, chosen, rejected, score_chosen, score_rejected} (rewards: the scores), or
    "auto" (detected from the column names; ambiguous columns are an error; score columns make preference rows
    scored_preference). The two preference formats may leave out the prompt (see `prompt_col`).
    One completion per row, rows of the same prompt grouped into one K-way row (in file order, split into
    groups of at most `max_completions`): "scored" {prompt, completion, reward} (logged scores) and
    "unpaired_preference" {prompt, completion, label} (TRL's name; label true / false -> the chosen / rejected
    reward of `preference_rewards`). A prompt left with one completion is a bad row (too_few_completions)."""
    preference_rewards: tuple[float, float] = (0.25, -0.25)
    """Rewards (chosen, rejected) of a preference row (of a true / false label, unpaired preference). The
    default (+1/4, -1/4) is the paper's (arXiv 2406.19185, Property 3): CoPG with beta on such rows is IPO
    with tau = beta (loss beta^2 * IPO) under the same loss.length_average (by default copg sums the
    log-ratios and ipo averages them). A gap D between them gives tau = beta / (2 D)."""
    prompt_col: str = "prompt"
    """Prompt column: a string, or a list of chat messages {role, content}; completions that are conversations
    repeating its turns have them taken off. Preference rows without it have an implicit prompt: the
    beginning chosen and rejected share (whole messages, or text up to a word start), as TRL's
    `extract_prompt` takes it. A list of texts is the user's turns (arena rows), each completion then the
    list of the assistant's answers to them, one per turn: the conversations they make are read as a
    message prompt and completions are (only their last answers may differ)."""
    json_cols: tuple[str, ...] | None = None
    """Columns whose values are JSON text, decoded before a row is read: the CSV of
    lmsys/lmsys-arena-human-preference-55k holds its prompts and responses as JSON lists of turns. A value
    that is no JSON text is a bad row (bad_json); a prompts file of its own (rollouts, evaluation by
    generation) has only its JSON lists decoded. None (unset): a prompt column whose first rows mostly hold
    JSON lists of texts is refused, naming this setting; () reads every column as it is."""
    turn_marker: str | None = None
    """Text prompts that hold a conversation's earlier turns, each turn after this marker and its role's
    name on a line of its own (nvidia/HelpSteer2's multi-turn prompts: "<extra_id_1>", then "User" or
    "Assistant"), are read as chat messages, the text before the first marker the user's first turn; every
    text prompt of the data is then a user turn rendered by the chat template. A prompt whose turns are not
    the user's and the assistant's in turn, ending with the user's, is a bad row (bad_turns). None (unset):
    text prompts whose first rows hold NeMo's "<extra_id_1>User" / "<extra_id_1>Assistant" lines are
    refused, naming this setting; "" reads them as the text they are. "hh" reads Anthropic HH's
    "\n\nHuman: ...\n\nAssistant: ..." conversations (Nectar's prompts) as turns, the closing empty
    "Assistant:" dropped; unset, such prompts are refused where the chat template would render them as one
    user turn (data.chat_template, data.system_col)."""
    prompt_template: str = ""
    """Optional: the prompt as a text made of the row's columns, for data whose prompt is in several columns
    or nested (`prompt_template_fields` reads it): `{column}`, `{column.key}` for a field of a record,
    `{column[i]}` for an item of a list; `{{` and `}}` are braces. openai/summarize_from_feedback:
    "SUBREDDIT: r/{info.subreddit}\nTITLE: {info.title}\nPOST: {info.post}\n\nTL;DR:"; alpaca:
    "{instruction}\n\n{input}". It replaces `prompt_col` (it and prompt_col are not set together); a row
    whose field is missing, null or not text or a number is a bad row naming it (numbers are written as
    Python writes the value read: a JSON column of ints and floats is read as floats, 2019 as 2019.0). "" =
    the prompt column."""
    system_col: str = ""
    """Optional: a column of system prompts (Intel/orca_dpo_pairs' "system"), each put first as a system turn
    (an empty or null cell adds none); every prompt then goes through the chat template, a text prompt as one
    user turn. "" = none."""
    messages_col: str = "messages"
    """Chat-message prompt column, used when `prompt_col` is absent."""
    completions_col: str = "completions"
    """K-way: list of completions (strings, or assistant messages; or records, see `completion_text_key`)."""
    rewards_col: str = "rewards"
    """K-way: list of rewards, one per completion (not read when `completion_reward_key` is set)."""
    completion_text_key: str = ""
    """K-way: the completions are records, each completion's text (or assistant message) at this key of its
    record, e.g. "response" for UltraFeedback's raw rows {instruction, completions: [{model, response,
    overall_score, ...}]}, "answer" for Nectar's {prompt, answers: [{answer, model, rank}]}; "" = the
    completions are the text or messages themselves."""
    completion_reward_key: str = ""
    """K-way: each completion's reward at this key of its record (UltraFeedback: "overall_score"; Nectar:
    "rank" with `negate_rewards`) instead of the `rewards_col` list; "" = that list."""
    negate_rewards: bool | None = None
    """The rewards read from the data are lower-is-better (a rank: 1 = best): train on their negation. Not
    applied to `preference_rewards` (preference rows, labels). None (unset) is false, except that rewards
    read from a key or column named as a rank (`rank`, `ranking`, `position`: Nectar's answers[k].rank) are
    refused, naming this setting (read as scores they trained the worst answer as the best)."""
    eos_token: str = ""
    """The token that ends a finished completion ("" = the tokenizer's EOS): appended after it in training,
    and what a cut completion never ends with. A chat model whose turns end with another token than its
    tokenizer's EOS (Gemma-it: "<end_of_turn>") sets it, so completions end in training as they end in
    sampling (`copg generate` and online rollouts stop at the model's end tokens). A completion whose recorded
    ids (`completion_ids_col`) end with the end token sampling stopped on ends with that token instead."""
    finished_col: str = "finished"
    """Optional: list of booleans, one per completion in the row's order (K-way completions; completion_a,
    completion_b; chosen, rejected), True where sampling ended with EOS and False where it was cut at the
    token limit (`copg generate` writes it). When present it decides the EOS: appended after finished
    completions only, whatever `add_eos` says."""
    completion_ids_col: str = "completion_token_ids"
    """Optional: list of token-id lists, one per completion in the row's order (as `finished_col`), the
    tokens sampling produced (`copg generate` writes them, a finished completion's end token last). A
    completion whose ids the tokenizer decodes to exactly its text is trained on those ids, so training sees
    the tokens that were sampled (a control token the policy spelled out in characters stays characters); a
    finished one's ids may end with the end token it stopped on (data.eos_token, the tokenizer's EOS or one of
    the model's end tokens), which a policy is then trained to end with (a reward model: with
    data.eos_token, as it scores). Any other (its text edited since, another tokenizer) is tokenised from its
    text, and the data report counts it."""
    completion_col: str = "completion"
    """Scored and unpaired preference: the row's one completion."""
    reward_col: str = "reward"
    """Scored: the completion's reward."""
    reward_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    """Scored rows rated on several attributes (nvidia/HelpSteer2's helpfulness, correctness, coherence,
    complexity, verbosity): the reward is the sum of these columns times their weights, read in place of
    `reward_col`; each column is checked as a reward is. {} = `reward_col`."""
    label_col: str = "label"
    """Unpaired preference: true (a desirable completion) or false."""
    completion_a_col: str = "completion_a"
    """Pairwise: first completion."""
    completion_b_col: str = "completion_b"
    """Pairwise: second completion."""
    reward_a_col: str = "reward_a"
    """Pairwise: reward of the first completion."""
    reward_b_col: str = "reward_b"
    """Pairwise: reward of the second completion."""
    winner_col: str = ""
    """Pairwise and K-way rows labelled with the completion the data prefers, not scored: this column names it
    and the rewards are `preference_rewards` (the winner's, the others'), not read from reward columns.
    Pairwise: one of `winner_values`; K-way: the preferred completion's index (0-based). Any other value (a
    tie) is a bad row (no_winner). "" = the rows carry rewards."""
    winner_values: tuple[WinnerLabel, WinnerLabel] | None = None
    """Pairwise with `winner_col`: the value (or the list of values) saying completion_a won, and those
    saying completion_b won, required there (datasets disagree: a default would train half of them on the
    opposite preference). PKU-SafeRLHF's better_response_id (response_0, response_1): (0, 1); SHP's labels
    (1: human_ref_A preferred): (1, 0); Chatbot Arena's winner: (model_a, model_b); HelpSteer3's
    overall_preference (-3 to 3, negative: response1 better, 0 a tie): ([-3, -2, -1], [1, 2, 3])."""
    winner_cols: tuple[str, ...] = ()
    """Pairwise rows labelled by one indicator column per completion instead of `winner_col` (A's, then
    B's): the completion whose column holds 1 (or true) won; both 0 (a tie) or both 1 is a bad row
    (no_winner), any other value one of wrong_type. lmsys/lmsys-arena-human-preference-55k:
    (winner_model_a, winner_model_b). () = none."""
    chosen_col: str = "chosen"
    """Preference: preferred completion."""
    rejected_col: str = "rejected"
    """Preference: dispreferred completion."""
    score_chosen_col: str = "score_chosen"
    """Scored preference: reward of the chosen completion (UltraFeedback-binarized's name)."""
    score_rejected_col: str = "score_rejected"
    """Scored preference: reward of the rejected completion."""

    chat_template: bool = False
    """Wrap string prompts as one user message and apply the tokenizer's chat template (message-list prompts
    always go through the chat template)."""
    chat_template_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Variables of the chat template for every prompt it renders, as apply_chat_template's keyword arguments
    (Qwen3 and SmolLM3: `{enable_thinking: false}`; `tools`). Each must be one the template reads
    (`copg_jax.data.chat.check_template_kwargs`). Sampling (online rollouts, evaluation by generation,
    `copg generate --chat-template-kwargs`) renders prompts with them too."""
    max_prompt_length: int = 512
    """Prompt tokens kept (longer prompts are cut on `prompt_side`, or rejected when truncation="error")."""
    max_completion_length: int = 512
    """Completion tokens kept, EOS included."""
    prompt_side: str = "left"
    """Side a long prompt is cut from: "left" keeps its end, "right" keeps its start."""
    completion_side: str = "right"
    """Side a long completion is cut from."""
    truncation: str = "truncate"
    """"truncate" (cut and count) or "error" (an over-long prompt/completion is a bad row)."""
    add_eos: bool = True
    """Append the tokenizer's EOS to each completion (unless already there) of rows without a `finished_col`
    field (rows with it get EOS exactly where they finished); truncation may cut it again."""

    layout: str = "padded"
    """"padded" (one row per completion), "packed" (several completions per row) or "shared_prefix" (a prompt
    once, then its K completions, groups packed into rows)."""
    batch_size: int = 8
    """Prompts per global batch (all hosts together); must divide by the number of processes."""
    max_completions: int = 0
    """K, completion slots per prompt; 0 = the largest count in the data. Rows with more are bad rows; a
    prompt of the scored / unpaired_preference formats with more completions is split into as few groups of
    at most K as hold them, of sizes as equal as can be."""
    row_length: int = 0
    """Row length T of the packed / shared_prefix layouts; 0 = the longest possible sequence (packed) or
    prompt+group (shared_prefix), rounded up to `pad_multiple`."""
    buckets: tuple[int, ...] = ()
    """Padded layout: allowed row lengths; a batch uses the smallest that fits (() = round up to
    `pad_multiple`)."""
    pad_multiple: int = 128
    """Row lengths are rounded up to a multiple of this (when no bucket applies)."""
    seed: int = 0
    """Seed of the per-epoch shuffle."""
    shuffle: bool = True
    """Shuffle rows each epoch (deterministically from `seed` and the epoch number)."""
    drop_last: bool = True
    """Drop the last incomplete batch of an epoch (False pads it with masked prompts)."""
    on_bad_row: str = "error"
    """"error": stop at invalid rows with a message naming row, file and field; "skip": drop them, counted
    and reported per reason."""
    ref_cache: str = ""
    """Parquet file of cached reference log-probs for `path` ("": ref_cache/train.parquet in the run
    folder, train.output_dir)."""
    eval_ref_cache: str = ""
    """Parquet file of cached reference log-probs for `eval_path` ("": ref_cache/eval.parquet in the run
    folder)."""
    ref_weights_hash: str = "full"
    """How the reference checkpoint's weight files enter the cache fingerprint: "full" (every byte, hashed
    once per file and cached beside it by size/mtime) or "sampled" (16 blocks of 64 KiB per file: fast on huge
    folders, blind to changes elsewhere; every use is logged as a warning)."""

    def __post_init__(self):
        choices = {
            "format": FORMATS,
            "layout": LAYOUTS,
            "prompt_side": ("left", "right"),
            "completion_side": ("left", "right"),
            "truncation": ("truncate", "error"),
            "on_bad_row": ("error", "skip"),
            "ref_weights_hash": ("full", "sampled"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"data.{name}={getattr(self, name)!r}; expected one of {allowed}")
        chosen, rejected = self.preference_rewards
        if not all(abs(r) <= REWARD_MAX for r in (chosen, rejected)):  # nan too
            raise ValueError(f"data.preference_rewards={tuple(self.preference_rewards)}: {REWARD_RANGE[3:]}")
        if not chosen > rejected:
            raise ValueError(
                f"data.preference_rewards={tuple(self.preference_rewards)}: the chosen reward must be larger"
            )
        self.preference_rewards = (float(chosen), float(rejected))
        for key in self.chat_template_kwargs:
            if not isinstance(key, str):
                raise ValueError(f"data.chat_template_kwargs: the key {key!r} is not a string")
        refuse_reserved(self.chat_template_kwargs, "data.chat_template_kwargs")
        if self.prompt_template:
            prompt_template_fields(self.prompt_template)
            if self.prompt_col != "prompt":
                raise ValueError("data.prompt_template and data.prompt_col both give the prompt; set one")
        try:
            json.dumps(self.chat_template_kwargs, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"data.chat_template_kwargs: not plain data ({e})") from None
        self.buckets = tuple(sorted(int(b) for b in self.buckets))
        if self.buckets and self.buckets[0] < 1:
            raise ValueError(f"data.buckets={self.buckets}: row lengths must be >= 1")
        if self.winner_col and self.completion_reward_key:
            raise ValueError(
                "data.winner_col and data.completion_reward_key both give the rewards; set one of them"
            )
        self._check_labels()
        pairs = [("completion_a_col", "completion_b_col"), ("reward_a_col", "reward_b_col")]
        pairs += [("chosen_col", "rejected_col"), ("score_chosen_col", "score_rejected_col")]
        for first, second in pairs:  # one column read twice: every pair's two sides the same
            if getattr(self, first) and getattr(self, first) == getattr(self, second):
                raise ValueError(
                    f"data.{first} and data.{second} name the same column {getattr(self, first)!r}"
                )
        if self.winner_values is not None:
            a, b = (_winner_keys(side) for side in self.winner_values)
            if not a or not b or a & b:
                raise ValueError(
                    f"data.winner_values={tuple(self.winner_values)}: the values of A won and of B won must "
                    "differ (none in both)"
                )
        if self.negate_rewards is None:
            sources = ("completion_reward_key", "rewards_col", "reward_col", "reward_a_col", "reward_b_col")
            sources += ("score_chosen_col", "score_rejected_col")
            for name in sources:
                if RANK_NAME.search(getattr(self, name)):
                    raise ValueError(
                        f"data.{name}={getattr(self, name)!r} reads ranks, which are lower-is-better (1 = "
                        "the best; Nectar's answers): set data.negate_rewards=true to train on their "
                        "negation, or data.negate_rewards=false if higher is better there"
                    )
            self.negate_rewards = False
        positive = ("max_prompt_length", "max_completion_length", "batch_size", "pad_multiple")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.max_completions == 1 or self.max_completions < 0:
            raise ValueError(f"data.max_completions={self.max_completions} must be 0 (auto) or >= 2")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"data.seed={self.seed} must be in [0, 2^63)")
        if self.row_length < 0:
            raise ValueError(f"data.row_length={self.row_length} must be 0 (auto) or >= 1")
        if self.buckets and self.buckets[-1] < self.max_prompt_length + self.max_completion_length:
            raise ValueError(
                f"data.buckets={self.buckets}: the largest bucket must hold max_prompt_length + "
                f"max_completion_length = {self.max_prompt_length + self.max_completion_length}"
            )

    def _check_labels(self) -> None:
        """winner_cols, reward_weights and json_cols: well formed, and not set beside what they replace."""
        if self.winner_cols:
            if len(self.winner_cols) != 2 or self.winner_cols[0] == self.winner_cols[1]:
                raise ValueError(
                    f"data.winner_cols={list(self.winner_cols)}: expected two columns, A's indicator then B's"
                )
            for other in ("winner_col", "winner_values"):
                if getattr(self, other):
                    raise ValueError(f"data.winner_cols and data.{other} both label the winner; set one")
        for column, weight in self.reward_weights.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
                raise ValueError(f"data.reward_weights.{column}: expected a finite number, got {weight!r}")
        if self.reward_weights and self.reward_col != "reward":
            raise ValueError("data.reward_weights and data.reward_col both give the reward; set one")
        if self.json_cols is not None and len(set(self.json_cols)) != len(self.json_cols):
            raise ValueError(f"data.json_cols={list(self.json_cols)} names a column twice")

    def tokenization_settings(self) -> dict:
        """The settings that change token ids (they enter the reference-cache fingerprint), with the version
        of the tokenisation rules (`TOKENIZATION_RULES`)."""
        names = (
            "format prompt_col system_col messages_col completions_col rewards_col finished_col "
            "completion_ids_col completion_col "
            "reward_col label_col completion_a_col "
            "completion_b_col reward_a_col reward_b_col chosen_col rejected_col score_chosen_col "
            "score_rejected_col completion_text_key completion_reward_key winner_col winner_values "
            "chat_template max_prompt_length max_completion_length prompt_side "
            "completion_side truncation add_eos eos_token on_bad_row max_completions"
        ).split()
        values = {n: getattr(self, n) for n in names}  # as JSON holds them: a cache stores them so
        if self.winner_values is None:  # unset: as the earlier default was written, so caches stay valid
            values["winner_values"] = (0, 1)
        only_when_set = (
            "chat_template_kwargs",
            "prompt_template",
            "winner_cols",
            "json_cols",
            "reward_weights",
            "turn_marker",
        )
        for name in only_when_set:  # caches made before the setting existed stay valid
            if getattr(self, name):
                values[name] = getattr(self, name)
        return {
            "rules": TOKENIZATION_RULES,
            **{n: list(v) if isinstance(v, tuple) else v for n, v in values.items()},
        }


@functools.lru_cache(maxsize=16)  # read once per template, not once per row
def prompt_template_fields(template: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """`data.prompt_template` read into (text before, column, keys) parts: "POST: {info.post}" ->
    (("POST: ", "info", ("post",)),); text after the last field is a part with column "".

    Raises:
      ValueError: a field that is not `{column}`, `{column.key}` or `{column[i]}` (a conversion or format
        spec, an empty name), or no field at all.
    """
    parts = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"data.prompt_template: {e} (write {{{{ and }}}} for braces)") from None
    for text, name, spec, conversion in parsed:
        if name is None:
            parts.append((text, "", ()))
            continue
        match = re.fullmatch(r"([^.\[\]]+)((?:\.[^.\[\]]+|\[[^\[\]]+\])*)", name)
        if not match or spec or conversion:
            raise ValueError(
                f"data.prompt_template: field {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not {{column}}, {{column.key}} or {{column[i]}}"
            )
        keys = tuple(k for k in re.split(r"[.\[\]]+", match.group(2)) if k)
        parts.append((text, match.group(1), keys))
    if not any(column for _, column, _ in parts):
        raise ValueError(
            "data.prompt_template names no column ({column}): it would be one prompt for every row"
        )
    return tuple(parts)


def _winner_key(value) -> tuple:
    """A winner value compared by kind: a label true is not the index 1, an index 1.0 read from a float
    column is 1."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float) and float(value).is_integer():
        return ("number", int(value))
    return (type(value).__name__, value)


def _winner_keys(side) -> set[tuple]:
    """The keys of one side of winner_values: a value, or a list of values."""
    return {_winner_key(v) for v in (side if isinstance(side, list | tuple) else [side])}


def winner_index(value, values) -> int | None:
    """Which side of `values` (winner_values) `value` is on: 0, 1, or None (neither)."""
    key = _winner_key(value)
    return next((i for i, side in enumerate(values) if key in _winner_keys(side)), None)
