"""Reading scored-completion files and normalising every row format to {prompt, completions, rewards}.

Formats (column names are configurable in DataConfig):
  kway:       {prompt, completions: [y_1..y_K], rewards: [r_1..r_K]}   (K >= 2, may vary per row)
  pairwise:   {prompt, completion_a, reward_a, completion_b, reward_b}
  preference: {prompt, chosen, rejected}  -> rewards (+1/2, -1/2), which turns CoPG into IPO
A prompt is a string or a list of chat messages {role, content}; a completion is a string, an assistant
message {role: assistant, content}, or a one-message list of it.

Optional fields that `copg generate` writes, checked here: `finished` (K-way, one boolean per completion:
ended with EOS, or cut at the token limit) and `chat_template` (whether the prompt went through the chat
template when the completions were sampled; it must match how training tokenises the prompt).
"""

from __future__ import annotations

import glob
import math
import os
import stat
from dataclasses import dataclass

import datasets

from copg_jax.data.config import DataConfig
from copg_jax.jsonl import MAX_DEPTH, BadLine, open_bytes, raw_lines, read_jsonl_lines, too_deep

# `datasets` builder per file extension (.gz files are decompressed by the builders)
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
    were skipped before becoming rows (data.on_bad_row=skip: not UTF-8, not JSON, nested too deeply), and for
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


def _folder_files(folder: str) -> list[str]:
    """Every file under `folder`, recursively and sorted; symlinks are followed, each folder read once (a
    link back up the tree is not a loop), names starting with "." are left out.

    Raises:
      ValueError: an entry cannot be read (a broken or looping symlink, no permission), or files of no
        supported format are present (naming them: nothing is skipped silently).
    """
    files, unsupported, seen = [], [], set()

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
            elif file_builder(entry):
                files.append(entry)
            else:
                unsupported.append(entry)

    walk(folder)
    if unsupported:
        shown = ", ".join(repr(f) for f in unsupported[:5]) + (" ..." if len(unsupported) > 5 else "")
        raise ValueError(
            f"data folder {folder!r} holds {len(unsupported)} file(s) of no supported format ({shown}); "
            f"supported: {', '.join(EXTENSIONS)}. Move them out, or set data.path to a glob of the files"
        )
    return files


def _data_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = _folder_files(path)
        if not files:
            raise FileNotFoundError(f"data folder {path!r} holds no {', '.join(EXTENSIONS)} files")
        return files
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise FileNotFoundError(f"data glob {path!r} matches no file")
        return files
    return [path]


def _json_rows(file: str, on_bad_row: str) -> tuple[datasets.Dataset, tuple[BadLine, ...]]:
    """A JSON-lines file read line by line by our reader: the slow path for files with bad lines."""
    skipped: list[BadLine] = []
    try:
        rows = read_jsonl_lines(file, skipped if on_bad_row == "skip" else None)
    except BadLine as e:
        raise ValueError(
            f"could not read data file {file!r}: {e} (data.on_bad_row=skip drops and counts such lines)"
        ) from None
    if not rows:
        raise ValueError(f"data file {file!r}: no readable rows ({len(skipped)} bad lines)")
    try:
        return datasets.Dataset.from_list([row for _, row in rows]), tuple(skipped)
    except Exception as e:  # e.g. a column whose type changes from row to row
        raise ValueError(f"could not read data file {file!r}: {str(e)[:300]}") from None


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _lines_need_reader(file: str) -> bool:
    """Whether a JSON-lines file has lines the `datasets` JSON reader mishandles: not UTF-8 (stored as is,
    failing later far from the file) or nested deeper than jsonl.MAX_DEPTH (it segfaults at ~100k levels).
    Such files go through our line reader, which names (or skips) those lines."""
    return any(too_deep(raw) or not _utf8(raw) for _, raw in raw_lines(file))


