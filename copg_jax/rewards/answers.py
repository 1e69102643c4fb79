"""Numeric answer rewards for math word problems (GSM8K, DeepScaleR-style `answer` columns), in TRL's calling
convention: `rollout.reward.fn: copg_jax.rewards.answers:numeric_answer` with prompt rows that carry an
`answer` field.

The reference answer is the text after GSM8K's last `####` marker when there is one (`"... #### 1,234"`),
else the field itself (`"72"`, `72`, `"-0.5"`). The completion's answer is, in order: the text after its
last `####`, the content of its last `\\boxed{...}`, or else its last number. Both are read as exact decimals
(thousands separators, a leading `$` and a trailing `.` or `%` dropped), so `72`, `72.0` and `72.00` are
equal and `0.1 + 0.2` rounding never enters. Reward 1.0 when equal, 0.0 otherwise (no number in the
completion included). A reference that is no number (`\\frac{1}{2}`, an expression) fails its row with a
message naming it: such datasets need a symbolic checker, not this one.
"""

from __future__ import annotations

import decimal
import re

# a number standing alone (not the digits of a word: "w5", "x2"), thousands separated by commas in threes
NUMBER = re.compile(r"(?<![\w.])[-+]?\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?![\w])")


def _decimal(text: str) -> decimal.Decimal | None:
    """The exact value of one number as written ("1,234", "$5", "-0.50", "12."), None if it is no number."""
    text = text.strip().rstrip(".%").replace(",", "").replace("$", "")
    try:
        value = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return None
    return value if value.is_finite() else None


def _boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced), None without one."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def reference_answer(answer) -> decimal.Decimal:
    """The reference value of an `answer` field (GSM8K's text after `####`, or the field itself).

    Raises:
      ValueError: it is no number.
    """
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    value = _decimal(text)
    if value is None:
        raise ValueError(f"the answer {str(answer)[-60:]!r} is no number (numeric_answer reads numbers only)")
    return value


def completion_answer(text: str) -> decimal.Decimal | None:
    """The value a completion gives as its answer (after `####`, in its last `\\boxed{}`, else its last
    number), None where it gives none."""
    if "####" in text:
        found = NUMBER.findall(text.rsplit("####", 1)[1])
        return _decimal(found[0]) if found else None
    boxed = _boxed(text)
    if boxed is not None:
        return _decimal(boxed)
    found = NUMBER.findall(text)
    return _decimal(found[-1]) if found else None


def _text(completion) -> str:
    """A completion as text: TRL passes a chat prompt's completion as its assistant message list."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def numeric_answer(completions: list, answer: list, **kwargs) -> list[float]:
    """1.0 where a completion's answer equals its row's `answer` as a number, else 0.0 (module docstring).

    Raises:
      ValueError: a row's `answer` is no number (the reward fails that row, named).
    """
    scores = []
    for completion, gold in zip(completions, answer, strict=True):
        want = reference_answer(gold)
        got = completion_answer(_text(completion))
        scores.append(float(got is not None and got == want))
    return scores
