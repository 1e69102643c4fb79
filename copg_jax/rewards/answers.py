"""Numeric answer rewards for math word problems (GSM8K, DeepScaleR-style `answer` columns), in TRL's calling
convention: `rollout.reward.fn: copg_jax.rewards.answers:numeric_answer` with prompt rows that carry an
`answer` field.

The reference answer is the text after GSM8K's last `####` marker when there is one (`"... #### 1,234"`),
else the field itself (`"72"`, `72`, `"-0.5"`, `"3/4"`). The completion's answer is, in order: the number
after its last `####`, the content of its last `\\boxed{...}`, or else its last number. Both are read as
exact rationals: thousands separators (`1,234`; a reference's `1,23,456` too), a leading `$`, a trailing `.`
or `%`, an exponent (`2.5e3`) and a fraction of two numbers (`3/4`) are read, so `72`, `72.0` and `72.00`
are equal, `3/4` equals `0.75` and `0.1 + 0.2` rounding never enters. A Unicode minus or dash before the
digits is a minus, and LaTeX's `\\%`, `\\$`, `{,}` and thin spaces inside `\\boxed{}` are read as what they
write. A number is read whole or not at all: `2.5m` is 2.5 (never its 2), and a number beside `/` or `^`
that makes no fraction (`2^10`, `1/2/3`) is none. Reward 1.0 when equal, 0.0 otherwise (no number in the
completion included). A list of numbers (`5,10,20,25,50,100`) ends with its last item, never a number
grouped from its tail. A reference that is no number (`\\frac{1}{2}`, an expression) fails its row with a
message naming it: such datasets need a symbolic checker, not this one.
"""

from __future__ import annotations

import decimal
import fractions
import re

# minus signs and dashes written before a number's digits: U+2212 minus, figure dash, en dash, small and
# fullwidth hyphen-minus
MINUSES = str.maketrans(dict.fromkeys("\u2212\u2012\u2013\ufe63\uff0d", "-"))
# LaTeX that writes a number's characters: an escaped percent or dollar, a braced comma, thin spaces
LATEX = (("\\%", "%"), ("\\$", "$"), ("{,}", ","), ("\\,", ""), ("\\!", ""), ("\\ ", ""))
# one number: thousands grouped by commas in threes (1,234,567; at most 20 groups, so that a chain of them is
# read in linear time), not starting inside a list of numbers ("5,10,20,25,50,100" ends with 100, not
# 50,100); decimals, an exponent; atomic: never read as a shorter number
_GROUPED = r"(?<!\d,)\d{1,3}(?:,\d{3}){1,20}"
_PLAIN = rf"[-+]?\$?(?>(?:{_GROUPED}|\d++)(?:\.\d++)?|\.\d++)(?:[eE][-+]?\d++)?"
# a number (or a fraction of two) standing alone: not the digits of a word ("w5"), not cut short ("2.5" is
# never its "2", "1,234" never its "1"), not one side of a power or of a longer chain of slashes
NUMBER = re.compile(
    rf"(?<![\w.^/])(?<![\^/]\s){_PLAIN}(?:\s*/\s*{_PLAIN})?(?!\d|[.,]\d|\s*[\^/]\s*[-+]?[\d.])"
)
_WHOLE = re.compile(rf"\s*({_PLAIN})(?:\s*/\s*({_PLAIN}))?\s*")
# exponents and digits past these are no answer: 10^(10^6), or 200,000 digits, take seconds to make exact
MAX_EXPONENT = 1000
MAX_CHARACTERS = 1000


def _normalised(text: str) -> str:
    text = text.translate(MINUSES)
    for latex, plain in LATEX:
        text = text.replace(latex, plain)
    return text


def _rational(text: str) -> fractions.Fraction | None:
    """The exact value of one number as written ("1,234", "$5", "-0.50", "2.5e3"), None past MAX_EXPONENT or
    MAX_CHARACTERS, or where it is none."""
    if len(text) > MAX_CHARACTERS:
        return None
    try:
        value = decimal.Decimal(text.replace(",", "").replace("$", ""))
    except decimal.InvalidOperation:  # no number, or an exponent past the decimal module's own bound
        return None
    return fractions.Fraction(value) if value.is_finite() and abs(value.adjusted()) <= MAX_EXPONENT else None


def _value(text: str) -> fractions.Fraction | None:
    """The exact value of a text that is one number or one fraction of two numbers (a trailing `.` or `%`
    allowed), None where it is anything else."""
    match = _WHOLE.fullmatch(_normalised(text).strip().rstrip(".%"))
    if match is None:
        return None
    numerator, denominator = (_rational(g) if g else fractions.Fraction(1) for g in match.groups())
    if numerator is None or not denominator:  # None, or a zero denominator
        return None
    return numerator / denominator


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


def reference_answer(answer) -> fractions.Fraction:
    """The reference value of an `answer` field (GSM8K's text after `####`, or the field itself).

    Raises:
      ValueError: it is no number.
    """
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    value = _value(text)
    if value is None:  # a dataset's own spelling the completions' rules refuse: "$ 5", "1_000", "1,00"
        value = _rational(_normalised(text).strip().rstrip(".%").replace("$", "").strip())
    if value is None:
        raise ValueError(f"the answer {str(answer)[-60:]!r} is no number (numeric_answer reads numbers only)")
    return value


def completion_answer(text: str) -> fractions.Fraction | None:
    """The value a completion gives as its answer (the first number after its last `####`, else its last
    `\\boxed{}`, else its last number), None where it gives none."""
    if "####" in text:
        found = NUMBER.findall(_normalised(text.rsplit("####", 1)[1]))
        if found:
            return _value(found[0])
    boxed = _boxed(text)
    if boxed is not None:
        return _value(boxed)
    found = NUMBER.findall(_normalised(text))
    return _value(found[-1]) if found else None


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
