"""Reward sources: import-path functions, per-row failure recording, code tests in a sandbox, `copg score`."""

import asyncio
import json
import math
import re
import signal
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from copg_jax import cli
from copg_jax.config import ConfigError
from copg_jax.rewards import (
    RewardConfig,
    build_reward,
    fields_taken,
    row_fields,
    score_rows,
    with_completion_ids,
)
from copg_jax.rewards.base import Batched
from copg_jax.rewards.code_tests import CodeTestReward, SandboxLimits, extract_code, same_value
from copg_jax.rewards.python_fn import load_python_reward
from copg_jax.rewards.score import main as score_main
from copg_jax.run_config import load_config

FAST = SandboxLimits(timeout_s=5.0, cpu_seconds=2, memory_mb=512)


# Reward functions addressed by import path from the tests below.
def length_reward(prompts, completions):
    return [float(len(c)) for c in completions]


def flaky_reward(prompts, completions):
    """Raises on 'boom', NaN on 'nan', a string on 'str': each failure must land on its own row."""
    out = []
    for c in completions:
        if c == "boom":
            raise RuntimeError("exploded")
        out.append(math.nan if c == "nan" else "x" if c == "str" else 1.0)
    return out


def wrong_length_reward(prompts, completions):
    return [1.0]


def cut_aware_reward(prompts, completions, finished):
    """Length, halved when the completion was cut."""
    if "boom" in completions and len(completions) > 1:
        raise RuntimeError("batch fails: rows are scored alone")
    return [len(c) * (1.0 if f else 0.5) for c, f in zip(completions, finished, strict=True)]


def test_python_reward_by_import_path():
    fn = load_python_reward("tests.test_rewards:length_reward")
    assert fn(["p"], ["abc"]) == [3.0]
    with pytest.raises(ValueError, match="not of the form"):
        load_python_reward("tests.test_rewards")
    with pytest.raises(ValueError, match="cannot import"):
        load_python_reward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        load_python_reward("tests.test_rewards:nope")
    with pytest.raises(ValueError, match="not callable"):
        load_python_reward("tests.test_rewards:FAST")


def test_failures_are_recorded_per_row_never_zeroed():
    res = score_rows(flaky_reward, ["p"] * 5, ["ok", "boom", "nan", "str", "ok"])
    assert res.errors[0] is None and res.errors[4] is None
    assert res.errors[1] == "RuntimeError: exploded"
    assert "not finite" in res.errors[2] and "not a number" in res.errors[3]
    np.testing.assert_array_equal(np.isnan(res.scores), [False, True, True, True, False])
    assert res.num_failed == 3
    # what float() would read but data refuses (a number as text, a bool), and past 1e12 (past float32 it
    # trained as an infinite reward, and from 1e20 its squared differences overflowed the loss: updates
    # skipped, or a stop blamed on the logged data), fail as those rows do
    text = ["0.3", b"7", bytearray(b"1"), True, np.bool_(False), np.array(True), np.array("0.3"), 1 + 5j]
    huge = [1e39, -(10**40), 10**400, 1e20, -2e12]
    values = [*text, np.complex64(2), *huge, 10**12, np.float32(2.5), np.int64(3), -0.0]
    res = score_rows(lambda p, c: values, ["p"] * len(values), ["c"] * len(values))
    assert [e is None for e in res.errors] == [False] * 14 + [True] * 4
    assert all("not a number" in e for e in res.errors[:9])
    assert all("is beyond ±1e12: CoPG squares reward differences in float32" in e for e in res.errors[9:14])
    assert res.scores[14:].tolist() == [1e12, 2.5, 3.0, -0.0]
    res = score_rows(lambda p, c: jnp.array([True, False]), ["p"] * 2, ["c"] * 2)  # jnp.all(...) per row
    assert res.num_failed == 2
    res = score_rows(wrong_length_reward, ["p", "q"], ["a", "b"])  # batch call wrong; rows alone fine
    assert res.num_failed == 0 and res.scores.tolist() == [1.0, 1.0]
    as_generator = lambda p, c: (float(len(x)) for x in c)  # noqa: E731 - any iterable of numbers
    as_text = lambda p, c: "12"  # noqa: E731 - its characters are not the scores
    for fn in (as_generator, Batched(as_generator, batch_size=1)):
        assert score_rows(fn, ["p", "q"], ["a", "bc"]).scores.tolist() == [1.0, 2.0]
    lazy = lambda p, c: (len(None) if x == "bad" else 1.0 for x in c)  # noqa: E731 - fails on one row
    for fn in (lazy, Batched(lazy, batch_size=2)):  # the reward's own error, on its row
        assert score_rows(fn, ["p"] * 3, ["a", "bad", "b"]).errors == [
            None, "TypeError: object of type 'NoneType' has no len()", None
        ]  # fmt: skip
    for fn in (as_text, Batched(as_text, batch_size=2)):
        assert (
            score_rows(fn, ["p", "q"], ["a", "b"]).errors
            == ["TypeError: reward function returned a str, expected a list of 1 floats"] * 2
        )


def exiting_reward(prompts, completions):
    sys.exit(0)


def test_a_reward_that_exits_or_returns_a_dict_fails_its_rows():
    """sys.exit(0) in a reward ended `copg score` and online training with status 0, nothing written; a dict
    {row: score} was read by its keys."""
    res = score_rows(exiting_reward, ["p", "q"], ["a", "b"])
    assert res.num_failed == 2 and res.errors[0] == "SystemExit: 0"
    as_dict = lambda p, c: {i: 7.0 for i in range(len(c))}  # noqa: E731
    for fn in (as_dict, Batched(as_dict, batch_size=2)):  # a configured reward is Batched
        res = score_rows(fn, ["p", "q"], ["a", "b"])
        assert res.num_failed == 2 and "returned a dict" in res.errors[0]


def test_a_reward_module_that_fails_at_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_reward.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot import module 'broken_reward': SyntaxError"):
        load_python_reward("broken_reward:f")


def test_a_reward_that_takes_finished_is_told_which_completions_were_cut():
    """Passed per row (also when a failing batch is scored row by row), never to a reward without the
    parameter, and all True when the caller does not know."""
    res = score_rows(cut_aware_reward, ["p"] * 3, ["abcd", "ab", "abcdef"], [True, False, False])
    assert res.scores.tolist() == [4.0, 1.0, 3.0]
    res = score_rows(cut_aware_reward, ["p"] * 3, ["abcd", "boom", "ab"], [False, True, False])
    assert res.scores.tolist() == [2.0, 4.0, 1.0]
    assert score_rows(length_reward, ["p"], ["abc"], [False]).scores.tolist() == [3.0]
    assert "missing 1 required positional argument" in score_rows(cut_aware_reward, ["p"], ["abc"]).errors[0]
    with pytest.raises(ValueError, match="2 prompts but 1 finished flags"):
        score_rows(length_reward, ["p", "q"], ["a", "b"], [True])


