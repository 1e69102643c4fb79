"""What every reward source returns: one score per (prompt, completion) row, or a recorded error for that row.

A reward function is any callable `fn(prompts: list[str], completions: list[str]) -> list[float]`, called on a
batch of rows. `score_rows` wraps it so that a failure (an exception, a wrong-length result, a NaN) is
attributed to the row that caused it and recorded as that row's error; it is never turned into a silent 0.

A function that declares a `finished` parameter (`fn(prompts, completions, finished)`) is also told, per row,
whether the completion ended with EOS (False: cut at the token limit), when the caller knows it (sampling
does; `copg score` does for rows `copg generate` wrote). The reward model uses it not to score a cut
completion as if it had ended.

The other fields of each prompt's row (a math problem's `answer`, a summary's source document) reach a
function that names them, as TRL's GRPO reward functions get the dataset's columns: `fn(prompts,
completions, answer)` gets `answer` = [N] values, the answer of each row's prompt; `**kwargs` gets every
field. A field fills a parameter of its name even where the parameter has a default. A function whose
first parameter is `completions` (or keyword-only `completions` after none but `prompts`) is called as TRL
calls one, by name: `fn(completions, answer, **kwargs)` gets `completions=`, `answer=` and `prompts=` in
its kwargs, and the completion of a chat prompt as TRL gives it, its assistant message
`[{"role": "assistant", "content": text}]`. Where the caller knows them (sampling; `copg score` for rows
with `completion_token_ids`), a function naming `completion_ids` (or one called by name taking
`**kwargs`) gets each completion's token ids, as TRL passes them. An `async def` function (an LLM judge
over HTTP, as TRL allows) is awaited on one event loop of a thread of its own (`run_awaitable`), so it
also runs where the caller's thread has a loop running (a notebook). `row_fields` reads the fields from the
prompt rows, `check_fields` refuses rows that lack a field the function needs, and `score_rows(...,
fields=...)` passes them on, sliced with the rows of each call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import itertools
import json
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from copg_jax.batch import REWARD_MAX, REWARD_RANGE

RewardFn = Callable[[list[str], list[str]], Sequence[float]]

# Row keys that are not a prompt's fields: the prompt, what a reward gets as `completions` and `finished`, the
# per-completion lists `copg generate` and `copg score` write, and how `copg generate` rendered the prompt.
NOT_FIELDS = frozenset(
    {"prompt", "prompts", "completions", "finished", "rewards", "reward_errors", "behaviour_logprobs",
     "completion_token_ids", "chat_template", "chat_template_kwargs", "completion_ids"}
)  # fmt: skip
# Passed beside the prompt fields (`with_completion_ids`), one per completion: its token ids, as TRL passes
# them (a length or repetition penalty reads them); the caller's, never a prompt row's.
COMPLETION_IDS = "completion_ids"
# what TRL's GRPOTrainer passes its reward functions besides the data (its state, loggers, environments):
# not passed here, so a function requiring one is refused as such, not for want of a data field
TRL_TRAINER_ARGUMENTS = frozenset({"trainer_state", "log_metric", "log_extra", "environments"})


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Scores of a batch of rows.

    Attributes:
      scores: [N] float64, NaN where the row failed.
      errors: [N] None for a scored row, else a one-line description of why it has no score.
      parts: for several reward functions summed (`WeightedSum`), each one's [N] unweighted float64 scores
        by its name (`WeightedSum.names`), NaN where it failed or does not apply; else empty.
    """

    scores: np.ndarray
    errors: list[str | None]
    parts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def num_failed(self) -> int:
        return sum(e is not None for e in self.errors)


class RewardFailed(ValueError):
    """A reward that failed on every row of a batch (`refuse_all_failed`)."""


def refuse_all_failed(errors: Sequence[str | None], where: str) -> None:
    """Raises where every row failed (`errors`: one per row, None where scored): a broken reward function
    (a signature or a convention it does not follow), not rows of its own to drop; training on without its
    scores would be training on nothing the reward says.

    Raises:
      RewardFailed: naming `where` and the first distinct errors.
    """
    if errors and all(e is not None for e in errors):
        shown = "; ".join(sorted(set(errors))[:3])
        raise RewardFailed(f"{where}: the reward failed on all {len(errors)} completions ({shown})")


