"""What every reward source returns: one score per (prompt, completion) row, or a recorded error for that row.

A reward function is any callable `fn(prompts: list[str], completions: list[str]) -> list[float]`, called on a
batch of rows. `score_rows` wraps it so that a failure (an exception, a wrong-length result, a NaN) is
attributed to the row that caused it and recorded as that row's error; it is never turned into a silent 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Scores of a batch of rows.

    Attributes:
      scores: [N] float64, NaN where the row failed.
      errors: [N] None for a scored row, else a one-line description of why it has no score.
    """

    scores: np.ndarray
    errors: list[str | None]

    @property
    def num_failed(self) -> int:
        return sum(e is not None for e in self.errors)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _check_values(values: Sequence[float], n: int) -> tuple[np.ndarray, list[str | None]]:
    """Converts a reward function's output to float64 and flags non-finite entries as errors."""
    try:
        length = len(values)
    except TypeError:
        raise TypeError(
            f"reward function returned {type(values).__name__}, expected a list of {n} floats"
        ) from None
    if length != n:
        raise ValueError(f"reward function returned {length} scores for {n} rows")
    scores = np.full(n, np.nan)
    errors: list[str | None] = [None] * n
    for i, v in enumerate(values):
        try:
            x = float(v)
        except (TypeError, ValueError):
            errors[i] = f"reward is not a number: {v!r}"
            continue
        if not math.isfinite(x):
            errors[i] = f"reward is not finite: {x}"
            continue
        scores[i] = x
    return scores, errors


def score_rows(fn: RewardFn, prompts: Sequence[str], completions: Sequence[str]) -> RewardResult:
    """Calls `fn` on the whole batch; if that raises, calls it row by row so the failure lands on its row.

    Args:
      fn: batched reward function.
      prompts: [N] prompt strings.
      completions: [N] completion strings.
    Returns:
      RewardResult with [N] scores and errors.
    """
    prompts, completions = list(prompts), list(completions)
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    n = len(prompts)
    if n == 0:
        return RewardResult(np.zeros(0), [])
    try:
        scores, errors = _check_values(fn(prompts, completions), n)
        return RewardResult(scores, errors)
    except Exception:  # noqa: BLE001 - isolate the failing row(s) below
        pass
    scores = np.full(n, np.nan)
    errors: list[str | None] = [None] * n
    for i in range(n):
        try:
            s, e = _check_values(fn([prompts[i]], [completions[i]]), 1)
            scores[i], errors[i] = s[0], e[0]
        except Exception as exc:  # noqa: BLE001 - recorded per row
            errors[i] = _describe(exc)
    return RewardResult(scores, errors)