def _check_document(file: str) -> None:
    """The same checks for a JSON document (which may span lines), raised naming the file."""
    with open_bytes(file) as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{file}:{line}: not UTF-8 (byte {raw[e.start]:#04x})") from None
    if too_deep(raw):
        raise ValueError(f"data file {file!r}: nested more than {MAX_DEPTH} levels deep")


def load_sources(path: str, split: str, cache_dir: str = "", on_bad_row: str = "error") -> list[Source]:
    """Loads raw rows from a file, glob, folder (recursively), `save_to_disk` folder or hub dataset (only as
    hf://datasets/ORG/NAME: a missing local path is an error, never a network request).

    Files are loaded one by one so that errors can name the file and the row inside it. A JSON-lines line
    that is not UTF-8, not JSON or nested too deeply stops loading naming file and line, or with
    on_bad_row="skip" is left out and returned in `Source.skipped`.
    """
    if not path:
        raise ValueError("data.path is empty: give a JSONL/Parquet/Arrow/CSV file, folder or dataset name")
    cache = cache_dir or None
    if path.startswith(HUB_PREFIX):
        name = path[len(HUB_PREFIX) :]
        rows = datasets.load_dataset(name, split=split, cache_dir=cache)
        # the builder's hash is the hub commit: a new revision of the dataset changes this fingerprint
        return [Source(f"{name}[{split}]", rows, revision=getattr(rows, "_fingerprint", "") or "")]
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_dict.json")):
        loaded = datasets.load_from_disk(path)
        if split not in loaded:
            raise KeyError(f"{path!r} has splits {list(loaded)}, not {split!r}")
        return [Source(f"{path}[{split}]", loaded[split])]
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "state.json")):
        return [Source(path, datasets.load_from_disk(path))]
    if not os.path.exists(path) and not any(c in path for c in "*?["):
        raise FileNotFoundError(
            f"data file {path!r} does not exist (a hub dataset is written {HUB_PREFIX}ORG/NAME)"
        )
    sources = []
    for file in _data_files(path):
        builder = file_builder(file)
        if builder is None:
            raise ValueError(
                f"data file {file!r}: unknown extension; expected one of {', '.join(EXTENSIONS)}"
            )
        if os.path.getsize(file) == 0:  # the json/parquet builders fail on it with an empty message
            raise ValueError(f"data file {file!r} is empty (no rows)")
        lines = builder == "json" and not file.lower().endswith((".json", ".json.gz"))
        if builder == "json" and not lines:
            _check_document(file)
        if lines and _lines_need_reader(file):
            sources.append(Source(file, *_json_rows(file, on_bad_row)))
            continue
        try:
            rows = datasets.load_dataset(builder, data_files=file, split="train", cache_dir=cache)
        except Exception as e:  # the library's own messages rarely name the file, never the line
            if lines:  # find and name (or skip) the bad lines
                sources.append(Source(file, *_json_rows(file, on_bad_row)))
                continue
            raise ValueError(f"could not read data file {file!r}: {str(e)[:300]}") from e
        sources.append(Source(file, rows))
    return sources


def _format_columns(cfg: DataConfig) -> dict[str, tuple[str, ...]]:
    return {
        "kway": (cfg.completions_col, cfg.rewards_col),
        "pairwise": (cfg.completion_a_col, cfg.reward_a_col, cfg.completion_b_col, cfg.reward_b_col),
        "preference": (cfg.chosen_col, cfg.rejected_col),
    }


def detect_format(columns: list[str], cfg: DataConfig, source: str = "") -> str:
    """The row format of a table with these columns: cfg.format, or the one format they match when "auto".

    Raises:
      ValueError: the columns match no format or several (naming the source and columns).
    """
    where = f" in {source!r}" if source else ""
    prompt_ok = cfg.prompt_col in columns or cfg.messages_col in columns
    needs = _format_columns(cfg)
    if cfg.format != "auto":
        missing = [c for c in needs[cfg.format] if c not in columns]
        if not prompt_ok:
            missing.insert(0, f"{cfg.prompt_col} (or {cfg.messages_col})")
        if missing:
            raise ValueError(
                f"format {cfg.format!r}{where}: missing column(s) {missing}; found {sorted(columns)}"
            )
        return cfg.format
    matches = [fmt for fmt, cols in needs.items() if all(c in columns for c in cols)]
    if len(matches) > 1:
        raise ValueError(
            f"ambiguous data format{where}: columns {sorted(columns)} match {matches}; set data.format"
        )
    if not matches or not prompt_ok:
        expected = {fmt: [cfg.prompt_col, *cols] for fmt, cols in needs.items()}
        raise ValueError(
            f"cannot detect the data format{where}: columns {sorted(columns)}; expected one of {expected}"
        )
    return matches[0]