def describe_error(exc: BaseException) -> str:
    """A row's reward error: "Type: the first line of its message" (the type alone for an empty one)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _as_scores(values, n: int) -> list:
    """A reward call's result as a list of its `n` scores (not yet checked one by one: `_check_values`).

    Raises:
      TypeError: not iterable, or a mapping or string (whose keys or characters would be read as scores);
        what a generator raises while it runs (the reward's own error, on its row).
      ValueError: another number of scores than rows.
    """
    if isinstance(values, (Mapping, str, bytes)):
        raise TypeError(f"reward function returned a {type(values).__name__}, expected a list of {n} floats")
    try:
        items = iter(values)
    except TypeError:
        raise TypeError(
            f"reward function returned {type(values).__name__}, expected a list of {n} floats"
        ) from None
    values = list(itertools.islice(items, n + 1))  # a generator runs here (its errors are the reward's),
    if len(values) != n:  # an endless one no further than one score too many
        count = f"more than {n}" if len(values) > n else len(values)
        raise ValueError(f"reward function returned {count} scores for {n} rows")
    return values


def _shown(value) -> str:
    """A returned value for an error message, at most 40 characters: never raising, as repr can (an int
    past 4300 digits, an object whose __repr__ fails)."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an int of {value.bit_length()} bits"
    try:
        return f"{value!r:.40}"
    except Exception:  # noqa: BLE001 - any object's __repr__
        return f"a {type(value).__name__}"


def _check_values(values: Sequence, n: int) -> tuple[np.ndarray, list[str | None]]:
    """[n] scores (numbers, or FailedCall) as float64, a row's error where it is not a finite number."""
    scores = np.full(n, np.nan)
    errors: list[str | None] = [None] * n
    for i, v in enumerate(_as_scores(values, n)):
        if isinstance(v, FailedCall):
            errors[i] = v.reason
            continue
        # float() reads "0.3", True and an array's bool or complex (dropping its imaginary part): data
        # refuses them, so do rewards
        kind = getattr(getattr(v, "dtype", None), "kind", "f")
        if isinstance(v, bool | str | bytes | bytearray | memoryview) or kind in "bcUSOMmV":
            errors[i] = f"reward is not a number: {_shown(v)}"
            continue
        try:
            x = float(v)
        except OverflowError:
            errors[i] = f"reward {_shown(v)} {REWARD_RANGE}"
            continue
        except Exception:  # noqa: BLE001 - any object's __float__: its row fails, never the whole batch
            errors[i] = f"reward is not a number: {_shown(v)}"
            continue
        if not math.isfinite(x):
            errors[i] = f"reward is not finite: {x}"
            continue
        if abs(x) > REWARD_MAX:  # its squared differences overflow float32 in the loss (batch.REWARD_MAX)
            errors[i] = f"reward {x:.4g} {REWARD_RANGE}"
            continue
        scores[i] = x
    return scores, errors


def _parameters(fn: Callable) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return []


@dataclasses.dataclass(frozen=True)
class FieldParameters:
    """How a reward function is called, and the row fields it takes (module docstring).

    Attributes:
      named: parameter name -> whether it is required (has no default), for each parameter that can be passed
        by name and is not `reserved`.
      every: the function has `**kwargs`: it takes every field.
      reserved: names never passed as fields: those its prompts and completions come in, and `finished`.
      finished: the function declares a parameter `finished` (module docstring).
      by_name: prompts and completions are passed by name (`prompts=`, `completions=`), as TRL calls its
        reward functions (`fn(completions, answer, **kwargs)`): `completions` is the function's first
        positional parameter, or keyword-only after none but `prompts`. Otherwise they are its first two
        positional arguments.
      takes_prompts: by name, whether to pass `prompts` (a parameter of that name, or `**kwargs`).
      positional_only: called positionally, the required positional-only parameters after the first two,
        which no field can fill.
    """

    named: dict[str, bool]
    every: bool
    reserved: frozenset[str]
    finished: bool = False
    by_name: bool = False
    takes_prompts: bool = False
    positional_only: tuple[str, ...] = ()

    def wanted(self, names) -> list[str]:
        """Which of the field `names` the function is given."""
        if self.every:  # completion_ids: to TRL-style functions (called by name) and where named only
            return [
                n
                for n in names
                if n not in self.reserved and (n != COMPLETION_IDS or self.by_name or n in self.named)
            ]
        return [n for n in names if n in self.named]


def field_parameters(fn: Callable) -> FieldParameters:
    """What `fn`'s signature says of how to call it and the row fields it takes (positionally and none where
    it has no readable signature)."""
    params = _parameters(fn)
    kinds = inspect.Parameter
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    by_keyword = {p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    every = any(p.kind is kinds.VAR_KEYWORD for p in params)
    names = [p.name for p in positional]
    # TRL's convention: `f(completions, answer, **kw)`, `f(prompts, *, completions)`; `f(prompts,
    # completions)` and `f(p, c, completions=None)` keep the positional call
    if COMPLETION_IDS in names[:2]:  # TRL's `f(completion_ids, **kwargs)` (its overlong punishment)
        by_name = True
    elif "completions" in names:
        by_name = names.index("completions") == 0
    else:
        by_name = "completions" in by_keyword and set(names) <= {"prompts"}
    if by_name:
        reserved = frozenset({"prompts", "completions", "finished"})
        unfilled = ()
    else:
        reserved = frozenset({p.name for p in positional[:2]} | {"finished"})
        unfilled = tuple(
            p.name for p in positional[2:] if p.kind is kinds.POSITIONAL_ONLY and p.default is p.empty
        )
    named = {p.name: p.default is p.empty for p in params if p.name in by_keyword - reserved}
    takes_prompts = by_name and ("prompts" in by_keyword or every)
    finished = any(p.name == "finished" for p in params)
    return FieldParameters(named, every, reserved, finished, by_name, takes_prompts, unfilled)


def fields_taken(fn: Callable, names) -> list[str]:
    """Which of the row fields `names` reward `fn` is given (a `Batched` reward: its function's; a
    `WeightedSum`: any of its functions')."""
    specs = [field_parameters(f) for f in _functions(fn)]
    return [n for n in names if any(n in spec.wanted(names) for spec in specs)]


def row_fields(rows: Sequence[Mapping]) -> dict[str, list]:
    """[N] values of each field of the prompt rows (every key but `NOT_FIELDS`, in order of first appearance),
    None where a row lacks it."""
    names = dict.fromkeys(k for row in rows for k in row if k not in NOT_FIELDS)
    return {name: [row.get(name) for row in rows] for name in names}


def with_completion_ids(fields: Mapping[str, Sequence] | None, ids: Sequence[Sequence[int] | None]) -> dict:
    """`fields` (one value per completion) with each completion's token ids (None: not known) under
    COMPLETION_IDS."""
    return {**(fields or {}), COMPLETION_IDS: [None if x is None else [int(t) for t in x] for x in ids]}


def needs_completion_ids(fn: Callable) -> bool:
    """Whether reward `fn` (or one of a `WeightedSum`'s) requires `completion_ids` (no default)."""
    return any(field_parameters(f).named.get(COMPLETION_IDS) for f in _functions(fn))


def _functions(fn: Callable) -> list[Callable]:
    """The functions a reward calls: those of a `WeightedSum`'s parts, a `Batched` reward's, or `fn`."""
    if isinstance(fn, WeightedSum):
        return [f for _, part, _ in fn.parts for f in _functions(part)]
    return [fn.fn if isinstance(fn, Batched) else fn]


def take_fields(fields: Mapping[str, Sequence] | None, index: Sequence[int]) -> dict[str, list] | None:
    """The fields of rows `index` (repeated as often as listed: a prompt's K completions)."""
    if fields is None:
        return None
    return {name: [values[i] for i in index] for name, values in fields.items()}


def check_fields(fn: Callable, rows: Sequence[Mapping], name: str, where: str) -> None:
    """Refuses prompt rows that lack a field reward `name` (its spec, for the message) requires, or hold null
    in it (a column another file of the data has), and a required parameter no field can fill.

    Raises:
      ValueError: naming the parameter, the first row without it (its prompt quoted, and its place among the
        prompt rows of `where`, counted from 0) and the fields the rows have.
    """
    spec = field_parameters(fn)
    if spec.positional_only:
        raise ValueError(
            f"reward {name} takes {spec.positional_only[0]!r} positionally only: row fields come by name"
        )
    for param in [p for p, needed in spec.named.items() if needed and p != COMPLETION_IDS]:
        if param in TRL_TRAINER_ARGUMENTS and not any(param in row for row in rows):
            raise ValueError(
                f"reward {name} takes {param!r}, an argument of TRL's trainer that copg_jax does not pass: "
                "give it a default (None) or take it from **kwargs"
            )
        missing = next((i for i, row in enumerate(rows) if row.get(param) is None), None)
        if param in NOT_FIELDS or missing is not None:
            have = ", ".join(repr(k) for k in row_fields(rows)) or "none"
            if param in NOT_FIELDS:
                why = "no prompt field has that name"
            else:
                prompt = json.dumps(rows[missing].get("prompt"), ensure_ascii=False)
                prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                why = f"the row of prompt {prompt} (prompt row {missing}) has none (or null)"
            raise ValueError(f"reward {name} takes {param!r}: {why} in {where} (the fields: {have})")


_LOOP: tuple[int, asyncio.AbstractEventLoop, threading.Thread] | None = None  # (process id, loop, thread)
_LOOP_LOCK = threading.Lock()


def _reward_loop() -> asyncio.AbstractEventLoop:
    """The event loop async rewards run on: one per process, as in TRL (a connection pool or a semaphore a
    reward keeps between calls is bound to it), on a daemon thread of its own; started again in a forked
    child, which has no such thread, or where its thread has ended."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP[0] != os.getpid() or not _LOOP[2].is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="reward-event-loop", daemon=True)
            thread.start()
            _LOOP = (os.getpid(), loop, thread)
        return _LOOP[1]


def run_awaitable(awaitable, timeout_s: float = 0.0):
    """The result of an awaitable (what an `async def` reward returns), awaited on `_reward_loop()` (the
    caller's thread may have a loop running, a notebook's, where `asyncio.run` refuses). What it raises
    (SystemExit too, which would have ended the loop's thread) is raised here; past `timeout_s` (> 0) it is
    cancelled and RewardTimeout raised. A coroutine that blocks (`time.sleep` inside it) holds up the loop
    and so the other async calls, as in TRL."""

    async def boxed():
        try:
            return True, await awaitable
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            return False, e

    future = asyncio.run_coroutine_threadsafe(boxed(), _reward_loop())
    try:
        ok, value = future.result(timeout_s or None)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise RewardTimeout(f"the reward function did not return within {timeout_s:g} s") from None
    if not ok and isinstance(value, asyncio.CancelledError):  # cancelled within the reward (a task of its
        raise RuntimeError("the reward's coroutine was cancelled") from value  # own): its failure
    if not ok:
        raise value
    return value


def _call(
    fn: RewardFn,
    prompts: list,
    completions: list[str],
    finished: list[bool] | None,
    fields=None,
    timeout_s=0.0,
):
    result = _call_sync(fn, prompts, completions, finished, fields)
    return run_awaitable(result, timeout_s) if inspect.isawaitable(result) else result


def _call_sync(fn: RewardFn, prompts: list, completions: list[str], finished: list[bool] | None, fields=None):
    if isinstance(fn, Batched):
        return fn(prompts, completions, finished, fields)
    spec = field_parameters(fn)  # one reading of its signature per call
    kwargs = {} if finished is None or not spec.finished else {"finished": finished}
    if fields:
        kwargs |= {name: fields[name] for name in spec.wanted(fields)}
    if spec.by_name:  # as TRL: a conversation's completion is its assistant message, [{role, content}]
        completions = [
            [{"role": "assistant", "content": c}] if isinstance(p, list) else c
            for p, c in zip(prompts, completions, strict=True)
        ]
        return fn(completions=completions, **({"prompts": prompts} if spec.takes_prompts else {}), **kwargs)
    return fn(prompts, completions, **kwargs)


class RewardTimeout(TimeoutError):
    """A reward call ran past its time limit (`reward.call_timeout_s`); its rows fail without being tried
    again one by one."""


@dataclasses.dataclass(frozen=True)
class FailedCall:
    """Stands in for the score of a row whose reward failed: each row of a call that failed as a whole
    (`Batched`: a call past its time limit), or a row a reward returns it for (a code test whose sandbox did
    not start). `_check_values` records `reason` as the row's error; the other rows are scored."""

    reason: str


def call_with_timeout(fn: Callable, timeout_s: float, *args, **kwargs):
    """`fn(*args, **kwargs)`; when `timeout_s` > 0, on a thread of its own, RewardTimeout past it (the call
    cannot be stopped: it is left running, a daemon that never keeps the process alive). A function that
    needs the main thread (signal handlers) or its import thread (sqlite connections) fails there: the
    limit is opt-in."""
    if not timeout_s:
        return fn(*args, **kwargs)
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="reward-call", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RewardTimeout(f"the reward function did not return within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class Batched:
    """`fn` called on at most `batch_size` rows at a time (`reward.batch_size`), its scores joined in order,
    each call given at most `timeout_s` seconds (0: no limit, on the caller's thread; `call_with_timeout`).
    The rows of a call past it fail (FailedCall); a call that raises (or returns another number of scores)
    is made again row by row, so its failure lands on its rows; it never raises itself. `finished` and the
    row fields `fn` takes are passed on, sliced with the rows (module docstring)."""

    def __init__(self, fn: RewardFn, batch_size: int, timeout_s: float = 0.0):
        if batch_size < 1:
            raise ValueError(f"reward.batch_size={batch_size} must be >= 1")
        self.fn, self.batch_size, self.timeout_s = fn, batch_size, timeout_s

    def _scores(self, prompts: list, completions: list[str], finished: list[bool] | None, fields) -> list:
        """One call's scores (FailedCall for all its rows when it ran past its limit).

        Raises:
          what the call raised (SystemExit too), or what `_as_scores` raises for its result.
        """

        def scores():  # a generator's scores are read within the time limit too
            raw = _call(self.fn, prompts, completions, finished, fields, self.timeout_s)
            return _as_scores(raw, len(prompts))

        try:
            return call_with_timeout(scores, self.timeout_s)
        except RewardTimeout as e:
            return [FailedCall(describe_error(e))] * len(prompts)

    def __call__(
        self,
        prompts: list,
        completions: list[str],
        finished: list[bool] | None = None,
        fields: Mapping[str, Sequence] | None = None,
    ) -> list:
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(prompts)))
            try:
                scores += self._scores(*_slice(rows, prompts, completions, finished, fields))
                continue
            except (Exception, SystemExit) as e:  # noqa: BLE001 - the call's rows, one by one below
                if len(rows) == 1:
                    scores.append(FailedCall(describe_error(e)))
                    continue
            for i in rows:
                try:
                    scores += self._scores(*_slice(range(i, i + 1), prompts, completions, finished, fields))
                except (Exception, SystemExit) as e:  # noqa: BLE001 - recorded on its row
                    scores.append(FailedCall(describe_error(e)))
        return scores


class WeightedSum(Batched):
    """Several rewards scored as one, sum_j w_j r_j (TRL's `reward_funcs` with `reward_weights`): `parts` are
    (name, Batched reward, weight). A reward that returns None for a row does not apply to it (TRL's
    convention: a math reward on a coding prompt) and is left out of its sum; a row fails where any of them
    fails on it, its error naming that one, or where none applies."""

    def __init__(self, parts: Sequence[tuple[str, Batched, float]]):
        self.parts = list(parts)

    @property
    def names(self) -> list[str]:
        """Each function's name for metrics: its own (`module:fn` -> `fn`, as TRL names them), with `#i` (its
        place in the list) where two share one."""
        short = [name.rsplit(":", 1)[-1] for name, _, _ in self.parts]
        return [s if short.count(s) == 1 else f"{s}#{i}" for i, s in enumerate(short)]

    def __call__(self, prompts: list, completions: list, finished: list | None = None, fields=None) -> list:
        return self.scored(prompts, completions, finished, fields)[0]

    def scored(
        self, prompts: list, completions: list, finished: list | None = None, fields=None
    ) -> tuple[list, dict[str, np.ndarray]]:
        """(the sums as `__call__` returns them, each function's [N] unweighted scores by `names`, NaN where
        it failed or does not apply)."""
        n = len(prompts)
        total, errors, applies = np.zeros(n), [None] * n, np.zeros(n, bool)
        each = {}
        for label, (name, part, weight) in zip(self.names, self.parts, strict=True):
            values = _as_scores(part(prompts, completions, finished, fields), n)
            absent = np.array([v is None for v in values])
            scores, failed = _check_values([0.0 if v is None else v for v in values], n)
            each[label] = np.where(absent, np.nan, scores)
            errors = [
                e if e is not None or f is None else f"{name}: {f}"
                for e, f in zip(errors, failed, strict=True)
            ]
            total += np.where(absent, 0.0, weight * np.nan_to_num(scores))
            applies |= ~absent
        none = "no reward applies (each returned None)"
        errors = [e or (None if a else none) for e, a in zip(errors, applies, strict=True)]
        return [float(x) if e is None else FailedCall(e) for x, e in zip(total, errors, strict=True)], each


def _slice(rows: range, prompts: list, completions: list, finished: list | None, fields) -> tuple:
    """(prompts, completions, finished, fields) of `rows`."""
    part = slice(rows.start, rows.stop)
    flags = None if finished is None else finished[part]
    return prompts[part], completions[part], flags, take_fields(fields, rows)


def score_rows(
    fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    finished: Sequence[bool] | None = None,
    fields: Mapping[str, Sequence] | None = None,
) -> RewardResult:
    """Calls `fn` on the whole batch; if that raises, calls it row by row so the failure lands on its row
    (`Batched` with all N rows in one call).

    Args:
      fn: batched reward function.
      prompts: [N] prompt strings.
      completions: [N] completion strings.
      finished: [N] whether each completion ended with EOS (None: unknown); passed to an `fn` that takes it.
      fields: name -> [N] values of each row's prompt fields (`row_fields`); those `fn` takes are passed.
    Returns:
      RewardResult with [N] scores and errors.
    """
    prompts, completions = list(prompts), list(completions)
    n = len(prompts)
    if len(completions) != n:
        raise ValueError(f"{n} prompts but {len(completions)} completions")
    if finished is not None:
        finished = [bool(f) for f in finished]
        if len(finished) != n:
            raise ValueError(f"{n} prompts but {len(finished)} finished flags")
    fields = None if fields is None else {name: list(values) for name, values in fields.items()}
    for name, values in (fields or {}).items():
        if len(values) != n:
            raise ValueError(f"{n} prompts but {len(values)} values of field {name!r}")
    if n == 0:
        return RewardResult(np.zeros(0), [])
    if isinstance(fn, WeightedSum):  # it never raises: each of its functions' failures land on their rows
        values, parts = fn.scored(prompts, completions, finished, fields)
        return RewardResult(*_check_values(values, n), parts)
    scores, errors = _check_values(Batched(fn, n)(prompts, completions, finished, fields), n)
    return RewardResult(scores, errors)


def gather_float64(x: np.ndarray) -> np.ndarray:
    """[P * S] float64: each process's [S] float64 values, gathered exactly. JAX without 64-bit mode would
    round them to float32 on the way (a reward of 123456789 arrives as 123456792), so their bits travel as
    pairs of uint32."""
    bits = np.ascontiguousarray(x, np.float64).view(np.uint32)
    gathered = np.asarray(multihost_utils.process_allgather(bits, tiled=True), np.uint32)
    return np.ascontiguousarray(gathered).view(np.float64)


def score_rows_shared(
    fn: RewardFn,
    prompts: Sequence[str],
    completions: Sequence[str],
    finished: Sequence[bool] | None = None,
    fields: Mapping[str, Sequence] | None = None,
) -> RewardResult:
    """`score_rows` with the rows split over the processes of a multi-host run: each process scores its own
    contiguous share (rewards run where the rows are assigned) and every process gets all N results. The
    same rows must be passed on every process; a row's error text is known on the process that scored it
    ("reward failed on process p" elsewhere). One process: exactly `score_rows`.
    """
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return score_rows(fn, prompts, completions, finished, fields)
    n = len(prompts)
    share = -(-n // count)
    lo, hi = min(n, index * share), min(n, (index + 1) * share)
    mine = None if finished is None else list(finished)[lo:hi]
    local = score_rows(
        fn, list(prompts)[lo:hi], list(completions)[lo:hi], mine, take_fields(fields, range(lo, hi))
    )
    scores, failed = np.full(share, np.nan), np.ones(share, np.int32)
    scores[: hi - lo] = local.scores
    failed[: hi - lo] = [e is not None for e in local.errors]
    parts = {}
    for name in fn.names if isinstance(fn, WeightedSum) else ():  # on every process (a share may be empty)
        mine = np.full(share, np.nan)
        mine[: hi - lo] = local.parts.get(name, np.zeros(0))
        parts[name] = gather_float64(mine)[:n]
    scores = gather_float64(scores)[:n]
    failed = np.asarray(multihost_utils.process_allgather(failed, tiled=True))[:n]
    errors: list[str | None] = [None] * n
    for i in np.flatnonzero(failed):
        errors[i] = local.errors[i - lo] if lo <= i < hi else f"reward failed on process {i // share}"
    return RewardResult(scores, errors, parts)
