"""Reading scored-completion files and normalising every row format to {prompt, completions, rewards}.

Formats (column names are configurable in DataConfig):
  kway:       {prompt, completions: [y_1..y_K], rewards: [r_1..r_K]}   (K >= 2, may vary per row)
  pairwise:   {prompt, completion_a, reward_a, completion_b, reward_b}
Pairwise and K-way rows may name their preferred completion in a `data.winner_col` instead of carrying
rewards (PKU-SafeRLHF, SHP, Chatbot Arena): the winner gets `data.preference_rewards[0]`, the others [1].
  preference: {prompt, chosen, rejected}  -> rewards `data.preference_rewards`, by default (+1/4, -1/4):
              the paper's choice (Property 3), under which CoPG(beta) is IPO(tau = beta) (with the
              same loss.length_average)
  scored_preference: {prompt, chosen, rejected, score_chosen, score_rejected}  -> rewards = the two scores
One completion per row (GROUPED_FORMATS), the rows of one prompt grouped into one K-way row by `group_rows`:
  scored:     {prompt, completion, reward}
  unpaired_preference: {prompt, completion, label}  -> reward `data.preference_rewards[0 if label else 1]`
A prompt is a string or a list of chat messages {role, content}; a completion is a string, an assistant
message {role: assistant, content}, or a one-message list of it.

Where completions are conversations that carry the prompt too, the prompt's turns are taken off their start:
  - a message-list prompt that a completion repeats is removed from it;
  - a text prompt beside conversations (UltraFeedback-binarized: the prompt is also the conversations' user
    turn) gives way to the turns the conversations share, which must include it;
  - preference rows without a prompt column (Anthropic HH) have an implicit prompt: the longest common
    beginning of chosen and rejected, as TRL's `extract_prompt` takes it -- whole messages for conversations;
    for text, the common prefix moved back to a word start (TRL cuts inside a word where the two differ
    there: "The sky is bl" + "ue" / "ack"), one space before the cut going to the completions as in TRL.
What is left of each completion must then be one assistant message (or text).

Optional fields that `copg generate` writes, checked here: `finished` (one boolean per completion, in the
row's completion order -- K-way completions, (completion_a, completion_b), (chosen, rejected); one boolean
on a one-completion row: ended with EOS, or cut at the token limit), `chat_template` (whether the prompt
went through the chat template when the completions were sampled; it must match how training tokenises the
prompt) and `chat_template_kwargs` (the template's variables it was rendered with, as JSON text: they must
equal data.chat_template_kwargs); and, on rows of several completions, `completion_token_ids` (the sampled
token ids of each, a finished one's end token last, which training uses where they decode to the
completion's text: `data.tokenize`).
"""

from __future__ import annotations

import csv
import dataclasses
import decimal
import functools
import glob
import gzip
import io
import json
import logging
import math
import os
import re
import stat
import urllib.parse
import zlib
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import xxhash
import yaml

from copg_jax import paths
from copg_jax.batch import REWARD_MAX, REWARD_RANGE
from copg_jax.data.config import DataConfig, prompt_template_fields, winner_index
from copg_jax.data.fingerprint import hash_json, update_with_file
from copg_jax.jsonl import (
    MAX_DEPTH,
    BadLine,
    DuplicateKey,
    line_chunks,
    loads,
    lone_surrogate,
    open_bytes,
    parse_lines,
    too_deep,
)

log = logging.getLogger(__name__)

# reader per file extension: json by our reader (`_json_dataset`), others by that `datasets` builder (.gz
# files are decompressed)
EXTENSIONS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".csv": "csv",
    ".csv.gz": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
HUB_PREFIX = "hf://datasets/"
# JSON files are read by our reader into Arrow files in the cache, keyed by content and this version: bump it
# when what the reader keeps changes
JSON_READER_VERSION = 2  # 2: integers past 64 bits in Json columns as floats
# a JSON-lines file is read a chunk at a time, twice (`_json_lines_types`, then `_write_json_lines`), so that
# memory is bounded by a chunk, not the file: this many lines, or fewer where they reach JSON_CHUNK_BYTES
JSON_CHUNK_LINES = 8192
JSON_CHUNK_BYTES = 64 << 20
# what pyarrow's type inference gives values of these types together: the last present, in this order (as
# `pa.array` infers them; strings beside booleans are booleans, then fail to convert)
SCALAR_PRECEDENCE = (pa.string(), pa.bool_(), pa.int64(), pa.float64())
# a column value of these types ends pyarrow's inference (ints do not: a float may follow)
INFERENCE_ENDS = (bool, float, str)
ARROW_CONVERSION_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError)
# cells that are missing in CSV columns other than text (pandas' defaults; text columns have none)
CSV_MISSING = (
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
)  # fmt: skip


