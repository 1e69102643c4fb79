"""Reading scored-completion files and normalising every row format to {prompt, completions, rewards}.

Formats (column names are configurable in DataConfig):
  kway:       {prompt, completions: [y_1..y_K], rewards: [r_1..r_K]}   (K >= 2, may vary per row)
  pairwise:   {prompt, completion_a, reward_a, completion_b, reward_b}
  preference: {prompt, chosen, rejected}  -> rewards `data.preference_rewards`, by default (+1/4, -1/4):
              the paper's choice (Property 3), under which CoPG(beta) is IPO(tau = beta)
A prompt is a string or a list of chat messages {role, content}; a completion is a string, an assistant
message {role: assistant, content}, or a one-message list of it.

Optional fields that `copg generate` writes, checked here: `finished` (K-way, one boolean per completion:
ended with EOS, or cut at the token limit) and `chat_template` (whether the prompt went through the chat
template when the completions were sampled; it must match how training tokenises the prompt).
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass

import datasets

from copg_jax.data.config import DataConfig
from copg_jax.jsonl import read_jsonl_lines

_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


class BadRow(ValueError):
    """An invalid row; `reason` is a short category used to count skipped rows."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(f"field {field!r}: {detail}")
        self.reason = reason
        self.field = field
        self.detail = detail


@dataclass(frozen=True)
class Source:
    """One loaded data source: `name` (file path or hub name) and its raw rows."""

    name: str
    rows: datasets.Dataset


def _data_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = [
            os.path.join(path, f) for f in sorted(os.listdir(path)) if os.path.splitext(f)[1] in _EXTENSIONS
        ]
        if not files:
            raise FileNotFoundError(f"data folder {path!r} holds no {sorted(_EXTENSIONS)} files")
        return files
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise FileNotFoundError(f"data glob {path!r} matches no file")
        return files
    return [path]


def load_sources(path: str, split: str, cache_dir: str = "") -> list[Source]:
    """Loads raw rows from a file, glob, folder, `save_to_disk` folder or (online) hub dataset name.

    Files are loaded one by one so that errors can name the file and the row inside it.
    """
    if not path:
        raise ValueError("data.path is empty: give a JSONL/Parquet/Arrow file, folder or dataset name")
    cache = cache_dir or None
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_dict.json")):
        loaded = datasets.load_from_disk(path)
        if split not in loaded:
            raise KeyError(f"{path!r} has splits {list(loaded)}, not {split!r}")
        return [Source(f"{path}[{split}]", loaded[split])]
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "state.json")):
        return [Source(path, datasets.load_from_disk(path))]
    if not os.path.exists(path) and not any(c in path for c in "*?["):
        # a hub name looks like "name" or "org/name"; anything path-like that is missing is an error
        if (
            os.path.splitext(path)[1] in _EXTENSIONS
            or path.startswith((".", "/", "~"))
            or path.count("/") > 1
        ):
            raise FileNotFoundError(f"data file {path!r} does not exist")
        return [Source(f"{path}[{split}]", datasets.load_dataset(path, split=split, cache_dir=cache))]
    sources = []
    for file in _data_files(path):
        ext = os.path.splitext(file)[1]
        if ext not in _EXTENSIONS:
            raise ValueError(
                f"data file {file!r}: unknown extension {ext!r}; expected one of {sorted(_EXTENSIONS)}"
            )
        if os.path.getsize(file) == 0:  # the json/parquet builders fail on it with an empty message
            raise ValueError(f"data file {file!r} is empty (no rows)")
        try:
            rows = datasets.load_dataset(_EXTENSIONS[ext], data_files=file, split="train", cache_dir=cache)
        except Exception as e:  # the library's own messages rarely name the file, never the line
            if ext == ".jsonl":  # name the first line that is not a JSON object
                try:
                    read_jsonl_lines(file)
                except ValueError as bad_line:
                    raise ValueError(f"could not read data file {file!r}: {bad_line}") from None
            raise ValueError(f"could not read data file {file!r}: {e}") from e
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
        rewards = list(cfg.preference_rewards)
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    if cfg.max_completions and len(completions) > cfg.max_completions:
        raise BadRow(
            "too_many_completions",
            cfg.completions_col,
            f"{len(completions)} completions > data.max_completions={cfg.max_completions}",
        )
    return {"prompt": prompt, "completions": completions, "rewards": rewards, "finished": finished}


def distinct_prompts(cfg: DataConfig, path: str, split: str) -> list[dict]:
    """The rows of a scored dataset with distinct prompts, {**raw row, prompt: normalised prompt} each, in
    file order: prompts to sample (online rollouts, evaluation by generation). Other keys (e.g. code tests)
    ride along. A row the data pipeline rejects raises (data.on_bad_row=error, naming it) or is left out.

    Raises:
      ValueError: no valid prompt.
    """
    rows, seen = [], set()
    for src in load_sources(path, split, cfg.cache_dir):
        fmt = detect_format(list(src.rows.column_names), cfg, src.name)
        for i, raw in enumerate(src.rows):
            try:
                prompt = normalize_row(raw, fmt, cfg)["prompt"]
            except BadRow as e:
                if cfg.on_bad_row == "error":
                    raise ValueError(f"{src.name} row {i}: {e}") from None
                continue
            key = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append({**raw, "prompt": prompt})
    if not rows:
        raise ValueError(f"{path!r} holds no valid prompt")
    return rows
