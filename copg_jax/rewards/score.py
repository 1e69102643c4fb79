"""`copg score`: {prompt, completions} rows -> K-way {prompt, completions, rewards} rows, failures reported.

A completion whose reward fails (exception, timeout, NaN) is never given a made-up score. With
`--on-error drop` (default) it is left out of its row and written, with the reason, to `<output>.errors.jsonl`
(a row left with fewer than 2 completions is moved there whole); with `--on-error keep` its reward is written
as null next to a `reward_errors` list, which the training data loader then rejects as a bad row, by name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from copg_jax.data.formats import token_id_lists
from copg_jax.jsonl import read_jsonl_lines, write_jsonl
from copg_jax.rewards.base import (
    COMPLETION_IDS,
    RewardFn,
    RewardResult,
    needs_completion_ids,
    row_fields,
    score_rows,
    take_fields,
    with_completion_ids,
)
from copg_jax.rewards.config import RewardConfig, build_reward

# Row keys holding one value per completion (`copg generate` writes these): filtered with the completions
# when failed ones are dropped, so the lists stay aligned.
PER_COMPLETION_KEYS = ("behaviour_logprobs", "finished", "completion_token_ids")


def read_prompt_rows(path: str | Path) -> tuple[list[dict], list[int]]:
    """(rows of a JSONL file, the line number of each), each checked to have `prompt`, a non-empty
    `completions` list of strings and, if present, one `finished` boolean per completion."""
    rows, lines = [], []
    for line_no, row in read_jsonl_lines(path):
        if "prompt" not in row:
            raise ValueError(f"{path}:{line_no}: expected an object with a 'prompt' key")
        comps = row.get("completions")
        if not isinstance(comps, list) or not comps or not all(isinstance(c, str) for c in comps):
            raise ValueError(f"{path}:{line_no}: 'completions' must be a non-empty list of strings")
        try:
            finished_flags(row)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: {e}") from None
        rows.append(row)
        lines.append(line_no)
    return rows, lines


def finished_flags(row: dict) -> list[bool]:
    """[K] whether each completion of `row` ended with EOS: its `finished` list, or all True without one.

    Raises:
      ValueError: a `finished` that is not a list of K booleans.
    """
    k = len(row["completions"])
    flags = row.get("finished")
    if flags is None:
        return [True] * k
    if not isinstance(flags, list) or len(flags) != k or not all(isinstance(f, bool) for f in flags):
        raise ValueError(f"'finished' must be a list of {k} booleans (one per completion), got {flags!r}")
    return flags


def recorded_ids(row: dict) -> list[list[int] | None]:
    """Each completion's recorded token ids (`completion_token_ids`, as `copg generate` writes them), None
    for all where the row has none or not one list of integers per completion."""
    ids, k = row.get("completion_token_ids"), len(row["completions"])
    return list(ids) if token_id_lists(ids) and len(ids) == k else [None] * k


def score_completions(fn: RewardFn, rows: Sequence[dict], batch_size: int = 32) -> list[RewardResult]:
    """Scores every completion of every row, `batch_size` (prompt, completion) pairs per reward call; a row's
    `finished` list (as `copg generate` writes it) tells the reward which completions were cut
    (`rewards.base`), a row without one counts as finished; its other fields (`rewards.base.row_fields`)
    reach a reward that takes them, the same for each of its completions.

    Returns:
      one RewardResult per row ([K_row] scores and errors).
    """
    flat = [
        (i, row["prompt"], c, bool(f))
        for i, row in enumerate(rows)
        for c, f in zip(row["completions"], finished_flags(row), strict=True)
    ]
    fields = row_fields(rows)
    flat_ids = [x for row in rows for x in recorded_ids(row)]
    scores, errors = [], []
    for start in range(0, len(flat), batch_size):
        index, prompts, completions, finished = zip(*flat[start : start + batch_size], strict=True)
        taken = with_completion_ids(take_fields(fields, index), flat_ids[start : start + batch_size])
        result = score_rows(fn, prompts, completions, finished, taken)
        scores.extend(result.scores.tolist())
        errors.extend(result.errors)
    out, pos = [], 0
    for row in rows:
        k = len(row["completions"])
        out.append(RewardResult(np.asarray(scores[pos : pos + k], float), errors[pos : pos + k]))
        pos += k
    return out


def split_scored(
    rows: Sequence[dict],
    results: Sequence[RewardResult],
    on_error: str = "drop",
    lines: Sequence[int] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Builds the K-way output rows and the error records.

    Args:
      rows: input rows ({prompt, completions, ...}); extra keys are carried over.
      results: one RewardResult per row.
      on_error: "drop" (leave failed completions out) or "keep" (null reward + `reward_errors`).
      lines: each row's line in the input file (as its other errors name it), recorded with its failures.
    Returns:
      (scored rows, error records {row (from 0), line, completion (from 0, None for the row), error}).
    """
    if on_error not in ("drop", "keep"):
        raise ValueError(f"on_error must be 'drop' or 'keep', got {on_error!r}")
    scored, failures = [], []
    for i, (row, res) in enumerate(zip(rows, results, strict=True)):
        comps = row["completions"]
        bad = [k for k, e in enumerate(res.errors) if e is not None]
        where = {"row": i, "line": None if lines is None else lines[i]}
        failures += [{**where, "completion": k, "error": res.errors[k]} for k in bad]
        # rewards and their errors are this scoring's: a file scored before (--on-error keep) carries old ones
        base = {key: v for key, v in row.items() if key not in ("completions", "rewards", "reward_errors")}
        if on_error == "keep":
            out = {
                **base,
                "completions": comps,
                "rewards": [None if k in bad else res.scores[k] for k in range(len(comps))],
            }
            if bad:
                out["reward_errors"] = res.errors
            scored.append(out)
            continue
        keep = [k for k in range(len(comps)) if k not in bad]
        if len(keep) < 2:
            if not bad:  # a single-completion row: nothing to contrast, say so rather than drop silently
                failures.append({**where, "completion": None, "error": "fewer than 2 completions"})
            failures.append(
                {**where, "completion": None, "error": f"row dropped: {len(keep)} scored completion(s)"}
            )
            continue
        for key in PER_COMPLETION_KEYS:
            if isinstance(base.get(key), list) and len(base[key]) == len(comps):
                base[key] = [base[key][k] for k in keep]
        scored.append(
            {**base, "completions": [comps[k] for k in keep], "rewards": [float(res.scores[k]) for k in keep]}
        )
    return scored, failures


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="copg score", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="JSONL of {prompt, completions: [..]} rows")
    p.add_argument("--output", required=True, help="JSONL of K-way {prompt, completions, rewards} rows")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--reward",
        nargs="+",
        help="package.module:function, called fn(prompts, completions) -> list[float]; parameters named "
        "after the rows' other fields (or **kwargs) get those; several: their sum weighted by --weights",
    )
    src.add_argument("--reward-model", help="folder of an HF *ForSequenceClassification checkpoint")
    src.add_argument(
        "--code-tests", action="store_true", help="completions are code; rows carry test snippets"
    )
    p.add_argument("--weights", type=float, nargs="+", default=[], help="one per --reward function")
    p.add_argument(
        "--tests-field",
        nargs="+",
        default=["tests"],
        help="row key with the test snippets (--code-tests); several: the tests of all of them",
    )
    p.add_argument(
        "--function-field",
        default="metadata",
        help="row key whose func_name names the function of LiveCodeBench's functional tests (--code-tests)",
    )
    p.add_argument("--all-or-nothing", action="store_true", help="code tests: 1 if all pass else 0")
    p.add_argument("--timeout-s", type=float, default=10.0, help="code tests: wall-clock seconds per test")
    p.add_argument("--cpu-seconds", type=int, default=5, help="code tests: CPU seconds per test")
    p.add_argument("--memory-mb", type=int, default=1024, help="code tests: address-space MiB per process")
    p.add_argument("--processes", type=int, default=8, help="code tests: processes+threads per test at once")
    p.add_argument("--tmp-mb", type=int, default=64, help="code tests: size of each test's private /tmp")
    p.add_argument(
        "--sandbox",
        choices=("bwrap", "none"),
        default="bwrap",
        help="code tests: bubblewrap sandbox, or none (explicit opt-out: trusted code only)",
    )
    p.add_argument("--workers", type=int, default=2, help="code tests: tests run in parallel")
    p.add_argument("--batch-size", type=int, default=32, help="completions per reward call")
    p.add_argument(
        "--call-timeout-s", type=float, default=0.0, help="Python reward: seconds per call, 0 = no limit"
    )
    p.add_argument("--max-length", type=int, default=1024, help="reward model: tokens per prompt+completion")
    p.add_argument(
        "--label", type=int, default=None, help="reward model of several outputs: the one that is the reward"
    )
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any reward failed")
    p.add_argument(
        "--on-error", choices=("drop", "keep"), default="drop", help="what to do with failed rewards"
    )
    return p.parse_args(list(argv))