class BadRow(ValueError):
    """An invalid row; `reason` is a short category used to count skipped rows."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(f"field {field!r}: {detail}")
        self.reason = reason
        self.field = field
        self.detail = detail


@dataclass(frozen=True)
class Source:
    """One loaded data source: `name` (file path or hub name), its raw rows, the lines of the file that
    were skipped before becoming rows (data.on_bad_row=skip: jsonl.parse_line's BadLine reasons), and for
    a hub dataset the `revision` its rows come from (datasets' fingerprint, which hashes the repository
    commit)."""

    name: str
    rows: datasets.Dataset
    skipped: tuple[BadLine, ...] = ()
    revision: str = ""


def file_builder(path: str) -> str | None:
    """The `datasets` builder that reads `path` by its extension (EXTENSIONS), or None."""
    name = path.lower()
    return next((builder for ext, builder in EXTENSIONS.items() if name.endswith(ext)), None)


# what a hub dataset's snapshot holds beside its data files (huggingface-cli download): its card, licence,
# citation, loading script and metadata
SNAPSHOT_FILES = re.compile(
    r"(?:README|LICEN[CS]E|CITATION|COPYING|NOTICE)(?:\.(?:md|txt|rst|cff))?|.*\.(?:md|py)|dataset_infos\.json",
    re.IGNORECASE,
)


def _folder_files(folder: str) -> list[str]:
    """Every file under `folder`, recursively and sorted; symlinks are followed, each folder read once (a
    link back up the tree is not a loop), names starting with "." are left out, and so are the files a hub
    snapshot holds beside its data (a dataset card, a licence, a loading script: `SNAPSHOT_FILES`), logged.

    Raises:
      ValueError: an entry cannot be read (a broken or looping symlink, no permission), or files of no
        supported format are present (naming them: nothing is skipped silently).
    """
    files, unsupported, seen, documents = [], [], set(), []

    def walk(directory: str) -> None:
        real = os.path.realpath(directory)
        if real in seen:
            return
        seen.add(real)
        for name in sorted(os.listdir(directory)):
            entry = os.path.join(directory, name)
            if name.startswith("."):
                continue
            try:
                is_dir = stat.S_ISDIR(os.stat(entry).st_mode)
            except OSError as e:
                raise ValueError(f"data folder {folder!r}: {entry!r} cannot be read ({e.strerror})") from None
            if is_dir:
                walk(entry)
            elif SNAPSHOT_FILES.fullmatch(name):
                documents.append(os.path.relpath(entry, folder))
            elif file_builder(entry):
                files.append(entry)
            else:
                unsupported.append(entry)

    walk(folder)
    if documents:
        log.info("data folder %s: not data, left out: %s", folder, ", ".join(documents))
    if unsupported:
        shown = ", ".join(repr(f) for f in unsupported[:5]) + (" ..." if len(unsupported) > 5 else "")
        raise ValueError(
            f"data folder {folder!r} holds {len(unsupported)} file(s) of no supported format ({shown}); "
            f"supported: {', '.join(EXTENSIONS)}. Move them out, or set data.path to a glob of the files"
        )
    return files


def snapshot_subsets(folder: str) -> dict[str, list[str]]:
    """The subsets ("configs") a hub snapshot's dataset card declares (`configs:` in the YAML front matter of
    its README.md), each with the file patterns of its `data_files` (joined to its `data_dir`; a `data_dir`
    alone is every file under it), relative to `folder`; {} without a card or with at most one subset (one
    subset is the dataset). A card it cannot read (front matter that is not YAML, a `configs` entry of
    another shape) is left unread, with a warning: the folder is then read as one.
    """
    card = os.path.join(folder, "README.md")
    if not os.path.isfile(card):
        return {}
    with open(card, encoding="utf-8-sig", errors="replace") as f:
        text = f.read(1 << 20)
    match = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|$)", text, re.DOTALL)
    if not match:
        return {}
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as e:
        log.warning(
            "%s: front matter that is not YAML, left unread (%s)", card, " ".join(str(e).split())[:120]
        )
        return {}
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list) or len(configs) < 2:
        return {}
    subsets = {}
    for config in configs:
        patterns = _config_patterns(config)
        if patterns is None:
            log.warning(
                "%s: a `configs` entry of a shape not read (%.120r): the card is left unread", card, config
            )
            return {}
        subsets[str(config.get("config_name", "default"))] = patterns
    return subsets


def _config_patterns(config) -> list[str] | None:
    """The file patterns of one `configs` entry of a dataset card, None for an entry of another shape."""
    if not isinstance(config, dict):
        return None
    root = config.get("data_dir") or ""
    if not isinstance(root, str):
        return None
    root = root.removeprefix("./").strip("/")
    files = config.get("data_files", None if root else [])
    if files is None:
        return [f"{root}/**"]
    entries = files if isinstance(files, list) else [files]
    patterns = []
    for entry in entries:
        found = entry.get("path") if isinstance(entry, dict) else entry
        patterns += found if isinstance(found, list) else [found]
    if not patterns or not all(isinstance(p, str) for p in patterns):
        return None
    return [f"{root}/{p.removeprefix('./')}" if root else p for p in patterns]


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern:
    """A dataset card's file pattern as a regular expression of "/"-separated paths, as `datasets` globs:
    `*` and `?` stay within a folder, `**` crosses folders and `**/` matches no folder too, `[...]` is a
    character class; a leading `./` is the folder itself."""
    while pattern.startswith("./"):
        pattern = pattern[2:]
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] in "*?":
            out.append("[^/]*" if pattern[i] == "*" else "[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) > 0:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + re.escape(body[1:]) if body[0] in "!^" else re.escape(body)) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _matches(name: str, pattern: str) -> bool:
    """Whether a file's path (relative, "/"-separated) matches a dataset card's pattern (`_glob_regex`)."""
    return _glob_regex(pattern).fullmatch(name) is not None


def _one_subset(files: list[str], folder: str, split: str, by_split: bool) -> list[str]:
    """`files` of `folder` (those of `split` where `by_split`) where they are all of one subset its dataset
    card declares (`snapshot_subsets`). Without a card, a split read from several sibling folders is warned
    of: they may be a dataset's subsets.

    Raises:
      ValueError: they are of several subsets (GSM8K's main and socratic: the same questions twice, with two
        kinds of answer), naming them and how to read one, or all.
    """
    subsets = snapshot_subsets(folder)
    names = [os.path.relpath(f, folder).replace(os.sep, "/") for f in files]
    if not subsets:
        tops = sorted({n.split("/")[0] for n in names if "/" in n})
        if by_split and len(tops) > 1:
            log.warning(
                "data %s: split %r is read from %d folders together (%s): if they are subsets of one dataset "
                "(a hub snapshot's configs, GSM8K's main/ and socratic/), give one subset's folder",
                folder, split, len(tops), ", ".join(tops[:6]),
            )  # fmt: skip
        return files
    if any(all(any(_matches(n, p) for p in patterns) for n in names) for patterns in subsets.values()):
        return files
    shown = "; ".join(f"{name}: {', '.join(patterns[:2])}" for name, patterns in list(subsets.items())[:6])
    raise ValueError(
        f"data folder {folder!r} is a dataset of {len(subsets)} subsets ({shown}), whose files it would read "
        "together: give one subset's folder or a glob of its files (a glob of several subsets' files reads "
        "them all)"
    )


def _data_files(path: str, split: str) -> list[str]:
    """The files `path` names: a folder's files, the path itself when it exists (brackets in a file name are
    part of it), else every file it matches as a glob; of a folder's files named by split, those of `split`
    (`split_files`), of one subset where its dataset card declares several (`_one_subset`)."""
    if os.path.isdir(path):
        files = _folder_files(path)
        if not files:
            raise FileNotFoundError(f"data folder {path!r} holds no {', '.join(EXTENSIONS)} files")
        chosen = split_files(files, path, split)
        return _one_subset(chosen, path, split, by_split=len(chosen) < len(files))
    if os.path.exists(path) or not any(c in path for c in "*?["):
        return [path]
    files = sorted(glob.glob(path, recursive=True))
    if not files:
        raise FileNotFoundError(
            f"data glob {path!r} matches no file ([...] in a glob matches one character; [[] is a literal [)"
        )
    return files


# the words `datasets` reads as a split in file and folder names, by the split they name
SPLIT_SYNONYMS = (
    ("train", "training"),
    ("test", "testing", "eval", "evaluation"),
    ("validation", "valid", "val", "dev"),
)
_SPLIT_WORD = "|".join(w for words in SPLIT_SYNONYMS for w in words)
# a shard or part number after a split's name: train-00000-of-00004, train_1, train.0
_SHARD_SUFFIX = r"(?:[-_. ]?\d+(?:-of-\d+)?)*"
# a name that looks like a split's: one of the words, then nothing or - _ . and more (train_prefs,
# test-00000), or a name ending with one (hh_train, data-test-00000-of-00001)
_SPLIT_LIKE = re.compile(
    rf"(?:{_SPLIT_WORD})(?:[-_. ].*)?|.*[-_. ](?:{_SPLIT_WORD}){_SHARD_SUFFIX}", re.IGNORECASE
)


def _split_names(file: str, root: str) -> list[str]:
    """The names that may say the split of `file` in folder `root`: its folders below `root` and its file
    name without extensions ("data/train_prefs-00000-of-00001.parquet": data, train_prefs-00000-of-00001)."""
    *folders, name = os.path.normpath(os.path.relpath(file, root)).split(os.sep)
    extension = next((e for e in EXTENSIONS if name.lower().endswith(e)), "")
    return [*folders, name[: len(name) - len(extension)]]


def split_files(files: list[str], root: str, split: str) -> list[str]:
    """The files of folder `root` that hold split `split` where its files are named by split, as hub
    snapshots are (`train.jsonl.gz` beside `test.jsonl.gz`; `data/train_prefs-*.parquet` beside
    `data/test_prefs-*.parquet`; `train/` beside `test/`): those with a folder or file name that is `split`,
    or a word `datasets` reads as that split ("training" for train, "eval" or "dev" for test and validation),
    each maybe after other words (`hh_train`) and before shard numbers (`train-00000-of-00004`, `train_1`),
    in any case (`train_prefs` is a split of its own); the others are left out with a warning naming them.
    Files none of whose names looks like a split's are all read.

    Raises:
      ValueError: the files are named by split, none by `split` (reading them all would train on every split).
    """
    words = next((ws for ws in SPLIT_SYNONYMS if split.lower() in ws), (split.lower(),))
    own = re.compile(rf"(?:.*[-_. ])?(?:{'|'.join(map(re.escape, words))}){_SHARD_SUFFIX}", re.IGNORECASE)
    names = {f: _split_names(f, root) for f in files}
    chosen = [f for f in files if any(own.fullmatch(n) for n in names[f])]
    if chosen:
        left = [os.path.relpath(f, root) for f in files if f not in chosen]
        if left:
            log.warning(
                "data %s: the files of split %r (%d of %d); left out: %s",
                root,
                split,
                len(chosen),
                len(files),
                ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else ""),
            )
        return chosen
    splits = sorted({n for f in files for n in names[f] if _SPLIT_LIKE.fullmatch(n)})
    if splits:
        raise ValueError(
            f"data folder {root!r}: its files are named by split ({', '.join(splits[:8])}), none by "
            f"{split!r}: set the split to read (data.split; data.eval_split for data.eval_path; copg "
            "generate --split), or give a glob of the files to read (a glob reads every file it matches)"
        )
    return files


def text_fields(cfg: DataConfig) -> tuple[str, ...]:
    """The columns that hold prompts and completions: text, which a CSV file gives exactly as written."""
    return (
        cfg.prompt_col,
        cfg.messages_col,
        cfg.completions_col,
        cfg.completion_col,
        cfg.completion_a_col,
        cfg.completion_b_col,
        cfg.chosen_col,
        cfg.rejected_col,
        *([cfg.system_col] if cfg.system_col else []),
        *template_columns(cfg),
        *(cfg.json_cols or ()),
    )


def template_columns(cfg: DataConfig) -> list[str]:
    """The columns `data.prompt_template` reads, in order, each once."""
    if not cfg.prompt_template:
        return []
    return list(dict.fromkeys(c for _, c, _ in prompt_template_fields(cfg.prompt_template) if c))


DEFAULT_TEXT_FIELDS = text_fields(DataConfig())
DEFAULT_PROMPT_COL = DataConfig().prompt_col


def _json_line_chunks(file: str, skipped: list[BadLine] | None) -> Iterator[list[dict]]:
    """The rows of a JSON-lines file, JSON_CHUNK_LINES at a time; bad lines are appended to `skipped`, or
    raised (when it is None) naming file:line."""
    for lines in line_chunks(file, JSON_CHUNK_LINES, JSON_CHUNK_BYTES):
        try:
            rows = parse_lines(lines, file, skipped)
        except BadLine as e:
            raise ValueError(
                f"could not read data file {file!r}: {e} (data.on_bad_row=skip drops and counts such lines)"
            ) from None
        yield [row for _, row in rows]


def _json_lines_file(file: str) -> bool:
    """Whether `file` holds JSON lines: named .jsonl, or named .json with a first line that is a whole JSON
    object (as the hub's SHP files and many exports are; a JSON document's first line is "[" or part of an
    object)."""
    if not file.lower().endswith((".json", ".json.gz")):
        return True
    with open_bytes(file) as f:
        first = b""
        for _ in range(1000):  # blank lines before the first row
            line = f.readline()
            first = line.strip()
            if first or not line:
                break
    try:
        lines = first.startswith(b"{") and not too_deep(first) and isinstance(json.loads(first), dict)
    except ValueError:  # not UTF-8 or not JSON: the document reader names the fault
        return False
    if lines:
        log.info("data file %s: JSON lines, though named .json", file)
    return lines


def _json_document(file: str) -> list[dict]:
    """The rows of a JSON document: a list of objects (one object: one row).

    Raises:
      ValueError: not UTF-8, nested too deeply, not JSON, a key twice in an object, an item that is not an
        object, or a lone UTF-16 surrogate, naming the file (and the line or item where known).
    """
    with open_bytes(file) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{file}:{line}: not UTF-8 (byte {raw[e.start]:#04x})") from None
    if too_deep(raw):
        raise ValueError(f"data file {file!r}: nested more than {MAX_DEPTH} levels deep")
    try:
        value = loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{e.lineno}: not valid JSON: {e.msg}") from None
    except DuplicateKey as e:
        raise ValueError(f"data file {file!r}: {e}") from None
    rows = value if isinstance(value, list) else [value]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(
                f"data file {file!r}: item {i} is a {type(row).__name__}, not a JSON object (a row)"
            )
    surrogate = lone_surrogate(raw, rows)
    if surrogate:
        raise ValueError(
            f"data file {file!r}: lone UTF-16 surrogate {surrogate} in a string (half a character)"
        )
    return rows


def _json_column(values: list) -> pa.Array:
    """`datasets`' Json type with every value encoded here, so that each decodes to itself: a string that is
    valid JSON ('"w7"', 'true', '42') stays that string. An integer past 64 bits, which Arrow cannot hold and
    the Json decoder refused (failing the whole file for one value), is its float, inf past float64's range
    (as most JSON readers take such a number): a reward that size is then a bad row of its own."""
    encoded = [None if v is None else json.dumps(_wide_ints_as_floats(v), ensure_ascii=False) for v in values]
    return pa.array(encoded, type=pa.json_())


def _bool_as_number(value, type_: pa.DataType) -> bool:
    """Whether `value` holds a JSON true / false where `type_` holds a number: pyarrow converts it to 1 / 0
    (a column of floats takes a later boolean as 1.0), which would make a boolean read as a number or not by
    the values beside it; such a column is Json instead, each value itself."""
    if isinstance(value, bool):
        return _is_number(type_)
    if isinstance(value, list) and pa.types.is_list(type_):
        item = type_.value_type
        if _is_number(item):  # `in` compares in C (True == 1, so it only narrows), then the exact check
            return (True in value or False in value) and any(type(v) is bool for v in value)
        return _holds_number(item) and any(_bool_as_number(v, item) for v in value)
    if isinstance(value, dict) and pa.types.is_struct(type_):
        return any(_bool_as_number(value.get(f.name), f.type) for f in type_ if _holds_number(f.type))
    return False


def _is_number(type_: pa.DataType) -> bool:
    return pa.types.is_integer(type_) or pa.types.is_floating(type_)


def _holds_number(type_: pa.DataType) -> bool:
    """Whether `type_` is or holds (in lists, structs) a number type."""
    if pa.types.is_list(type_):
        return _holds_number(type_.value_type)
    if pa.types.is_struct(type_):
        return any(_holds_number(f.type) for f in type_)
    return _is_number(type_)


def _to_arrow(values: list, type_: pa.DataType | None = None) -> pa.Array:
    """`pa.array(values, type_)`, refusing what pyarrow would convert but not keep: a boolean as a number.

    Raises:
      pa.ArrowInvalid (in ARROW_CONVERSION_ERRORS): the values do not convert, or a boolean would be a number.
    """
    array = pa.array(values, type=type_)
    if _bool_as_number(values, pa.list_(array.type)):
        raise pa.ArrowInvalid(f"a boolean among numbers would become a number ({array.type})")
    return array


def _column(values: list) -> pa.Array:
    """One column of JSON values as Arrow: their common type, or, where they have none (text prompts beside
    chat prompts, booleans beside numbers, an integer past 64 bits), Json (`_json_column`)."""
    try:
        return _to_arrow(values)
    except ARROW_CONVERSION_ERRORS:
        return _json_column(values)


INT64 = range(-(2**63), 2**63)


def _wide_ints_as_floats(value):
    """`value` with every integer outside int64 (in lists and objects too) as a float; `value` itself when
    it holds none."""
    if type(value) is int:
        if value in INT64:
            return value
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, list):
        items = [_wide_ints_as_floats(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    if isinstance(value, dict):
        items = {k: _wide_ints_as_floats(v) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else items
    return value


def _rows_table(rows: list[dict]) -> pa.Table:
    """Rows -> an Arrow table with a column for each key of any row (in order of first appearance, null in
    rows without it)."""
    names = list(dict.fromkeys(key for row in rows for key in row))
    return pa.table({name: _column([row.get(name) for row in rows]) for name in names})


def _inferred_type(values: list) -> pa.DataType | None:
    """The type `pa.array(values)` would convert to; None where it has none (a list beside other values)."""
    try:
        return pa.infer_type(values)
    except ARROW_CONVERSION_ERRORS:
        return None


def _merged_type(a: pa.DataType | None, b: pa.DataType | None) -> pa.DataType | None:
    """The type pyarrow infers for values of inferred types `a` and `b` together (their lists' items merged,
    their structs' fields united in order of first appearance, scalars by SCALAR_PRECEDENCE); None where it
    has none: a list or an object beside any other value, at any depth."""
    if a is None or b is None:
        return None
    if pa.types.is_null(a) or pa.types.is_null(b):
        return b if pa.types.is_null(a) else a
    if pa.types.is_list(a) and pa.types.is_list(b):
        item = _merged_type(a.value_type, b.value_type)
        return None if item is None else pa.list_(item)
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        fields = {field.name: field.type for field in a}
        for field in b:
            fields[field.name] = _merged_type(fields.get(field.name, pa.null()), field.type)
        return None if None in fields.values() else pa.struct(list(fields.items()))
    if pa.bool_() in (a, b) and a != b:  # a boolean beside a number or a string: no common type (`_to_arrow`)
        return None
    if a in SCALAR_PRECEDENCE and b in SCALAR_PRECEDENCE:
        return max(a, b, key=SCALAR_PRECEDENCE.index)
    return None


def _converts(values: list, type_: pa.DataType) -> bool:
    """Whether `_to_arrow(values, type_)` converts every value."""
    try:
        _to_arrow(values, type_)
    except ARROW_CONVERSION_ERRORS:
        return False
    return True


def _json_lines_types(chunks: Iterable[list[dict]]) -> tuple[dict[str, pa.DataType | None], int]:
    """The type of each column of rows read in `chunks` (None: Json), in order of first appearance, exactly
    as `_rows_table` would type all the rows at once, and the number of rows.

    pyarrow infers a column's type from its values up to the first boolean, float or string (INFERENCE_ENDS)
    and then converts every value to it: chunk by chunk, the types inferred are merged until that value
    (`_merged_type`), and from there on the values are only checked to convert. A column still being merged
    at the end may hold a value that does not convert to its final type: `_write_json_lines` finds it."""
    types: dict[str, pa.DataType | None] = {}
    ended: set[str] = set()
    count = 0
    for rows in chunks:
        count += len(rows)
        for name in dict.fromkeys(key for row in rows for key in row):
            type_ = types.setdefault(name, pa.null())
            if type_ is None:
                continue
            values = [row.get(name) for row in rows]
            if name not in ended:
                type_ = _merged_type(type_, _inferred_type(values))
                if any(isinstance(v, INFERENCE_ENDS) for v in values):
                    ended.add(name)
            if name in ended and type_ is not None and not _converts(values, type_):
                type_ = None
            types[name] = type_
    return types, count


class _NotConverted(Exception):
    """Values of the columns `names` that do not convert to the types chosen for them."""

    def __init__(self, names: list[str]):
        super().__init__(", ".join(names))
        self.names = names


def _typed_table(rows: list[dict], types: dict[str, pa.DataType | None]) -> pa.Table:
    """`rows` as an Arrow table of the columns `types` names, each of its type (None: Json).

    Raises:
      _NotConverted: naming the columns with a value that does not convert to its type.
    """
    columns, failed = {}, []
    for name, type_ in types.items():
        values = [row.get(name) for row in rows]
        try:
            columns[name] = _json_column(values) if type_ is None else _to_arrow(values, type_)
        except ARROW_CONVERSION_ERRORS:
            failed.append(name)
    if failed:
        raise _NotConverted(failed)
    return pa.table(columns)


def _write_json_lines(file: str, types: dict[str, pa.DataType | None], path: Path) -> None:
    """Writes the rows of a JSON-lines file (its bad lines left out) as the Arrow stream file `path`, a
    record batch a chunk, each column of its type in `types` (`_json_lines_types`); when a column's values
    turn out not to convert to it, the column is Json and the file is written again."""
    while True:
        schema = pa.schema([(name, pa.json_() if t is None else t) for name, t in types.items()])
        try:
            with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                for rows in _json_line_chunks(file, []):
                    writer.write_table(_typed_table(rows, types))
            return
        except _NotConverted as e:
            if all(types[name] is None for name in e.names):  # Json already: writing again would loop
                raise ValueError(f"data file {file!r}: column(s) {e.names} do not convert to Arrow") from None
            types = {**types, **dict.fromkeys(e.names)}


def _content_key(file: str) -> str:
    """xxh3-128 of the file's stored bytes and JSON_READER_VERSION."""
    h = xxhash.xxh3_128(f"copg-json-v{JSON_READER_VERSION}".encode())
    update_with_file(h, file)
    return h.hexdigest()


def _replace(path: Path, write) -> None:
    """Writes `path` atomically: `write(tmp)`, then renamed into place."""
    paths.remove_stale_temps(path)
    tmp = Path(paths.temp_beside(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_arrow(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _cache_json(file: str, on_bad_row: str, arrow: Path, bad: Path) -> None:
    """Reads a JSON(-lines) file into the cache: its rows in the Arrow file `arrow`, its bad lines in `bad`.
    A JSON document is read whole; a JSON-lines file (also one named .json) a chunk at a time, twice
    (`_json_lines_types`, then `_write_json_lines`), in memory bounded by a chunk, however large the file.

    Raises:
      ValueError: a bad line (unless on_bad_row == "skip") or a bad document, naming file:line; no rows.
    """
    skipped: list[BadLine] = []
    rows = _json_document(file) if not _json_lines_file(file) else None
    if rows is not None:
        count, write = len(rows), functools.partial(_write_arrow, _rows_table(rows))
    else:
        types, count = _json_lines_types(_json_line_chunks(file, skipped if on_bad_row == "skip" else None))
        write = functools.partial(_write_json_lines, file, types)
    if not count:
        raise ValueError(f"data file {file!r}: no readable rows ({len(skipped)} bad lines)")
    arrow.parent.mkdir(parents=True, exist_ok=True)
    found = [[e.line_no, e.reason, e.detail] for e in skipped]
    _replace(bad, lambda tmp: tmp.write_text(json.dumps(found)))
    _replace(arrow, write)


def _json_dataset(file: str, on_bad_row: str, cache_dir: str) -> tuple[datasets.Dataset, tuple[BadLine, ...]]:
    """A JSON(-lines) file read by our reader, every value exactly as written, and kept as an Arrow file in
    the cache keyed by the file's content: parsed once (`_cache_json`: JSON lines in bounded memory), then
    memory-mapped (so is what `datasets.map` makes of it). The bad lines skipped are kept beside it; with
    on_bad_row="error" the first one is raised.

    The `datasets` JSON builder is not used: it decodes strings that are valid JSON in columns of mixed
    types, reads a file that pyarrow refuses (a duplicate key, a lone surrogate) column-wise through pandas,
    and segfaults on deep nesting."""
    folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "copg_json"
    key = _content_key(file)
    arrow, bad = folder / f"{key}.arrow", folder / f"{key}.skipped.json"
    if not (arrow.exists() and bad.exists()):
        _cache_json(file, on_bad_row, arrow, bad)
    skipped = tuple(BadLine(file, n, reason, detail) for n, reason, detail in json.loads(bad.read_text()))
    if skipped and on_bad_row != "skip":
        raise ValueError(
            f"could not read data file {file!r}: {skipped[0]} "
            "(data.on_bad_row=skip drops and counts such lines)"
        )
    return datasets.Dataset.from_file(str(arrow)), skipped


def _csv_header(file: str) -> list[str]:
    with open_bytes(file) as f:
        return next(csv.reader(io.TextIOWrapper(f, encoding="utf-8-sig", newline="")), [])


def _csv_options(file: str, text_columns: Collection[str]) -> dict:
    """`datasets` CSV builder options: text columns exactly as written ("NA", "None", "" and "007" stay
    text), other columns (rewards) as pandas reads them, CSV_MISSING cells missing."""
    header = _csv_header(file)
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:  # pandas would rename the second one "name.1", and it would go unread
        raise ValueError(f"data file {file!r}: column(s) {repeated} appear more than once in the CSV header")
    return {
        "keep_default_na": False,
        "converters": {c: str for c in header if c in text_columns},
        "na_values": {c: list(CSV_MISSING) for c in header if c not in text_columns},
    }


CSV_INT = re.compile(r"[+-]?\d+")


def _csv_cell(value):
    """A CSV cell of a column pandas left as text (one of its cells is no number): a number or a boolean
    where it reads as one (true / false in any case), else the text."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if "_" in text:  # Python's int and float read "1_000"; pandas does not: text
        return value
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if CSV_INT.fullmatch(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return value


def _csv_typed(rows: datasets.Dataset, content_key: str, text_columns: Collection[str], cache_dir: str):
    """`rows` of a CSV file with every column other than text that pandas read as text (one cell that is no
    number made the whole column text, and then every row's reward a "string", every row a bad row) read
    cell by cell (`_csv_cell`): the one bad cell is one bad row. Kept as an Arrow file in the cache keyed by
    the file's content (`content_key`, `_content_key`) and the text columns; `rows` itself when no column
    needs it."""
    loose = [
        name
        for name, feature in rows.features.items()
        if name not in text_columns and getattr(feature, "dtype", None) in ("string", "large_string")
    ]
    if not loose:
        return rows
    folder = Path(cache_dir or datasets.config.HF_DATASETS_CACHE) / "copg_csv"
    key = hash_json({"file": content_key, "text": sorted(text_columns)})
    arrow = folder / f"{key}.arrow"
    if not arrow.exists():
        table = rows.data.table
        columns = {
            name: _column([_csv_cell(v) for v in table[name].to_pylist()]) if name in loose else table[name]
            for name in table.column_names
        }
        folder.mkdir(parents=True, exist_ok=True)
        _replace(arrow, functools.partial(_write_arrow, pa.table(columns)))
    return datasets.Dataset.from_file(str(arrow))


HUB_OPTIONS = ("name", "data_dir", "revision")


def hub_dataset(path: str) -> tuple[str, dict[str, str]]:
    """The dataset and `datasets.load_dataset` options of hf://datasets/ORG/NAME[?name=SUBSET&data_dir=DIR&
    revision=REV]: a dataset's subset ("config": GSM8K's main, summarize_from_feedback's comparisons), a
    folder of its repository (hh-rlhf's helpful-base) and a revision.

    Raises:
      ValueError: an option not in HUB_OPTIONS, given twice or empty.
    """
    name, _, query = path[len(HUB_PREFIX) :].partition("?")
    options = urllib.parse.parse_qs(query, keep_blank_values=True) if query else {}
    for key, values in options.items():
        if key not in HUB_OPTIONS or len(values) != 1 or not values[0]:
            raise ValueError(
                f"{path!r}: option {key}={values} is not one of {', '.join(HUB_OPTIONS)}, given once with a "
                "value (hf://datasets/ORG/NAME?name=SUBSET&data_dir=DIR&revision=REV)"
            )
    return name, {k: v[0] for k, v in options.items()}


def load_sources(
    path: str,
    split: str,
    cache_dir: str = "",
    on_bad_row: str = "error",
    text_columns: Collection[str] = DEFAULT_TEXT_FIELDS,
    typed_cells: bool = True,
) -> list[Source]:
    """Loads raw rows from a file, glob, folder (recursively), `save_to_disk` folder or hub dataset (only as
    hf://datasets/ORG/NAME, `hub_dataset`: a missing local path is an error, never a network request).

    Files are loaded one by one so that errors can name the file and the row inside it. A JSON-lines line
    that is not UTF-8, not JSON, nested too deeply, repeats a key or holds a lone UTF-16 surrogate stops
    loading naming file and line, or with on_bad_row="skip" is left out and returned in `Source.skipped`.
    CSV columns named in `text_columns` (`text_fields(cfg)`) are read as text, exactly as written; a column
    of other cells that pandas reads as text is read cell by cell (`_csv_typed`: a reward column with one bad
    cell) where `typed_cells`, else left as `datasets` reads it (a prompt file's fields for a reward).
    """
    if not path:
        raise ValueError("data.path is empty: give a JSONL/Parquet/Arrow/CSV file, folder or dataset name")
    cache = cache_dir or None
    if path.startswith(HUB_PREFIX):
        name, options = hub_dataset(path)
        rows = datasets.load_dataset(name, split=split, cache_dir=cache, **options)
        # the builder's hash is the hub commit: a new revision of the dataset changes this fingerprint
        where = name + "".join(f"[{k}={v}]" for k, v in options.items())
        return [Source(f"{where}[{split}]", rows, revision=getattr(rows, "_fingerprint", "") or "")]
    if paths.is_url(path):  # `datasets` and the checks below read local files: a staged copy
        path = paths.stage(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_dict.json")):
        loaded = datasets.load_from_disk(path)
        if split not in loaded:
            raise ValueError(
                f"{path!r} has splits {list(loaded)}, not {split!r} (data.split / data.eval_split)"
            )
        return [Source(f"{path}[{split}]", loaded[split])]
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "state.json")):
        return [Source(path, datasets.load_from_disk(path))]
    if not os.path.exists(path) and not any(c in path for c in "*?["):
        raise FileNotFoundError(
            f"data file {path!r} does not exist (a hub dataset is written {HUB_PREFIX}ORG/NAME)"
        )
    sources = []
    for file in _data_files(path, split):
        builder = file_builder(file)
        if builder is None:
            raise ValueError(
                f"data file {file!r}: unknown extension; expected one of {', '.join(EXTENSIONS)}"
            )
        if os.path.getsize(file) == 0:  # the json/parquet builders fail on it with an empty message
            raise ValueError(f"data file {file!r} is empty (no rows)")
        if builder == "json":
            try:
                sources.append(Source(file, *_json_dataset(file, on_bad_row, cache_dir)))
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # a .gz cut short, or not gzip at all
                raise ValueError(f"could not read data file {file!r}: {type(e).__name__}: {e}") from None
            continue
        try:
            options = _csv_options(file, text_columns) if builder == "csv" else {}
            # `datasets` keys its cache of a file by path and modification time: a file replaced with its
            # time kept (a copy with -p, a sync) was read as its old rows. Keyed by content here, as JSON is.
            content_key = _content_key(file)  # one read of the file for both caches
            by_content = os.path.join(cache or datasets.config.HF_DATASETS_CACHE, "copg_files", content_key)
            # data_files is a glob to `datasets`: escaped, a name with [...] is itself
            rows = datasets.load_dataset(
                builder, data_files=glob.escape(file), split="train", cache_dir=by_content, **options
            )
            if builder == "csv" and typed_cells:
                rows = _csv_typed(rows, content_key, text_columns, cache_dir)
        except Exception as e:  # the library's own messages rarely name the file, never the line
            cause = (
                e.__cause__
                if isinstance(e, datasets.exceptions.DatasetGenerationError) and e.__cause__
                else e
            )
            reason = (
                " ".join(str(cause).split()) or type(cause).__name__
            )  # pandas' and pyarrow's, on one line
            raise ValueError(f"could not read data file {file!r}: {reason[:300]}") from e
        sources.append(Source(file, rows))
    return sources


# formats whose rows may leave the prompt implicit: the shared beginning of the two completions (chosen and
# rejected; Chatbot Arena's conversation_a and conversation_b)
PREFERENCE_FORMATS = ("preference", "scored_preference")
IMPLICIT_PROMPT = (*PREFERENCE_FORMATS, "pairwise")
# formats of one completion per row, grouped by prompt into K-way rows (`group_rows`)
GROUPED_FORMATS = ("scored", "unpaired_preference")


# columns, when a table's only prompt is the implicit one, that hold its prompt in truth: format auto refuses
# to leave them unread (Intel/orca_dpo_pairs: system, question, chosen, rejected)
PROMPT_LIKE = (
    *("instruction", "input", "question", "query", "history", "context", "post", "conversation"),
    *("problem", "dialog", "dialogue"),
)
# words that make a column beside chosen / rejected look like their score (RLHFlow's chosen_score, argilla's
# chosen-rating, dpo-mix's chosen_rating): format auto refuses to train on the fixed preference rewards then
SCORE_WORDS = ("score", "rating", "reward")


def _format_columns(cfg: DataConfig) -> dict[str, tuple[str, ...]]:
    kway_rewards = () if cfg.completion_reward_key else (cfg.rewards_col,)
    pair_rewards = (cfg.reward_a_col, cfg.reward_b_col)
    if cfg.winner_col:
        kway_rewards = pair_rewards = (cfg.winner_col,)
    if cfg.winner_cols:
        pair_rewards = tuple(cfg.winner_cols)
    return {
        "kway": (cfg.completions_col, *kway_rewards),
        "pairwise": (cfg.completion_a_col, cfg.completion_b_col, *pair_rewards),
        "preference": (cfg.chosen_col, cfg.rejected_col),
        "scored_preference": (cfg.chosen_col, cfg.rejected_col, cfg.score_chosen_col, cfg.score_rejected_col),
        "scored": (cfg.completion_col, *(cfg.reward_weights or (cfg.reward_col,))),
        "unpaired_preference": (cfg.completion_col, cfg.label_col),
    }


def detect_format(columns: list[str], cfg: DataConfig, source: str = "") -> str:
    """The row format of a table with these columns: cfg.format, or the one format they match when "auto".

    A prompt column is needed except by IMPLICIT_PROMPT formats; of two matching formats, one whose columns
    are all among the other's gives way to it (preference rows with score columns are scored_preference).

    Raises:
      ValueError: the columns match no format or several (naming the source and columns).
    """
    where = f" in {source!r}" if source else ""
    if missing := [c for c in template_columns(cfg) if c not in columns]:
        raise ValueError(
            f"data.prompt_template reads column(s) {missing}, which the rows{where} lack; found "
            f"{sorted(columns)}"
        )
    if cfg.system_col and cfg.system_col not in columns:  # a typo trained every row without its system turn
        raise ValueError(
            f"data.system_col={cfg.system_col!r}: no such column{where}; found {sorted(columns)}"
        )
    if missing := [c for c in cfg.json_cols or () if c not in columns]:
        raise ValueError(
            f"data.json_cols names column(s) {missing}, which the rows{where} lack; found {sorted(columns)}"
        )
    prompt_ok = cfg.prompt_col in columns or cfg.messages_col in columns or bool(cfg.prompt_template)
    if not prompt_ok and cfg.prompt_col != DEFAULT_PROMPT_COL:  # named, yet absent: never an implicit prompt
        raise ValueError(
            f"data.prompt_col={cfg.prompt_col!r}: no such column{where}; found {sorted(columns)}"
        )
    needs = _format_columns(cfg)
    if cfg.format != "auto":
        missing = [c for c in needs[cfg.format] if c not in columns]
        if not prompt_ok and cfg.format not in IMPLICIT_PROMPT:
            missing.insert(0, f"{cfg.prompt_col} (or {cfg.messages_col})")
        if missing:
            raise ValueError(
                f"format {cfg.format!r}{where}: missing column(s) {missing}; found {sorted(columns)}"
            )
        return _winner_format(cfg.format, cfg, where)
    matches = [
        fmt
        for fmt, cols in needs.items()
        if all(c in columns for c in cols) and (prompt_ok or fmt in IMPLICIT_PROMPT)
    ]
    matches = [m for m in matches if not any(set(needs[m]) < set(needs[other]) for other in matches)]
    if len(matches) > 1:
        raise ValueError(
            f"ambiguous data format{where}: columns {sorted(columns)} match {matches}; set data.format"
        )
    if not matches:
        expected = {
            fmt: [f"[{cfg.prompt_col}]" if fmt in IMPLICIT_PROMPT else cfg.prompt_col, *cols]
            for fmt, cols in needs.items()
        }
        raise ValueError(
            f"cannot detect the data format{where}: columns {sorted(columns)}; expected one of {expected} "
            f"([{cfg.prompt_col}]: optional, the completions' shared beginning when absent)"
        )
    fmt = matches[0]
    if fmt in IMPLICIT_PROMPT and not prompt_ok:
        like = [c for c in columns if c.lower() in PROMPT_LIKE]
        if like:
            raise ValueError(
                f"data format{where}: no {cfg.prompt_col!r} column, and column {like[0]!r} looks like the "
                f"prompt; set data.prompt_col={like[0]}, or data.format={fmt} to take the prompt from the "
                "beginning the completions share"
            )
    if fmt == "preference":
        scores = [_score_like(columns, col) for col in (cfg.chosen_col, cfg.rejected_col)]
        if all(scores):
            raise ValueError(
                f"data format{where}: columns {scores[0]!r} and {scores[1]!r} look like the scores of "
                f"{cfg.chosen_col} and {cfg.rejected_col}, which format 'preference' does not read; set "
                f"data.score_chosen_col={scores[0]} data.score_rejected_col={scores[1]} to train on them, or "
                "data.format=preference to train on the preference alone"
            )
    return _winner_format(fmt, cfg, where)


def _score_like(columns: list[str], completion_col: str) -> str | None:
    """The first column named as `completion_col`'s score: it and a score word (SCORE_WORDS), either way
    round, joined by at most one "_", "-" or space (chosen_score, chosen-rating, score_chosen; not
    chosen_reward_model, which names a model), if any."""
    name, words = re.escape(completion_col.lower()), "|".join(SCORE_WORDS)
    pattern = re.compile(rf"{name}[_\- ]?(?:{words})s?|(?:{words})s?[_\- ]?{name}")
    return next((c for c in columns if pattern.fullmatch(c.lower())), None)


# rows looked at for text columns holding structure read as text (`refuse_unread_structure`)
JSON_TEXT_ROWS = 16


def _json_list_text(value) -> bool:
    """Whether a value is text holding a JSON list of texts or nulls (a model's failed answer: arena rows)."""
    if not isinstance(value, str) or not (text := value.strip()).startswith("[") or not text.endswith("]"):
        return False
    try:
        items = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(items, list) and bool(items) and all(i is None or isinstance(i, str) for i in items)


# NeMo's chat format, in which nvidia/HelpSteer and HelpSteer2 write their multi-turn prompts as one text
NEMO_TURN = re.compile(r"<extra_id_1>(?:User|Assistant)\n")


def refuse_unread_structure(rows: datasets.Dataset, cfg: DataConfig, source: str) -> None:
    """Refuses rows whose text columns hold a structure that would be trained as text: JSON lists
    (`_refuse_json_text`), or conversations in NeMo's turn lines (`data.turn_marker` unset), among the first
    JSON_TEXT_ROWS rows of its prompt and completion columns.

    Raises:
      ValueError: naming the columns, the source and the settings that read them.
    """
    if cfg.json_cols is not None and cfg.turn_marker is not None:  # both read as the settings say
        return
    names = (cfg.prompt_col, cfg.completion_col, cfg.completion_a_col, cfg.completion_b_col, cfg.chosen_col)
    columns = [c for c in dict.fromkeys((*names, cfg.rejected_col)) if c in rows.column_names]
    head = rows.select_columns(columns).select(range(min(JSON_TEXT_ROWS, len(rows)))).to_list()
    _refuse_json_text(head, columns, cfg, source)
    if cfg.turn_marker is not None or cfg.prompt_col not in columns:
        return
    prompts = [r[cfg.prompt_col] for r in head if isinstance(r[cfg.prompt_col], str)]
    if marked := [p for p in prompts if NEMO_TURN.search(p)]:
        raise ValueError(
            f"{source}: {len(marked)} of the first {len(head)} prompts ({cfg.prompt_col!r}) hold earlier "
            "turns of a conversation in NeMo's '<extra_id_1>User' / '<extra_id_1>Assistant' lines "
            "(nvidia/HelpSteer2's multi-turn prompts): set data.turn_marker='<extra_id_1>' to read them as "
            "chat turns, or data.turn_marker='' to train them as the text they are"
        )
    hh = [p for p in prompts if HH_HUMAN in p and p.rstrip().endswith(HH_ASSISTANT.strip())]
    if hh and (cfg.chat_template or cfg.system_col):  # a template would render the whole text as one turn
        raise ValueError(
            f"{source}: {len(hh)} of the first {len(head)} prompts ({cfg.prompt_col!r}) are conversations in "
            "Anthropic HH's 'Human:' / 'Assistant:' lines (Nectar's prompts), which the chat template would "
            "render as one user turn holding them all: set data.turn_marker=hh to read them as chat turns, "
            "or data.turn_marker='' to template them as the text they are (or leave data.chat_template off "
            "for a base model)"
        )


def _refuse_json_text(head: list[dict], columns: list[str], cfg: DataConfig, source: str) -> None:
    """With `data.json_cols` unset, refuses rows whose prompt column holds JSON lists of texts in three
    quarters or more of `head` (their first rows, of `columns`: the CSV of lmsys-arena-human-preference-55k),
    naming it and the completion columns that do too: read as text, their brackets, quotes and escapes (a
    newline as the two characters \\n) would be trained. Completions alone holding JSON lists are
    structured output (an extraction task's answers), not refused.

    Raises:
      ValueError: naming the columns, the source and the settings that read them.
    """
    if cfg.json_cols is not None:
        return
    flagged = [
        c
        for c in columns
        if (values := [r[c] for r in head if r[c] is not None])
        and sum(map(_json_list_text, values)) >= 0.75 * len(values)
    ]
    if cfg.prompt_col in flagged:
        raise ValueError(
            f"{source}: column(s) {flagged} hold JSON text of lists in most of the first {len(head)} rows, "
            f"as lmsys-arena-human-preference-55k's turns do: set data.json_cols={flagged} to read them "
            "as lists (user turns, answers one per turn), or data.json_cols=[] to train the text as it is"
        )


def _winner_format(fmt: str, cfg: DataConfig, where: str) -> str:
    """`fmt`, once the settings that read only some formats' rewards are checked against it."""
    if cfg.winner_cols and fmt != "pairwise":
        raise ValueError(
            f"data.winner_cols={list(cfg.winner_cols)} labels pairwise rows; the rows{where} are {fmt!r}"
        )
    if cfg.reward_weights and fmt != "scored":
        raise ValueError(
            f"data.reward_weights weighs the columns of scored rows; the rows{where} are {fmt!r}"
        )
    if cfg.winner_col and fmt not in ("pairwise", "kway"):
        raise ValueError(
            f"data.winner_col={cfg.winner_col!r} labels pairwise or kway rows; the rows{where} are {fmt!r}"
        )
    if cfg.winner_col and fmt == "pairwise" and cfg.winner_values is None:
        raise ValueError(
            f"data.winner_col={cfg.winner_col!r} labels the pairwise rows{where}: set "
            f"data.winner_values=[A, B] to the values meaning {cfg.completion_a_col} won and "
            f"{cfg.completion_b_col} won (PKU-SafeRLHF's better_response_id: [0,1]; SHP's labels: [1,0]); "
            "datasets disagree, so there is no default"
        )
    return fmt


def describe_reading(columns: list[str], fmt: str, cfg: DataConfig, detected: bool) -> str:
    """One line for the data log: how a table with these columns is read as format `fmt` (where its prompt
    and rewards come from) and which of its columns are not read."""
    needs = _format_columns(cfg)[fmt]
    prompt_col = next((c for c in (cfg.prompt_col, cfg.messages_col) if c in columns), None)
    if fmt == "preference":
        rewards = f"data.preference_rewards {tuple(cfg.preference_rewards)}"
    elif fmt == "pairwise" and cfg.winner_cols:
        a, b = cfg.winner_cols
        rewards = f"data.preference_rewards by columns {a!r} ({cfg.completion_a_col} won) and {b!r} "
        rewards += f"({cfg.completion_b_col} won)"
    elif fmt == "scored" and cfg.reward_weights:
        rewards = " + ".join(f"{w:g} * {c!r}" for c, w in cfg.reward_weights.items())
    elif fmt == "unpaired_preference" or (cfg.winner_col and fmt in ("pairwise", "kway")):
        rewards = f"data.preference_rewards by column {needs[-1]!r}"
        if fmt == "pairwise" and cfg.winner_values is not None:
            a, b = cfg.winner_values
            rewards += f" ({a!r}: {cfg.completion_a_col} won, {b!r}: {cfg.completion_b_col} won)"
    elif fmt == "kway" and cfg.completion_reward_key:
        rewards = f"{cfg.completions_col}[k].{cfg.completion_reward_key}"
    else:
        completions = {cfg.completions_col, cfg.completion_a_col, cfg.completion_b_col, cfg.chosen_col}
        completions |= {cfg.rejected_col, cfg.completion_col}
        rewards = "columns " + ", ".join(repr(c) for c in needs if c not in completions)
    if cfg.negate_rewards and not rewards.startswith("data.preference_rewards"):
        rewards += ", negated"
    prompt = f"column {prompt_col!r}" if prompt_col else "the beginning the completions share"
    if cfg.prompt_template:
        prompt_col, prompt = None, f"data.prompt_template over column(s) {template_columns(cfg)}"
    read = {*needs, cfg.finished_col, cfg.completion_ids_col, prompt_col, cfg.system_col}
    read |= {"chat_template", "chat_template_kwargs", *template_columns(cfg)}
    unread = [c for c in columns if c not in read]
    text = f"format {fmt} ({'detected' if detected else 'set'}); prompt from {prompt}; rewards from {rewards}"
    return text + (f"; columns not read: {unread}" if unread else "")


# message keys chat templates render besides role and content: a message that sets one is refused, not
# trained without it (a tool call, or the reasoning before an answer, dropped from the text)
TEMPLATE_MESSAGE_KEYS = ("tool_calls", "function_call", "tool_call_id", "reasoning_content", "thinking")


# ShareGPT's speakers ({from, value} messages, as LLaMA-Factory's and axolotl's "sharegpt" data writes them)
# and the chat role each is; others (function_call, observation: tool turns) are not read
SHAREGPT_ROLES = {"human": "user", "user": "user", "system": "system"} | dict.fromkeys(
    ("gpt", "assistant", "chatgpt", "bing", "bard"), "assistant"
)


def _from_sharegpt(m: dict, i: int, field: str) -> dict:
    """ShareGPT's message {from, value, ...} as {role, content, ...} (`SHAREGPT_ROLES`).

    Raises:
      BadRow: a speaker without a chat role (a tool turn), or a value that is not text.
    """
    speaker = m["from"]
    role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
    if role is None:
        raise BadRow(
            "wrong_type",
            field,
            f"message {i} is ShareGPT's from {speaker!r:.40}, a speaker no chat role is read for (human, "
            "gpt, system; tool turns are not)",
        )
    rest = {k: v for k, v in m.items() if k not in ("from", "value")}
    return {**rest, "role": role, "content": m["value"]}


def _messages(value: list, field: str) -> list[dict]:
    """A list of chat messages, each checked and reduced to {role, content}; ShareGPT's {from, value}
    messages are read as the chat turns they are (`_from_sharegpt`).

    Raises:
      BadRow: a message that is not {role: str, content: str}, or that sets a key of TEMPLATE_MESSAGE_KEYS.
    """
    value = [
        _from_sharegpt(m, i, field)
        if isinstance(m, dict) and "role" not in m and {"from", "value"} <= set(m)
        else m
        for i, m in enumerate(value)
    ]
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRow("wrong_type", field, f"message {i} is not {{role: str, content: str}}: {m!r:.80}")
        if used := [k for k in TEMPLATE_MESSAGE_KEYS if m.get(k) not in (None, "", [], {})]:
            raise BadRow(
                "unread_message_field",
                field,
                f"message {i} ({m['role']}) sets {used[0]!r}, which is not trained (only role and content "
                "are): fold it into the content, or leave such rows out",
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _decoded(row: dict, cfg: DataConfig, lists_only: bool = False) -> dict:
    """`row` with the JSON text of its `data.json_cols` columns decoded (a null cell stays null).
    `lists_only`: only text holding a JSON list of texts is decoded, other values kept as they are (a
    prompts file of its own beside arena data: its prompts are text or messages).

    Raises:
      BadRow: a value that is not a string of JSON text.
    """
    if not cfg.json_cols:
        return row
    row = dict(row)
    for column in cfg.json_cols:
        value = row.get(column)
        if value is None or (lists_only and not _json_list_text(value)):
            continue
        if not isinstance(value, str):
            raise BadRow("wrong_type", column, f"expected JSON text (data.json_cols), got {_kind(value)}")
        if too_deep(value.encode("utf-8", "surrogatepass")):
            raise BadRow(
                "bad_json", column, f"JSON nested more than {MAX_DEPTH} levels deep (data.json_cols)"
            )
        try:
            row[column] = loads(value)
        except ValueError as e:  # JSONDecodeError, DuplicateKey
            raise BadRow("bad_json", column, f"not JSON text (data.json_cols): {e}") from None
    return row


def _read(row: dict, cfg: DataConfig) -> dict:
    """A raw row as the formats read it: `data.json_cols` decoded, `data.prompt_template` filled, a text
    prompt's marked turns (`data.turn_marker`) read as messages."""
    return _marked_turns(_templated(_decoded(row, cfg), cfg), cfg, cfg.prompt_col)


ROLES = ("user", "assistant", "system")  # the roles a marked turn may name (any case)


def _marked_turns(row: dict, cfg: DataConfig, prompt_col: str) -> dict:
    """`row` with its text prompt (column `prompt_col`) read as chat messages where `data.turn_marker` is
    set: the text before the first marker is the user's turn, each marker starts a line naming the next
    turn's role (User, Assistant, System), the turn's text on the lines after it (HelpSteer2:
    "q1\n<extra_id_1>Assistant\na1\n<extra_id_1>User\nq2"). A prompt without a marker is one user turn.

    Raises:
      BadRow: bad_turns, a marker without a role line, or turns that are not the user's and the assistant's
        in turn, ending with the user's.
    """
    text = row.get(prompt_col)
    if not cfg.turn_marker or not isinstance(text, str):
        return row
    if cfg.turn_marker == HH_TURNS:
        return {**row, prompt_col: _hh_turns(text, prompt_col)}
    pieces = text.split(cfg.turn_marker)
    turns = [{"role": "user", "content": pieces[0].removesuffix("\n")}]
    for i, piece in enumerate(pieces[1:], 1):
        name, newline, content = piece.partition("\n")
        role = name.strip().lower()
        if role not in ROLES or not newline:
            raise BadRow(
                "bad_turns",
                prompt_col,
                f"turn {i} (after marker {cfg.turn_marker!r}) starts with {name[:30]!r}, not a role's name "
                "(User, Assistant, System) on a line of its own (data.turn_marker)",
            )
        turns.append({"role": role, "content": content.removesuffix("\n")})
    if turns[0]["content"].strip() == "" and len(turns) > 1:  # the text starts with a marker
        turns = turns[1:]
    return {**row, prompt_col: _checked_turns(turns, prompt_col)}


def _hh_turns(text: str, prompt_col: str) -> list[dict]:
    """Anthropic HH's text conversation ("\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:",
    Nectar's prompts) as chat messages: each turn's text stripped, the closing empty "Assistant:" (the cue
    for the answer) dropped; text before the first turn line is the user's first turn.

    Raises:
      BadRow: bad_turns, as `_checked_turns`.
    """
    pieces = HH_LINE.split(text)
    turns = [{"role": "user", "content": pieces[0].strip()}] if pieces[0].strip() else []
    for marker, content in zip(pieces[1::2], pieces[2::2], strict=True):
        turns.append({"role": "user" if marker == HH_HUMAN else "assistant", "content": content.strip()})
    if len(turns) > 1 and turns[-1] == {"role": "assistant", "content": ""}:
        turns = turns[:-1]
    return _checked_turns(turns, prompt_col)


def _checked_turns(turns: list[dict], prompt_col: str) -> list[dict]:
    """`turns` (a leading system turn kept first) where they are the user's and the assistant's in turn,
    ending with the user's.

    Raises:
      BadRow: bad_turns, naming the roles found.
    """
    if turns and turns[0]["role"] == "system":
        system, turns = turns[:1], turns[1:]
    else:
        system = []
    roles = [t["role"] for t in turns]
    if not turns or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise BadRow(
            "bad_turns",
            prompt_col,
            f"the marked turns are {roles}: expected the user's and the assistant's in turn, ending with the "
            "user's (data.turn_marker)",
        )
    return system + turns


def _turn_texts(value) -> bool:
    """Whether a prompt value is a list of the user's turns as texts (arena rows), not chat messages."""
    return isinstance(value, list) and bool(value) and all(isinstance(t, str) for t in value)


def _conversations(row: dict, cfg: DataConfig, fields: list[str], raw: list) -> tuple[dict, list]:
    """Rows whose prompt is a list of the user's turns (texts) and whose completions are the lists of the
    assistant's answers, one per turn (lmsys-arena-human-preference-55k): (the row with its prompt set to
    the turns the conversations share, up to the last user turn; each completion's whole conversation, as
    messages), which `_prompt_and_rest` then splits as any conversations. Other rows are returned as they are.

    Raises:
      BadRow: a completion that is not a list of as many answers (texts) as the prompt has turns.
    """
    field = _prompt_column(row, cfg)
    turns = row.get(field) if field else None
    if not _turn_texts(turns):
        return row, raw
    conversations = []
    for name, answers in zip(fields, raw, strict=True):
        if not isinstance(answers, list) or len(answers) != len(turns):
            got = f"{len(answers)} answers" if isinstance(answers, list) else _kind(answers)
            raise BadRow(
                "length_mismatch" if isinstance(answers, list) else "wrong_type",
                name,
                f"{field!r} is a list of {len(turns)} user turn(s): expected a list of one answer (text) per "
                f"turn, got {got}",
            )
        for i, answer in enumerate(answers):
            if not isinstance(answer, str):
                missing = answer is None
                what = "missing (null)" if missing else f"expected the answer's text, got {_kind(answer)}"
                raise BadRow("missing_field" if missing else "wrong_type", f"{name}[{i}]", what)
        conversations.append(
            [
                m
                for q, a in zip(turns, answers, strict=True)
                for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
            ]
        )
    shared = min(_shared_turns(conversations), 2 * len(turns) - 1)
    if shared % 2 == 0:  # an answer all share: the prompt ends with the user's turn before it
        shared -= 1
    return {**row, field: conversations[0][:shared]}, conversations


def _templated(row: dict, cfg: DataConfig) -> dict:
    """`row` with its prompt column set to `data.prompt_template` filled from its fields (the row itself
    without a template).

    Raises:
      BadRow: a field the template reads is missing, null, or neither text nor a number.
    """
    if not cfg.prompt_template:
        return row
    text = []
    for before, column, keys in prompt_template_fields(cfg.prompt_template):
        text.append(before)
        if not column:
            continue
        if column not in row:
            raise BadRow("missing_field", column, "no such column (data.prompt_template)")
        value, name = row[column], column
        for key in keys:
            if isinstance(value, dict):
                value = value.get(key)
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                raise BadRow("missing_field", name, f"has no {key!r} (data.prompt_template)")
            name = f"{name}.{key}"
        if value is None:
            raise BadRow("missing_field", name, "missing (null) (data.prompt_template)")
        if isinstance(value, decimal.Decimal):  # a Parquet decimal column's: as written
            value = str(value)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise BadRow(
                "wrong_type", name, f"expected text or a number, got {_kind(value)} (data.prompt_template)"
            )
        text.append(str(value))
    if not "".join(text).strip():
        raise BadRow("empty_prompt", "data.prompt_template", "filled from the row, it is empty or whitespace")
    return {**row, cfg.prompt_col: "".join(text)}


def prompt_setting(cfg: DataConfig) -> str:
    """What errors about a row's prompt name: its column, or data.prompt_template."""
    return "data.prompt_template" if cfg.prompt_template else cfg.prompt_col


def _prompt_column(row: dict, cfg: DataConfig) -> str | None:
    """The column that holds the row's prompt (`prompt_col`, else `messages_col`), None where it has neither
    (an implicit prompt)."""
    return next((c for c in (cfg.prompt_col, cfg.messages_col) if c in row), None)


def _prompt(row: dict, cfg: DataConfig) -> str | list[dict]:
    field = _prompt_column(row, cfg) or cfg.messages_col
    return _checked_prompt(row.get(field), field)


def _checked_prompt(prompt, field: str) -> str | list[dict]:
    """A prompt value as text or {role, content} messages (`_messages`), neither empty nor whitespace."""
    if prompt is None:
        raise BadRow("missing_field", field, "missing (null)")
    if isinstance(prompt, str):
        if not prompt.strip():  # a prompt of spaces trained as the BOS token alone
            raise BadRow("empty_prompt", field, "empty prompt" if not prompt else "prompt of whitespace only")
        return prompt
    if isinstance(prompt, list) and prompt:
        return _messages(prompt, field)
    raise BadRow("wrong_type", field, f"expected a string or a non-empty message list, got {_kind(prompt)}")


def prompt_to_sample(row: dict, cfg: DataConfig, prompt_col: str) -> str | list[dict]:
    """The prompt of a row of prompts to sample from (rollouts, evaluation by generation, `copg generate`),
    read as training reads a row's prompt: `data.prompt_template` filled from the row where it holds every
    column the template reads (prompts shaped as the training data), else column `prompt_col`; text or
    {role, content} messages, checked as training prompts are (not empty, no message key a template renders
    but training drops), not ending with the assistant's turn; with `data.system_col`'s system turn.

    Raises:
      BadRow: naming the column (or data.prompt_template) and what is wrong.
    """
    row = _decoded(row, cfg, lists_only=True)
    if _turn_texts(row.get(prompt_col)) and len(row[prompt_col]) == 1:  # an arena row's one user turn
        row = {**row, prompt_col: [{"role": "user", "content": row[prompt_col][0]}]}
    if cfg.prompt_template and all(c in row for c in template_columns(cfg)):
        row, prompt_col = _templated(row, cfg), cfg.prompt_col
    elif prompt_col not in row:
        have = ", ".join(map(repr, list(row)[:12]))
        template = (
            f" nor the columns of data.prompt_template {template_columns(cfg)}" if cfg.prompt_template else ""
        )
        raise BadRow("missing_field", prompt_col, f"no such column{template} (the row's columns: {have})")
    row = _marked_turns(row, cfg, prompt_col)
    prompt = _checked_prompt(row[prompt_col], prompt_col)
    _refuse_answer_last(prompt, prompt_col, "a completion sampled after it would be a second answer")
    return _with_system(row, prompt, cfg)


def _refuse_answer_last(prompt: str | list[dict], field: str, consequence: str) -> None:
    """Refuses message prompts whose last turn is the assistant's (a column of whole conversations read as
    the prompt, as NuminaMath's or OpenR1's `messages`).

    Raises:
      BadRow: "prompt_ends_with_answer", saying `consequence`.
    """
    if isinstance(prompt, list) and prompt[-1]["role"] == "assistant":
        raise BadRow(
            "prompt_ends_with_answer",
            field,
            f"the prompt's last turn is the assistant's: {consequence} (a column of whole conversations read "
            "as the prompt? name the question's column instead)",
        )


def _turns(value, field: str) -> str | list[dict]:
    """A completion field as text or as messages (one message {role, content} is a one-message list)."""
    if value is None:
        raise BadRow("missing_field", field, "missing (null)")
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value:
        return _messages(value, field)
    if not isinstance(value, str):
        raise BadRow("wrong_type", field, f"expected a string completion or messages, got {_kind(value)}")
    return value


def _completion(value: str | list[dict], field: str, finished: bool | None = None) -> str:
    """The completion text: `value` itself, or the content of its one assistant message. Empty only when
    `finished` (the policy ended it at once: it trains as its end token alone, `tokenize`)."""
    if isinstance(value, list):
        if len(value) != 1 or value[0]["role"] != "assistant":
            roles = [m["role"] for m in value] or "nothing"
            raise BadRow(
                "not_assistant_turn",
                field,
                f"expected one assistant message after the prompt's turns, found roles {roles}",
            )
        value = value[0]["content"]
    if not value and not finished:
        raise BadRow(
            "empty_completion",
            field,
            "empty completion (one the policy ended at once is kept when its row marks it finished)",
        )
    return value


def _text_prompt_end(texts: list[str]) -> int:
    """Length of the implicit prompt of texts that start alike: their longest common prefix, moved back to
    the start of the word it ends inside (word pieces tokenise unlike the word; a text that ends there would
    have no completion left), less one space just before the cut, which goes to the completions as in TRL's
    `extract_prompt`. 0: no shared beginning."""
    end = min(_common_prefix_length(texts[0], t) for t in texts[1:])
    if end and not texts[0][end - 1].isspace() and not all(t[end : end + 1].isspace() for t in texts):
        end -= len(texts[0][:end].rsplit(None, 1)[-1])
    return end - 1 if end and texts[0][end - 1] == " " else end


def _common_prefix_length(text: str, other: str, chunk: int = 4096) -> int:
    """Length of the common prefix of two texts, compared a chunk at a time (C speed on huge texts)."""
    end = 0
    while end < len(text) and text[end : end + chunk] == other[end : end + chunk]:
        end += chunk
    while end < min(len(text), len(other)) and text[end] == other[end]:
        end += 1
    return min(end, len(text))


def _shared_turns(conversations: list[list[dict]]) -> int:
    """Number of leading messages equal in every conversation (TRL's `extract_prompt` on messages)."""
    return next(
        (i for i, turn in enumerate(zip(*conversations, strict=False)) if any(m != turn[0] for m in turn)),
        min(len(c) for c in conversations),
    )


# the turn lines of Anthropic HH's text conversations (and Nectar's prompts); data.turn_marker=hh reads them
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
HH_LINE = re.compile(f"({re.escape(HH_HUMAN)}|{re.escape(HH_ASSISTANT)})")
HH_TURNS = "hh"


def _refuse_later_turn(prompt: str, completion: str, field: str) -> None:
    """Refuses an implicit text prompt's completion that goes on into the conversation's next turn: Anthropic
    HH rows whose chosen and rejected part before their last answer (the prompt then ends at an earlier
    answer, and each completion holds a later human turn and the answer to it, which would be trained as the
    completion). Text that is no HH conversation passes.

    Raises:
      BadRow: not_assistant_turn, naming where the later turn starts.
    """
    if HH_HUMAN in prompt and HH_ASSISTANT in prompt and (at := completion.find(HH_HUMAN)) >= 0:
        raise BadRow(
            "not_assistant_turn",
            field,
            f"goes on past its answer into a later human turn ({HH_HUMAN.strip()!r} at character {at}): the "
            "conversations part before their last answer, so the turns after would be trained as the "
            "completion",
        )


def _shared_beginning(values: list, fields: list[str]) -> tuple[str | list[dict], list]:
    """(prompt, each value less it): the beginning all completion values share (all text or all messages).

    Raises:
      BadRow: text mixed with messages, or nothing shared to use as the prompt.
    """
    others = ", ".join(repr(f) for f in fields[1:])
    if all(isinstance(v, str) for v in values):
        end = _text_prompt_end(values)
        if not values[0][:end].strip():
            raise BadRow(
                "no_shared_prompt",
                fields[0],
                f"shares no beginning (a whole word at least) with {others}: nothing to use as the prompt "
                "(give a prompt column)",
            )
        rest = [v[end:] for v in values]
        for field, v in zip(fields, rest, strict=True):
            if not v.strip():
                raise BadRow(
                    "empty_completion", field, "nothing left after the prompt shared with the others"
                )
            _refuse_later_turn(values[0][:end], v, field)
        return values[0][:end], rest
    if all(isinstance(v, list) for v in values):
        end = _shared_turns(values)
        if end == 0:
            raise BadRow(
                "no_shared_prompt",
                fields[0],
                f"shares no first turn with {others}: nothing to use as the prompt (give a prompt column)",
            )
        return values[0][:end], [v[end:] for v in values]
    kinds = ", ".join(
        f"{f}: {'messages' if isinstance(v, list) else 'text'}" for f, v in zip(fields, values, strict=True)
    )
    raise BadRow("wrong_type", fields[0], f"text and chat messages mixed ({kinds})")


def _prompt_and_rest(
    row: dict, fmt: str, fields: list[str], raw: list, cfg: DataConfig
) -> tuple[str | list[dict], list]:
    """The row's prompt and its completion values `raw` (named `fields`) with the prompt's turns taken off
    (module docstring)."""
    values = [_turns(v, f) for f, v in zip(fields, raw, strict=True)]
    prompt_field = _prompt_column(row, cfg)
    if fmt in IMPLICIT_PROMPT and prompt_field is None:
        if fmt not in PREFERENCE_FORMATS and not all(isinstance(v, list) for v in values):
            raise BadRow(  # text pairs without a prompt: more likely a prompt column of another name
                "missing_field",
                cfg.prompt_col,
                "no prompt column: pairwise rows take the turns their completions share as the prompt only "
                "when both are conversations; name the prompt's column (data.prompt_col)",
            )
        return _shared_beginning(values, fields)
    prompt = _prompt(row, cfg)
    prompt_field = prompt_field or cfg.messages_col
    if isinstance(prompt, list):
        n = len(prompt)
        for field, v in zip(fields, values, strict=True):
            if isinstance(v, list) and len(v) <= n and v == prompt[: len(v)]:
                raise BadRow(
                    "empty_completion",
                    field,
                    f"the conversation has nothing after the {n} turn(s) of the prompt ({prompt_field!r})",
                )
        _refuse_answer_last(prompt, prompt_field, "its completions would be trained as a second answer")
        return prompt, [v[n:] if isinstance(v, list) and v[:n] == prompt else v for v in values]
    if not any(isinstance(v, list) and v[0]["role"] != "assistant" for v in values):
        if not cfg.chat_template and any(isinstance(v, list) for v in values):
            raise BadRow(
                "text_prompt_chat_completion",
                prompt_field,
                "a text prompt beside chat-message completions would be trained without the chat template; "
                "set data.chat_template=true to render it as a user turn",
            )
        return prompt, values
    turns, rest = _shared_beginning(values, fields)
    if prompt.strip() not in {m["content"].strip() for m in turns}:
        raise BadRow(
            "prompt_mismatch",
            prompt_field,
            f"the text is none of the {len(turns)} turn(s) that {', '.join(map(repr, fields))} start with",
        )
    return turns, rest


def _with_system(row: dict, prompt: str | list[dict], cfg: DataConfig) -> str | list[dict]:
    """With a `cfg.system_col`, the prompt as chat turns (a text prompt one user turn, so that every row goes
    through the chat template) after the row's system text as a system turn (none where it is empty or
    null); the prompt itself without one."""
    if not cfg.system_col:
        return prompt
    system = row.get(cfg.system_col)
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if system is None or system == "":
        return turns
    if not isinstance(system, str):
        raise BadRow("wrong_type", cfg.system_col, f"expected the system prompt's text, got {_kind(system)}")
    if turns[0]["role"] == "system":
        raise BadRow("two_system_prompts", cfg.system_col, "the prompt already starts with a system turn")
    return [{"role": "system", "content": system}, *turns]


def _reward(value, field: str, cfg: DataConfig) -> float:
    """A reward read from the data, as trained on (negated under data.negate_rewards)."""
    value = _reward_value(value, field)
    return -value if cfg.negate_rewards else value


def _reward_value(value, field: str) -> float:
    """A reward as written in the data: a finite number within REWARD_MAX.

    Raises:
      BadRow: null, not a number, not finite, or out of range.
    """
    if value is None:
        raise BadRow("missing_field", field, "missing (null) reward")
    if isinstance(value, decimal.Decimal):  # a Parquet decimal column's
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRow("wrong_type", field, f"expected a number, got {_kind(value)} {value!r:.40}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRow("non_finite_reward", field, f"non-finite reward {value}")
    if abs(value) > REWARD_MAX:  # its squared differences overflow float32 in the loss (batch.REWARD_MAX)
        raise BadRow("reward_out_of_range", field, f"reward {value!r:.40} {REWARD_RANGE}")
    return float(value)


def _kind(value) -> str:
    return type(value).__name__


def _winner_rewards(row: dict, count: int, cfg: DataConfig, pairwise: bool) -> list[float]:
    """The rewards of a row of `count` completions labelled by `cfg.winner_col` (pairwise: one of
    `winner_values`; K-way: an index): preference_rewards[0] for the winner, [1] for the others."""
    field, value = cfg.winner_col, row.get(cfg.winner_col)
    if value is None:
        raise BadRow("missing_field", field, "missing (null)")
    if pairwise:
        if not isinstance(value, bool | int | float | str):
            raise BadRow("wrong_type", field, f"expected a label of data.winner_values, got {_kind(value)}")
        winner = winner_index(value, cfg.winner_values)
        if winner is None:
            a, b = cfg.winner_values
            raise BadRow(
                "no_winner",
                field,
                f"{value!r:.40} is neither {a!r} ({cfg.completion_a_col} won) nor {b!r} "
                f"({cfg.completion_b_col} won): no preference to train on (data.winner_values)",
            )
    elif isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # 1.0: a float column's
    ):
        raise BadRow(
            "wrong_type", field, f"expected the index of the preferred completion, got {value!r:.40}"
        )
    elif not 0 <= value < count:
        raise BadRow("no_winner", field, f"index {value} is not one of the row's {count} completions")
    else:
        winner = int(value)
    chosen, rejected = cfg.preference_rewards
    return [chosen if k == winner else rejected for k in range(count)]


def _indicated_rewards(row: dict, cfg: DataConfig) -> list[float]:
    """The rewards of a pairwise row whose winner is marked by one indicator column per completion
    (`cfg.winner_cols`): preference_rewards[0] for the one marked 1 (or true), [1] for the other."""
    marks = []
    for column in cfg.winner_cols:
        value = row.get(column)
        if value is None:
            raise BadRow("missing_field", column, "missing (null)")
        if isinstance(value, decimal.Decimal):
            value = float(value)
        if not isinstance(value, bool | int | float) or value not in (0, 1):
            raise BadRow("wrong_type", column, f"expected 1 or 0 (true or false), got {value!r:.40}")
        marks.append(bool(value))
    if marks.count(True) != 1:
        a, b = cfg.winner_cols
        raise BadRow(
            "no_winner",
            a,
            f"{a!r} and {b!r} are {'both' if all(marks) else 'neither'} 1: no preference to train on "
            "(data.winner_cols)",
        )
    chosen, rejected = cfg.preference_rewards
    return [chosen if mark else rejected for mark in marks]


def _weighted_reward(row: dict, cfg: DataConfig) -> float:
    """The reward of a scored row rated on several attributes: the sum of `cfg.reward_weights`' columns
    times their weights, each column read as a reward is (`_reward_value`), the sum within its bound too."""
    total = math.fsum(w * _reward_value(row.get(c), c) for c, w in cfg.reward_weights.items())
    if abs(total) > REWARD_MAX:
        raise BadRow(
            "reward_out_of_range", "data.reward_weights", f"weighted reward {total!r:.40} {REWARD_RANGE}"
        )
    return -total if cfg.negate_rewards else total


def _finished(row: dict, cfg: DataConfig, count: int) -> list[bool] | None:
    value = row.get(cfg.finished_col)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, bool) for v in value):
        raise BadRow("wrong_type", cfg.finished_col, f"expected a list of booleans, got {value!r:.60}")
    if len(value) != count:
        raise BadRow("length_mismatch", cfg.finished_col, f"{len(value)} flags for {count} completions")
    return value


def token_id_lists(value) -> bool:
    """Whether `value` is a list of lists of integers (recorded token ids, one list per completion)."""
    return isinstance(value, list) and all(
        isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
        for ids in value
    )


def _token_ids(row: dict, cfg: DataConfig, count: int) -> list[list[int]] | None:
    """The row's `completion_ids_col`: `count` lists of token ids (None: the row has none)."""
    value = row.get(cfg.completion_ids_col)
    if value is None:
        return None
    if not token_id_lists(value) or any(t < 0 for ids in value for t in ids):
        raise BadRow(
            "wrong_type", cfg.completion_ids_col, f"expected lists of token ids >= 0, got {value!r:.60}"
        )
    if len(value) != count:
        raise BadRow(
            "length_mismatch", cfg.completion_ids_col, f"{len(value)} id lists for {count} completions"
        )
    return value


def _check_chat_template(row: dict, prompt, cfg: DataConfig) -> None:
    """A row that records how its prompt was sampled (through the chat template or not, and with which of the
    template's variables) must be tokenised the same way for training."""
    sampled = row.get("chat_template")
    if sampled is None:
        return
    if not isinstance(sampled, bool):
        raise BadRow("wrong_type", "chat_template", f"expected true/false, got {sampled!r:.40}")
    training = isinstance(prompt, list) or cfg.chat_template
    if sampled != training:
        how = {True: "with", False: "without"}
        raise BadRow(
            "chat_template_mismatch",
            "chat_template",
            f"completions were sampled {how[sampled]} the chat template but training would tokenise this "
            f"prompt {how[training]} it; set data.chat_template={str(sampled).lower()}",
        )
    recorded = row.get("chat_template_kwargs")
    if not (sampled and isinstance(recorded, str)):  # JSON text, as `copg generate` records them
        if recorded is not None and sampled:
            raise BadRow("wrong_type", "chat_template_kwargs", f"expected JSON text, got {recorded!r:.40}")
        return
    try:
        variables = json.loads(recorded)
    except ValueError:
        variables = None
    if not isinstance(variables, dict):
        raise BadRow("wrong_type", "chat_template_kwargs", f"expected a JSON object, got {recorded!r:.60}")
    canonical = functools.partial(json.dumps, sort_keys=True)  # 0 is not false: a template tells them apart
    if canonical(variables) != canonical(cfg.chat_template_kwargs):
        setting = json.dumps(variables, separators=(",", ":"))
        raise BadRow(
            "chat_template_mismatch",
            "chat_template_kwargs",
            f"the prompt was sampled with the chat template variables {setting} but training renders it "
            f"with {json.dumps(cfg.chat_template_kwargs, separators=(',', ':'))}; set "
            f"data.chat_template_kwargs='{setting}'",
        )


def _kway(row: dict, cfg: DataConfig) -> tuple[list[str], list, list[float]]:
    """(the K completion fields "completions[k]", their raw values, their rewards) of a K-way row, its lists
    checked; completions given as records (`completion_text_key`, `completion_reward_key`) are read there."""
    comps = row.get(cfg.completions_col)
    lists = [(cfg.completions_col, comps)]
    if not cfg.completion_reward_key and not cfg.winner_col:
        lists.append((cfg.rewards_col, row.get(cfg.rewards_col)))
    for name, value in lists:
        if value is None:
            raise BadRow("missing_field", name, "missing (null)")
        if not isinstance(value, list):
            raise BadRow("wrong_type", name, f"expected a list, got {_kind(value)}")
    fields = [f"{cfg.completions_col}[{k}]" for k in range(len(comps))]
    raw, rewards = comps, row.get(cfg.rewards_col)
    if cfg.completion_text_key or cfg.completion_reward_key:
        for field, record in zip(fields, comps, strict=True):
            if not isinstance(record, dict):
                raise BadRow(
                    "wrong_type", field, f"expected a record (a completion's fields), got {_kind(record)}"
                )
        if cfg.completion_text_key:
            raw = [c.get(cfg.completion_text_key) for c in comps]
            fields = [f"{f}.{cfg.completion_text_key}" for f in fields]
        if cfg.completion_reward_key:
            key = cfg.completion_reward_key
            for k, c in enumerate(comps):
                if key not in c:  # absent, not null: a dotted path is no key (UltraFeedback's annotations)
                    have = ", ".join(map(repr, list(c)[:12]))
                    raise BadRow(
                        "missing_field",
                        f"{cfg.completions_col}[{k}].{key}",
                        f"the record has no key {key!r} (its keys: {have}); a dotted path is not followed",
                    )
            rewards = [
                _reward(c.get(key), f"{cfg.completions_col}[{k}].{key}", cfg) for k, c in enumerate(comps)
            ]
    if cfg.winner_col:
        rewards = _winner_rewards(row, len(comps), cfg, pairwise=False)
    elif not cfg.completion_reward_key:
        if len(comps) != len(rewards):
            raise BadRow(
                "length_mismatch", cfg.rewards_col, f"{len(rewards)} rewards for {len(comps)} completions"
            )
        rewards = [_reward(r, f"{cfg.rewards_col}[{k}]", cfg) for k, r in enumerate(rewards)]
    if len(comps) < 2:
        raise BadRow("too_few_completions", cfg.completions_col, f"{len(comps)} completion(s); need >= 2")
    return fields, raw, rewards


def normalize_row(row: dict, fmt: str, cfg: DataConfig) -> dict:
    """One raw row of format `fmt` -> {prompt: str | messages, completions: list[str], rewards: list[float],
    finished: list[bool] | None, token_ids: list[list[int]] | None}.

    Raises:
      BadRow: naming the field and what is wrong with it.
    """
    if fmt == GROUPED:
        return _grouped_row(row)
    if fmt in GROUPED_FORMATS:
        raise ValueError(f"{fmt!r} rows hold one completion each: group them first (group_rows)")
    row = _read(row, cfg)
    if fmt == "kway":
        fields, raw, rewards = _kway(row, cfg)
    elif fmt == "pairwise":
        fields = [cfg.completion_a_col, cfg.completion_b_col]
        if cfg.winner_cols:
            rewards = _indicated_rewards(row, cfg)
        elif cfg.winner_col:
            rewards = _winner_rewards(row, 2, cfg, pairwise=True)
        else:
            rewards = [_reward(row.get(c), c, cfg) for c in (cfg.reward_a_col, cfg.reward_b_col)]
    elif fmt == "scored_preference":
        fields = [cfg.chosen_col, cfg.rejected_col]
        rewards = [_reward(row.get(c), c, cfg) for c in (cfg.score_chosen_col, cfg.score_rejected_col)]
    elif fmt == "preference":
        fields = [cfg.chosen_col, cfg.rejected_col]
        rewards = list(cfg.preference_rewards)
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    if fmt != "kway":
        raw = [row.get(f) for f in fields]
    row, raw = _conversations(row, cfg, fields, raw)
    labelled = fmt in PREFERENCE_FORMATS or (fmt == "pairwise" and (cfg.winner_col or cfg.winner_cols))
    if (labelled or _prompt_column(row, cfg) is None) and raw[0] is not None and raw[0] == raw[1]:
        raise BadRow(
            "identical_completions",
            fields[0],
            f"{fields[0]!r} and {fields[1]!r} are the same completion: no preference to train on",
        )
    if fmt == "kway" and cfg.winner_col:  # a label over a copy of the winner (TL;DR repeats summaries)
        won = rewards.index(cfg.preference_rewards[0])
        if raw[won] is not None and (same := [k for k, v in enumerate(raw) if k != won and v == raw[won]]):
            raise BadRow(
                "identical_completions",
                cfg.completions_col,
                f"completions {won} (the winner) and {same[0]} are the same completion: no preference to "
                "train on",
            )
    finished, token_ids = _finished(row, cfg, len(fields)), _token_ids(row, cfg, len(fields))
    prompt, rest = _prompt_and_rest(row, fmt, fields, raw, cfg)
    prompt = _with_system(row, prompt, cfg)
    _check_chat_template(row, prompt, cfg)
    ends = finished or [None] * len(fields)
    completions = [_completion(v, f, e) for f, v, e in zip(fields, rest, ends, strict=True)]
    if cfg.max_completions and len(completions) > cfg.max_completions:
        raise BadRow(
            "too_many_completions",
            cfg.completions_col,
            f"{len(completions)} completions > data.max_completions={cfg.max_completions}",
        )
    return {
        "prompt": prompt,
        "completions": completions,
        "rewards": rewards,
        "finished": finished,
        "token_ids": token_ids,
    }


def normalize_single(row: dict, fmt: str, cfg: DataConfig) -> dict:
    """One raw row of a one-completion format (GROUPED_FORMATS) -> {prompt, completion: str, reward: float,
    finished: bool | None}.

    Raises:
      BadRow: naming the field and what is wrong with it.
    """
    field, row = cfg.completion_col, _read(row, cfg)
    row, raw = _conversations(row, cfg, [field], [row.get(field)])
    prompt, (value,) = _prompt_and_rest(row, fmt, [field], raw, cfg)
    prompt = _with_system(row, prompt, cfg)
    _check_chat_template(row, prompt, cfg)
    finished = row.get(cfg.finished_col)
    if finished is not None and not isinstance(finished, bool):
        raise BadRow("wrong_type", cfg.finished_col, f"expected true or false, got {finished!r:.40}")
    completion = _completion(value, field, finished)
    if fmt == "scored" and cfg.reward_weights:
        reward = _weighted_reward(row, cfg)
    elif fmt == "scored":
        reward = _reward(row.get(cfg.reward_col), cfg.reward_col, cfg)
    elif fmt == "unpaired_preference":
        label = row.get(cfg.label_col)
        if not isinstance(label, bool):
            raise BadRow("wrong_type", cfg.label_col, f"expected true or false, got {label!r:.40}")
        reward = cfg.preference_rewards[0 if label else 1]
    else:
        raise ValueError(f"{fmt!r} is not a one-completion format; expected one of {GROUPED_FORMATS}")
    return {"prompt": prompt, "completion": completion, "reward": reward, "finished": finished}


GROUPING_BATCH = 4096
# The version of `group_rows`' output, in the key of its cached file: bump it when what it writes changes.
# 3: an empty completion marked finished is kept (tokenisation rules 6). 4: rewards past +-1e12 are bad rows.
# 5: decimal rewards are read as numbers; messages setting tool_calls, reasoning_content, ... are bad rows.
# 6: message prompts ending with an assistant turn, and identical completions of pairwise rows without a
# prompt column, are bad rows; templates filled to whitespace too.
GROUPING_VERSION = 7
# The data settings that `group_rows`' output does not depend on (where the data is, batching, truncation and
# caches). Every other setting is part of the key of its cached file, so a setting added later is keyed until
# listed here: a needless regrouping at worst, never groups read under other settings (once data.chat_template
# was left out of the key, and a row sampled with the template passed a run without it).
NOT_GROUPING = frozenset(
    "path split eval_path eval_split cache_dir on_bad_row max_prompt_length max_completion_length "
    "prompt_side completion_side truncation layout batch_size row_length buckets pad_multiple seed shuffle "
    "drop_last ref_cache eval_ref_cache ref_weights_hash".split()
)
# The format `group_rows` turns one-completion rows into: a K-way row per group (or a bad source row).
GROUPED = "grouped"
GROUPED_FEATURES = datasets.Features(
    {
        "group_prompt": datasets.Value("string"),  # JSON of the normalised prompt
        "group_completions": datasets.List(datasets.Value("string")),
        "group_rewards": datasets.List(datasets.Value("float64")),
        "group_finished": datasets.List(datasets.Value("bool")),
        "group_rows": datasets.List(datasets.Value("int64")),  # the source rows, ascending
        "group_reason": datasets.Value("string"),  # a bad row: why ("" for a group)
        "group_field": datasets.Value("string"),
        "group_detail": datasets.Value("string"),
    }
)


def _chunks(members: list, cap: int) -> list[list]:
    """`members` split into the fewest groups of at most `cap` (0 = one group), sizes differing by <= 1."""
    count = -(-len(members) // cap) if cap else 1
    size, extra = divmod(len(members), count)
    out, start = [], 0
    for g in range(count):
        end = start + size + (g < extra)
        out.append(members[start:end])
        start = end
    return out


def _prompt_key(prompt) -> bytes:
    """16-byte digest of a normalised prompt (text, or messages with their keys in order): rows with equal
    keys are one prompt's."""
    return xxhash.xxh3_128_digest(json.dumps(prompt, sort_keys=True).encode())


def _raw_rows(rows: datasets.Dataset) -> Iterator[dict]:
    """The rows of `rows` as dicts, read a batch of columns at a time (twice the rows/s of row access)."""
    for batch in rows.iter(batch_size=GROUPING_BATCH):
        yield from (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True))


def _group_plan(keys: np.ndarray, bad: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """How `group_rows` lays its output out, from the rows' prompt keys: (stream, sizes). `stream` [N] is
    every row id once, in output order, `sizes` [E] the rows of each output entry, consecutive in `stream`:
    a bad row alone; a prompt's valid rows in file order, split by `_chunks` at `cap`; entries in the order
    of their first rows.

    Args:
      keys: [N] S16 prompt keys (any value where `bad`); bad: [N] bool.
    """
    valid = np.flatnonzero(~bad)
    _, first, inverse, counts = np.unique(
        keys[valid], return_index=True, return_inverse=True, return_counts=True
    )
    by_first = np.argsort(first, kind="stable")
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(len(by_first))
    order = valid[np.argsort(rank[inverse.ravel()], kind="stable")]  # each prompt's rows, file order
    starts, sizes, group_start = [], [], 0
    for count in counts[by_first]:
        for chunk in _chunks(range(group_start, group_start + int(count)), cap):
            starts.append(chunk.start)
            sizes.append(len(chunk))
        group_start += int(count)
    bad_rows = np.flatnonzero(bad)
    every = np.concatenate([order, bad_rows])
    starts = np.concatenate([np.asarray(starts, np.int64), len(order) + np.arange(len(bad_rows))])
    sizes = np.concatenate([np.asarray(sizes, np.int64), np.ones(len(bad_rows), np.int64)])
    entry_order = np.argsort(every[starts], kind="stable")  # by first row
    starts, sizes = starts[entry_order], sizes[entry_order]
    offsets = np.cumsum(sizes) - sizes
    stream = every[np.repeat(starts - offsets, sizes) + np.arange(int(sizes.sum()))]
    return stream, sizes


def _entry(rows: list[tuple[int, dict]], fmt: str, cfg: DataConfig, of: int) -> dict:
    """One output row of `group_rows` from its source rows [(row id, raw row)]: a group, or a bad row; `of`
    is the count of its prompt's valid rows (more than `rows` where data.max_completions split them)."""
    ids = [i for i, _ in rows]
    try:
        ones = [normalize_single(raw, fmt, cfg) for _, raw in rows]
        if len(ones) < 2 and of > 1:
            detail = (
                f"the one completion data.max_completions={cfg.max_completions} left alone splitting its "
                f"prompt's {of} completions into groups; CoPG compares >= 2 completions of a prompt (raise "
                "data.max_completions)"
            )
            raise BadRow("too_few_completions", cfg.completion_col, detail)
        if len(ones) < 2:
            detail = "the only completion of its prompt; CoPG compares >= 2 completions of a prompt"
            raise BadRow("too_few_completions", cfg.completion_col, detail)
    except BadRow as e:
        return {**_EMPTY_ENTRY, "group_rows": ids, "group_reason": e.reason, "group_field": e.field,
                "group_detail": e.detail}  # fmt: skip
    return {
        "group_prompt": json.dumps(ones[0]["prompt"], sort_keys=True),
        "group_completions": [one["completion"] for one in ones],
        "group_rewards": [one["reward"] for one in ones],
        "group_finished": [cfg.add_eos if one["finished"] is None else one["finished"] for one in ones],
        "group_rows": ids,
        "group_reason": "",
        "group_field": "",
        "group_detail": "",
    }


_EMPTY_ENTRY = {"group_prompt": "", "group_completions": [], "group_rewards": [], "group_finished": []}


def _write_groups(rows: datasets.Dataset, fmt: str, cfg: DataConfig, path: Path) -> None:
    """`group_rows`' output written to the Arrow file `path`, a batch of entries at a time."""
    keys, bad = np.zeros(len(rows), "S16"), np.zeros(len(rows), bool)
    for i, raw in enumerate(_raw_rows(rows)):  # pass 1: each row's prompt key, or that it is bad
        try:
            keys[i] = _prompt_key(normalize_single(raw, fmt, cfg)["prompt"])
        except BadRow:
            bad[i] = True
    stream, sizes = _group_plan(keys, bad, cfg.max_completions)
    of = np.zeros(len(rows), np.int32)  # each valid row's prompt's count of valid rows
    _, inverse, counts = np.unique(keys[~bad], return_inverse=True, return_counts=True)
    of[~bad] = counts[inverse.ravel()]
    schema = GROUPED_FEATURES.arrow_schema
    raws = zip(stream.tolist(), _raw_rows(rows.select(stream)), strict=True)  # pass 2: in output order
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, len(sizes), GROUPING_BATCH):
            entries = []
            for n in sizes[start : start + GROUPING_BATCH].tolist():
                members = [next(raws) for _ in range(n)]
                entries.append(_entry(members, fmt, cfg, int(of[members[0][0]])))
            columns = {name: [e[name] for e in entries] for name in GROUPED_FEATURES}
            writer.write_table(pa.Table.from_pydict(columns, schema=schema))


def group_rows(rows: datasets.Dataset, fmt: str, cfg: DataConfig) -> datasets.Dataset:
    """One-completion rows (`fmt` in GROUPED_FORMATS) grouped by prompt into K-way rows of format GROUPED.

    Rows of the same normalised prompt form one group, in file order (split by `_chunks` into groups of at
    most data.max_completions); groups come in the order of their first rows. A row that fails validation
    stays a row of its own carrying its BadRow, and so does a group of one completion (too_few_completions):
    the data pipeline then errors or skips and counts them like bad rows of any format, naming the source
    rows (`group_rows`). Completions without `finished` end by data.add_eos.

    Memory stays bounded however many rows: a first pass keeps 17 bytes a row (prompt key, bad flag), a
    second writes the groups to an Arrow file in the datasets cache (data.cache_dir), keyed by the rows'
    fingerprint and the settings grouping reads, and memory-mapped from there.
    """
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_GROUPING}
    key = hash_json({"version": GROUPING_VERSION, "rows": rows._fingerprint, "format": fmt, **settings})
    path = Path(cfg.cache_dir or datasets.config.HF_DATASETS_CACHE) / "copg_grouped" / f"{key}.arrow"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace(path, functools.partial(_write_groups, rows, fmt, cfg))
    return datasets.Dataset.from_file(str(path))


def _grouped_row(row: dict) -> dict:
    """A row of `group_rows`' output -> normalize_row's dict; raises its BadRow when it carries one."""
    if row["group_reason"]:
        raise BadRow(row["group_reason"], row["group_field"], row["group_detail"])
    return {
        "prompt": json.loads(row["group_prompt"]),
        "completions": list(row["group_completions"]),
        "rewards": list(row["group_rewards"]),
        "finished": list(row["group_finished"]),
        "token_ids": None,
    }


# rows named per reason in the data reports' words for skipped rows
EXAMPLES_PER_REASON = 5


def skip_summary(counts: dict[str, int], examples: dict[str, list[str]]) -> str:
    """The words data reports use for skipped rows: "skipped N rows: reason: n (e.g. where, ...); ...".

    Args:
      counts: rows skipped per reason.
      examples: per reason, where they are ("file line 3", "source row 7"): the first EXAMPLES_PER_REASON
        are named.
    """
    parts = [
        f"{r}: {n} (e.g. {', '.join(examples.get(r, [])[:EXAMPLES_PER_REASON])})"
        for r, n in sorted(counts.items())
    ]
    return f"skipped {sum(counts.values())} rows: " + "; ".join(parts)


def distinct_prompts(cfg: DataConfig, path: str, split: str) -> list[dict]:
    """The rows of a scored dataset with distinct prompts, {**raw row, prompt: normalised prompt} each, in
    file order: prompts to sample (online rollouts, evaluation by generation). Other keys (e.g. code tests)
    ride along. A line or row the data pipeline rejects raises (data.on_bad_row=error, naming it) or is left
    out and counted in a logged warning, as `tokenize_dataset` reports it.

    Raises:
      ValueError: a bad line or row (data.on_bad_row=error); no valid prompt.
    """
    sources = load_sources(path, split, cfg.cache_dir, cfg.on_bad_row, text_fields(cfg))
    skipped = [(line.reason, f"{line.path} line {line.line_no}") for src in sources for line in src.skipped]
    rows, seen, read = [], set(), len(skipped)
    for src in sources:
        fmt = detect_format(list(src.rows.column_names), cfg, src.name)
        refuse_unread_structure(src.rows, cfg, src.name)
        normalize = normalize_single if fmt in GROUPED_FORMATS else normalize_row
        for i, raw in enumerate(src.rows):
            read += 1
            try:
                prompt = normalize(raw, fmt, cfg)["prompt"]
            except BadRow as e:
                if cfg.on_bad_row == "error":
                    raise ValueError(
                        f"{src.name} row {i}: {e} (data.on_bad_row=skip drops and counts such rows)"
                    ) from None
                skipped.append((e.reason, f"{src.name} row {i}"))
                continue
            key = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append({**raw, "prompt": prompt})
    summary = f"{len(rows)} distinct prompts from {read} rows"
    if skipped:
        examples: dict[str, list[str]] = {}
        for reason, where in skipped:
            examples.setdefault(reason, []).append(where)
        counts = {r: len(w) for r, w in examples.items()}
        summary += "; " + skip_summary(counts, examples)
    if not rows:
        raise ValueError(f"{path!r} holds no valid prompt: {summary}")
    (log.warning if skipped else log.info)("prompts %s: %s", path, summary)
    return rows