def call_size_reward(prompts, completions, finished):
    """The number of rows of the call, plus a half for a finished completion."""
    return [len(prompts) + 0.5 * f for f in finished]


def test_a_python_reward_is_called_on_reward_batch_size_rows_at_a_time():
    """reward.batch_size (rows per reward call) bounds the calls of online rollouts and evaluation, which
    hand the reward every row at once (it was ignored for Python functions)."""
    fn = build_reward(RewardConfig(fn="tests.test_rewards:call_size_reward", batch_size=3))
    finished = [i % 2 == 0 for i in range(7)]
    result = score_rows(fn, ["p"] * 7, ["c"] * 7, finished)
    sizes = [3, 3, 3, 3, 3, 3, 1]
    assert result.scores.tolist() == [n + 0.5 * f for n, f in zip(sizes, finished, strict=True)]


def test_score_command_passes_the_finished_flags_of_generated_rows(tmp_path):
    rows = [
        {"prompt": "a", "completions": ["xx", "yyyy"], "finished": [False, True]},
        {"prompt": "b", "completions": ["zz", "w"]},
    ]
    _write(tmp_path / "in.jsonl", rows)
    args = ["--input", str(tmp_path / "in.jsonl"), "--reward", "tests.test_rewards:cut_aware_reward"]
    assert score_main([*args, "--output", str(tmp_path / "out.jsonl")]) == 0
    assert [r["rewards"] for r in _read(tmp_path / "out.jsonl")] == [[1.0, 4.0], [2.0, 1.0]]
    _write(tmp_path / "bad.jsonl", [rows[1], {**rows[0], "finished": [True]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'finished' must be a list of 2 booleans"):
        score_main(["--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o"), *args[2:]])


def answer_reward(prompts, completions, answer, scale=None):
    """The row's `scale` (1 without the field) where the completion's last word is its row's answer, else 0;
    raises on "boom"."""
    if "boom" in completions:
        raise RuntimeError("a batch holding boom fails: rows are scored alone")
    scale = scale or [1.0] * len(completions)
    rows = zip(completions, answer, scale, strict=True)
    return [x * (c.split()[-1:] == [str(a)]) for c, a, x in rows]


def every_field_reward(ps, completions, finished, **fields):
    """The row's `weight` times the completion's length, halved when cut; fails unless given exactly the
    fields `weight` and `tag` (not the prompt, completions or per-completion lists)."""
    if sorted(fields) != ["tag", "weight"]:
        raise AssertionError(f"fields {sorted(fields)}")
    cut = [1.0 if f else 0.5 for f in finished]
    return [w * len(c) * x for w, c, x in zip(fields["weight"], completions, cut, strict=True)]


def test_a_python_reward_gets_the_fields_of_its_rows_it_names():
    """A math problem's answer reaches the reward beside its prompt, row by row: also when a failing call is
    made again row by row and when `reward.batch_size` splits the rows; a parameter with a default that no row
    has keeps its default, and `**kwargs` gets every field."""
    prompts = ["1+1", "2+2", "3+3", "4+4", "5+5"]
    completions = ["so 2", "it is 5", "boom", "8", "= 10"]
    fields = {"answer": [2, 4, 6, 8, 10], "source": ["gsm"] * 5}  # `source` is not taken: not passed
    for batch_size in (5, 2, 1):
        fn = build_reward(RewardConfig(fn="tests.test_rewards:answer_reward", batch_size=batch_size))
        res = score_rows(fn, prompts, completions, fields=fields)
        assert res.scores[[0, 1, 3, 4]].tolist() == [1.0, 0.0, 1.0, 1.0] and res.num_failed == 1
        assert "boom" in res.errors[2]
    scaled = score_rows(
        answer_reward, prompts[:2], completions[:2], fields={"answer": [2, 4], "scale": [3, 5]}
    )
    assert scaled.scores.tolist() == [3.0, 0.0]
    res = score_rows(
        every_field_reward,
        ["p", "q", "r"],
        ["ab", "abc", "abcd"],
        [True, False, True],
        {"weight": [1.0, 2.0, 10.0], "tag": ["x", None, "z"]},
    )
    assert res.scores.tolist() == [2.0, 3.0, 40.0]
    assert (
        "missing 1 required positional argument: 'answer'"
        in score_rows(answer_reward, ["p"], ["c"]).errors[0]
    )
    with pytest.raises(ValueError, match="2 prompts but 1 values of field 'answer'"):
        score_rows(answer_reward, ["p", "q"], ["a", "b"], fields={"answer": [1]})


def test_rows_without_a_field_the_reward_needs_are_refused_by_row():
    """Checked when the reward is built, before anything is sampled: a row without the field (or null in it,
    where another file of the data has the column) is named; a field that is not a prompt's is named too."""
    rows = [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": None}, {"prompt": "c"}]
    cfg = RewardConfig(fn="tests.test_rewards:answer_reward")
    build_reward(cfg, rows[:1], "x.jsonl")
    for bad, row, prompt in ((rows[:2], 1, "b"), (rows[::2], 1, "c"), (rows[2:], 0, "c")):
        with pytest.raises(
            ValueError,
            match=rf'\'answer\': the row of prompt "{prompt}" \(prompt row {row}\) has none \(or null\) in x',
        ):
            build_reward(cfg, bad, "x.jsonl")
    with pytest.raises(ValueError, match="takes 'answer' positionally only: row fields come by name"):
        build_reward(RewardConfig(fn="tests.test_rewards:positional_only_reward"), rows[:1], "x.jsonl")
    with pytest.raises(
        ValueError,
        match=r"takes 'rewards': no prompt field has that name in x.jsonl \(the fields: 'answer'\)",
    ):
        build_reward(RewardConfig(fn="tests.test_rewards:rewards_reward"), rows[:1], "x.jsonl")
    build_reward(
        RewardConfig(fn="tests.test_rewards:every_field_reward"), rows[2:], "x.jsonl"
    )  # all optional


def rewards_reward(prompts, completions, rewards):
    return rewards


def positional_only_reward(prompts, completions, answer, /):
    return [1.0] * len(completions)


def trl_reward(completions, answer, **kwargs):
    """TRL's convention (its GRPO reward functions): everything by name, the prompts in kwargs."""
    assert len(kwargs["prompts"]) == len(completions)
    return [float(c.split()[-1:] == [str(a)]) for c, a in zip(completions, answer, strict=True)]


def test_a_reward_written_for_trl_is_called_by_name():
    """`fn(completions, answer, **kwargs)` got the prompts as its completions and the completions as its
    answers (every reward 0, no error); it is called as TRL calls it. A function whose second parameter is
    `completions` keeps the positional call."""
    fields = {"answer": [2, 4, 6]}
    completions = ["so 2", "it is 5", "6"]
    for fn in ("trl_reward", "answer_reward"):
        reward = build_reward(RewardConfig(fn=f"tests.test_rewards:{fn}", batch_size=2))
        assert score_rows(reward, ["1+1", "2+2", "3+3"], completions, fields=fields).scores.tolist() == [
            1,
            0,
            1,
        ]
    only = lambda completions: [float(len(c)) for c in completions]  # noqa: E731 - no prompts taken
    assert score_rows(only, ["p", "q"], ["ab", "c"], fields=fields | {"answer": [1, 2]}).scores.tolist() == [
        2,
        1,
    ]


def trl_chat_reward(completions, **kwargs):
    """TRL's conversational form: a chat prompt's completion is [{"role": "assistant", "content": ...}]."""
    return [float(len(c[0]["content"]) if isinstance(c, list) else -1) for c in completions]


def test_a_trl_reward_gets_a_chat_prompts_completion_as_its_assistant_message():
    """As TRL's GRPO trainer passes them: text prompts' completions as text, chat prompts' as the assistant
    message (a TRL function reading c[0]["content"] failed on every row and online mode trained on logged
    rows alone)."""
    prompts = [[{"role": "user", "content": "hi"}], "plain"]
    reward = build_reward(RewardConfig(fn="tests.test_rewards:trl_chat_reward", batch_size=1))
    assert score_rows(reward, prompts, ["abc", "de"]).scores.tolist() == [3, -1]
    plain = build_reward(RewardConfig(fn="tests.test_rewards:answer_reward"))  # the positional call: text
    assert score_rows(plain, prompts, ["2", "5"], fields={"answer": [2, 4]}).scores.tolist() == [1, 0]


JUDGE = {"semaphore": None, "cancelled": 0}


async def async_judge(completions, answer, **kwargs):
    """TRL allows `async def` rewards (a judge over HTTP): awaited, its failures land on their rows. A
    semaphore kept between calls (a judge's concurrency limit) is bound to the loop of its first call."""
    if JUDGE["semaphore"] is None:
        JUDGE["semaphore"] = asyncio.Semaphore(2)
    async with JUDGE["semaphore"]:
        await asyncio.sleep(0)
    if any(c == "slow" for c in completions):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            JUDGE["cancelled"] += 1
            raise
    if any(c == "boom" for c in completions):
        raise RuntimeError("judge unreachable")
    if any(c == "exit" for c in completions):
        raise SystemExit("judge gave up")  # killed a shared event loop's thread: every later call hung
    return [float(c.split()[-1] == str(a)) for c, a in zip(completions, answer, strict=True)]


def test_an_async_reward_is_awaited_even_where_an_event_loop_runs():
    """A coroutine counted as a wrong result: every completion failed. It is awaited on a loop of its own,
    also from inside a running event loop (a notebook), where asyncio.run would refuse; one row raising
    fails that row only, as for any function; in a weighted sum beside a plain one."""
    reward = build_reward(RewardConfig(fn="tests.test_rewards:async_judge", batch_size=4))
    prompts, completions = ["1+1", "2+2", "3+3"], ["so 2", "boom", "it is 7"]
    fields = {"answer": [2, 4, 6]}

    result = score_rows(reward, prompts, completions, fields=fields)
    assert result.scores[[0, 2]].tolist() == [1.0, 0.0] and np.isnan(result.scores[1])
    assert result.errors == [None, "RuntimeError: judge unreachable", None]

    async def in_a_notebook():
        return score_rows(reward, prompts, ["so 2", "4", "6"], fields=fields).scores.tolist()

    assert asyncio.run(in_a_notebook()) == [1.0, 1.0, 1.0]
    result = score_rows(reward, prompts, ["so 2", "exit", "6"], fields=fields)
    assert result.errors == [None, "SystemExit: judge gave up", None]
    assert score_rows(reward, prompts[:1], ["so 2"], fields={"answer": [2]}).scores.tolist() == [1.0]
    # past reward.call_timeout_s: the call's rows fail, the coroutine is cancelled, later calls go on
    limited = build_reward(
        RewardConfig(fn="tests.test_rewards:async_judge", call_timeout_s=0.5, batch_size=1)
    )
    result = score_rows(limited, prompts[:2], ["slow", "so 4"], fields={"answer": [2, 4]})
    assert result.errors[0].startswith("RewardTimeout") and np.isnan(result.scores[0])
    assert result.errors[1] is None and result.scores[1] == 1.0
    judge = limited.fn.__globals__["JUDGE"]  # the module as the reward imported it (pytest's is another)
    deadline = time.monotonic() + 5
    while not judge["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert judge["cancelled"] == 1
    both = build_reward(
        RewardConfig(
            fn=["tests.test_rewards:async_judge", "tests.test_rewards:format_reward"], weights=[1, 2]
        )
    )
    assert score_rows(both, prompts[:1], ["so 2"], fields={"answer": [2]}).scores.tolist() == [3.0]


def test_a_reward_failing_on_every_row_stops_rollouts_and_evaluation():
    """Not a warning and a run trained on logged rows alone: every completion failing is a broken reward."""
    from copg_jax.rewards import refuse_all_failed

    refuse_all_failed([None, "KeyError: 'x'"], "rollout 3")  # one scored
    with pytest.raises(
        ValueError, match=r"rollout 3: the reward failed on all 2 completions \(KeyError: 'x'\)"
    ):
        refuse_all_failed(["KeyError: 'x'"] * 2, "rollout 3")


def format_reward(completions, **kwargs):
    """A TRL-style format reward: 1 when the completion ends with a number."""
    if any(c == "boom" for c in completions):
        raise RuntimeError("format check broke")
    return [float(c.split()[-1].isdigit()) for c in completions]


def curriculum_reward(completions, trainer_state, **kwargs):
    """TRL passes its trainer state (`trainer_state.global_step`): copg_jax does not."""
    return [1.0] * len(completions)


def test_several_reward_functions_are_one_weighted_sum():
    """TRL's reward_funcs + reward_weights: reward.fn as a list, each function called its own way with the
    fields it names; a row fails where any function fails on it, naming that function."""
    cfg = RewardConfig(
        fn=["tests.test_rewards:format_reward", "tests.test_rewards:answer_reward"], weights=[0.5, 2.0]
    )
    rows = [{"prompt": "1+1", "answer": 2}, {"prompt": "2+2", "answer": 4}, {"prompt": "3+3", "answer": 6}]
    reward = build_reward(cfg, rows)
    fields = {"answer": [2, 4, 6], "level": [1, 1, 2]}
    assert fields_taken(reward, fields) == ["answer", "level"]  # **kwargs takes every field
    result = score_rows(reward, ["1+1", "2+2", "3+3"], ["so 2", "five", "boom"], fields=fields)
    assert result.scores[:2].tolist() == [0.5 + 2.0, 0.0] and np.isnan(result.scores[2])
    assert result.errors[2] == "tests.test_rewards:format_reward: RuntimeError: format check broke"
    # each function's own unweighted scores, by its name (NaN where it failed), for rollout/reward/<name>
    assert sorted(result.parts) == ["answer_reward", "format_reward"]
    np.testing.assert_array_equal(result.parts["format_reward"], [1.0, 0.0, np.nan])
    np.testing.assert_array_equal(result.parts["answer_reward"], [1.0, 0.0, np.nan])  # raises on "boom" too

    twice = build_reward(RewardConfig(fn=[cfg.fn[0], cfg.fn[0]]), rows)
    assert twice.names == ["format_reward#0", "format_reward#1"]
    # None: the reward does not apply to the row (TRL's multi-task convention), left out of its sum
    reward.parts[1][1].fn = lambda prompts, completions, answer: [None if a == 4 else 1.0 for a in answer]
    result = score_rows(reward, ["1+1", "2+2", "3+3"], ["so 2", "so 5", "none"], fields=fields)
    assert result.scores.tolist() == [0.5 + 2.0, 0.5, 2.0]
    reward.parts[0][1].fn = lambda completions, **kwargs: [None] * len(completions)
    result = score_rows(reward, ["2+2"], ["so 4"], fields={"answer": [4], "level": [1]})
    assert result.errors == ["no reward applies (each returned None)"]
    with pytest.raises(ValueError, match="reward.weights: 1 weights for 2 functions"):
        RewardConfig(fn=cfg.fn, weights=[1.0])
    with pytest.raises(ValueError, match="reward.weights: weights apply to several reward.fn"):
        RewardConfig(fn="m:f", weights=[1.0])
    with pytest.raises(ValueError, match=r"takes 'answer': the row of prompt \"4\+4\""):
        build_reward(cfg, [*rows, {"prompt": "4+4"}])
    with pytest.raises(
        ValueError, match=r"takes 'trainer_state', an argument of TRL's trainer that copg_jax"
    ):
        build_reward(RewardConfig(fn="tests.test_rewards:curriculum_reward"), rows)

    class Odd:  # a value whose __float__ raises what no number type does: its row fails, not the batch
        def __float__(self):
            raise RuntimeError("cannot convert")

    reward = build_reward(cfg, rows)
    reward.parts[0][1].fn = lambda completions, **kwargs: [Odd() if c == "odd" else 1.0 for c in completions]
    result = score_rows(reward, ["1+1", "2+2"], ["odd", "so 4"], fields={"answer": [2, 4], "level": [1, 1]})
    assert result.errors[0].startswith("tests.test_rewards:format_reward: reward is not a number")
    from copg_jax.rewards.score import _reason

    assert _reason(result.errors[0]) == "tests.test_rewards:format_reward: reward is not a number"
    assert (
        _reason("ValueError: bad") == "ValueError"
        and _reason("reward is not finite: nan") == "reward is not finite"
    )


def test_trls_length_rewards_get_the_completions_token_ids():
    """TRL passes each completion's token ids (`completion_ids`); its DAPO overlong punishment takes them
    first. Sampling passes them, and `copg score` passes a row's recorded `completion_token_ids`."""
    from trl.rewards import get_soft_overlong_punishment

    overlong = get_soft_overlong_punishment(max_completion_len=4, soft_punish_cache=2)
    fields = with_completion_ids({"answer": [1, 2]}, [[5, 6], [5, 6, 7]])
    result = score_rows(Batched(overlong, 8), ["p", "q"], ["ab", "abc"], fields=fields)
    assert result.scores.tolist() == [0.0, -0.5]
    lengths = lambda prompts, completions, completion_ids: [float(len(x)) for x in completion_ids]  # noqa: E731
    assert score_rows(lengths, ["p", "q"], ["ab", "abc"], fields=fields).scores.tolist() == [2, 3]
    # completion_ids among the first two parameters: called by name, as TRL calls everything
    second = lambda prompts, completion_ids, **kw: [float(len(x)) for x in completion_ids]  # noqa: E731
    first = lambda completion_ids, completions, **kw: [float(len(x)) for x in completion_ids]  # noqa: E731
    for fn in (second, first):
        assert score_rows(fn, ["p", "q"], ["ab", "abc"], fields=fields).scores.tolist() == [2, 3]
    # a function called positionally gets them only where it names them, not through **kwargs (a decorator's
    # wrapper(*args, **kwargs) around f(prompts, completions) would pass them on)
    inner = lambda prompts, completions: [1.0] * len(completions)  # noqa: E731
    wrapped = lambda *args, **kwargs: inner(*args, **kwargs)  # noqa: E731
    assert score_rows(wrapped, ["p"], ["ab"], fields=with_completion_ids(None, [[5]])).scores.tolist() == [1]
    reward = build_reward(RewardConfig(fn="tests.test_rewards:ids_reward"), [{"prompt": "p"}])  # no field
    from copg_jax.rewards.score import score_completions

    rows = [{"prompt": "p", "completions": ["a", "b"], "completion_token_ids": [[1], [1, 2, 3]]}]
    assert [r.scores.tolist() for r in score_completions(reward, rows)] == [[1, 3]]


def ids_reward(prompts, completions, completion_ids):
    return [float(len(x)) for x in completion_ids]


def test_score_command_passes_each_rows_fields_to_a_reward_that_names_them(tmp_path):
    rows = [
        {"prompt": "1+1", "answer": 2, "completions": ["2", "3", "so 2"], "finished": [True, True, False]},
        {"prompt": "2+2", "answer": 4, "completions": ["4", "2"]},
    ]
    _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    args = ["--input", str(tmp_path / "in.jsonl"), "--reward", "tests.test_rewards:answer_reward"]
    assert score_main([*args, "--output", str(out), "--batch-size", "2"]) == 0
    assert [r["rewards"] for r in _read(out)] == [[1.0, 0.0, 1.0], [1.0, 0.0]]
    malformed = [{**rows[0], "completion_token_ids": [[1], None, ["x"]]}, rows[1]]  # not read: no matter
    _write(tmp_path / "odd.jsonl", malformed)
    assert score_main(["--input", str(tmp_path / "odd.jsonl"), *args[2:], "--output", str(out)]) == 0
    ids_args = ["--input", str(tmp_path / "odd.jsonl"), "--reward", "tests.test_rewards:ids_reward"]
    with pytest.raises(
        ValueError, match=r"takes 'completion_ids': .*odd.jsonl:\d+ \(row 0\) has no completion_token_ids"
    ):
        score_main([*ids_args, "--output", str(out)])
    both = [*args, "tests.test_rewards:format_reward", "--weights", "1", "0.5"]  # as an online reward.fn list
    assert score_main([*both, "--output", str(out)]) == 0
    assert [r["rewards"] for r in _read(out)] == [[1.5, 0.5, 1.5], [1.5, 0.5]]
    _write(tmp_path / "in.jsonl", [rows[0], {"prompt": "3+3", "completions": ["6", "5"]}])
    with pytest.raises(
        ValueError, match=r'takes \'answer\': the row of prompt "3\+3" \(prompt row 1\).* in .*in.jsonl'
    ):
        score_main([*args, "--output", str(out)])


def test_extract_code_prefers_fenced_blocks():
    assert extract_code("Here:\n```python\nx = 1\n```\ntext\n```\ny = 2\n```") == "x = 1\n\n\ny = 2\n"
    assert extract_code("x = 3") == "x = 3"


def test_code_test_reward_pass_rate_and_all_or_nothing():
    tests = {"double": ["assert f(1) == 2", "assert f(2) == 4", "assert f(3) == 7"]}
    good, half = "def f(x):\n    return 2 * x", "```python\ndef f(x):\n    return x + 1\n```"
    assert CodeTestReward(tests, FAST)(["double", "double"], [good, half]) == [2 / 3, 1 / 3]
    assert CodeTestReward(tests, FAST, all_or_nothing=True)(["double"], [good]) == [0.0]
    with pytest.raises(KeyError, match="row 0: no tests"):
        CodeTestReward(tests, FAST)(["unknown"], [good])


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_command_python_reward(tmp_path, capsys):
    rows = [{"prompt": "a", "completions": ["x", "yy", "zzz"]}, {"prompt": "b", "completions": ["1", "22"]}]
    _write(tmp_path / "in.jsonl", rows)
    rc = score_main(
        ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
        + ["--reward", "tests.test_rewards:length_reward"]
    )
    assert rc == 0
    out = _read(tmp_path / "out.jsonl")
    assert out == [{**rows[0], "rewards": [1.0, 2.0, 3.0]}, {**rows[1], "rewards": [1.0, 2.0]}]
    assert not (tmp_path / "out.jsonl.errors.jsonl").exists()
    assert "scored 5/5 completions of 2 prompts" in capsys.readouterr().out


def test_score_command_reports_and_drops_failures(tmp_path, capsys):
    rows = [
        {"prompt": "a", "completions": ["ok", "boom", "ok"]},
        {"prompt": "b", "completions": ["nan", "ok"]},  # one scored completion left: the row is dropped
    ]
    _write(tmp_path / "in.jsonl", rows)
    args = ["--input", str(tmp_path / "in.jsonl"), "--reward", "tests.test_rewards:flaky_reward"]
    assert score_main([*args, "--output", str(tmp_path / "out.jsonl")]) == 0
    assert _read(tmp_path / "out.jsonl") == [
        {"prompt": "a", "completions": ["ok", "ok"], "rewards": [1.0, 1.0]}
    ]
    errors = _read(tmp_path / "out.jsonl.errors.jsonl")  # each row by its line too, as other errors name it
    assert {(e["row"], e["line"], e["completion"]) for e in errors} == {(0, 1, 1), (1, 2, 0), (1, 2, None)}
    assert "2 reward failure(s)" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"^--batch-size=0 must be >= 1$"):  # named as copg score's flag
        score_main([*args, "--output", str(tmp_path / "out.jsonl"), "--batch-size", "0"])
    assert (
        score_main([*args, "--output", str(tmp_path / "keep.jsonl"), "--on-error", "keep", "--strict"]) == 1
    )
    kept = _read(tmp_path / "keep.jsonl")
    assert kept[0]["rewards"] == [1.0, None, 1.0] and kept[0]["reward_errors"][1] == "RuntimeError: exploded"
    # scored again by a reward that fails nowhere: the earlier errors are neither carried nor left beside it
    again = ["--input", str(tmp_path / "keep.jsonl"), "--output", str(tmp_path / "keep.jsonl")]
    (tmp_path / "keep.jsonl.errors.jsonl").write_text(json.dumps({"row": 0, "completion": 1}) + "\n")
    assert score_main([*again, "--reward", "tests.test_rewards:length_reward"]) == 0
    assert "reward_errors" not in _read(tmp_path / "keep.jsonl")[0]
    assert not (tmp_path / "keep.jsonl.errors.jsonl").exists()


def test_score_command_fails_when_no_row_could_be_scored(tmp_path, capsys):
    _write(tmp_path / "in.jsonl", [{"prompt": "a", "completions": ["boom", "nan"]}])
    out = tmp_path / "out.jsonl"
    assert score_main(["--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--reward",
                       "tests.test_rewards:flaky_reward"]) == 1  # fmt: skip
    assert _read(out) == [] and len(_read(tmp_path / "out.jsonl.errors.jsonl")) == 3
    assert "no row could be scored" in capsys.readouterr().err


def test_score_drop_keeps_per_completion_fields_aligned(tmp_path):
    """`copg generate` rows carry token ids, behaviour_logprobs and finished flags per completion; dropping a
    failed completion drops its entries too, while a row-level list (tests) is left whole."""
    row = {
        "prompt": "a",
        "tests": ["t1", "t2", "t3"],
        "completions": ["ok", "boom", "ok"],
        "completion_token_ids": [[1], [2, 2], [3]],
        "behaviour_logprobs": [-1.0, -2.0, -3.0],
        "finished": [True, False, False],
    }
    _write(tmp_path / "in.jsonl", [row])
    out = tmp_path / "out.jsonl"
    args = ["--input", str(tmp_path / "in.jsonl"), "--reward", "tests.test_rewards:flaky_reward"]
    assert score_main([*args, "--output", str(out)]) == 0
    (scored,) = _read(out)
    assert scored["completions"] == ["ok", "ok"] and scored["behaviour_logprobs"] == [-1.0, -3.0]
    assert scored["completion_token_ids"] == [[1], [3]] and scored["finished"] == [True, False]
    assert scored["tests"] == ["t1", "t2", "t3"]


def test_score_command_code_tests(tmp_path):
    rows = [
        {
            "prompt": "write f doubling x",
            "tests": ["assert f(1) == 2", "assert f(5) == 10"],
            "completions": [
                "def f(x):\n    return 2 * x",
                "def f(x):\n    return x + 1",
                "def f(x): syntax(",
            ],
        }
    ]
    _write(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert score_main(["--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--code-tests"]) == 0
    assert _read(out)[0]["rewards"] == [1.0, 0.5, 0.0]


def test_bad_inputs_are_named(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "a", "completions": ["x"]}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=r"in.jsonl:2: 'completions'"):
        score_main(
            ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o"), "--reward", "m:f"]
        )
    with pytest.raises(ValueError, match="row 0: code tests need 'tests'"):
        build_reward(RewardConfig(code_tests=True), [{"prompt": "a"}])
    same = [
        {"prompt": "a", "tests": ["assert f() == 1"]},
        {"prompt": "b", "tests": ["assert g() == 2"]},
        {"prompt": "a", "tests": [{"call": "f", "expected": 2}]},
    ]
    with pytest.raises(ValueError, match="rows 0 and 2 have the same prompt but different 'tests'"):
        build_reward(RewardConfig(code_tests=True), same)
    build_reward(RewardConfig(code_tests=True), [same[0], same[0]])  # repeated identical tests are fine
    with pytest.raises(ValueError, match="exactly one"):
        RewardConfig(fn="a:b", code_tests=True)


def test_apps_call_based_tests_are_read_as_apps_checks_them():
    """APPS' / TACO's call-based problems (`fn_name`; each input the list of the arguments; some expected
    values wrapped in a list) were refused. They are call tests now, judged as APPS' checker judges them: a
    value equal to the expected one or to its wrapped item passes, a returned tuple compares as a list, and a
    LeetCode `class Solution` method is called where no function of that name is defined."""
    from copg_jax.rewards.code_tests import CallTest, parse_test, row_test_specs

    apps = json.dumps({"fn_name": "add", "inputs": [[1, 2], [[1], [2, 3]]], "outputs": [[3], [[1, 2, 3]]]})
    assert [parse_test(t) for t in row_test_specs(apps)] == [
        CallTest((("add", (1, 2), {}),), ([3],), 0.0, True),
        CallTest((("add", ([1], [2, 3]), {}),), ([[1, 2, 3]],), 0.0, True),
    ]
    reward = build_reward(
        RewardConfig(code_tests=True, sandbox="none", timeout_s=10.0), [{"prompt": "p", "tests": apps}]
    )
    plain = "def add(a, b):\n    return a + b"
    leetcode = "class Solution:\n    def add(self, a, b):\n        return a + b"
    as_tuple = "def add(a, b):\n    return tuple(a + b) if isinstance(a, list) else a + b"
    wrong = "def add(a, b):\n    return a - b if isinstance(a, int) else a + b"
    missing = "def plus(a, b):\n    return a + b"
    got = score_rows(reward, ["p"] * 5, [plain, leetcode, as_tuple, wrong, missing])
    assert got.scores.tolist() == [1.0, 1.0, 1.0, 0.5, 0.0]
    # an unwrapped comparison is APPS' alone: a plain call test still wants exactly its value
    strict = build_reward(
        RewardConfig(code_tests=True, sandbox="none", timeout_s=10.0),
        [{"prompt": "p", "tests": [{"call": "add", "args": [1, 2], "expected": [3]}]}],
    )
    assert score_rows(strict, ["p"], [plain]).scores.tolist() == [0.0]


def test_code_datasets_tests_are_read_in_the_shapes_they_ship():
    """APPS / TACO `input_output` (JSON text of {inputs, outputs}), CodeContests `public_tests` ({input,
    output}), LiveCodeBench `public_test_cases` (JSON text of {input, output, testtype}) become stdin/stdout
    tests; a program summing its input passes them all (sandbox none: the same runner and verdicts as bwrap,
    whose own tests are in test_sandbox.py)."""
    from copg_jax.rewards.code_tests import IOTest, parse_test, row_test_specs

    apps = json.dumps({"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", ["7"]]})
    contests = {"input": ["5 5\n"], "output": ["10\n"]}
    lcb = json.dumps([{"input": "2 2\n", "output": "4", "testtype": "stdin"}])
    assert [parse_test(t) for t in row_test_specs(apps)] == [IOTest("1 2\n", "3\n"), IOTest("3 4\n", "7\n")]
    assert [parse_test(t) for t in row_test_specs(lcb)] == [IOTest("2 2\n", "4")]
    assert row_test_specs("assert f(1) == 2") == ["assert f(1) == 2"]  # as before: one test, a list of it
    assert row_test_specs('"assert f(1) == 2"') == ["assert f(1) == 2"]  # JSON text of one
    single = {"input": "1\n", "output": "1\n", "testtype": "stdin"}  # one LiveCodeBench case, not a list
    assert [parse_test(t) for t in row_test_specs(single)] == [IOTest("1\n", "1\n")]
    with pytest.raises(ValueError, match=r"stdin/stdout pair 0: its output is not text: \[1\]"):
        row_test_specs({"inputs": ["1\n"], "outputs": [[1]]})
    rows = [
        {"prompt": "apps", "tests": apps},
        {"prompt": "cc", "tests": contests},
        {"prompt": "lcb", "tests": lcb},
    ]
    reward = build_reward(RewardConfig(code_tests=True, sandbox="none", timeout_s=10.0), rows)
    program = "```python\nprint(sum(map(int, input().split())))\n```"
    wrong = "print(0)"
    got = score_rows(reward, ["apps", "cc", "lcb", "apps"], [program, program, program, wrong])
    assert got.scores.tolist() == [1.0, 1.0, 1.0, 0.0]
    for bad, why in (
        (
            {"inputs": ["1"], "outputs": ["2"], "fn_name": "f"},
            "call-based test 0 of 'f': its input is not a list",
        ),
        ('{"inputs": ["1"]', "a JSON text of tests that is not JSON"),
        ({"inputs": ["1"], "outputs": []}, "lists of inputs and outputs of one length"),
        (
            [{"input": "1", "output": "1", "testtype": "functional"}],
            "functional test needs the function it calls",
        ),
        ([{"input": "1", "output": "1", "testtype": "interactive"}], "testtype 'interactive' is not read"),
    ):
        with pytest.raises(ValueError, match=rf"row 1: tests(\[0\])?: .*{why}"):
            build_reward(
                RewardConfig(code_tests=True, sandbox="none"), [rows[0], {"prompt": "x", "tests": bad}]
            )


@pytest.mark.parametrize(
    ("actual", "expected", "same"),
    [
        ({1}, {True}, False),
        ({1: "yes", 0: "no"}, {True: "yes", False: "no"}, False),
        ({(0, 0)}, {(0, False)}, False),
        ({frozenset({1})}, {frozenset({True})}, False),
        ({(1, "a"): [True]}, {(1, "a"): [1]}, False),  # values stay strict too
        ({True: 1}, {True: 1}, True),
        ({1, (2, frozenset({3}))}, {1.0, (2.0, frozenset({3.0}))}, True),  # 1 == 1.0, as at the top
        ({1, 2}, frozenset({1, 2}), True),  # a set equals a frozenset, as in Python
        ({0.1: "a"}, {0.1 + 1e-12: "a"}, False),  # keys compare exactly, whatever the tolerance
    ],
)
def test_bools_are_not_numbers_as_set_members_and_dict_keys(actual, expected, same):
    assert same_value(actual, expected, tolerance=1e-6) is same
    assert same_value(expected, actual, tolerance=1e-6) is same


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("timeout_s", math.inf, "reward.timeout_s=inf must be a finite number, at most 1000000"),
        ("timeout_s", math.nan, "reward.timeout_s=nan must be a finite number"),
        ("timeout_s", 1e300, "reward.timeout_s=1e+300 must be a finite number"),
        ("memory_mb", 10**400, "(401 characters) must be a finite number"),  # the value quoted in part
        ("workers", -1, "reward.workers=-1 must be > 0"),
    ],
    ids=["inf", "nan", "1e300", "huge-int", "negative"],
)
def test_code_test_limits_must_be_finite(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        RewardConfig(code_tests=True, **{key: value})
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


def test_an_infinite_timeout_is_one_line_from_the_score_command_and_the_config(tmp_path, capsys):
    _write(tmp_path / "in.jsonl", [{"prompt": "p", "completions": ["a", "b"], "tests": ["assert f() == 1"]}])
    argv = ["score", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o"), "--code-tests"]
    assert cli.main([*argv, "--timeout-s", "inf"]) == 1
    assert capsys.readouterr().err == (
        "copg score: error: --timeout-s=inf must be a finite number, at most 1000000\n"  # its flag
    )
    with pytest.raises(ConfigError, match=r"^rollout\.reward\.timeout_s=1000000000000\.0 must be a finite"):
        load_config(None, ["model.path=/m", "rollout.reward.timeout_s=1e12"])


def never_returning_reward(prompts, completions):
    threading.Event().wait()


CALLS: list[list[str]] = []


def hangs_on_b(prompts, completions):
    CALLS.append(list(completions))
    if "b" in completions:
        threading.Event().wait()
    if "boom" in completions:
        raise RuntimeError("exploded")
    return [float(len(c)) for c in completions]


def signal_reward(prompts, completions):
    """A reward with a SIGALRM timeout of its own (math-answer checkers): it needs the main thread."""
    signal.signal(signal.SIGALRM, signal.getsignal(signal.SIGALRM))
    return [1.0] * len(completions)


def test_a_reward_call_past_its_time_limit_fails_its_rows_and_only_them(tmp_path, capsys):
    """A reward that never returned hung `copg score`, online training and evaluation by generation for
    good. Past `reward.call_timeout_s` the rows of that call fail, not retried row by row (each would wait
    as long), the other calls' rows are scored, and the command ends. Without a limit (the default) the
    reward runs on the caller's thread, where a reward's own signal handler works."""
    fn = Batched(hangs_on_b, batch_size=2, timeout_s=0.5)
    start = time.monotonic()
    CALLS.clear()
    res = score_rows(fn, ["p"] * 6, ["a", "aa", "b", "bb", "boom", "c"])  # a call past its limit, one raising
    assert time.monotonic() - start < 5 and res.num_failed == 3
    assert res.errors[2] == res.errors[3] == "RewardTimeout: the reward function did not return within 0.5 s"
    assert res.errors[4] == "RuntimeError: exploded" and res.scores[[0, 1, 5]].tolist() == [1.0, 2.0, 1.0]
    assert CALLS == [["a", "aa"], ["b", "bb"], ["boom", "c"], ["boom"], ["c"]]  # the timed-out rows once
    assert (
        score_rows(build_reward(RewardConfig(fn="tests.test_rewards:signal_reward")), ["p"], ["a"]).num_failed
        == 0
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\n")
    argv = ["score", "--input", str(rows), "--output", str(tmp_path / "out.jsonl"), "--call-timeout-s", "0.5",
            "--reward", "tests.test_rewards:never_returning_reward"]  # fmt: skip
    assert cli.main(argv) == 1 and "scored 0/2 completions" in capsys.readouterr().out


def test_processes_agree_on_the_fields_the_reward_takes():
    """Each process scores its share of the samples with its own rows' fields: hosts whose `answer` differs
    gave different scores for one prompt, silently. The pool's digest holds the fields the reward takes; not
    the others, nor objects by address."""
    from copg_jax.prompt_pool import PromptPool

    def pool(rows, reward):
        ids = [np.asarray([1, 2], np.int32)] * len(rows)
        return PromptPool(rows, ids, Batched(reward, 4), row_fields(rows), "prompts", ("tests",))

    rows = [{"prompt": "17 * 3", "answer": "51", "source": "a", "image": object()}]
    same = pool(rows, answer_reward).digest()
    assert pool([{**rows[0], "source": "b", "image": object()}], answer_reward).digest() == same
    assert pool([{**rows[0], "answer": "52"}], answer_reward).digest() != same
    assert pool([{**rows[0], "answer": "52"}], length_reward).digest() == pool(rows, length_reward).digest()
    assert (
        pool([{**rows[0], "source": "b"}], every_field_reward).digest()
        != pool(rows, every_field_reward).digest()
    )


def test_a_resume_and_the_processes_compare_every_key_code_tests_read():
    """An online run's prompt pool is compared between processes and at a resume by a digest: it held the
    prompts and the first tests field only, so LiveCodeBench's `metadata` (the function its tests call) or
    a second tests field, edited in place, went unnoticed. Keys no row has leave the digest as it was."""
    from copg_jax.prompt_pool import PromptPool

    def digest(rows, keys):
        ids = [np.asarray([1, 2], np.int32)] * len(rows)
        return PromptPool(rows, ids, Batched(length_reward, 4), row_fields(rows), "prompts", keys).digest()

    cfg = RewardConfig(code_tests=True, tests_field=["public_test_cases", "private_test_cases"])
    keys = cfg.row_keys()
    assert keys == ("public_test_cases", "private_test_cases", "metadata")
    meta = '{"func_name": "f"}'
    row = {"prompt": "p", "public_test_cases": "[]", "private_test_cases": "x", "metadata": meta}
    same = digest([row], keys)
    for key in keys:
        assert digest([{**row, key: "edited"}], keys) != same, key
    assert digest([{**row, "other": 1}], keys) == same
    plain = {"prompt": "p", "tests": ["assert f() == 1"]}
    assert RewardConfig(code_tests=True).row_keys() == ("tests", "metadata")
    assert digest([plain], ("tests", "metadata")) == digest([plain], ("tests",))


def slow_generator_reward(prompts, completions):
    """Scores yielded one by one, each after a wait: the reading of them is the reward's own time."""
    for c in completions:
        time.sleep(0.6)
        yield float(len(c))


def endless_reward(prompts, completions):
    while True:
        yield 1.0


def huge_int_reward(prompts, completions):
    """An exact big-int score (10**5000: its text is past Python's 4300-digit limit) beside fine ones."""
    return [10**5000 if c == "big" else 1.0 for c in completions]


async def cancelled_reward(prompts, completions):
    """A coroutine whose own task is cancelled (a judge call given up by asyncio.wait_for or gather)."""
    task = asyncio.ensure_future(asyncio.sleep(10))
    task.cancel()
    await task


class _Scorer:
    def __call__(self, prompts, completions):
        return [0.0] * len(completions)


scorer = _Scorer()


def test_misbehaving_rewards_fail_their_rows_never_the_run():
    """A generator is read within the call's time limit (it was read after it, on the caller's thread, past
    any limit), and an endless one no further than one score too many; an int too long to write out, or an
    async reward whose own task was cancelled, fail their rows (both crashed the whole batch)."""
    fn = Batched(slow_generator_reward, batch_size=2, timeout_s=0.5)
    start = time.monotonic()
    res = score_rows(fn, ["p"] * 2, ["a", "bb"])
    assert time.monotonic() - start < 1.1 and res.num_failed == 2
    assert res.errors[0] == "RewardTimeout: the reward function did not return within 0.5 s"
    res = score_rows(Batched(endless_reward, batch_size=3), ["p"] * 3, ["a", "b", "c"])
    assert res.errors[0] == "ValueError: reward function returned more than 1 scores for 1 rows"
    res = score_rows(Batched(huge_int_reward, batch_size=2), ["p"] * 2, ["big", "ok"])
    assert res.errors[0].startswith("reward an int of 16610 bits is beyond ±1e12") and res.scores[1] == 1.0
    res = score_rows(Batched(cancelled_reward, batch_size=2), ["p"] * 2, ["a", "b"])
    assert res.errors == ["RuntimeError: the reward's coroutine was cancelled"] * 2
    with pytest.raises(ValueError, match=r"'tests.test_rewards.scorer' has no attribute 'missing'"):
        load_python_reward("tests.test_rewards:scorer.missing")


def test_scores_gathered_across_processes_stay_float64():
    """JAX's all-gather without 64-bit mode rounds float64 to float32: 123456789 arrived as 123456792."""
    from copg_jax.rewards.base import gather_float64

    x = np.array([123456789.0, 0.1, 2.0**53 + 2, -1e12, np.nan])
    np.testing.assert_array_equal(gather_float64(x), x)
    assert gather_float64(x).dtype == np.float64


@pytest.mark.parametrize(("key", "value"), [("batch_size", 0), ("max_length", 1), ("max_length", -3)])
def test_reward_batch_size_and_max_length_are_checked(key, value):
    with pytest.raises(ValueError, match=rf"reward.{key}={value} must be >= "):
        RewardConfig(model="rm", **{key: value})


def test_livecodebench_functional_and_compressed_private_tests():
    """LiveCodeBench's functional tests (LeetCode problems) call the method its `metadata` names, each input
    line one JSON argument, judged as its checker judges them (a returned tuple is a list, nothing more
    lenient); its private_test_cases are base64 of zlib of a pickled JSON text, read without running what a
    pickle could name; DeepCoder's rows name the function in each test's own metadata."""
    import base64
    import pickle
    import zlib

    from copg_jax.rewards.code_tests import CallTest, parse_test, row_test_specs

    public = [{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"}]
    bools = [{"input": "0", "output": "false", "testtype": "functional"}]  # == as its checker: 0 == False
    private = [{"input": "[3, 3]\n6", "output": "[0, 1]", "testtype": "functional"}]
    packed = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(private)))).decode()
    meta = json.dumps({"func_name": "twoSum"})
    specs = row_test_specs(json.dumps(public), "twoSum")
    assert [parse_test(s) for s in specs] == [
        CallTest((("twoSum", ([2, 7, 11, 15], 9), {}),), ([0, 1],), 0, False, True)
    ]
    assert row_test_specs(packed, "twoSum")[0]["args"] == [[3, 3], 6]
    deepcoder = [{**public[0], "metadata": {"func_name": "twoSum"}}]
    assert row_test_specs(deepcoder) == specs
    for crafted in (CallTest((), ()), {1: ()}, ["x", "y"]):  # a class it would call, data it would build
        packed_crafted = base64.b64encode(zlib.compress(pickle.dumps(crafted))).decode()
        with pytest.raises(ValueError, match=r"the pickle holds (a \w+|2 strings).*only a pickled string"):
            row_test_specs(packed_crafted)
    solution = (
        "```python\nclass Solution:\n    def twoSum(self, nums, target):\n"
        "        seen = {}\n        for i, x in enumerate(nums):\n"
        "            if target - x in seen:\n                return RET\n            seen[x] = i\n```"
    )
    rows = [
        {"prompt": "p", "public_test_cases": json.dumps(public), "metadata": meta},
        {"prompt": "q", "private_test_cases": packed, "metadata": meta},
    ]
    cfg = dict(code_tests=True, sandbox="none", timeout_s=10.0)
    public_reward = build_reward(RewardConfig(**cfg, tests_field="public_test_cases"), rows[:1])
    private_reward = build_reward(RewardConfig(**cfg, tests_field="private_test_cases"), rows[1:])
    answers = [solution.replace("RET", r) for r in ("(seen[target - x], i)", "[seen[target - x], i]", "[i]")]
    assert score_rows(public_reward, ["p"] * 3, answers).scores.tolist() == [1.0, 1.0, 0.0]
    assert score_rows(private_reward, ["q"] * 3, answers).scores.tolist() == [1.0, 1.0, 0.0]
    truthy = build_reward(
        RewardConfig(**cfg, tests_field="t"), [{"prompt": "b", "t": bools, "metadata": meta}]
    )
    zero = "class Solution:\n    def twoSum(self, n):\n        return n and n & (n - 1) == 0"
    assert score_rows(truthy, ["b"], [zero]).scores.tolist() == [1.0]
    with pytest.raises(ValueError, match="row 0: public_test_cases: a LiveCodeBench functional test needs"):
        build_reward(RewardConfig(**cfg, tests_field="public_test_cases"), [{**rows[0], "metadata": "{}"}])


def test_public_and_private_tests_are_read_together(tmp_path):
    """LiveCodeBench is judged on its public and private tests together: `reward.tests_field` (`copg score
    --tests-field`) takes a list of keys, each on every row, the reward being the pass rate over all their
    tests."""
    import base64
    import pickle
    import zlib

    public = [{"input": "[2, 7, 11, 15]\n9", "output": "[0, 1]", "testtype": "functional"}]
    private = [{"input": "[3, 2, 4]\n6", "output": "[1, 2]", "testtype": "functional"}]
    row = {
        "prompt": "p",
        "public_test_cases": json.dumps(public),
        "private_test_cases": base64.b64encode(zlib.compress(pickle.dumps(json.dumps(private)))).decode(),
        "metadata": json.dumps({"func_name": "twoSum"}),
    }
    solution = (
        "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
        "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
        "                return [seen[target - x], i]\n            seen[x] = i\n"
    )
    constant = "class Solution:\n    def twoSum(self, nums, target):\n        return [0, 1]\n"
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({**row, "completions": [solution, constant]}) + "\n")
    out = tmp_path / "scored.jsonl"
    argv = ["--input", str(data), "--output", str(out), "--code-tests", "--sandbox", "none",
            "--tests-field", "public_test_cases", "private_test_cases"]  # fmt: skip
    assert score_main(argv) == 0
    assert json.loads(out.read_text())["rewards"] == [1.0, 0.5]
    fields = ["public_test_cases", "private_test_cases"]
    cfg = dict(code_tests=True, sandbox="none", tests_field=fields)
    with pytest.raises(ValueError, match="row 0: code tests need 'private_test_cases' = a list of tests"):
        build_reward(RewardConfig(**cfg), [{k: v for k, v in row.items() if k != "private_test_cases"}])
    with pytest.raises(ValueError, match="row 0: code tests need at least one test in public_test_cases / "):
        build_reward(RewardConfig(**cfg), [{**row, "public_test_cases": "[]", "private_test_cases": "[]"}])
    for wrong in ([], ["tests", "tests"], ["tests", ""]):
        with pytest.raises(ValueError, match="reward.tests_field=.*a row key, or a list of distinct ones"):
            RewardConfig(code_tests=True, tests_field=wrong)