def _prompt(row: dict, cfg: DataConfig) -> str | list[dict]:
    field = cfg.prompt_col if cfg.prompt_col in row else cfg.messages_col
    prompt = row.get(field)
    if prompt is None:
        raise BadRow("missing_field", field, "missing (null)")
    if isinstance(prompt, str):
        if not prompt:
            raise BadRow("empty_prompt", field, "empty prompt")
        return prompt
    if isinstance(prompt, list) and prompt:
        for i, m in enumerate(prompt):
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise BadRow(
                    "wrong_type", field, f"message {i} is not {{role: str, content: str}}: {m!r:.80}"
                )
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise BadRow("wrong_type", field, f"expected a string or a non-empty message list, got {_kind(prompt)}")


def _completion(value, field: str) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant" or not isinstance(value.get("content"), str):
            raise BadRow("wrong_type", field, "a message completion must be {role: assistant, content: str}")
        value = value["content"]
    if value is None:
        raise BadRow("missing_field", field, "missing (null)")
    if not isinstance(value, str):
        raise BadRow("wrong_type", field, f"expected a string completion, got {_kind(value)}")
    if not value:
        raise BadRow("empty_completion", field, "empty completion")
    return value


def _reward(value, field: str) -> float:
    if value is None:
        raise BadRow("missing_field", field, "missing (null) reward")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRow("wrong_type", field, f"expected a number, got {_kind(value)} {value!r:.40}")
    if not math.isfinite(value):
        raise BadRow("non_finite_reward", field, f"non-finite reward {value}")
    return float(value)


def _kind(value) -> str:
    return type(value).__name__


def _finished(row: dict, cfg: DataConfig, count: int) -> list[bool] | None:
    value = row.get(cfg.finished_col)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, bool) for v in value):
        raise BadRow("wrong_type", cfg.finished_col, f"expected a list of booleans, got {value!r:.60}")
    if len(value) != count:
        raise BadRow("length_mismatch", cfg.finished_col, f"{len(value)} flags for {count} completions")
    return value


def _check_chat_template(row: dict, prompt, cfg: DataConfig) -> None:
    """A row that records how its prompt was sampled must be tokenised the same way for training."""
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


def normalize_row(row: dict, fmt: str, cfg: DataConfig) -> dict:
    """One raw row of format `fmt` -> {prompt: str | messages, completions: list[str], rewards: list[float],
    finished: list[bool] | None}.

    Raises:
      BadRow: naming the field and what is wrong with it.
    """
    prompt = _prompt(row, cfg)
    _check_chat_template(row, prompt, cfg)
    finished = None
    if fmt == "kway":
        comps, rews = row.get(cfg.completions_col), row.get(cfg.rewards_col)
        for name, value in ((cfg.completions_col, comps), (cfg.rewards_col, rews)):
            if value is None:
                raise BadRow("missing_field", name, "missing (null)")
            if not isinstance(value, list):
                raise BadRow("wrong_type", name, f"expected a list, got {_kind(value)}")
        if len(comps) != len(rews):
            raise BadRow(
                "length_mismatch", cfg.rewards_col, f"{len(rews)} rewards for {len(comps)} completions"
            )
        if len(comps) < 2:
            raise BadRow("too_few_completions", cfg.completions_col, f"{len(comps)} completion(s); need >= 2")
        completions = [_completion(c, f"{cfg.completions_col}[{k}]") for k, c in enumerate(comps)]
        rewards = [_reward(r, f"{cfg.rewards_col}[{k}]") for k, r in enumerate(rews)]
        finished = _finished(row, cfg, len(comps))
    elif fmt == "pairwise":
        completions = [_completion(row.get(c), c) for c in (cfg.completion_a_col, cfg.completion_b_col)]
        rewards = [_reward(row.get(c), c) for c in (cfg.reward_a_col, cfg.reward_b_col)]
    elif fmt == "preference":
        completions = [_completion(row.get(c), c) for c in (cfg.chosen_col, cfg.rejected_col)]
        rewards = [0.5, -0.5]
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    if cfg.max_completions and len(completions) > cfg.max_completions:
        raise BadRow(
            "too_many_completions",
            cfg.completions_col,
            f"{len(completions)} completions > data.max_completions={cfg.max_completions}",
        )
    return {"prompt": prompt, "completions": completions, "rewards": rewards, "finished": finished}