def _reason(error: str) -> str:
    """What a reward error counts under: its kind ("ValueError", "reward is not finite"), after the function
    it names where several are summed ("mod:fn: reward is not finite")."""
    parts = error.split(": ")
    return ": ".join(parts[:2]) if ":" in parts[0] else parts[0]


def main(argv: Sequence[str] | None = None) -> int:
    """`copg score`; returns 0, or 1 when no row could be scored (or, with --strict, when any reward failed);
    the output and the errors file are written either way."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    functions = args.reward or ""  # one name, or a list summed with --weights
    with _named_as_flags():
        cfg = _reward_config(args, functions)
    rows, lines = read_prompt_rows(args.input)
    fn = build_reward(cfg, rows, args.input)
    lacking = next((i for i, r in enumerate(rows) if None in recorded_ids(r)), None)
    if lacking is not None and needs_completion_ids(fn):
        raise ValueError(
            f"the reward takes {COMPLETION_IDS!r}: {args.input}:{lines[lacking]} (row {lacking}) has no "
            "completion_token_ids (one list of token ids per completion, as copg generate writes)"
        )
    results = score_completions(fn, rows, args.batch_size)
    scored, failures = split_scored(rows, results, args.on_error, lines)
    write_jsonl(args.output, scored)
    errors_path = f"{args.output}.errors.jsonl"
    if failures:
        write_jsonl(errors_path, failures)
    elif os.path.exists(errors_path):  # an earlier run's: it names rows this output has scored
        os.remove(errors_path)
    total = sum(len(r["completions"]) for r in rows)
    failed = sum(r.num_failed for r in results)
    print(f"scored {total - failed}/{total} completions of {len(rows)} prompts; wrote {len(scored)} rows")
    if cut := getattr(fn, "cut", 0):
        print(
            f"{cut} prompt+completion sequences were longer than --max-length={args.max_length}: each was "
            "scored on its end"
        )
    if failed:
        reasons = Counter(_reason(e) for r in results for e in r.errors if e is not None)
        print(f"{failed} reward failure(s) ({dict(reasons)}); details in {errors_path}")
    if not scored:
        print(f"copg score: no row could be scored; see {errors_path}", file=sys.stderr)
        return 1
    return 1 if failed and args.strict else 0


# the flags of settings that copg score names otherwise than reward.<setting>
_FLAGS = {"fn": "--reward", "model": "--reward-model"}
# a RewardConfig setting named in a message (not a module path that holds "reward.")
_SETTING = re.compile(rf"(?<![\w.])reward\.({'|'.join(f.name for f in dataclasses.fields(RewardConfig))})\b")


@contextlib.contextmanager
def _named_as_flags():
    """Re-raises a RewardConfig error with the flags `copg score` takes in place of the reward.* settings."""
    try:
        yield
    except ValueError as e:
        raise ValueError(
            _SETTING.sub(lambda m: _FLAGS.get(m[1], "--" + m[1].replace("_", "-")), str(e))
        ) from None


def _reward_config(args: argparse.Namespace, functions) -> RewardConfig:
    return RewardConfig(
        fn=functions[0] if len(functions) == 1 and not args.weights else functions,
        weights=args.weights,
        model=args.reward_model or "",
        code_tests=args.code_tests,
        tests_field=args.tests_field[0] if len(args.tests_field) == 1 else args.tests_field,
        function_field=args.function_field,
        all_or_nothing=args.all_or_nothing,
        batch_size=args.batch_size,
        call_timeout_s=args.call_timeout_s,
        max_length=args.max_length,
        timeout_s=args.timeout_s,
        cpu_seconds=args.cpu_seconds,
        memory_mb=args.memory_mb,
        processes=args.processes,
        tmp_mb=args.tmp_mb,
        workers=args.workers,
        sandbox=args.sandbox,
        label=args.label,
    )


if __name__ == "__main__":
    sys.exit(main())
